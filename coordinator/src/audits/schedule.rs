//! The audit schedule: which storers to challenge at a tick. Pure: the
//! storers, the time and the randomness are passed in, so it is tested on
//! virtual time.
//!
//! ```text
//! interval(storer) = audit_every_ms / replicas held, within [audit_tick_ms, storer_audit_every_ms]
//! first seen:  next = now + random within one interval   (storers spread out, not all due at once)
//! each tick:   next <= now and online  -> challenge; next += interval
//!                                        (now + interval after a pause longer than one)
//!              next <= now and offline -> not challenged; stays due for its first tick online
//!              next > now + interval   -> next = now + interval (it holds more now, or the
//!                                         clock stepped back)
//! clock stepped back by S since the last tick -> every next -= S (the cadence carries on)
//! ```
//!
//! So each replica is audited about once per `audit_every_ms`, a storer in
//! proportion to what it holds, and every storer at least once per
//! `storer_audit_every_ms` of its time online. An offline storer's absence
//! is the uptime track's business; coming back does not skip its audit.

use std::collections::{HashMap, HashSet};

use pluto_plugins_api::NodeId;
use rand_core::RngCore;

use crate::CoordinatorConfig;

/// A storer as the schedule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StorerLoad {
    /// The storer.
    pub(crate) id: NodeId,
    /// Replicas it holds.
    pub(crate) replicas: u64,
    /// Whether it is online.
    pub(crate) online: bool,
}

/// When each storer is next due.
#[derive(Debug)]
pub(crate) struct AuditSchedule {
    tick_ms: u64,
    audit_every_ms: u64,
    storer_every_ms: u64,
    next: HashMap<NodeId, u64>,
    last_tick_ms: Option<u64>,
}

impl AuditSchedule {
    /// A schedule on these settings, with no storer seen yet.
    pub(crate) fn new(c: &CoordinatorConfig) -> Self {
        Self {
            tick_ms: c.audit_tick_ms,
            audit_every_ms: c.audit_every_ms,
            storer_every_ms: c.storer_audit_every_ms,
            next: HashMap::new(),
            last_tick_ms: None,
        }
    }

    /// How often a storer holding `replicas` is audited: each replica
    /// about once per `audit_every_ms`, no more often than the tick, no
    /// less than `storer_audit_every_ms` (which wins should the settings
    /// contradict each other), and never 0.
    pub(crate) fn interval(&self, replicas: u64) -> u64 {
        (self.audit_every_ms / replicas.max(1))
            .max(self.tick_ms)
            .min(self.storer_every_ms)
            .max(1)
    }

