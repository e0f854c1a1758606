//! The coordinator's books: registered nodes, their offers and usage, space
//! reservations, pack replicas, manifests and presence. SQLite by default,
//! Postgres for scale; every coordinator replica works from the same books,
//! so the atomic operations here are what keeps concurrent replicas
//! consistent.
//!
//! Space moves through two steps. A match *reserves* room on a storer (and
//! quota on the owner) until a deadline; the owner then *records* the
//! replica it placed, which turns one reservation into a replica. A
//! reservation nobody records is released once its deadline passes, so an
//! owner that asked and went away gives the space back.
//!
//! [`testkit`](crate::testkit) (feature `testkit`) holds the tests every
//! implementation must pass.

use crate::{NodeId, PackId, StoreError};

/// One reputation track: a beta reputation (as Storj publishes it). Each
/// observation `v` in -1..=1 (a failure is -1, a success 1) with weight `w`
/// moves it: `alpha <- l*alpha + w(1+v)/2`, `beta <- l*beta + w(1-v)/2`;
/// `l` below 1 lets old observations fade. The score is
/// `alpha / (alpha + beta)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Beta {
    /// Weighted successes.
    pub alpha: f64,
    /// Weighted failures.
    pub beta: f64,
}

impl Default for Beta {
    /// The prior of a new node: one success, no failure (score 1).
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

impl Beta {
    /// `alpha / (alpha + beta)`; 1 when both are 0.
    pub fn score(&self) -> f64 {
        let total = self.alpha + self.beta;
        if total > 0.0 && total.is_finite() {
            (self.alpha / total).clamp(0.0, 1.0)
        } else {
            1.0
        }
    }

    /// Takes one observation `v` (-1..=1) of weight `w` with forgetting
    /// factor `l`.
    pub fn observe(&mut self, l: f64, w: f64, v: f64) {
        let v = v.clamp(-1.0, 1.0);
        self.alpha = l * self.alpha + w * (1.0 + v) / 2.0;
        self.beta = l * self.beta + w * (1.0 - v) / 2.0;
    }

    /// Takes `k` (not necessarily whole) observations of the same `v` and
    /// weight `w` at once: the closed form of `k` calls to [`Self::observe`].
    pub fn observe_many(&mut self, l: f64, w: f64, v: f64, k: f64) {
        if k <= 0.0 {
            return;
        }
        let v = v.clamp(-1.0, 1.0);
        let lk = l.powf(k);
        // The sum of l^i for i in 0..k.
        let sum = if (1.0 - l).abs() < 1e-12 {
            k
        } else {
            (1.0 - lk) / (1.0 - l)
        };
        self.alpha = lk * self.alpha + w * (1.0 + v) / 2.0 * sum;
        self.beta = lk * self.beta + w * (1.0 - v) / 2.0 * sum;
    }
}

/// What the coordinator knows of a node as a storer: its reputation per
/// track, what its audits came to, its measured speed, and whether it may
/// get new data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Standing {
    /// Audits answered: right answers against wrong ones (data lost).
    pub audit: Beta,
    /// Audits answered in time against audits not answered while online.
    pub timeout: Beta,
    /// Time online against time offline (an exponentially weighted online
    /// fraction).
    pub uptime: Beta,
    /// Audits passed.
    pub passed: u64,
    /// Audits failed (wrong answer, or the replica is not there).
    pub failed: u64,
    /// Audits not answered in time while online.
    pub timed_out: u64,
    /// Transfer speed, bytes per second, as owners measured it (0: none yet).
    pub speed_bps: u64,
    /// When the speed was last measured, ms since the epoch.
    pub speed_at_ms: u64,
    /// When it was excluded for failing audits (0: never). Excluded nodes
    /// get no new data, and their owners repair elsewhere; it is not undone.
    pub excluded_ms: u64,
    /// Whether it gets no new data for now: its uptime, answers in time or
    /// speed are below the coordinator's minimums. Cleared when they recover.
    pub held_back: bool,
}

impl Standing {
    /// Whether new data may be placed on it.
    pub fn eligible(&self) -> bool {
        self.excluded_ms == 0 && !self.held_back
    }
}

