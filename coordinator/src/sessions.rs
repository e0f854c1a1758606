//! Login sessions: the handshake that proves a node holds its key.
//!
//! ```text
//! node --Hello--> coordinator: a fresh 32-byte challenge, for this node, until now + challenge_ttl_ms,
//!      and the coordinator's exchange key (everything after the Hello is sealed to it)
//! node --Auth { challenge, exchange key, offer } (sealed)--> coordinator:
//!      the challenge is taken (whoever sends it); it must be this node's and not lapsed
//!      -> registered in the books -> (a newcomer's broker account made, if the Auth
//!      carries its password and the broker keeps accounts) -> Welcome { coordinator's
//!      exchange key, heartbeat }
//! ```
//!
//! The envelope's signature is the proof of key; the challenge makes the
//! proof fresh. At most `max_challenges` are outstanding, and at most
//! `challenges_per_node` for one key (its oldest gives way to its newest);
//! lapsed ones are forgotten when the table is full.

use std::collections::{HashMap, VecDeque};

use pluto_plugins_api::NodeId;
use pluto_protocol::{ErrorCode, Message};
use rand_core::RngCore;

use crate::coordinator::{error, lock, public, Reply};
use crate::{Coordinator, Rejected};

/// Challenges issued and not yet answered.
#[derive(Debug)]
pub(crate) struct Sessions {
    pending: HashMap<[u8; 32], (NodeId, u64)>,
    /// Each node's outstanding challenges, oldest first.
    by_node: HashMap<NodeId, VecDeque<[u8; 32]>>,
    /// Challenges in the order issued, with their expiry: the lapsed ones
    /// are found at the front, without scanning the table (some may have
    /// been taken already; they are skipped).
    order: VecDeque<([u8; 32], u64)>,
    capacity: usize,
    per_node: usize,
    ttl_ms: u64,
}

impl Sessions {
    /// At most `capacity` outstanding, `per_node` of them for one node, each
    /// answerable for `ttl_ms`.
    pub(crate) fn new(capacity: usize, per_node: usize, ttl_ms: u64) -> Self {
        Self {
            pending: HashMap::new(),
            by_node: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            per_node: per_node.max(1),
            ttl_ms,
        }
    }

    /// A fresh challenge for `from`, or `None` when too many are
    /// outstanding. A node that asks again past its share gives up its
    /// oldest challenge: one key asking fast fills nothing but its own.
    pub(crate) fn challenge(
        &mut self,
        from: NodeId,
        now_ms: u64,
        rng: &mut (impl RngCore + ?Sized),
    ) -> Option<[u8; 32]> {
        let expiry = now_ms.saturating_add(self.ttl_ms);
        // Lapsed ones go, oldest first; so do those a clock that stepped
        // back left further ahead than a new one. Constant time for each
        // challenge issued, however full the table.
        while let Some(&(c, e)) = self.order.front() {
            if !self.pending.contains_key(&c) {
                self.order.pop_front();
            } else if e <= now_ms || e > expiry {
                self.order.pop_front();
                self.forget(&c);
            } else {
                break;
            }
        }
        let mine = self.by_node.entry(from).or_default();
        while mine.len() >= self.per_node {
            if let Some(old) = mine.pop_front() {
                self.pending.remove(&old);
            }
        }
        if self.pending.len() >= self.capacity {
            if mine.is_empty() {
                self.by_node.remove(&from);
            }
            return None;
        }
        let mut challenge = [0u8; 32];
        rng.fill_bytes(&mut challenge);
        self.pending.insert(challenge, (from, expiry));
        mine.push_back(challenge);
        self.order.push_back((challenge, expiry));
        Some(challenge)
    }

    /// Drops an outstanding challenge.
    fn forget(&mut self, challenge: &[u8; 32]) {
        if let Some((node, _)) = self.pending.remove(challenge) {
            if let Some(q) = self.by_node.get_mut(&node) {
                q.retain(|c| c != challenge);
                if q.is_empty() {
                    self.by_node.remove(&node);
                }
            }
        }
    }

    /// Takes `challenge` (it is used up whoever presents it); true when it
    /// was issued to `from` and has not lapsed.
    pub(crate) fn redeem(&mut self, challenge: &[u8; 32], from: &NodeId, now_ms: u64) -> bool {
        let Some(&(node, expiry)) = self.pending.get(challenge) else {
            return false;
        };
        self.forget(challenge);
        node == *from && expiry > now_ms
    }

    /// Challenges outstanding.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.len()
    }
}

impl Coordinator {
    /// `Hello`: a challenge to sign.
    pub(crate) fn hello(&self, from: &NodeId, now_ms: u64, rng: &mut impl RngCore) -> Reply {
        match lock(&self.sessions).challenge(*from, now_ms, rng) {
            Some(challenge) => public(Message::Challenge {
                challenge,
                exchange_key: Some(self.exchange_key()),
            }),
            None => error(ErrorCode::Busy, "too many handshakes at once"),
        }
    }

