//! Matching and the life of a replica in the books.
//!
//! ```text
//! MatchRequest{pack, size, copies, friends, friend_copies, exclude}
//!   -> candidates (a bounded sample of nodes with room) + the friends' records
//!   -> rank (pure): usable ones only (online, room, standing), the more often online first,
//!      random within
//!   -> reserve each in turn (atomic in the books; one that filled up meanwhile is skipped):
//!      friends for friend_copies, then anyone
//!   -> MatchReply{storers, tickets}  (a ticket: this owner may place this pack, this size, on this
//!                                     storer, until the reservation lapses; signed by us)
//! RecordReplica{.., receipt}  the storer's signed receipt for that very replica -> recorded
//! DropReplica                 the owner forgets a replica; the storer's claim is released
//! ReportHeld[..]              a storer's list of what it holds, each with our ticket and the
//!                             owner's signed statement -> restored in the books (after a loss
//!                             of the coordinator's database)
//! ```

use pluto_plugins_api::{human, NodeId, NodeRecord, OwnerLimits, PackId, Recorded, ReplicaRecord};
use pluto_protocol::{ErrorCode, HeldReport, Message, ReplicaStatement, Ticket};
use std::collections::{HashMap, HashSet};

use rand::seq::SliceRandom;
use rand_core::{CryptoRngCore, RngCore};

use crate::audits::rules;
use crate::coordinator::{error, lock, private, public, Reply, RngAdapter};
use crate::{Coordinator, CoordinatorConfig, Rejected};

/// What a match asks for.
pub(crate) struct Want<'a> {
    pub(crate) size: u64,
    pub(crate) copies: u8,
    pub(crate) friends: &'a [NodeId],
    pub(crate) friend_copies: u8,
    pub(crate) exclude: &'a [NodeId],
}

/// The nodes a match may pick from.
pub(crate) struct Candidates {
    /// The records of the friends the owner named.
    pub(crate) friends: Vec<NodeRecord>,
    /// A sample of the others with room.
    pub(crate) others: Vec<NodeRecord>,
    /// Those of them refused a match for want of quota lately.
    pub(crate) hungry: HashSet<NodeId>,
}

/// The storers a match tries, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Ranked {
    /// Friends, tried first for the friend copies.
    pub(crate) friends: Vec<NodeId>,
    /// Everyone else.
    pub(crate) others: Vec<NodeId>,
}

/// Most friends looked up for one match.
const MAX_FRIENDS: usize = 64;

/// Orders the candidates for `owner`'s match: only those online now, with
/// room, that may take new data (not the owner, not excluded by the
/// request, not excluded or held back, within their vetting limit); an
/// offline storer is never matched, since the owner would wait on it and
/// fail. Those online more often come before the rest, random within
/// each group (so load spreads). `friends` are the records of the nodes
/// the owner named; `others` never include them.
pub(crate) fn rank(
    owner: &NodeId,
    want: &Want<'_>,
    candidates: Candidates,
    c: &CoordinatorConfig,
    now_ms: u64,
    rng: &mut (impl RngCore + ?Sized),
) -> Ranked {
    let Candidates {
        friends,
        others,
        hungry,
    } = candidates;
    let hungry = &hungry;
    let usable = |n: &NodeRecord| {
        n.id != *owner
            && n.online
            && !want.exclude.contains(&n.id)
            && n.free() >= want.size
            && n.standing.eligible()
            && rules::vetted_room(&n.standing, n.held, want.size, c)
    };
    let others: Vec<NodeRecord> = others
        .into_iter()
        .filter(|n| usable(n) && !want.friends.contains(&n.id))
        .collect();
    let mut friendly: Vec<NodeRecord> = Vec::new();
    for n in friends {
        if usable(&n) && !friendly.iter().any(|x| x.id == n.id) {
            friendly.push(n);
        }
    }
    Ranked {
        others: order(others, hungry, now_ms, rng),
        friends: order(friendly, hungry, now_ms, rng),
    }
}