/// A registered node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRecord {
    /// Its identity.
    pub id: NodeId,
    /// Its X25519 key for private messages.
    pub exchange_key: [u8; 32],
    /// Bytes it offers to others.
    pub offer: u64,
    /// Bytes others placed on it (reserved or stored).
    pub held: u64,
    /// Bytes it placed on others, every replica counted (reserved or stored).
    pub placed: u64,
    /// Bytes it holds for others in replicas that passed an audit: what it
    /// has earned the right to place, beyond the grant ([`Self::may_place`]).
    pub earned: u64,
    /// Whether its channel is connected.
    pub online: bool,
    /// Last time it was heard from, ms since the epoch.
    pub last_seen_ms: u64,
    /// When it first registered.
    pub registered_ms: u64,
    /// Time spent online in stretches that ended.
    pub online_ms: u64,
    /// When the current online stretch began (meaningful while online).
    pub online_since_ms: u64,
    /// Its reputation and whether it may get new data.
    pub standing: Standing,
}

impl NodeRecord {
    /// Bytes of its offer nobody uses yet.
    pub fn free(&self) -> u64 {
        self.offer.saturating_sub(self.held)
    }

    /// Bytes it may place on others in all: the `grant` every node gets,
    /// plus what it is proven to hold for others, never more than it offers.
    pub fn may_place(&self, grant: u64) -> u64 {
        self.offer.min(grant.saturating_add(self.earned))
    }

    /// The fraction of its life since registration spent online, at `now_ms`.
    /// A cheap running figure for ranking; [`online_fraction`] gives the
    /// exact one for a window.
    pub fn lifetime_uptime(&self, now_ms: u64) -> f64 {
        let life = now_ms.saturating_sub(self.registered_ms);
        if life == 0 {
            return if self.online { 1.0 } else { 0.0 };
        }
        let current = if self.online {
            now_ms.saturating_sub(self.online_since_ms)
        } else {
            0
        };
        ((self.online_ms + current) as f64 / life as f64).clamp(0.0, 1.0)
    }
}

/// One replica of a pack, as the books keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// Whose pack.
    pub owner: NodeId,
    /// The pack.
    pub pack: PackId,
    /// Who holds this replica.
    pub storer: NodeId,
    /// Its size.
    pub size: u64,
    /// BLAKE3 root of the replica's bytes.
    pub root: [u8; 32],
}

/// What the books marked on a replica ([`BooksStore::replica_marked`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaMarks {
    /// When it was recorded ([`BooksStore::record_replica`], or reported
    /// again: [`BooksStore::restore_replica`]).
    pub recorded_ms: u64,
    /// When an audit first found it not held (0: never).
    pub lost_ms: u64,
}

/// What recording a replica did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A reservation became this replica.
    New,
    /// The very same replica was already recorded; nothing changed.
    Again,
    /// No reservation from this owner on this storer covers it; nothing changed.
    NoReservation,
    /// Another replica of this pack at this storer is recorded (other size
    /// or root); nothing changed.
    Conflict,
}

/// A node's manifest kept at the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRecord {
    /// Its version.
    pub version: u64,
    /// The opaque (encrypted, signed) bytes.
    pub blob: Vec<u8>,
}

/// The fraction of `from_ms..to_ms` a node spent online, from its presence
/// log (changes in time order; the first may lie before `from_ms` and gives
/// the state at the start). Before the first change the node counts as
/// offline.
pub fn online_fraction(log: &[(u64, bool)], from_ms: u64, to_ms: u64) -> f64 {
    if to_ms <= from_ms {
        return 0.0;
    }
    let mut online_ms = 0u64;
    let mut state = false;
    let mut since = from_ms;
    for &(at, online) in log {
        let at = at.clamp(from_ms, to_ms);
        if state {
            online_ms += at.saturating_sub(since);
        }
        state = online;
        since = since.max(at);
    }
    if state {
        online_ms += to_ms.saturating_sub(since);
    }
    online_ms as f64 / (to_ms - from_ms) as f64
}

/// What one owner may reserve ([`BooksStore::reserve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerLimits {
    /// Bytes every node may place before it holds anything for others.
    pub grant: u64,
    /// Reservations one owner may have pending at once.
    pub max_reservations: u64,
}

