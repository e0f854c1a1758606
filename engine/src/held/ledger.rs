//! The storer's books, without I/O: what is held for whom, what is being
//! received, what was kept of transfers that broke, and the links open.
//! Every decision about room, tickets and resuming is made here; the
//! caller does the reading and writing the decision asks for.

use std::collections::HashMap;

use pluto_plugins_api::{NodeId, PackId};

use super::{refuse, HeldEntry, ServeError};
use crate::exchange::PeerError;

/// Links one peer may have open at once, and all peers together.
pub const LINKS_PER_PEER: usize = 16;
pub const LINKS_TOTAL: usize = 256;
/// How long the first bytes of a transfer that broke are kept for the
/// owner to resume.
pub const PARTIAL_KEEP_MS: u64 = 24 * 3_600_000;
/// Transfers kept for resuming, per owner (the oldest goes first).
pub const PARTIALS_PER_OWNER: usize = 4;
/// Times one kept transfer may be resumed: each resume reads what was
/// kept again, so an owner cannot make the storer read it endlessly.
pub const MAX_RESUMES: u32 = 8;

/// The first bytes of a replica whose transfer broke, kept so its owner
/// can send only the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partial {
    /// Whose transfer it was.
    pub owner: NodeId,
    /// The replica's announced size.
    pub size: u64,
    /// Bytes kept.
    pub have: u64,
    /// Names the object that keeps them ([`super::partial_id`]).
    pub nonce: u64,
    /// When the transfer started, ms since the epoch.
    pub at_ms: u64,
    /// Times it was resumed.
    pub resumes: u32,
}

/// What to do with an incoming replica.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Already held for this owner: its entry.
    Have(HeldEntry),
    /// Room reserved: receive it, after the bytes kept in `from` when set.
    /// `dropped` was kept for this root but cannot be resumed: its object
    /// is to be removed.
    Receive {
        /// What to resume from.
        from: Option<Partial>,
        /// What to throw away.
        dropped: Option<Partial>,
    },
}

/// A replica being received: its ticket and the bytes reserved for it.
#[derive(Clone, Copy, Debug)]
struct Incoming {
    ticket: [u8; 32],
    reserved: u64,
}

/// The books.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By root.
    held: HashMap<[u8; 32], HeldEntry>,
    /// Ticket id -> the root stored under it.
    tickets: HashMap<[u8; 32], [u8; 32]>,
    /// Replicas being received, so two links cannot race one root or ticket.
    incoming: HashMap<[u8; 32], Incoming>,
    /// Transfers that broke, by root.
    partials: HashMap<[u8; 32], Partial>,
    /// Bytes held, being received and kept of broken transfers: what the
    /// node's offer bounds.
    bytes: u64,
    /// Open links per peer.
    links: HashMap<NodeId, usize>,
}

impl Ledger {
    /// Records a replica found in the store at start.
    pub fn found(&mut self, root: [u8; 32], ticket: [u8; 32], entry: HeldEntry) {
        self.bytes += entry.size;
        self.tickets.insert(ticket, root);
        if let Some(old) = self.held.insert(root, entry) {
            self.bytes -= old.size;
        }
    }

    /// Records a broken transfer found at start.
    pub fn found_partial(&mut self, root: [u8; 32], p: Partial) {
        self.bytes += p.have;
        if let Some(old) = self.partials.insert(root, p) {
            self.bytes -= old.have;
        }
    }

    /// Takes a link slot for `peer`, unless it or everyone has too many.
    pub fn open_link(&mut self, peer: NodeId) -> bool {
        let total: usize = self.links.values().sum();
        let mine = self.links.entry(peer).or_insert(0);
        if *mine >= LINKS_PER_PEER || total >= LINKS_TOTAL {
            if *mine == 0 {
                self.links.remove(&peer);
            }
            return false;
        }
        *mine += 1;
        true
    }

