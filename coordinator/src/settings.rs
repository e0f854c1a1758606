//! The coordinator's settings, and the rules they must keep.
//!
//! Every interval is a setting so tests can run on a short clock, and
//! `pluto-coordinator --config FILE` reads them from TOML under these
//! names. [`CoordinatorConfig::validate`] is called when the file is read,
//! so a setting that makes no sense stops the coordinator at start with
//! one line naming it, instead of a panic inside a task later:
//!
//! ```text
//! durations        above 0 and at most ten years (now + any of them never overflows)
//! counts, rates    above 0 (0 would refuse everything, for ever)
//! scores           thresholds within 0..=1; forgetting factors within (0, 1]; weights above 0
//! ticks            no longer than the interval they serve
//!                  (audit_tick_ms <= storer_audit_every_ms, sweep_ms <= 3 x heartbeat_ms)
//! deadlines        no longer than the interval they belong to
//!                  (proof_deadline_ms <= audit_every_ms)
//! windows          the presence log is kept for the uptime window (presence_keep_ms >=
//!                  uptime_window_ms), and a sample fits in it (uptime_sample_ms <= uptime_window_ms)
//! sizes            one envelope fits in the answer cache and in a relay burst; an audit
//!                  asks for no more than a proof can hold
//! vetting          a node being vetted may hold something (or it could never be audited)
//! ```
//!
//! docs/design-notes.md gives the reason for each rule.

use pluto_protocol::{proof::MAX_RANGE, MAX_ENVELOPE};

/// The longest any duration setting may be: ten years, so that adding one
/// to a clock reading can never overflow (and any longer is a typo).
pub const MAX_DURATION_MS: u64 = 10 * 365 * 24 * 3_600_000;

