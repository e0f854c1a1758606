//! Audits and reputation: the pure rules. The coordinator keeps one
//! [`Standing`] per node and moves it with each audit's outcome, each
//! measured transfer and the node's presence; these functions say how.
//!
//! ```text
//! audit:   right answer  -> audit   +1 (weight audit_weight)          timeout +1
//!          wrong / none  -> audit   -1 (weight audit_failure_weight)  timeout +1
//!          no answer     ->                                           timeout -1
//!          offline       -> (no challenge sent; the uptime track counts it)
//! uptime:  every uptime_sample_ms online +1, offline -1 (closed form over the
//!          presence log, so the score is an exponentially weighted online fraction)
//! speed:   max(new measurement, old one halved every speed_half_life_ms)
//! exclude: audit score < audit_min        (kept: the node is out for good)
//! hold back: timeout < timeout_min, uptime < uptime_min, speed < min_speed_bps
//! ```
//!
//! Pure: the time is passed in, and nothing here reads the books.

use pluto_plugins_api::{Beta, NodeId, Standing};
use pluto_protocol::{delete_message, proof, AuditOutcome, ProofAnswer};

use super::pending::PendingAudit;
use crate::CoordinatorConfig;

/// The outcome of `storer`'s answer to audit `p` at `now_ms`: checked
/// against the root both ends signed, so neither a lying owner nor a
/// lying storer decides it. Too late counts as no answer.
pub(crate) fn judge(
    p: &PendingAudit,
    storer: &NodeId,
    answer: ProofAnswer,
    now_ms: u64,
) -> AuditOutcome {
    if now_ms > p.deadline_ms {
        return AuditOutcome::TimedOut;
    }
    match answer {
        ProofAnswer::Held(bytes) => match proof::verify(&p.root, p.size, p.offset, p.len, &bytes) {
            Ok(_) => AuditOutcome::Proven,
            Err(e) => {
                tracing::warn!(
                    "storer {} failed an audit of {}'s pack {}: {e}",
                    storer.short(),
                    p.owner.short(),
                    p.pack.short()
                );
                AuditOutcome::Failed
            }
        },
        ProofAnswer::NotHeld => AuditOutcome::Failed,
        // Deleted at the owner's own signed request: nothing held against
        // it; but only a request signed after this placement was recorded
        // (the same pack placed again on the same storer has the same
        // root, and an old delete must not release the new placement).
        ProofAnswer::Deleted { at_ms, signature } => {
            let asked = delete_message(storer, &p.root, at_ms);
            if at_ms >= p.deletes_from_ms && pluto_protocol::verify(&p.owner, &asked, &signature) {
                AuditOutcome::Released
            } else {
                AuditOutcome::Failed
            }
        }
    }
}

/// Moves `st` by one audit's outcome at `now_ms`; true when this audit
/// excluded the node.
pub(crate) fn on_audit(
    st: &mut Standing,
    outcome: AuditOutcome,
    c: &CoordinatorConfig,
    now_ms: u64,
) -> bool {
    match outcome {
        AuditOutcome::Proven => {
            st.audit.observe(c.audit_lambda, c.audit_weight, 1.0);
            st.timeout.observe(c.timeout_lambda, 1.0, 1.0);
            st.passed += 1;
        }
        AuditOutcome::Failed => {
            st.audit
                .observe(c.audit_lambda, c.audit_failure_weight, -1.0);
            st.timeout.observe(c.timeout_lambda, 1.0, 1.0);
            st.failed += 1;
        }
        AuditOutcome::TimedOut => {
            st.timeout.observe(c.timeout_lambda, 1.0, -1.0);
            st.timed_out += 1;
        }
        _ => return false,
    }
    if st.excluded_ms == 0 && st.audit.score() < c.audit_min {
        st.excluded_ms = now_ms.max(1);
        return true;
    }
    false
}

/// A node's measured speed, halved every `half_life_ms` since it was
/// measured.
pub fn decayed_speed(st: &Standing, half_life_ms: u64, now_ms: u64) -> u64 {
    if st.speed_bps == 0 || half_life_ms == 0 {
        return st.speed_bps;
    }
    let age = now_ms.saturating_sub(st.speed_at_ms) as f64 / half_life_ms as f64;
    (st.speed_bps as f64 * 0.5f64.powf(age)) as u64
}

/// Takes a measured transfer speed: the best of it and the old one decayed,
/// so that no owner, however it measures, can push a storer's speed down
/// faster than time does.
pub(crate) fn on_speed(st: &mut Standing, bps: u64, half_life_ms: u64, now_ms: u64) {
    let old = decayed_speed(st, half_life_ms, now_ms);
    if bps >= old {
        st.speed_bps = bps;
        st.speed_at_ms = now_ms;
    }
}

/// The uptime track from a presence log (changes in time order, the first
/// possibly before `from_ms`) over `from_ms..now_ms`: one observation per
/// `sample_ms`, +1 online and -1 offline, from the prior.
pub(crate) fn uptime_track(
    log: &[(u64, bool)],
    from_ms: u64,
    now_ms: u64,
    c: &CoordinatorConfig,
) -> Beta {
    let mut b = Beta::default();
    // A window that ends before it starts (a clock that stepped back) is
    // an empty one.
    let from_ms = from_ms.min(now_ms);
    let sample = c.uptime_sample_ms.max(1) as f64;
    let mut state = false;
    let mut since = from_ms;
    let advance = |b: &mut Beta, state: bool, ms: u64| {
        let v = if state { 1.0 } else { -1.0 };
        b.observe_many(c.uptime_lambda, 1.0, v, ms as f64 / sample);
    };
    for &(at, online) in log {
        let at = at.clamp(from_ms, now_ms);
        if at > since {
            advance(&mut b, state, at - since);
            since = at;
        }
        state = online;
    }
    if now_ms > since {
        advance(&mut b, state, now_ms - since);
    }
    b
}

