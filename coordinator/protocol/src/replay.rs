//! Freshness: refuses stale, future-dated and repeated envelopes.
//!
//! A message is fresh when its timestamp is within `window_ms` of the
//! receiver's clock and its `(sender, nonce)` was not seen before. A nonce
//! is remembered only until its timestamp leaves the window, after which the
//! timestamp alone refuses it, so memory stays bounded by the message rate
//! times the window; past `capacity` remembered nonces, new messages are
//! refused rather than remembered less. One sender may hold at most
//! `per_sender` of them, so no single key can take the whole guard and
//! lock everyone else out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use pluto_plugins_api::NodeId;

use crate::Envelope;

/// Why a message is not fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Older than the window.
    #[error("stale message ({0} ms old)")]
    Stale(u64),
    /// Too far in the future.
    #[error("message from the future ({0} ms ahead)")]
    Future(u64),
    /// Seen before.
    #[error("replayed message")]
    Replay,
    /// Too many messages in the window to remember.
    #[error("too many messages; try again later")]
    Busy,
    /// Too many messages from this sender in the window.
    #[error("too many messages from this sender; try again later")]
    SenderBusy,
}

/// Remembers recent nonces.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    per_sender: usize,
    seen: HashSet<(NodeId, [u8; 16])>,
    /// Nonces remembered per sender (senders with none are not kept).
    by_sender: HashMap<NodeId, usize>,
    /// Remembered nonces, soonest to expire first (a heap: a message
    /// stamped early costs a logarithm, not a walk over newer ones).
    by_expiry: BinaryHeap<Reverse<(u64, NodeId, [u8; 16])>>,
}