/// Settings; every interval is a setting so tests can run on a short clock.
/// `pluto-coordinator --config FILE` reads them from TOML, under these names.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// How far a message's timestamp may be from the coordinator's clock.
    pub window_ms: u64,
    /// How many nonces the replay guard remembers at most.
    pub replay_capacity: usize,
    /// How many of them one sender may hold: no key can fill the guard.
    pub replay_per_sender: usize,
    /// How long a challenge may be answered.
    pub challenge_ttl_ms: u64,
    /// How many challenges may be outstanding.
    pub max_challenges: usize,
    /// How many of them one key may hold (its oldest gives way to its
    /// newest). Handshakes have a replay guard of their own, of four times
    /// `max_challenges` nonces, 512 per key (at most `max_challenges`).
    pub challenges_per_node: usize,
    /// How often nodes must send a heartbeat.
    pub heartbeat_ms: u64,
    /// Most replicas one request may ask for.
    pub max_copies: u8,
    /// How long matched space stays reserved for a replica to be recorded.
    pub reservation_ttl_ms: u64,
    /// Bytes every node may place on others before it holds anything for
    /// them; beyond it, a node may place as much as it is proven (by
    /// passed audits) to hold for others, never more than it offers
    /// (docs/design-notes.md, "Space is earned"). 0: only what it earned.
    pub grant_bytes: u64,
    /// Reservations one owner may have pending at once (matched, not yet
    /// recorded): a key cannot fill the books with tiny reservations.
    pub max_reservations: u64,
    /// Audits all owners together may ask of one storer per second, on
    /// average (its own schedule aside).
    pub storer_audits_per_s: u64,
    /// See `storer_audits_per_s`: how many may come at once.
    pub storer_audit_burst: u64,
    /// Match requests one owner may make per second, on average.
    pub matches_per_s: u64,
    /// See `matches_per_s`: how many may come at once.
    pub match_burst: u64,
    /// The window uptime is measured over.
    pub uptime_window_ms: u64,
    /// How long presence changes are kept.
    pub presence_keep_ms: u64,
    /// How often expired reservations are released and silent nodes marked
    /// offline.
    pub sweep_ms: u64,
    /// Bytes of answers kept to re-send when a node repeats a request
    /// whose answer it missed.
    pub answer_cache_bytes: usize,
    /// Bytes per second one node may send through the relay (payloads
    /// beyond it are dropped; the relay transport slows down and re-sends).
    pub relay_bytes_per_s: u64,
    /// Bytes one node may send through the relay in a burst.
    pub relay_burst_bytes: u64,
    /// How long a storer has to answer an audit.
    pub proof_deadline_ms: u64,
    /// Bytes one audit asks a storer to prove (rounded to 1 KiB chunks).
    pub audit_bytes: u64,
    /// Each replica is audited about once per this long...
    pub audit_every_ms: u64,
    /// ...and every storer at least once per this long.
    pub storer_audit_every_ms: u64,
    /// How often the scheduler looks for audits that are due, and for
    /// answers that are late.
    pub audit_tick_ms: u64,
    /// Most audits outstanding at once. Audits owners ask for may take
    /// half of them at most: the scheduled ones always find room.
    pub max_audits: usize,
    /// Most audits one owner's requests may have outstanding.
    pub audits_per_owner: usize,
    /// Most audits outstanding on one storer.
    pub audits_per_storer: usize,
    /// Audits one owner may ask for per second, and in a burst.
    pub owner_audits_per_s: u64,
    /// See `owner_audits_per_s`.
    pub owner_audit_burst: u64,
    /// Forgetting factor of the audit track, per audit.
    pub audit_lambda: f64,
    /// Weight of a right answer on the audit track.
    pub audit_weight: f64,
    /// Weight of a wrong answer (data lost) on the audit track.
    pub audit_failure_weight: f64,
    /// Below this audit score a node is excluded for good.
    pub audit_min: f64,
    /// Forgetting factor of the timeout track, per audit.
    pub timeout_lambda: f64,
    /// Below this timeout score a node gets no new data.
    pub timeout_min: f64,
    /// Forgetting factor of the uptime track, per sample.
    pub uptime_lambda: f64,
    /// How long one uptime sample lasts.
    pub uptime_sample_ms: u64,
    /// Below this uptime score a node gets no new data.
    pub uptime_min: f64,
    /// Below this measured speed (bytes per second) a node gets no new
    /// data; 0 turns the check off.
    pub min_speed_bps: u64,
    /// A measured speed halves in this long unless measured again.
    pub speed_half_life_ms: u64,
    /// Audits a new node must pass before it holds more than `vetting_bytes`
    /// (0: no vetting).
    pub vetting_audits: u64,
    /// What a node still being vetted may hold.
    pub vetting_bytes: u64,
    /// A storer offline this long has its replicas placed elsewhere.
    pub offline_grace_ms: u64,
    /// How often uptime tracks and hold-backs are worked out again.
    pub standing_every_ms: u64,
    /// Most messages [`crate::serve`] handles at once; beyond it, it reads
    /// the channel again only when one is done. Memory in flight is at most
    /// this many envelopes (4 MiB each at most).
    pub max_in_flight: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            window_ms: 120_000,
            replay_capacity: 1_000_000,
            replay_per_sender: 50_000,
            challenge_ttl_ms: 60_000,
            max_challenges: 100_000,
            challenges_per_node: 4,
            heartbeat_ms: 30_000,
            max_copies: 8,
            reservation_ttl_ms: 3_600_000,
            grant_bytes: 1 << 30,
            max_reservations: 4096,
            storer_audits_per_s: 50,
            storer_audit_burst: 1000,
            matches_per_s: 20,
            match_burst: 1000,
            uptime_window_ms: 7 * 24 * 3_600_000,
            presence_keep_ms: 30 * 24 * 3_600_000,
            sweep_ms: 15_000,
            answer_cache_bytes: 64 << 20,
            relay_bytes_per_s: 64 << 20,
            relay_burst_bytes: 16 << 20,
            proof_deadline_ms: 30_000,
            audit_bytes: 1024,
            audit_every_ms: 24 * 3_600_000,
            storer_audit_every_ms: 3_600_000,
            audit_tick_ms: 5_000,
            max_audits: 100_000,
            audits_per_owner: 1_000,
            audits_per_storer: 64,
            owner_audits_per_s: 100,
            owner_audit_burst: 10_000,
            audit_lambda: 0.99,
            audit_weight: 1.0,
            audit_failure_weight: 10.0,
            audit_min: 0.9,
            timeout_lambda: 0.99,
            timeout_min: 0.6,
            uptime_lambda: 0.99,
            uptime_sample_ms: 3_600_000,
            uptime_min: 0.5,
            min_speed_bps: 64 << 10,
            speed_half_life_ms: 7 * 24 * 3_600_000,
            vetting_audits: 10,
            vetting_bytes: 1 << 30,
            offline_grace_ms: 3 * 24 * 3_600_000,
            standing_every_ms: 60_000,
            max_in_flight: 256,
        }
    }
}