impl OwnerLimits {
    /// No limit but the owner's offer.
    pub const NONE: Self = Self {
        grant: u64::MAX,
        max_reservations: u64::MAX,
    };
}

/// The coordinator's store.
#[async_trait::async_trait]
pub trait BooksStore: Send + Sync {
    /// Registers a node or updates its exchange key and offer (never below
    /// what it holds or placed); usage stays.
    async fn register(
        &self,
        id: &NodeId,
        exchange_key: &[u8; 32],
        offer: u64,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// One node.
    async fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Up to `limit` eligible nodes ([`Standing::eligible`]) online now
    /// with at least `size` bytes of free offer, a random sample when there
    /// are more (so load spreads). An offline node is never a candidate:
    /// its owner would wait on it and fail.
    async fn candidates(&self, size: u64, limit: usize) -> Result<Vec<NodeRecord>, StoreError>;
    /// Changes a node's offer; refused (false) below what it already holds
    /// or has placed.
    async fn set_offer(&self, id: &NodeId, offer: u64) -> Result<bool, StoreError>;
    /// Records that a node was heard from (`online`) or went offline at
    /// `now_ms`. Only changes go to the presence log; a heartbeat from a
    /// node already online just moves its last-seen time. Going offline
    /// never moves it: last-seen is when the node itself was last heard
    /// from, so a goodbye (which anyone could fake) cannot keep a vanished
    /// node looking recent.
    async fn presence(&self, id: &NodeId, online: bool, now_ms: u64) -> Result<(), StoreError>;
    /// Marks offline, at `now_ms`, every online node last heard from before
    /// `silent_since_ms` (its goodbye was lost, or it came while the
    /// coordinator was down). Returns them.
    async fn mark_silent_offline(
        &self,
        silent_since_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<NodeId>, StoreError>;
    /// A node's presence changes from the last one at or before `from_ms`
    /// onwards, in time order, for [`online_fraction`].
    async fn presence_log(&self, id: &NodeId, from_ms: u64)
        -> Result<Vec<(u64, bool)>, StoreError>;
    /// Forgets presence changes before `before_ms`, keeping each node's last
    /// one before it (so its state at that time stays known).
    async fn prune_presence(&self, before_ms: u64) -> Result<u64, StoreError>;
    /// Atomically reserves `size` bytes of `storer`'s free offer for one
    /// replica of `owner`'s, within `owner`'s own quota (what it placed may
    /// not exceed [`NodeRecord::may_place`] with `limits.grant`) and with
    /// fewer than `limits.max_reservations` of its reservations pending,
    /// until `expires_ms`. False, changing nothing, when any would be
    /// over-committed.
    async fn reserve(
        &self,
        owner: &NodeId,
        storer: &NodeId,
        size: u64,
        expires_ms: u64,
        limits: OwnerLimits,
    ) -> Result<bool, StoreError>;
    /// An audit of this replica passed at `now_ms`: the first time, its
    /// size counts towards its storer's `earned` (until the replica is
    /// dropped or found lost). False when no such replica is kept, or it
    /// is lost.
    async fn mark_proven(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Releases every reservation whose deadline is at or before `now_ms`,
    /// giving the space back to storers and the quota back to owners.
    /// Returns how many were released.
    async fn release_expired(&self, now_ms: u64) -> Result<u64, StoreError>;
    /// Turns one of `owner`'s reservations on `storer` (one at least
    /// `replica.size`: the smallest, then the earliest to expire, so that a
    /// small replica never takes the reservation a bigger one was matched
    /// with) into this replica, recorded at `now_ms`; reserved bytes beyond
    /// its size are given back.
    async fn record_replica(
        &self,
        replica: &ReplicaRecord,
        now_ms: u64,
    ) -> Result<Recorded, StoreError>;
    /// One replica with what the books marked on it, in one read (an
    /// audit needs both); None when it is not recorded.
    async fn replica_marked(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<Option<(ReplicaRecord, ReplicaMarks)>, StoreError>;
    /// Records a replica its storer reported again, for books that lost it
    /// (the report is checked by the caller against the placement ticket):
    /// adds its size to the storer's `held` and the owner's `placed`,
    /// registering an owner the books do not know (no offer, no exchange
    /// key until it authenticates). False, changing nothing, when a replica
    /// of that pack at that storer is already recorded, or the storer's
    /// offer has no room for it (a report never exceeds the offer).
    async fn restore_replica(
        &self,
        replica: &ReplicaRecord,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Replaces the addresses a node announced (`quic:IP:PORT` and so on).
    async fn set_addresses(&self, id: &NodeId, addresses: &[String]) -> Result<(), StoreError>;
    /// The registered ones among `ids`, each with whether it is online and
    /// the addresses it announced.
    async fn addresses(
        &self,
        ids: &[NodeId],
    ) -> Result<Vec<(NodeId, bool, Vec<String>)>, StoreError>;
    /// The replicas of one owner's packs.
    async fn replicas_of(&self, owner: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError>;
    /// The replicas one storer holds, for every owner.
    async fn replicas_held_by(&self, storer: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError>;
    /// Keeps a manifest when `version` is newer than the kept one; false
    /// (keeping the old one) otherwise.
    async fn put_manifest(
        &self,
        id: &NodeId,
        version: u64,
        blob: &[u8],
    ) -> Result<bool, StoreError>;
    /// A node's kept manifest.
    async fn manifest(&self, id: &NodeId) -> Result<Option<ManifestRecord>, StoreError>;
    /// Replaces a node's standing; false when the node is unknown.
    async fn set_standing(&self, id: &NodeId, standing: &Standing) -> Result<bool, StoreError>;
    /// One replica: `owner`'s pack `pack` at `storer`.
    async fn replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<Option<ReplicaRecord>, StoreError>;
    /// Forgets a replica, giving its size back to the storer's free offer
    /// and to the owner's quota (and taking it off the storer's `earned`
    /// when it was proven); false when it was not recorded.
    async fn drop_replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<bool, StoreError>;
    /// Marks a replica lost (an audit proved it is not held) at `now_ms`;
    /// it stays counted as held and placed until its owner drops it, but no
    /// longer as earned. False when not recorded.
    async fn mark_lost(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// `owner`'s replicas marked lost, as (pack, storer).
    async fn lost_replicas(&self, owner: &NodeId) -> Result<Vec<(PackId, NodeId)>, StoreError>;
    /// Whether one replica is marked lost (false when not recorded). The
    /// default reads [`Self::lost_replicas`]; stores answer from the row.
    async fn is_lost(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<bool, StoreError> {
        Ok(self.lost_replicas(owner).await?.contains(&(*pack, *storer)))
    }
    /// Every node that holds replicas, with how many.
    async fn storers(&self) -> Result<Vec<(NodeId, u64)>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_fraction_counts_only_the_window() {
        assert_eq!(online_fraction(&[], 0, 100), 0.0);
        assert_eq!(online_fraction(&[(0, true)], 0, 100), 1.0);
        // Online before the window, offline half way.
        assert_eq!(online_fraction(&[(0, true), (150, false)], 100, 200), 0.5);
        // Came online at 150 and stays.
        assert_eq!(online_fraction(&[(150, true)], 100, 200), 0.5);
        // Two stretches of 10.
        let log = [(10, true), (20, false), (50, true), (60, false)];
        assert!((online_fraction(&log, 0, 100) - 0.2).abs() < 1e-9);
        assert_eq!(online_fraction(&log, 100, 100), 0.0);
    }

    #[test]
    fn lifetime_uptime_counts_the_current_stretch() {
        let n = NodeRecord {
            id: NodeId([0; 32]),
            exchange_key: [0; 32],
            offer: 0,
            held: 0,
            placed: 0,
            earned: 0,
            online: true,
            last_seen_ms: 0,
            registered_ms: 0,
            online_ms: 20,
            online_since_ms: 80,
            standing: Standing::default(),
        };
        assert!((n.lifetime_uptime(100) - 0.4).abs() < 1e-9);
        let off = NodeRecord { online: false, ..n };
        assert!((off.lifetime_uptime(100) - 0.2).abs() < 1e-9);
    }
}