impl ReplayGuard {
    /// Accepts timestamps within `window_ms` of now, remembering at most
    /// `capacity` nonces, any number of them from one sender.
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self::with_sender_limit(window_ms, capacity, usize::MAX)
    }

    /// As [`ReplayGuard::new`], with at most `per_sender` nonces from any
    /// one sender.
    pub fn with_sender_limit(window_ms: u64, capacity: usize, per_sender: usize) -> Self {
        Self {
            window_ms,
            capacity,
            per_sender,
            seen: HashSet::new(),
            by_sender: HashMap::new(),
            by_expiry: BinaryHeap::new(),
        }
    }

    /// Checks an envelope received at `now_ms` and remembers it when fresh.
    /// The timestamp is the sender's and may be anything: the sums
    /// saturate, so no value of it can overflow.
    pub fn check(&mut self, env: &Envelope, now_ms: u64) -> Result<(), Refused> {
        if env.time_ms.saturating_add(self.window_ms) < now_ms {
            return Err(Refused::Stale(now_ms - env.time_ms));
        }
        if env.time_ms > now_ms.saturating_add(self.window_ms) {
            return Err(Refused::Future(env.time_ms - now_ms));
        }
        while let Some(&Reverse((expiry, from, nonce))) = self.by_expiry.peek() {
            if expiry >= now_ms {
                break;
            }
            self.by_expiry.pop();
            self.seen.remove(&(from, nonce));
            if let Some(n) = self.by_sender.get_mut(&from) {
                *n -= 1;
                if *n == 0 {
                    self.by_sender.remove(&from);
                }
            }
        }
        let key = (env.from, env.nonce);
        if self.seen.contains(&key) {
            return Err(Refused::Replay);
        }
        let from_sender = self.by_sender.get(&env.from).copied().unwrap_or(0);
        if from_sender >= self.per_sender {
            return Err(Refused::SenderBusy);
        }
        if self.seen.len() >= self.capacity {
            return Err(Refused::Busy);
        }
        self.seen.insert(key);
        self.by_sender.insert(env.from, from_sender + 1);
        self.by_expiry.push(Reverse((
            env.time_ms.saturating_add(self.window_ms),
            env.from,
            env.nonce,
        )));
        Ok(())
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(from: u8, nonce: u8, time_ms: u64) -> Envelope {
        Envelope {
            kind: 0,
            from: NodeId([from; 32]),
            to: NodeId([0; 32]),
            time_ms,
            nonce: [nonce; 16],
            reply_to: None,
            body: vec![],
        }
    }

    #[test]
    fn stale_future_replayed_refused() {
        let mut g = ReplayGuard::new(1000, 10);
        assert_eq!(g.check(&env(1, 1, 10_000), 10_000), Ok(()));
        assert_eq!(g.check(&env(1, 1, 10_000), 10_500), Err(Refused::Replay));
        // Same nonce from another sender is a different message.
        assert_eq!(g.check(&env(2, 1, 10_000), 10_500), Ok(()));
        assert_eq!(
            g.check(&env(1, 2, 8_000), 10_000),
            Err(Refused::Stale(2000))
        );
        assert_eq!(
            g.check(&env(1, 3, 12_000), 10_000),
            Err(Refused::Future(2000))
        );
        // After the window the nonce is forgotten, and the timestamp refuses it.
        assert_eq!(
            g.check(&env(1, 1, 10_000), 11_001),
            Err(Refused::Stale(1001))
        );
        assert_eq!(g.check(&env(3, 3, 11_001), 11_001), Ok(()));
        assert_eq!(g.len(), 1, "expired nonces are dropped");
    }

    #[test]
    fn out_of_order_timestamps_expire_in_order() {
        let mut g = ReplayGuard::new(1000, 100_000);
        // Many recent messages, then old-stamped ones: each is cheap, and
        // each is forgotten when its own time leaves the window.
        for n in 0..50_000u32 {
            let mut e = env(1, 0, 10_000);
            e.nonce[..4].copy_from_slice(&n.to_le_bytes());
            g.check(&e, 10_000).unwrap();
        }
        let started = std::time::Instant::now();
        for n in 0..50_000u32 {
            let mut e = env(2, 0, 9_100);
            e.nonce[..4].copy_from_slice(&n.to_le_bytes());
            g.check(&e, 10_000).unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(g.check(&env(3, 3, 10_101), 10_101), Ok(()));
        assert_eq!(g.len(), 50_001, "the old-stamped ones left first");
    }

    #[test]
    fn any_timestamp_or_window_is_refused_without_overflow() {
        let mut g = ReplayGuard::new(1000, 10);
        assert_eq!(
            g.check(&env(1, 1, u64::MAX), 10_000),
            Err(Refused::Future(u64::MAX - 10_000))
        );
        assert_eq!(
            g.check(&env(1, 2, 0), u64::MAX),
            Err(Refused::Stale(u64::MAX))
        );
        let mut wide = ReplayGuard::new(u64::MAX, 10);
        assert_eq!(wide.check(&env(1, 1, u64::MAX), 10_000), Ok(()));
        assert_eq!(wide.check(&env(1, 2, 0), u64::MAX), Ok(()));
        assert_eq!(
            wide.check(&env(1, 1, u64::MAX), u64::MAX),
            Err(Refused::Replay)
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut g = ReplayGuard::new(1000, 3);
        for n in 0..3 {
            g.check(&env(1, n, 5000), 5000).unwrap();
        }
        assert_eq!(g.check(&env(1, 9, 5000), 5000), Err(Refused::Busy));
        assert_eq!(
            g.check(&env(1, 9, 6001), 6001),
            Ok(()),
            "room again once old ones expire"
        );
    }

    #[test]
    fn one_sender_cannot_take_the_whole_guard() {
        let mut g = ReplayGuard::with_sender_limit(1000, 10, 4);
        for n in 0..4 {
            g.check(&env(1, n, 5000), 5000).unwrap();
        }
        assert_eq!(g.check(&env(1, 9, 5000), 5000), Err(Refused::SenderBusy));
        // Everyone else still gets in, up to the whole.
        for n in 0..4 {
            g.check(&env(2, n, 5000), 5000).unwrap();
        }
        g.check(&env(3, 0, 5000), 5000).unwrap();
        g.check(&env(4, 0, 5000), 5000).unwrap();
        assert_eq!(g.check(&env(5, 0, 5000), 5000), Err(Refused::Busy));
        // Once its nonces lapse, the sender is forgotten altogether.
        g.check(&env(1, 9, 6001), 6001).unwrap();
        assert_eq!(g.by_sender.len(), 1);
        assert_eq!(g.by_sender[&NodeId([1; 32])], 1);
    }
}