/// A setting that breaks a rule (see the module documentation). Each names
/// the setting and says what is wrong, in one line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// A duration, count or rate of 0.
    #[error("{setting} must be above 0")]
    Zero {
        /// The setting.
        setting: &'static str,
    },
    /// A duration beyond [`MAX_DURATION_MS`].
    #[error("{setting} = {value} ms is longer than ten years ({MAX_DURATION_MS} ms)")]
    TooLong {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: u64,
    },
    /// A threshold outside 0..=1.
    #[error("{setting} = {value} must be a score from 0 to 1")]
    NotAScore {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: f64,
    },
    /// A forgetting factor outside (0, 1].
    #[error("{setting} = {value} must be above 0 and at most 1 (1 forgets nothing)")]
    NotAFactor {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: f64,
    },
    /// A weight that is not a number above 0.
    #[error("{setting} = {value} must be a number above 0")]
    NotAWeight {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: f64,
    },
    /// Below a fixed minimum.
    #[error("{setting} = {value} must be at least {min}: {why}")]
    BelowMinimum {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: u64,
        /// The least it may be.
        min: u64,
        /// Why.
        why: &'static str,
    },
    /// Above a fixed maximum.
    #[error("{setting} = {value} must be at most {max}: {why}")]
    AboveMaximum {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: u64,
        /// The most it may be.
        max: u64,
        /// Why.
        why: &'static str,
    },
    /// Longer than another setting allows.
    #[error("{setting} = {value} must not be above {other} = {limit}: {why}")]
    AboveOther {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: u64,
        /// The setting that bounds it.
        other: &'static str,
        /// That setting's value (or the bound derived from it).
        limit: u64,
        /// Why.
        why: &'static str,
    },
    /// Shorter than another setting needs.
    #[error("{setting} = {value} must not be below {other} = {limit}: {why}")]
    BelowOther {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: u64,
        /// The setting that bounds it.
        other: &'static str,
        /// That setting's value.
        limit: u64,
        /// Why.
        why: &'static str,
    },
}

impl SettingsError {
    /// The setting at fault.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::Zero { setting }
            | Self::TooLong { setting, .. }
            | Self::NotAScore { setting, .. }
            | Self::NotAFactor { setting, .. }
            | Self::NotAWeight { setting, .. }
            | Self::BelowMinimum { setting, .. }
            | Self::AboveMaximum { setting, .. }
            | Self::AboveOther { setting, .. }
            | Self::BelowOther { setting, .. } => setting,
        }
    }
}

fn duration(setting: &'static str, value: u64) -> Result<(), SettingsError> {
    match value {
        0 => Err(SettingsError::Zero { setting }),
        v if v > MAX_DURATION_MS => Err(SettingsError::TooLong { setting, value }),
        _ => Ok(()),
    }
}

fn nonzero(setting: &'static str, value: u64) -> Result<(), SettingsError> {
    if value == 0 {
        return Err(SettingsError::Zero { setting });
    }
    Ok(())
}

fn score(setting: &'static str, value: f64) -> Result<(), SettingsError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(SettingsError::NotAScore { setting, value });
    }
    Ok(())
}

fn factor(setting: &'static str, value: f64) -> Result<(), SettingsError> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(SettingsError::NotAFactor { setting, value });
    }
    Ok(())
}

fn weight(setting: &'static str, value: f64) -> Result<(), SettingsError> {
    if !(value > 0.0 && value.is_finite()) {
        return Err(SettingsError::NotAWeight { setting, value });
    }
    Ok(())
}

