//! Audits waiting for their storer's answer. Pure: the time is passed in.
//!
//! An audit is pending from its challenge until the storer answers, or its
//! deadline passes (then the audit tick settles it as timed out). Only the
//! storer challenged can settle it by answering; at most `max_audits` are
//! pending at once.

use std::collections::HashMap;

use pluto_plugins_api::{NodeId, PackId};

/// An audit waiting for its storer's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PendingAudit {
    /// Whose replica.
    pub(crate) owner: NodeId,
    /// Of which pack.
    pub(crate) pack: PackId,
    /// Who holds it (and must answer).
    pub(crate) storer: NodeId,
    /// The replica's root, as both ends signed it.
    pub(crate) root: [u8; 32],
    /// The replica's size.
    pub(crate) size: u64,
    /// The range asked for.
    pub(crate) offset: u64,
    /// See `offset`.
    pub(crate) len: u64,
    /// When an answer is too late.
    pub(crate) deadline_ms: u64,
    /// The owner's request, when an owner asked (scheduled audits answer
    /// nobody).
    pub(crate) reply_to: Option<[u8; 16]>,
}

/// The pending audits, by challenge.
#[derive(Debug)]
pub(crate) struct PendingAudits {
    by_challenge: HashMap<[u8; 32], PendingAudit>,
    capacity: usize,
}

impl PendingAudits {
    /// At most `capacity` at once.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            by_challenge: HashMap::new(),
            capacity,
        }
    }

    /// Adds an audit; false (and nothing added) when full.
    pub(crate) fn insert(&mut self, challenge: [u8; 32], audit: PendingAudit) -> bool {
        if self.by_challenge.len() >= self.capacity {
            return false;
        }
        self.by_challenge.insert(challenge, audit);
        true
    }

    /// Forgets an audit (its challenge could not be sent).
    pub(crate) fn remove(&mut self, challenge: &[u8; 32]) {
        self.by_challenge.remove(challenge);
    }

    /// Takes the audit `challenge` names when `storer` is the one
    /// challenged; anyone else's answer leaves it pending.
    pub(crate) fn answered(
        &mut self,
        challenge: &[u8; 32],
        storer: &NodeId,
    ) -> Option<PendingAudit> {
        match self.by_challenge.get(challenge) {
            Some(p) if p.storer == *storer => self.by_challenge.remove(challenge),
            _ => None,
        }
    }

    /// Takes the audits whose deadline passed by `now_ms`. Deadlines were
    /// set on the clock of their time: none is left further ahead than
    /// `longest_ms` from now, so a clock that stepped back does not keep
    /// audits pending for the whole step.
    pub(crate) fn lapsed(&mut self, now_ms: u64, longest_ms: u64) -> Vec<PendingAudit> {
        let latest = now_ms.saturating_add(longest_ms);
        let mut out = Vec::new();
        self.by_challenge.retain(|_, p| {
            p.deadline_ms = p.deadline_ms.min(latest);
            if p.deadline_ms < now_ms {
                out.push(p.clone());
                false
            } else {
                true
            }
        });
        out
    }

    /// How many are pending.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_challenge.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(storer: u8, deadline_ms: u64) -> PendingAudit {
        PendingAudit {
            owner: NodeId([9; 32]),
            pack: PackId([1; 32]),
            storer: NodeId([storer; 32]),
            root: [0; 32],
            size: 10,
            offset: 0,
            len: 10,
            deadline_ms,
            reply_to: None,
        }
    }

    #[test]
    fn only_the_storer_challenged_settles_it() {
        let mut p = PendingAudits::new(10);
        assert!(p.insert([1; 32], audit(1, 100)));
        assert_eq!(p.answered(&[1; 32], &NodeId([2; 32])), None);
        assert_eq!(p.answered(&[2; 32], &NodeId([1; 32])), None);
        assert_eq!(p.answered(&[1; 32], &NodeId([1; 32])), Some(audit(1, 100)));
        assert_eq!(p.answered(&[1; 32], &NodeId([1; 32])), None, "once");
    }

    #[test]
    fn bounded() {
        let mut p = PendingAudits::new(2);
        assert!(p.insert([1; 32], audit(1, 100)));
        assert!(p.insert([2; 32], audit(1, 100)));
        assert!(!p.insert([3; 32], audit(1, 100)));
        p.remove(&[1; 32]);
        assert!(p.insert([3; 32], audit(1, 100)));
    }

    #[test]
    fn lapse_after_the_deadline_even_when_the_clock_stepped_back() {
        let mut p = PendingAudits::new(10);
        p.insert([1; 32], audit(1, 100));
        p.insert([2; 32], audit(1, 200));
        assert!(p.lapsed(100, 1000).is_empty(), "not yet at the deadline");
        assert_eq!(p.lapsed(150, 1000), vec![audit(1, 100)]);
        assert_eq!(p.lapsed(250, 1000), vec![audit(1, 200)]);
        // Set an hour ahead of a clock that then stepped back: due no later
        // than `longest` from the new now.
        p.insert([3; 32], audit(1, 10_000_000));
        let back = 10_000_000 - 3_600_000;
        assert!(p.lapsed(back, 30_000).is_empty());
        assert_eq!(p.lapsed(back + 30_001, 30_000).len(), 1);
        assert_eq!(p.len(), 0);
    }
}