    /// The storers to challenge at `now_ms`, of `storers` (every storer
    /// that holds replicas; those no longer listed are forgotten).
    pub(crate) fn due(
        &mut self,
        storers: &[StorerLoad],
        now_ms: u64,
        rng: &mut (impl RngCore + ?Sized),
    ) -> Vec<NodeId> {
        if let Some(step) = self.last_tick_ms.and_then(|t| t.checked_sub(now_ms)) {
            for at in self.next.values_mut() {
                *at = at.saturating_sub(step);
            }
        }
        self.last_tick_ms = Some(now_ms);
        let listed: HashSet<NodeId> = storers.iter().map(|s| s.id).collect();
        self.next.retain(|id, _| listed.contains(id));
        let mut due = Vec::new();
        for s in storers {
            let every = self.interval(s.replicas);
            let latest = now_ms.saturating_add(every);
            let at = self
                .next
                .entry(s.id)
                .or_insert_with(|| now_ms.saturating_add(rng.next_u64() % every));
            *at = (*at).min(latest);
            if *at > now_ms || !s.online {
                continue;
            }
            // The cadence carries on from when it was due, not from this
            // tick; after a pause longer than an interval, from now.
            let then = at.saturating_add(every);
            *at = if then > now_ms { then } else { latest };
            due.push(s.id);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const T: u64 = 1_800_000_000_000;

    fn config() -> CoordinatorConfig {
        CoordinatorConfig {
            audit_tick_ms: 1_000,
            audit_every_ms: 100_000,
            storer_audit_every_ms: 10_000,
            ..CoordinatorConfig::default()
        }
    }

    fn storer(n: u8, replicas: u64) -> StorerLoad {
        StorerLoad {
            id: NodeId([n; 32]),
            replicas,
            online: true,
        }
    }

    /// Ticks every second over `seconds` from `start`; each storer's audit
    /// times. `online` says who is online at a time.
    fn run(
        s: &mut AuditSchedule,
        storers: &[StorerLoad],
        start: u64,
        seconds: u64,
        online: impl Fn(&StorerLoad, u64) -> bool,
        rng: &mut rand::rngs::StdRng,
    ) -> HashMap<NodeId, Vec<u64>> {
        let mut times: HashMap<NodeId, Vec<u64>> = HashMap::new();
        for i in 0..seconds {
            let now = start + i * 1000;
            let now_storers: Vec<StorerLoad> = storers
                .iter()
                .map(|st| StorerLoad {
                    online: online(st, now),
                    ..*st
                })
                .collect();
            for id in s.due(&now_storers, now, rng) {
                times.entry(id).or_default().push(now);
            }
        }
        times
    }

    fn always(_: &StorerLoad, _: u64) -> bool {
        true
    }

    /// The longest wait from `start` to the first audit, between audits,
    /// and from the last one to `end`.
    fn longest_gap(times: &[u64], start: u64, end: u64) -> u64 {
        let mut edges = vec![start];
        edges.extend_from_slice(times);
        edges.push(end);
        edges.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    #[test]
    fn a_storer_is_audited_in_proportion_to_what_it_holds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s = AuditSchedule::new(&config());
        // 1 and 5 replicas: the floor of once per 10 s; 40: once per 2.5 s;
        // 400: once per 250 ms, so once per tick.
        let storers = [storer(1, 1), storer(2, 5), storer(3, 40), storer(4, 400)];
        let times = run(&mut s, &storers, T, 100, always, &mut rng);
        let count = |n: u8| times.get(&NodeId([n; 32])).map_or(0, Vec::len);
        assert!((9..=11).contains(&count(1)), "{}", count(1));
        assert!((9..=11).contains(&count(2)), "{}", count(2));
        assert!((39..=41).contains(&count(3)), "{}", count(3));
        assert!((99..=100).contains(&count(4)), "{}", count(4));
        assert_eq!(s.interval(40), 2_500);
    }

    #[test]
    fn every_storer_at_least_once_per_storer_audit_every_ms() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let c = config();
        let mut s = AuditSchedule::new(&c);
        let storers: Vec<StorerLoad> = (0..50).map(|n| storer(n, u64::from(n) % 3)).collect();
        let end = T + 300_000;
        let times = run(&mut s, &storers, T, 300, always, &mut rng);
        for st in &storers {
            let t = &times[&st.id];
            assert!(longest_gap(t, T, end) <= c.storer_audit_every_ms, "{t:?}");
        }
        // Spread out: the fifty are not all due at the same tick.
        let first: HashSet<u64> = storers.iter().map(|st| times[&st.id][0]).collect();
        assert!(first.len() > 5, "{first:?}");
    }

    #[test]
    fn offline_storers_are_not_challenged_and_are_when_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut s = AuditSchedule::new(&config());
        let storers = [storer(1, 1), storer(2, 1)];
        let away = T + 20_000..T + 80_000;
        let online = |st: &StorerLoad, now: u64| st.id != NodeId([2; 32]) || !away.contains(&now);
        let times = run(&mut s, &storers, T, 100, online, &mut rng);
        let back = &times[&NodeId([2; 32])];
        assert!(back.iter().all(|t| !away.contains(t)), "{back:?}");
        assert!(back.contains(&away.end), "at once on its return: {back:?}");
        assert!((9..=11).contains(&times[&NodeId([1; 32])].len()));
    }

    #[test]
    fn a_clock_that_steps_back_still_schedules() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let c = config();
        let mut s = AuditSchedule::new(&c);
        let storers = [storer(1, 1), storer(2, 40), storer(3, 7)];
        run(&mut s, &storers, T, 30, always, &mut rng);
        // An hour back, and on from there.
        let back = T + 30_000 - 3_600_000;
        let times = run(&mut s, &storers, back, 60, always, &mut rng);
        for st in &storers {
            let t = &times[&st.id];
            assert!(
                longest_gap(t, back, back + 60_000) <= c.storer_audit_every_ms,
                "{t:?}"
            );
        }
        assert!((23..=25).contains(&times[&NodeId([2; 32])].len()));
    }

    #[test]
    fn a_pause_gives_one_audit_then_the_cadence() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let c = config();
        let mut s = AuditSchedule::new(&c);
        let storers = [storer(1, 1)];
        run(&mut s, &storers, T, 20, always, &mut rng);
        // Down for an hour.
        let later = T + 3_600_000;
        let times = run(&mut s, &storers, later, 25, always, &mut rng);
        assert_eq!(
            times[&NodeId([1; 32])],
            [later, later + 10_000, later + 20_000]
        );
    }

    #[test]
    fn storers_that_hold_more_are_due_sooner_and_those_that_hold_nothing_forgotten() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let mut s = AuditSchedule::new(&config());
        run(
            &mut s,
            &[storer(1, 1), storer(2, 1)],
            T,
            1,
            always,
            &mut rng,
        );
        // 1 now holds 400: due within its new interval (a tick), not at
        // its old time (up to 10 s on).
        let times = run(&mut s, &[storer(1, 400)], T + 1000, 3, always, &mut rng);
        let t = &times[&NodeId([1; 32])];
        assert!(t[0] <= T + 2000 && t.len() >= 2, "{t:?}");
        assert!(!s.next.contains_key(&NodeId([2; 32])));
    }
}
