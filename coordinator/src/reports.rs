//! What the coordinator reports to a node about itself and its peers.
//!
//! ```text
//! GetStatus  -> offered, held, placed, how many peers
//! ListPeers  -> per peer (both directions, biggest exchanges first): replicas and bytes each
//!               way, presence, uptime (see [`uptime`]), scores, speed, audit counts
//! GetRepairs -> the owner's replicas to place elsewhere: lost ones, those on excluded storers,
//!               and those on storers offline past the grace period
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use pluto_plugins_api::{
    online_fraction, BooksStore, NodeId, NodeRecord, PackId, ReplicaRecord, StoreError,
};
use pluto_protocol::{
    Message, PeerReport, Quota, RepairItem, RepairReason, StatusReport, MAX_REPAIRS,
};

use crate::audits::rules;
use crate::coordinator::{private, Reply};
use crate::{Coordinator, CoordinatorConfig, Rejected};

/// A node's uptime, the one definition every screen shows: the fraction
/// of time it was online over the uptime window, or over its life when it
/// is younger than the window. None ("new") until its record spans one
/// uptime sample, so a node that joined a minute ago is not "100%".
///
/// This is not the uptime *score* (the track that holds a node back when
/// low), which weighs recent hours most and starts from a prior.
pub async fn uptime(
    books: &dyn BooksStore,
    node: &NodeRecord,
    config: &CoordinatorConfig,
    now_ms: u64,
) -> Result<Option<f64>, StoreError> {
    if now_ms.saturating_sub(node.registered_ms) < config.uptime_sample_ms {
        return Ok(None);
    }
    let from = now_ms
        .saturating_sub(config.uptime_window_ms)
        .max(node.registered_ms);
    let log = books.presence_log(&node.id, from).await?;
    Ok(Some(online_fraction(&log, from, now_ms)))
}

/// Most peers one report lists (as many as one message holds).
const MAX_PEERS: usize = 1024;

/// What two nodes exchange, seen from one of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Exchange {
    /// Replicas the peer holds for me, and their bytes.
    pub(crate) held: (u32, u64),
    /// Replicas I hold for the peer, and their bytes.
    pub(crate) stored: (u32, u64),
}

/// Each peer of a node, from its replicas placed (`placed`, the peer is
/// the storer) and held (`held`, the peer is the owner): the biggest
/// exchanges first, at most [`MAX_PEERS`].
pub(crate) fn exchanges(
    placed: &[ReplicaRecord],
    held: &[ReplicaRecord],
) -> Vec<(NodeId, Exchange)> {
    let mut by_peer: BTreeMap<NodeId, Exchange> = BTreeMap::new();
    for r in placed {
        let e = &mut by_peer.entry(r.storer).or_default().held;
        *e = (e.0.saturating_add(1), e.1.saturating_add(r.size));
    }
    for r in held {
        let e = &mut by_peer.entry(r.owner).or_default().stored;
        *e = (e.0.saturating_add(1), e.1.saturating_add(r.size));
    }
    let mut peers: Vec<_> = by_peer.into_iter().collect();
    peers.sort_by_key(|(id, e)| (std::cmp::Reverse(e.held.1.saturating_add(e.stored.1)), *id));
    peers.truncate(MAX_PEERS);
    peers
}

/// Why replicas on `storer` (None: not in the books) must be placed
/// elsewhere, if they must.
pub(crate) fn repair_reason(
    storer: Option<&NodeRecord>,
    now_ms: u64,
    offline_grace_ms: u64,
) -> Option<RepairReason> {
    match storer {
        None => Some(RepairReason::Offline),
        Some(n) if n.standing.excluded_ms != 0 => Some(RepairReason::Excluded),
        Some(n) if !n.online && now_ms.saturating_sub(n.last_seen_ms) > offline_grace_ms => {
            Some(RepairReason::Offline)
        }
        Some(_) => None,
    }
}

impl Coordinator {
    /// `GetStatus`.
    pub(crate) async fn status(&self, node: &NodeRecord) -> Result<Reply, Rejected> {
        let mut peers: Vec<NodeId> = (self.books.replicas_of(&node.id).await?.iter())
            .map(|r| r.storer)
            .chain((self.books.replicas_held_by(&node.id).await?.iter()).map(|r| r.owner))
            .collect();
        peers.sort_unstable();
        peers.dedup();
        Ok(private(Message::Status(StatusReport {
            offered: node.offer,
            held: node.held,
            placed: node.placed,
            peers: peers.len() as u32,
            quota: Some(Quota {
                may_place: node.may_place(self.config.grant_bytes),
                earned: node.earned,
                grant: self.config.grant_bytes,
            }),
        })))
    }