/// `setting` (`value`) must not exceed `other` (`limit`).
fn at_most(
    (setting, value): (&'static str, u64),
    (other, limit): (&'static str, u64),
    why: &'static str,
) -> Result<(), SettingsError> {
    if value > limit {
        return Err(SettingsError::AboveOther {
            setting,
            value,
            other,
            limit,
            why,
        });
    }
    Ok(())
}

impl CoordinatorConfig {
    /// Checks every setting, alone and against the others it works with;
    /// the first that breaks a rule is the error.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let c = self;
        let envelope = MAX_ENVELOPE as u64;
        for (setting, value) in [
            ("window_ms", c.window_ms),
            ("challenge_ttl_ms", c.challenge_ttl_ms),
            ("heartbeat_ms", c.heartbeat_ms),
            ("reservation_ttl_ms", c.reservation_ttl_ms),
            ("uptime_window_ms", c.uptime_window_ms),
            ("presence_keep_ms", c.presence_keep_ms),
            ("sweep_ms", c.sweep_ms),
            ("proof_deadline_ms", c.proof_deadline_ms),
            ("audit_every_ms", c.audit_every_ms),
            ("storer_audit_every_ms", c.storer_audit_every_ms),
            ("audit_tick_ms", c.audit_tick_ms),
            ("uptime_sample_ms", c.uptime_sample_ms),
            ("speed_half_life_ms", c.speed_half_life_ms),
            ("offline_grace_ms", c.offline_grace_ms),
            ("standing_every_ms", c.standing_every_ms),
        ] {
            duration(setting, value)?;
        }
        for (setting, value) in [
            ("replay_capacity", c.replay_capacity as u64),
            ("replay_per_sender", c.replay_per_sender as u64),
            ("max_challenges", c.max_challenges as u64),
            ("challenges_per_node", c.challenges_per_node as u64),
            ("max_copies", u64::from(c.max_copies)),
            ("relay_bytes_per_s", c.relay_bytes_per_s),
            ("audit_bytes", c.audit_bytes),
            ("max_audits", c.max_audits as u64),
            ("audits_per_owner", c.audits_per_owner as u64),
            ("audits_per_storer", c.audits_per_storer as u64),
            ("owner_audits_per_s", c.owner_audits_per_s),
            ("max_reservations", c.max_reservations),
            ("storer_audits_per_s", c.storer_audits_per_s),
            ("storer_audit_burst", c.storer_audit_burst),
            ("matches_per_s", c.matches_per_s),
            ("match_burst", c.match_burst),
            ("owner_audit_burst", c.owner_audit_burst),
            ("max_in_flight", c.max_in_flight as u64),
        ] {
            nonzero(setting, value)?;
        }
        for (setting, value) in [
            ("answer_cache_bytes", c.answer_cache_bytes as u64),
            ("relay_burst_bytes", c.relay_burst_bytes),
        ] {
            if value < envelope {
                return Err(SettingsError::BelowMinimum {
                    setting,
                    value,
                    min: envelope,
                    why: "one message of the largest size must fit",
                });
            }
        }
        if c.audit_bytes > MAX_RANGE {
            return Err(SettingsError::AboveMaximum {
                setting: "audit_bytes",
                value: c.audit_bytes,
                max: MAX_RANGE,
                why: "the most one proof covers",
            });
        }
        for (setting, value) in [
            ("audit_lambda", c.audit_lambda),
            ("timeout_lambda", c.timeout_lambda),
            ("uptime_lambda", c.uptime_lambda),
        ] {
            factor(setting, value)?;
        }
        weight("audit_weight", c.audit_weight)?;
        weight("audit_failure_weight", c.audit_failure_weight)?;
        for (setting, value) in [
            ("audit_min", c.audit_min),
            ("timeout_min", c.timeout_min),
            ("uptime_min", c.uptime_min),
        ] {
            score(setting, value)?;
        }
        at_most(
            ("audit_tick_ms", c.audit_tick_ms),
            ("storer_audit_every_ms", c.storer_audit_every_ms),
            "the audit tick must come at least once per interval it keeps",
        )?;
        at_most(
            ("sweep_ms", c.sweep_ms),
            ("3 x heartbeat_ms", c.heartbeat_ms.saturating_mul(3)),
            "the sweep is what notices a node that missed three heartbeats",
        )?;
        at_most(
            ("proof_deadline_ms", c.proof_deadline_ms),
            ("audit_every_ms", c.audit_every_ms),
            "an audit must be settled before its replica is due again",
        )?;
        at_most(
            ("uptime_sample_ms", c.uptime_sample_ms),
            ("uptime_window_ms", c.uptime_window_ms),
            "uptime is sampled within its window",
        )?;
        if c.presence_keep_ms < c.uptime_window_ms {
            return Err(SettingsError::BelowOther {
                setting: "presence_keep_ms",
                value: c.presence_keep_ms,
                other: "uptime_window_ms",
                limit: c.uptime_window_ms,
                why: "uptime is worked out from the presence kept over that window",
            });
        }
        if c.vetting_audits > 0 && c.vetting_bytes == 0 {
            return Err(SettingsError::BelowMinimum {
                setting: "vetting_bytes",
                value: 0,
                min: 1,
                why: "a node being vetted must hold something to be audited (or set vetting_audits = 0)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(change: impl FnOnce(&mut CoordinatorConfig)) -> Result<(), SettingsError> {
        let mut c = CoordinatorConfig::default();
        change(&mut c);
        c.validate()
    }

    fn fails_on(setting: &str, change: impl FnOnce(&mut CoordinatorConfig)) {
        match check(change) {
            Err(e) => {
                assert_eq!(e.setting(), setting, "{e}");
                assert!(e.to_string().starts_with(setting), "{e}");
                assert!(!e.to_string().contains('\n'), "{e}");
            }
            Ok(()) => panic!("{setting}: accepted"),
        }
    }

    #[test]
    fn the_defaults_keep_every_rule() {
        assert_eq!(CoordinatorConfig::default().validate(), Ok(()));
    }

    #[test]
    fn every_duration_is_above_zero_and_below_ten_years() {
        fails_on("window_ms", |c| c.window_ms = 0);
        fails_on("heartbeat_ms", |c| c.heartbeat_ms = 0);
        fails_on("sweep_ms", |c| c.sweep_ms = 0);
        fails_on("audit_tick_ms", |c| c.audit_tick_ms = 0);
        fails_on("standing_every_ms", |c| c.standing_every_ms = 0);
        fails_on("presence_keep_ms", |c| c.presence_keep_ms = u64::MAX);
        fails_on("offline_grace_ms", |c| {
            c.offline_grace_ms = MAX_DURATION_MS + 1
        });
        assert_eq!(
            check(|c| {
                c.presence_keep_ms = MAX_DURATION_MS;
                c.offline_grace_ms = MAX_DURATION_MS;
            }),
            Ok(())
        );
    }

    #[test]
    fn counts_and_sizes() {
        fails_on("max_copies", |c| c.max_copies = 0);
        fails_on("max_in_flight", |c| c.max_in_flight = 0);
        fails_on("owner_audit_burst", |c| c.owner_audit_burst = 0);
        fails_on("audit_bytes", |c| c.audit_bytes = 0);
        fails_on("audit_bytes", |c| c.audit_bytes = MAX_RANGE + 1);
        fails_on("relay_burst_bytes", |c| c.relay_burst_bytes = 1000);
        fails_on("answer_cache_bytes", |c| c.answer_cache_bytes = 0);
        fails_on("vetting_bytes", |c| c.vetting_bytes = 0);
        assert_eq!(
            check(|c| {
                c.vetting_bytes = 0;
                c.vetting_audits = 0;
                c.min_speed_bps = 0;
            }),
            Ok(()),
            "no vetting, no speed floor"
        );
    }

    #[test]
    fn scores_factors_and_weights() {
        fails_on("audit_min", |c| c.audit_min = 1.5);
        fails_on("uptime_min", |c| c.uptime_min = -0.1);
        fails_on("timeout_min", |c| c.timeout_min = f64::NAN);
        fails_on("audit_lambda", |c| c.audit_lambda = 0.0);
        fails_on("uptime_lambda", |c| c.uptime_lambda = 1.01);
        fails_on("audit_weight", |c| c.audit_weight = 0.0);
        fails_on("audit_failure_weight", |c| {
            c.audit_failure_weight = f64::INFINITY
        });
        assert_eq!(
            check(|c| {
                c.audit_min = 0.0;
                c.uptime_min = 1.0;
                c.timeout_lambda = 1.0;
            }),
            Ok(())
        );
    }

    #[test]
    fn ticks_and_deadlines_fit_their_intervals() {
        fails_on("audit_tick_ms", |c| {
            c.audit_tick_ms = 10_000;
            c.storer_audit_every_ms = 5_000;
        });
        fails_on("sweep_ms", |c| {
            c.heartbeat_ms = 1_000;
            c.sweep_ms = 3_001;
        });
        fails_on("proof_deadline_ms", |c| {
            c.proof_deadline_ms = 60_000;
            c.audit_every_ms = 30_000;
        });
        fails_on("uptime_sample_ms", |c| {
            c.uptime_sample_ms = c.uptime_window_ms + 1
        });
        fails_on("presence_keep_ms", |c| {
            c.presence_keep_ms = c.uptime_window_ms - 1
        });
        // The short clocks the tests run on are valid.
        assert_eq!(
            check(|c| {
                c.heartbeat_ms = 1_000;
                c.sweep_ms = 500;
                c.audit_tick_ms = 100;
                c.storer_audit_every_ms = 500;
                c.audit_every_ms = 20_000;
                c.proof_deadline_ms = 5_000;
                c.standing_every_ms = 1_000;
            }),
            Ok(())
        );
    }
}