    /// Gives a link slot back.
    pub fn close_link(&mut self, peer: &NodeId) {
        if let Some(n) = self.links.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                self.links.remove(peer);
            }
        }
    }

    /// Decides whether `owner`'s replica `root` of `size` bytes may come
    /// in under the ticket `ticket`, and reserves its room. With `resume`,
    /// a transfer of the same replica by the same owner that broke is
    /// continued.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        owner: &NodeId,
        ticket: [u8; 32],
        root: [u8; 32],
        size: u64,
        resume: bool,
        capacity: u64,
        now_ms: u64,
    ) -> Result<Admit, ServeError> {
        if let Some(e) = self.held.get(&root) {
            if e.owner == *owner {
                return Ok(Admit::Have(e.clone()));
            }
            return refuse(PeerError::Ticket, "that replica is held for someone else");
        }
        if self.tickets.contains_key(&ticket) || self.incoming.values().any(|i| i.ticket == ticket)
        {
            return refuse(PeerError::Ticket, "the ticket was used already");
        }
        if self.incoming.contains_key(&root) {
            return refuse(PeerError::Busy, "that replica is being received");
        }
        let kept = self.partials.get(&root).copied();
        let resumable = kept.filter(|p| {
            resume
                && p.owner == *owner
                && p.size == size
                && p.have <= size
                && p.resumes < MAX_RESUMES
                && now_ms.saturating_sub(p.at_ms) <= PARTIAL_KEEP_MS
        });
        // The kept bytes are counted already; a transfer started over
        // frees them.
        let counted = kept.map_or(0, |p| p.have);
        if self.bytes - counted + size > capacity {
            return refuse(PeerError::Full, "no room left under this node's offer");
        }
        self.partials.remove(&root);
        self.bytes = self.bytes - counted + size;
        self.incoming.insert(
            root,
            Incoming {
                ticket,
                reserved: size,
            },
        );
        Ok(Admit::Receive {
            from: resumable.map(|p| Partial {
                resumes: p.resumes + 1,
                ..p
            }),
            dropped: if resumable.is_some() { None } else { kept },
        })
    }

    /// A replica received whole: held from now on.
    pub fn commit(&mut self, root: [u8; 32], entry: HeldEntry, ticket: [u8; 32]) {
        let reserved = self.incoming.remove(&root).map_or(0, |i| i.reserved);
        self.bytes = self.bytes - reserved + entry.size;
        self.tickets.insert(ticket, root);
        self.held.insert(root, entry);
    }

    /// A replica that will not come: its room is free again. Nothing when
    /// it is not being received (committed or kept already).
    pub fn abandon(&mut self, root: &[u8; 32]) {
        if let Some(i) = self.incoming.remove(root) {
            self.bytes -= i.reserved;
        }
    }

    /// A transfer that broke after `p.have` bytes: they are kept for
    /// resuming. Returns what no longer fits the owner's share of kept
    /// transfers (the oldest), whose objects are to be removed.
    pub fn keep_partial(&mut self, root: [u8; 32], p: Partial) -> Vec<([u8; 32], Partial)> {
        self.abandon(&root);
        self.found_partial(root, p);
        let mut mine: Vec<([u8; 32], Partial)> = self
            .partials
            .iter()
            .filter(|(_, q)| q.owner == p.owner)
            .map(|(r, q)| (*r, *q))
            .collect();
        mine.sort_by_key(|(_, q)| std::cmp::Reverse(q.at_ms));
        let evicted: Vec<_> = mine.split_off(PARTIALS_PER_OWNER.min(mine.len()));
        for (r, _) in &evicted {
            self.forget_partial(r);
        }
        evicted
    }

    /// Drops a kept transfer from the books.
    pub fn forget_partial(&mut self, root: &[u8; 32]) -> Option<Partial> {
        let p = self.partials.remove(root)?;
        self.bytes -= p.have;
        Some(p)
    }

    /// Kept transfers older than [`PARTIAL_KEEP_MS`], dropped from the books.
    pub fn expired_partials(&mut self, now_ms: u64) -> Vec<([u8; 32], Partial)> {
        let old: Vec<[u8; 32]> = self
            .partials
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.at_ms) > PARTIAL_KEEP_MS)
            .map(|(r, _)| *r)
            .collect();
        old.into_iter()
            .filter_map(|r| Some((r, self.forget_partial(&r)?)))
            .collect()
    }

    /// A replica deleted at its owner's request.
    pub fn remove(&mut self, root: &[u8; 32], ticket: Option<[u8; 32]>) -> Option<HeldEntry> {
        let e = self.held.remove(root)?;
        self.bytes -= e.size;
        if let Some(t) = ticket {
            self.tickets.remove(&t);
        }
        Some(e)
    }

    /// `peer`'s replica by `root`, if it is `peer`'s.
    pub fn owned(&self, peer: &NodeId, root: &[u8; 32]) -> Option<&HeldEntry> {
        self.held.get(root).filter(|e| e.owner == *peer)
    }

    /// Whether `owner`'s replica of `pack` is held as the coordinator
    /// recorded it.
    pub fn holds(&self, owner: &NodeId, pack: &PackId, root: &[u8; 32], size: u64) -> bool {
        matches!(self.held.get(root), Some(e) if e.owner == *owner && e.pack == *pack && e.size == size)
    }

    /// Whether anything of `owner`'s is held.
    pub fn holds_any_of(&self, owner: &NodeId) -> bool {
        self.held.values().any(|e| e.owner == *owner)
    }

    /// Every replica held, by root.
    pub fn held(&self) -> impl Iterator<Item = (&[u8; 32], &HeldEntry)> {
        self.held.iter()
    }

    /// Bytes counted against the offer.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Kept transfers.
    pub fn partials(&self) -> impl Iterator<Item = (&[u8; 32], &Partial)> {
        self.partials.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: NodeId = NodeId([1; 32]);
    const BOB: NodeId = NodeId([2; 32]);

    fn entry(owner: NodeId, size: u64) -> HeldEntry {
        HeldEntry {
            owner,
            pack: PackId([9; 32]),
            size,
            ticket: vec![],
            attest: [0; 64],
        }
    }

    fn code(r: Result<Admit, ServeError>) -> PeerError {
        match r {
            Err(ServeError::Refused(c, _)) => c,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn room_is_reserved_while_receiving_and_freed_when_abandoned() {
        let mut l = Ledger::default();
        let a = l.admit(&ALICE, [1; 32], [10; 32], 600, false, 1000, 0);
        assert!(matches!(
            a,
            Ok(Admit::Receive {
                from: None,
                dropped: None
            })
        ));
        assert_eq!(l.bytes(), 600);
        assert_eq!(
            code(l.admit(&BOB, [2; 32], [11; 32], 500, false, 1000, 0)),
            PeerError::Full
        );
        assert_eq!(
            code(l.admit(&ALICE, [3; 32], [10; 32], 600, false, 1000, 0)),
            PeerError::Busy,
            "one root, one transfer at a time"
        );
        assert_eq!(
            code(l.admit(&ALICE, [1; 32], [12; 32], 10, false, 1000, 0)),
            PeerError::Ticket,
            "one ticket, one replica"
        );
        l.abandon(&[10; 32]);
        assert_eq!(l.bytes(), 0);
        assert!(l
            .admit(&BOB, [2; 32], [11; 32], 500, false, 1000, 0)
            .is_ok());
    }

    #[test]
    fn a_committed_replica_is_had_by_its_owner_only_and_its_ticket_is_spent() {
        let mut l = Ledger::default();
        l.admit(&ALICE, [1; 32], [10; 32], 600, false, 1000, 0)
            .unwrap();
        l.commit([10; 32], entry(ALICE, 600), [1; 32]);
        assert_eq!(l.bytes(), 600);
        l.abandon(&[10; 32]);
        assert_eq!(l.bytes(), 600, "abandoning what is held frees nothing");
        assert!(matches!(
            l.admit(&ALICE, [5; 32], [10; 32], 600, false, 1000, 0),
            Ok(Admit::Have(_))
        ));
        assert_eq!(
            code(l.admit(&BOB, [6; 32], [10; 32], 600, false, 1000, 0)),
            PeerError::Ticket
        );
        assert_eq!(
            code(l.admit(&ALICE, [1; 32], [13; 32], 1, false, 1000, 0)),
            PeerError::Ticket
        );
        assert_eq!(l.remove(&[10; 32], Some([1; 32])), Some(entry(ALICE, 600)));
        assert_eq!(l.bytes(), 0);
    }

    fn partial(owner: NodeId, have: u64, at_ms: u64) -> Partial {
        Partial {
            owner,
            size: 600,
            have,
            nonce: 7,
            at_ms,
            resumes: 0,
        }
    }

    #[test]
    fn a_broken_transfer_is_resumed_by_its_owner_only_and_counts_against_the_offer() {
        let mut l = Ledger::default();
        l.admit(&ALICE, [1; 32], [10; 32], 600, true, 1000, 0)
            .unwrap();
        l.keep_partial([10; 32], partial(ALICE, 250, 0));
        assert_eq!(l.bytes(), 250, "the kept bytes count, the reservation not");
        // Resumed by its owner: the room reserved is the whole replica.
        let a = l.admit(&ALICE, [1; 32], [10; 32], 600, true, 1000, 5);
        let Ok(Admit::Receive {
            from: Some(p),
            dropped: None,
        }) = a
        else {
            panic!("expected a resume, got {a:?}");
        };
        assert_eq!((p.have, p.resumes), (250, 1));
        assert_eq!(l.bytes(), 600);
        l.keep_partial([10; 32], Partial { have: 400, ..p });
        // Someone else, or the owner without resuming, or another size:
        // started over, the kept bytes dropped.
        for (who, size, resume) in [(BOB, 600, true), (ALICE, 600, false), (ALICE, 601, true)] {
            l.keep_partial([10; 32], partial(ALICE, 400, 0));
            let a = l.admit(&who, [2; 32], [10; 32], size, resume, 1000, 5);
            assert!(
                matches!(
                    a,
                    Ok(Admit::Receive {
                        from: None,
                        dropped: Some(_)
                    })
                ),
                "{who:?} {size} {resume}: {a:?}"
            );
            assert_eq!(l.bytes(), size);
            l.abandon(&[10; 32]);
        }
        assert_eq!(l.bytes(), 0);
    }

    #[test]
    fn kept_transfers_expire_and_are_bounded_per_owner() {
        let mut l = Ledger::default();
        for i in 0..6u8 {
            l.admit(&ALICE, [i; 32], [i + 20; 32], 600, true, 10_000, 0)
                .unwrap();
            let evicted = l.keep_partial([i + 20; 32], partial(ALICE, 100, u64::from(i)));
            if usize::from(i) < PARTIALS_PER_OWNER {
                assert!(evicted.is_empty());
            } else {
                assert_eq!(evicted.len(), 1, "the oldest goes");
                assert_eq!(evicted[0].1.at_ms, u64::from(i) - PARTIALS_PER_OWNER as u64);
            }
        }
        assert_eq!(l.bytes(), 100 * PARTIALS_PER_OWNER as u64);
        assert!(l.expired_partials(PARTIAL_KEEP_MS).is_empty());
        assert_eq!(
            l.expired_partials(PARTIAL_KEEP_MS + 10).len(),
            PARTIALS_PER_OWNER
        );
        assert_eq!(l.bytes(), 0);
        // Too old, or resumed too often: started over.
        l.found_partial([30; 32], partial(ALICE, 100, 0));
        let a = l.admit(
            &ALICE,
            [9; 32],
            [30; 32],
            600,
            true,
            10_000,
            PARTIAL_KEEP_MS + 1,
        );
        assert!(matches!(
            a,
            Ok(Admit::Receive {
                from: None,
                dropped: Some(_)
            })
        ));
        l.abandon(&[30; 32]);
        l.found_partial(
            [31; 32],
            Partial {
                resumes: MAX_RESUMES,
                ..partial(ALICE, 100, 0)
            },
        );
        let a = l.admit(&ALICE, [8; 32], [31; 32], 600, true, 10_000, 1);
        assert!(matches!(
            a,
            Ok(Admit::Receive {
                from: None,
                dropped: Some(_)
            })
        ));
    }

    #[test]
    fn link_slots_are_bounded_per_peer_and_in_all() {
        let mut l = Ledger::default();
        for _ in 0..LINKS_PER_PEER {
            assert!(l.open_link(ALICE));
        }
        assert!(!l.open_link(ALICE));
        l.close_link(&ALICE);
        assert!(l.open_link(ALICE));
        let mut peers = 0u16;
        while l.open_link(NodeId(blake3::hash(&peers.to_le_bytes()).into())) {
            peers += 1;
        }
        assert_eq!(usize::from(peers), LINKS_TOTAL - LINKS_PER_PEER);
        assert!(!l.links.contains_key(&BOB) && !l.open_link(BOB));
        assert!(
            !l.links.contains_key(&BOB),
            "a refused peer leaves no entry"
        );
    }
}