    /// `ListPeers`.
    pub(crate) async fn list_peers(&self, me: &NodeId, now_ms: u64) -> Result<Reply, Rejected> {
        let placed = self.books.replicas_of(me).await?;
        let held = self.books.replicas_held_by(me).await?;
        let peers = exchanges(&placed, &held);
        let mut out = Vec::with_capacity(peers.len());
        for (id, e) in peers {
            let node = self.books.node(&id).await?;
            let uptime = match &node {
                Some(n) => uptime(&*self.books, n, &self.config, now_ms).await?,
                None => None,
            };
            let st = node
                .as_ref()
                .map(|n| n.standing.clone())
                .unwrap_or_default();
            out.push(PeerReport {
                id,
                online: node.as_ref().is_some_and(|n| n.online),
                last_seen_ms: node.as_ref().map_or(0, |n| n.last_seen_ms),
                uptime_permille: uptime.map(|u| (u * 1000.0).round().clamp(0.0, 1000.0) as u16),
                replicas_held: e.held.0,
                bytes_held: e.held.1,
                replicas_stored: e.stored.0,
                bytes_stored: e.stored.1,
                audit_permille: rules::permille(&st.audit),
                timeout_permille: rules::permille(&st.timeout),
                uptime_score_permille: rules::permille(&st.uptime),
                speed_bps: rules::decayed_speed(&st, self.config.speed_half_life_ms, now_ms),
                audits_passed: st.passed,
                audits_failed: st.failed,
                audits_timed_out: st.timed_out,
                excluded: st.excluded_ms != 0,
                held_back: st.held_back,
            });
        }
        Ok(private(Message::Peers(out)))
    }

    /// `GetRepairs`: lost replicas first, then those on storers that are
    /// excluded or offline past the grace period; at most [`MAX_REPAIRS`].
    pub(crate) async fn list_repairs(
        &self,
        owner: &NodeId,
        now_ms: u64,
    ) -> Result<Reply, Rejected> {
        let mut out: Vec<RepairItem> = (self.books.lost_replicas(owner).await?.into_iter())
            .map(|(pack, storer)| RepairItem {
                pack,
                storer,
                reason: RepairReason::Lost,
            })
            .collect();
        let lost: HashSet<(PackId, NodeId)> = out.iter().map(|i| (i.pack, i.storer)).collect();
        let mut verdicts: HashMap<NodeId, Option<RepairReason>> = HashMap::new();
        for r in self.books.replicas_of(owner).await? {
            if out.len() >= MAX_REPAIRS {
                break;
            }
            if lost.contains(&(r.pack, r.storer)) {
                continue;
            }
            let verdict = match verdicts.get(&r.storer) {
                Some(v) => *v,
                None => {
                    let storer = self.books.node(&r.storer).await?;
                    let v = repair_reason(storer.as_ref(), now_ms, self.config.offline_grace_ms);
                    verdicts.insert(r.storer, v);
                    v
                }
            };
            if let Some(reason) = verdict {
                out.push(RepairItem {
                    pack: r.pack,
                    storer: r.storer,
                    reason,
                });
            }
        }
        out.truncate(MAX_REPAIRS);
        Ok(private(Message::Repairs(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pluto_plugins_api::Standing;

    fn replica(owner: u8, storer: u8, size: u64) -> ReplicaRecord {
        ReplicaRecord {
            owner: NodeId([owner; 32]),
            pack: PackId([size as u8; 32]),
            storer: NodeId([storer; 32]),
            size,
            root: [0; 32],
        }
    }

    #[test]
    fn exchanges_count_both_ways_biggest_first() {
        let me = 1;
        let placed = [replica(me, 2, 10), replica(me, 2, 20), replica(me, 3, 5)];
        let held = [replica(3, me, 100), replica(4, me, 1)];
        let e = exchanges(&placed, &held);
        let ids: Vec<u8> = e.iter().map(|(id, _)| id.0[0]).collect();
        assert_eq!(ids, [3, 2, 4]);
        assert_eq!(
            e[0].1,
            Exchange {
                held: (1, 5),
                stored: (1, 100)
            }
        );
        assert_eq!(
            e[1].1,
            Exchange {
                held: (2, 30),
                stored: (0, 0)
            }
        );
    }

    #[test]
    fn repair_reasons() {
        let now = 10_000_000;
        let grace = 1_000;
        let mut n = NodeRecord {
            id: NodeId([2; 32]),
            exchange_key: [0; 32],
            offer: 0,
            held: 0,
            placed: 0,
            earned: 0,
            online: false,
            last_seen_ms: now - 500,
            registered_ms: 0,
            online_ms: 0,
            online_since_ms: 0,
            standing: Standing::default(),
        };
        assert_eq!(repair_reason(None, now, grace), Some(RepairReason::Offline));
        assert_eq!(
            repair_reason(Some(&n), now, grace),
            None,
            "within the grace"
        );
        n.last_seen_ms = now - 1001;
        assert_eq!(
            repair_reason(Some(&n), now, grace),
            Some(RepairReason::Offline)
        );
        n.online = true;
        assert_eq!(repair_reason(Some(&n), now, grace), None);
        n.standing.excluded_ms = 1;
        assert_eq!(
            repair_reason(Some(&n), now, grace),
            Some(RepairReason::Excluded)
        );
        // Seen "after" now (the clock stepped back): not offline for long.
        n.standing.excluded_ms = 0;
        n.online = false;
        n.last_seen_ms = now + 3_600_000;
        assert_eq!(repair_reason(Some(&n), now, grace), None);
    }
}
