//! Audits waiting for their storer's answer. Pure: the time is passed in.
//!
//! An audit is pending from its challenge until the storer answers, or its
//! deadline passes (then the audit tick settles it as timed out). Only the
//! storer challenged can settle it by answering; at most `max_audits` are
//! pending at once.
//!
//! Audits owners ask for have quotas of their own, so that a few fake
//! owner/storer pairs whose storer never answers cannot fill the table: at
//! most half of it, `audits_per_owner` for one owner and
//! `audits_per_storer` on one storer, one at a time for one replica (the
//! storer answers it once, not once per request). Scheduled audits are
//! bounded by the schedule, and always find the other half free.

use std::collections::{HashMap, HashSet};

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
    /// A delete the owner signed before this does not release the replica:
    /// when it was recorded, less the clock skew the protocol allows
    /// (`window_ms`), so an honest owner's delete right after placing holds.
    pub(crate) deletes_from_ms: u64,
}

/// How many audits owners asked for may be pending.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quotas {
    /// In all (scheduled and asked).
    pub(crate) capacity: usize,
    /// For one owner's requests.
    pub(crate) per_owner: usize,
    /// On one storer, asked by owners.
    pub(crate) per_storer: usize,
}

/// The pending audits, by challenge.
#[derive(Debug)]
pub(crate) struct PendingAudits {
    by_challenge: HashMap<[u8; 32], PendingAudit>,
    quotas: Quotas,
    /// Audits owners asked for, in all, per owner and per storer (nodes
    /// with none are not kept).
    asked: usize,
    /// The replicas (owner, pack, storer) an owner's audit is pending for.
    asked_replicas: HashSet<(NodeId, PackId, NodeId)>,
    by_owner: HashMap<NodeId, usize>,
    by_storer: HashMap<NodeId, usize>,
}

fn replica_of(a: &PendingAudit) -> (NodeId, PackId, NodeId) {
    (a.owner, a.pack, a.storer)
}

fn up(counts: &mut HashMap<NodeId, usize>, id: NodeId) {
    *counts.entry(id).or_default() += 1;
}

fn down(counts: &mut HashMap<NodeId, usize>, id: &NodeId) {
    if let Some(n) = counts.get_mut(id) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(id);
        }
    }
}

impl PendingAudits {
    /// Within `quotas`.
    pub(crate) fn new(quotas: Quotas) -> Self {
        Self {
            by_challenge: HashMap::new(),
            quotas,
            asked: 0,
            asked_replicas: HashSet::new(),
            by_owner: HashMap::new(),
            by_storer: HashMap::new(),
        }
    }

    /// Adds an audit; false (and nothing added) when it would go over a
    /// quota.
    pub(crate) fn insert(&mut self, challenge: [u8; 32], audit: PendingAudit) -> bool {
        let q = self.quotas;
        if self.by_challenge.len() >= q.capacity {
            return false;
        }
        if audit.reply_to.is_some() {
            let count = |m: &HashMap<NodeId, usize>, id| m.get(id).copied().unwrap_or(0);
            if self.asked >= q.capacity / 2
                || count(&self.by_owner, &audit.owner) >= q.per_owner
                || count(&self.by_storer, &audit.storer) >= q.per_storer
                || self.asked_replicas.contains(&replica_of(&audit))
            {
                return false;
            }
            self.asked += 1;
            self.asked_replicas.insert(replica_of(&audit));
            up(&mut self.by_owner, audit.owner);
            up(&mut self.by_storer, audit.storer);
        }
        if let Some(old) = self.by_challenge.insert(challenge, audit) {
            self.forget(&old);
        }
        true
    }

    /// Takes an audit off the quotas.
    fn forget(&mut self, audit: &PendingAudit) {
        if audit.reply_to.is_some() {
            self.asked = self.asked.saturating_sub(1);
            self.asked_replicas.remove(&replica_of(audit));
            down(&mut self.by_owner, &audit.owner);
            down(&mut self.by_storer, &audit.storer);
        }
    }