/// By lifetime uptime in quarters; within each, the hungry first (nodes
/// that were refused a match for want of quota lately: holding more lets
/// them place more, so giving and getting grow together); random within.
fn order(
    mut nodes: Vec<NodeRecord>,
    hungry: &HashSet<NodeId>,
    now_ms: u64,
    rng: &mut (impl RngCore + ?Sized),
) -> Vec<NodeId> {
    nodes.shuffle(rng);
    nodes.sort_by_key(|n| {
        let quarter = 4 - (n.lifetime_uptime(now_ms) * 4.0) as u8;
        // Then the most in want of holdings: what they placed beyond what
        // they are proven to hold.
        let want = n.placed.saturating_sub(n.earned);
        (quarter, !hungry.contains(&n.id), std::cmp::Reverse(want))
    });
    nodes.into_iter().map(|n| n.id).collect()
}

/// Nodes refused a match for want of quota, and when (the last time):
/// for a day they are storers of choice. Bounded: past this many, the
/// oldest half is forgotten.
#[derive(Debug, Default)]
pub(crate) struct Hungry {
    since: HashMap<NodeId, u64>,
}

const HUNGRY_FOR_MS: u64 = 24 * 3_600_000;
const MAX_HUNGRY: usize = 100_000;

impl Hungry {
    fn note(&mut self, node: NodeId, now_ms: u64) {
        if self.since.len() >= MAX_HUNGRY {
            let mut times: Vec<u64> = self.since.values().copied().collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            self.since.retain(|_, t| *t > cut);
        }
        self.since.insert(node, now_ms);
    }

    /// Which of `nodes` were hungry within the last day.
    fn among(&self, nodes: &[NodeRecord], now_ms: u64) -> HashSet<NodeId> {
        nodes
            .iter()
            .filter(|n| {
                self.since
                    .get(&n.id)
                    .is_some_and(|t| now_ms.saturating_sub(*t) < HUNGRY_FOR_MS)
            })
            .map(|n| n.id)
            .collect()
    }
}

impl Coordinator {
    /// `MatchRequest`: storers for `copies` replicas of `pack`, with their
    /// space reserved and a ticket for each.
    pub(crate) async fn match_request(
        &self,
        owner: &NodeRecord,
        pack: PackId,
        want: &Want<'_>,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Reply, Rejected> {
        if want.copies == 0 || want.copies > self.config.max_copies || want.size == 0 {
            return Ok(error(
                ErrorCode::Refused,
                format!(
                    "copies must be 1..={}, size above 0",
                    self.config.max_copies
                ),
            ));
        }
        // What this owner may place: the grant, plus what it is proven to
        // hold for others, within its offer. A key with a huge offer and
        // nothing held gets the grant, no more.
        if !lock(&self.matches).take(&owner.id, 1, now_ms) {
            return Ok(error(
                ErrorCode::Busy,
                format!(
                    "too many match requests (at most {}/s); try again shortly",
                    self.config.matches_per_s
                ),
            ));
        }
        let may = owner.may_place(self.config.grant_bytes);
        if owner.placed.saturating_add(want.size) > may {
            lock(&self.hungry).note(owner.id, now_ms);
            return Ok(error(
                ErrorCode::NoCapacity,
                format!(
                    "your quota is used up: you may place {} (a grant of {} plus {} you are \
                     proven to hold for others, up to your offer of {}) and placed {}; hold \
                     more for others (pluto offer, and keep the daemon running) to place more",
                    human::bytes(may),
                    human::bytes(self.config.grant_bytes),
                    human::bytes(owner.earned),
                    human::bytes(owner.offer),
                    human::bytes(owner.placed),
                ),
            ));
        }
        let storers = self.match_storers(owner, want, now_ms, rng).await?;
        if storers.is_empty() {
            return Ok(error(
                ErrorCode::NoCapacity,
                "no storer online has room (or your quota is used up)",
            ));
        }
        let expires_ms = now_ms.saturating_add(self.config.reservation_ttl_ms);
        let tickets = storers
            .iter()
            .map(|storer| {
                Ticket {
                    owner: owner.id,
                    storer: *storer,
                    size: want.size,
                    expires_ms,
                    pack,
                }
                .sign(&self.identity)
            })
            .collect();
        Ok(private(Message::MatchReply { storers, tickets }))
    }