    /// `Auth`: the signed answer to a challenge; registers the node.
    pub(crate) async fn auth(
        &self,
        from: &NodeId,
        challenge: &[u8; 32],
        exchange_key: &[u8; 32],
        offer: u64,
        broker_password: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Result<Reply, Rejected> {
        if !lock(&self.sessions).redeem(challenge, from, now_ms) {
            return Ok(error(
                ErrorCode::Unauthenticated,
                "unknown or expired challenge",
            ));
        }
        // A newcomer's account on a broker that keeps them, made before the
        // welcome so that the node can log in with it at once.
        let accounts = self.accounts.get().cloned();
        if let (Some(accounts), Some(password)) = (accounts, broker_password) {
            if let Err(e) = accounts.provision(from, &hex::encode(password)).await {
                tracing::warn!("broker account of {}: {e}", from.short());
                return Ok(error(
                    ErrorCode::Busy,
                    "the broker account could not be made now; try again",
                ));
            }
            tracing::info!("broker account of {} made", from.short());
        }
        // Registered, not yet online: a node is online once it heartbeats
        // (its daemon does at once), so a command that connects for a
        // moment is never matched as a storer.
        self.books
            .register(from, exchange_key, offer, now_ms)
            .await?;
        tracing::info!("node {} authenticated", from.short());
        Ok(public(Message::Welcome {
            exchange_key: self.exchange_key(),
            heartbeat_ms: self.config.heartbeat_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const A: NodeId = NodeId([1; 32]);
    const B: NodeId = NodeId([2; 32]);

    #[test]
    fn a_challenge_is_for_one_node_once_until_it_lapses() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s = Sessions::new(10, 4, 1000);
        let c = s.challenge(A, 0, &mut rng).unwrap();
        assert!(!s.redeem(&c, &B, 10), "stolen");
        assert!(!s.redeem(&c, &A, 10), "used up by the thief's try");
        let c = s.challenge(A, 0, &mut rng).unwrap();
        assert!(s.redeem(&c, &A, 999));
        assert!(!s.redeem(&c, &A, 999), "once");
        let c = s.challenge(A, 0, &mut rng).unwrap();
        assert!(!s.redeem(&c, &A, 1000), "lapsed");
    }

    #[test]
    fn bounded_and_lapsed_ones_make_room() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut s = Sessions::new(2, 4, 1000);
        assert!(s.challenge(A, 0, &mut rng).is_some());
        assert!(s.challenge(B, 0, &mut rng).is_some());
        assert!(s.challenge(A, 999, &mut rng).is_none());
        assert!(s.challenge(A, 1000, &mut rng).is_some());
    }

    #[test]
    fn one_key_asking_fast_fills_only_its_own_share() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut s = Sessions::new(100, 3, 60_000);
        let mut last = Vec::new();
        for t in 0..10_000 {
            last.push(s.challenge(A, t, &mut rng).unwrap());
        }
        assert_eq!(s.len(), 3, "A holds its share only");
        assert_eq!(s.by_node.len(), 1);
        // Its newest still work; its oldest gave way.
        assert!(!s.redeem(&last[0], &A, 10_000));
        assert!(s.redeem(&last[9_999], &A, 10_000));
        // Everyone else is served.
        for n in 0..90u8 {
            assert!(s
                .challenge(NodeId([n + 10; 32]), 10_000, &mut rng)
                .is_some());
        }
        assert_eq!(s.len(), 92);
    }

    #[test]
    fn a_clock_that_steps_back_keeps_challenges_no_longer_than_their_time() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut s = Sessions::new(1, 4, 1000);
        let ahead = s.challenge(A, 10_000_000, &mut rng).unwrap();
        // An hour back: the one now further ahead than a new one would be
        // gives way at once.
        assert!(s.challenge(B, 10_000_000 - 3_600_000, &mut rng).is_some());
        assert!(!s.redeem(&ahead, &A, 10_000_000 - 3_600_000));
    }

    #[test]
    fn a_full_table_finds_its_lapsed_challenges_at_the_front() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut s = Sessions::new(1000, 1, 1000);
        for n in 0..1000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&n.to_le_bytes());
            assert!(s.challenge(NodeId(id), u64::from(n), &mut rng).is_some());
        }
        // Full of live ones: refused, and nothing scanned goes.
        assert!(s.challenge(A, 999, &mut rng).is_none());
        assert_eq!(s.len(), 1000);
        // The oldest lapse one by one, each making room for one.
        assert!(s.challenge(A, 1000, &mut rng).is_some());
        assert!(s.challenge(B, 1000, &mut rng).is_none());
        assert!(s.challenge(B, 1001, &mut rng).is_some());
        assert_eq!((s.len(), s.order.len() <= 1002), (1000, true));
    }
}