    /// Forgets an audit (its challenge could not be sent).
    pub(crate) fn remove(&mut self, challenge: &[u8; 32]) {
        if let Some(p) = self.by_challenge.remove(challenge) {
            self.forget(&p);
        }
    }

    /// Takes the audit `challenge` names when `storer` is the one
    /// challenged; anyone else's answer leaves it pending.
    pub(crate) fn answered(
        &mut self,
        challenge: &[u8; 32],
        storer: &NodeId,
    ) -> Option<PendingAudit> {
        match self.by_challenge.get(challenge) {
            Some(p) if p.storer == *storer => {
                let p = self.by_challenge.remove(challenge)?;
                self.forget(&p);
                Some(p)
            }
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
        for p in &out {
            self.forget(p);
        }
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

    fn quotas(capacity: usize) -> Quotas {
        Quotas {
            capacity,
            per_owner: capacity,
            per_storer: capacity,
        }
    }

    fn asked(owner: u8, storer: u8) -> PendingAudit {
        PendingAudit {
            owner: NodeId([owner; 32]),
            reply_to: Some([owner; 16]),
            deletes_from_ms: 0,
            ..audit(storer, 100)
        }
    }

    #[test]
    fn owners_asking_have_quotas_and_never_crowd_out_the_schedule() {
        let mut p = PendingAudits::new(Quotas {
            capacity: 10,
            per_owner: 3,
            per_storer: 2,
        });
        let mut c = 0u8;
        let mut next = || {
            c += 1;
            [c; 32]
        };
        // One storer: two asked audits at most, whoever asks.
        assert!(p.insert(next(), asked(1, 7)));
        assert!(p.insert(next(), asked(2, 7)));
        assert!(!p.insert(next(), asked(3, 7)), "per storer");
        // One owner: three at most.
        assert!(p.insert(next(), asked(1, 8)));
        assert!(p.insert(next(), asked(1, 9)));
        assert!(!p.insert(next(), asked(1, 10)), "per owner");
        // Owners in all: half the table.
        assert!(p.insert(next(), asked(4, 11)));
        assert!(!p.insert(next(), asked(5, 12)), "half the table");
        // The schedule still has its half.
        for s in 20..25 {
            assert!(p.insert(next(), audit(s, 100)));
        }
        assert!(!p.insert(next(), audit(30, 100)), "full");
        // Settled ones give their quota back.
        assert!(p.answered(&[1; 32], &NodeId([7; 32])).is_some());
        assert_eq!(p.lapsed(101, 1000).len(), 9);
        assert_eq!((p.asked, p.by_owner.len(), p.by_storer.len()), (0, 0, 0));
        assert!(p.insert(next(), asked(3, 7)));
    }

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
            deletes_from_ms: 0,
        }
    }

    #[test]
    fn only_the_storer_challenged_settles_it() {
        let mut p = PendingAudits::new(quotas(10));
        assert!(p.insert([1; 32], audit(1, 100)));
        assert_eq!(p.answered(&[1; 32], &NodeId([2; 32])), None);
        assert_eq!(p.answered(&[2; 32], &NodeId([1; 32])), None);
        assert_eq!(p.answered(&[1; 32], &NodeId([1; 32])), Some(audit(1, 100)));
        assert_eq!(p.answered(&[1; 32], &NodeId([1; 32])), None, "once");
    }

    #[test]
    fn bounded() {
        let mut p = PendingAudits::new(quotas(2));
        assert!(p.insert([1; 32], audit(1, 100)));
        assert!(p.insert([2; 32], audit(1, 100)));
        assert!(!p.insert([3; 32], audit(1, 100)));
        p.remove(&[1; 32]);
        assert!(p.insert([3; 32], audit(1, 100)));
    }

    #[test]
    fn lapse_after_the_deadline_even_when_the_clock_stepped_back() {
        let mut p = PendingAudits::new(quotas(10));
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