    /// Picks up to `copies` distinct storers (see [`rank`]), friends first
    /// for `friend_copies`, then others (and friends who are left, if
    /// others lack room). Each pick reserves its space atomically until
    /// `reservation_ttl_ms` from now; a candidate that filled up meanwhile
    /// is skipped.
    async fn match_storers(
        &self,
        owner: &NodeRecord,
        want: &Want<'_>,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Vec<NodeId>, Rejected> {
        // A bounded sample of nodes with room, so a match costs the same
        // with ten nodes or ten thousand.
        let sample = 32 + 4 * want.copies as usize + want.exclude.len();
        let others = self.books.candidates(want.size, sample).await?;
        let mut friends = Vec::new();
        for f in want.friends.iter().take(MAX_FRIENDS) {
            if let Some(n) = self.books.node(f).await? {
                friends.push(n);
            }
        }
        let hungry = lock(&self.hungry).among(&others, now_ms);
        let ranked = rank(
            &owner.id,
            want,
            Candidates {
                friends,
                others,
                hungry,
            },
            &self.config,
            now_ms,
            &mut RngAdapter(rng),
        );
        let expires = now_ms.saturating_add(self.config.reservation_ttl_ms);
        let limits = OwnerLimits {
            grant: self.config.grant_bytes,
            max_reservations: self.config.max_reservations,
        };
        let want_friends = want.friend_copies.min(want.copies) as usize;
        let mut picked = Vec::new();
        for n in &ranked.friends {
            if picked.len() >= want_friends {
                break;
            }
            if self
                .books
                .reserve(&owner.id, n, want.size, expires, limits)
                .await?
            {
                picked.push(*n);
            }
        }
        for n in ranked.others.iter().chain(ranked.friends.iter()) {
            if picked.len() >= want.copies as usize {
                break;
            }
            if !picked.contains(n)
                && self
                    .books
                    .reserve(&owner.id, n, want.size, expires, limits)
                    .await?
            {
                picked.push(*n);
            }
        }
        Ok(picked)
    }

    /// `RecordReplica`: the owner records a replica it placed, with the
    /// storer's receipt for that very replica, against its reservation.
    pub(crate) async fn record_replica(
        &self,
        replica: &ReplicaRecord,
        receipt: &[u8; 64],
        micros: u64,
        now_ms: u64,
    ) -> Result<Reply, Rejected> {
        let statement = ReplicaStatement {
            owner: replica.owner,
            storer: replica.storer,
            pack: replica.pack,
            size: replica.size,
            root: replica.root,
        };
        if !statement.signed_by(&replica.storer, receipt) {
            return Ok(error(
                ErrorCode::Refused,
                "the storer's receipt does not name this replica",
            ));
        }
        Ok(match self.books.record_replica(replica, now_ms).await? {
            Recorded::New | Recorded::Again => {
                self.measured(&replica.storer, replica.size, micros, now_ms)
                    .await?;
                public(Message::Ok)
            }
            Recorded::NoReservation => error(
                ErrorCode::Refused,
                "no reservation of yours on that storer covers this replica (ask for a match first)",
            ),
            Recorded::Conflict => error(
                ErrorCode::Refused,
                "another replica of this pack is recorded at that storer",
            ),
        })
    }

    /// `DropReplica`: the owner forgets a replica.
    pub(crate) async fn drop_replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<Reply, Rejected> {
        self.books.drop_replica(owner, pack, storer).await?;
        Ok(public(Message::Ok))
    }