/// Whether a node should get no new data for now (it is not excluded for
/// that; it recovers when its figures do).
pub(crate) fn held_back(st: &Standing, c: &CoordinatorConfig, now_ms: u64) -> bool {
    st.timeout.score() < c.timeout_min
        || st.uptime.score() < c.uptime_min
        || (st.speed_bps > 0 && decayed_speed(st, c.speed_half_life_ms, now_ms) < c.min_speed_bps)
}

/// Whether a node still being vetted (fewer than `vetting_audits` passed)
/// may take `size` more bytes: while vetted it holds at most `vetting_bytes`.
pub(crate) fn vetted_room(st: &Standing, held: u64, size: u64, c: &CoordinatorConfig) -> bool {
    st.passed >= c.vetting_audits || held.saturating_add(size) <= c.vetting_bytes
}

/// A score in thousandths.
pub(crate) fn permille(b: &Beta) -> u16 {
    (b.score() * 1000.0).round().clamp(0.0, 1000.0) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CoordinatorConfig {
        CoordinatorConfig::default()
    }

    #[test]
    fn one_loss_costs_a_clean_record_its_margin_and_two_exclude() {
        let c = cfg();
        let mut st = Standing::default();
        for _ in 0..1000 {
            assert!(!on_audit(&mut st, AuditOutcome::Proven, &c, 5));
        }
        assert!(st.audit.score() > 0.999);
        assert!(!on_audit(&mut st, AuditOutcome::Failed, &c, 6));
        assert!(st.audit.score() < 0.95 && st.audit.score() > c.audit_min);
        for _ in 0..10 {
            on_audit(&mut st, AuditOutcome::Proven, &c, 7);
        }
        assert!(
            on_audit(&mut st, AuditOutcome::Failed, &c, 8),
            "a second loss soon after"
        );
        assert_eq!(st.excluded_ms, 8);
        // It stays out whatever comes next.
        for _ in 0..1000 {
            on_audit(&mut st, AuditOutcome::Proven, &c, 9);
        }
        assert_eq!(st.excluded_ms, 8);
        assert_eq!((st.passed, st.failed), (2010, 2));
    }

    #[test]
    fn a_new_node_that_loses_data_is_out_at_once() {
        let c = cfg();
        let mut st = Standing::default();
        on_audit(&mut st, AuditOutcome::Proven, &c, 1);
        assert!(on_audit(&mut st, AuditOutcome::Failed, &c, 2));
    }

    #[test]
    fn timeouts_move_only_the_timeout_track() {
        let c = cfg();
        let mut st = Standing::default();
        for _ in 0..100 {
            on_audit(&mut st, AuditOutcome::TimedOut, &c, 1);
            on_audit(&mut st, AuditOutcome::Offline, &c, 1);
        }
        assert_eq!(st.audit, Beta::default());
        assert_eq!(st.excluded_ms, 0);
        assert!(st.timeout.score() < 0.05);
        assert!(held_back(&st, &c, 1));
        assert_eq!(st.timed_out, 100);
    }

    #[test]
    fn uptime_is_a_weighted_online_fraction() {
        let c = cfg();
        let h = c.uptime_sample_ms;
        // Always online: the prior and nothing but successes.
        assert!(uptime_track(&[(0, true)], 0, 100 * h, &c).score() > 0.999);
        // Never seen online.
        assert!(uptime_track(&[], 0, 100 * h, &c).score() < 0.01);
        // Online the first half, offline the second: recent time weighs more.
        let half = uptime_track(&[(0, true), (50 * h, false)], 0, 100 * h, &c).score();
        assert!(half < 0.5 && half > 0.2, "{half}");
        // Alternating hours come out near one half.
        let log: Vec<(u64, bool)> = (0..200).map(|i| (i * h, i % 2 == 0)).collect();
        let alt = uptime_track(&log, 0, 200 * h, &c).score();
        assert!((alt - 0.5).abs() < 0.05, "{alt}");
    }

    #[test]
    fn a_window_that_ends_before_it_starts_is_empty() {
        let c = cfg();
        let log = [(1_000, true), (5_000, false)];
        assert_eq!(uptime_track(&log, 10_000, 2_000, &c), Beta::default());
    }

    #[test]
    fn speed_decays_and_cannot_be_talked_down() {
        let c = cfg();
        let mut st = Standing::default();
        on_speed(&mut st, 10_000_000, c.speed_half_life_ms, 0);
        for _ in 0..100 {
            on_speed(&mut st, 1, c.speed_half_life_ms, 10);
        }
        assert_eq!(st.speed_bps, 10_000_000);
        let later = decayed_speed(&st, c.speed_half_life_ms, c.speed_half_life_ms);
        assert_eq!(later, 5_000_000);
    }

    #[test]
    fn vetting_limits_new_nodes() {
        let c = cfg();
        let mut st = Standing::default();
        assert!(vetted_room(&st, 0, c.vetting_bytes, &c));
        assert!(!vetted_room(&st, 1, c.vetting_bytes, &c));
        st.passed = c.vetting_audits;
        assert!(vetted_room(&st, u64::MAX / 2, c.vetting_bytes, &c));
    }
}