    /// `ReportHeld`: what a storer reports it holds. Each entry must come
    /// with a ticket this coordinator signed for this storer and that pack,
    /// be no bigger than the ticket allows, and carry the owner's signed
    /// statement of the root (the one the owner signed when it sent the
    /// bytes, not one the storer names now).
    pub(crate) async fn report_held(
        &self,
        storer: &NodeId,
        held: &[HeldReport],
        now_ms: u64,
    ) -> Result<Reply, Rejected> {
        let mut taken = 0;
        for h in held {
            let Ok(t) = Ticket::verify(&h.ticket, &self.id()) else {
                continue;
            };
            if t.storer != *storer || t.pack != h.pack || h.size > t.size || t.owner == *storer {
                continue;
            }
            let statement = ReplicaStatement {
                owner: t.owner,
                storer: *storer,
                pack: h.pack,
                size: h.size,
                root: h.root,
            };
            if !statement.signed_by(&t.owner, &h.attest) {
                continue;
            }
            let replica = ReplicaRecord {
                owner: t.owner,
                pack: h.pack,
                storer: *storer,
                size: h.size,
                root: h.root,
            };
            self.books.restore_replica(&replica, now_ms).await?;
            taken += 1;
        }
        Ok(public(Message::HeldTaken { taken }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pluto_plugins_api::Standing;
    use rand::SeedableRng;

    const NOW: u64 = 1_800_000_000_000;

    fn node(n: u8, free: u64, online: bool) -> NodeRecord {
        NodeRecord {
            id: NodeId([n; 32]),
            exchange_key: [0; 32],
            offer: free,
            held: 0,
            placed: 0,
            earned: 0,
            online,
            last_seen_ms: NOW,
            registered_ms: NOW - 1000,
            online_ms: 0,
            online_since_ms: NOW - 1000,
            standing: Standing::default(),
        }
    }

    fn want<'a>(friends: &'a [NodeId], exclude: &'a [NodeId]) -> Want<'a> {
        Want {
            size: 100,
            copies: 2,
            friends,
            friend_copies: 1,
            exclude,
        }
    }

    #[test]
    fn hungry_storers_come_first_among_equals() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let nodes: Vec<NodeRecord> = (11..15).map(|n| node(n, 10_000, true)).collect();
        let mut hungry = Hungry::default();
        hungry.note(NodeId([12; 32]), NOW - 1000);
        hungry.note(NodeId([14; 32]), NOW - HUNGRY_FOR_MS); // a day ago: no longer
        hungry.note(NodeId([13; 32]), NOW);
        let set = hungry.among(&nodes, NOW);
        assert_eq!(set.len(), 2);
        for _ in 0..20 {
            let ids = order(nodes.clone(), &set, NOW, &mut rng);
            let mut first: Vec<_> = ids[..2].to_vec();
            first.sort();
            assert_eq!(first, vec![NodeId([12; 32]), NodeId([13; 32])]);
        }
    }

    #[test]
    fn only_usable_storers_and_never_offline_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let c = CoordinatorConfig::default();
        let owner = NodeId([1; 32]);
        let mut excluded = node(5, 1000, true);
        excluded.standing.excluded_ms = 1;
        let mut held_back = node(6, 1000, true);
        held_back.standing.held_back = true;
        let mut vetted = node(7, u64::MAX, true);
        vetted.held = c.vetting_bytes;
        let others = vec![
            node(1, 1000, true),  // the owner
            node(2, 99, true),    // no room
            node(3, 1000, true),  // excluded by the request
            node(4, 1000, false), // offline
            excluded,
            held_back,
            vetted,
            node(8, 1000, true),
            node(9, 1000, true), // a friend: not among the others
        ];
        let friends = vec![
            node(9, 1000, true),
            node(9, 1000, true),
            node(2, 10, true),
            node(10, 1000, false), // an offline friend
        ];
        let r = rank(
            &owner,
            &want(
                &[NodeId([9; 32]), NodeId([2; 32]), NodeId([10; 32])],
                &[NodeId([3; 32])],
            ),
            Candidates {
                friends,
                others,
                hungry: HashSet::new(),
            },
            &c,
            NOW,
            &mut rng,
        );
        assert_eq!(
            r.friends,
            vec![NodeId([9; 32])],
            "once, only with room, only online"
        );
        assert_eq!(r.others, vec![NodeId([8; 32])], "never an offline storer");
    }

    #[test]
    fn random_within_a_group() {
        let c = CoordinatorConfig::default();
        let others: Vec<NodeRecord> = (10..30).map(|n| node(n, 1000, true)).collect();
        let firsts: std::collections::HashSet<NodeId> = (0..20)
            .map(|seed| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                rank(
                    &NodeId([1; 32]),
                    &want(&[], &[]),
                    Candidates {
                        friends: vec![],
                        others: others.clone(),
                        hungry: HashSet::new(),
                    },
                    &c,
                    NOW,
                    &mut rng,
                )
                .others[0]
            })
            .collect();
        assert!(firsts.len() > 5, "{firsts:?}");
    }
}
