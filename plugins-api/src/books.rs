//! The coordinator's books: registered nodes, their offers and usage, pack
//! replicas, manifests and presence. SQLite by default, Postgres for scale;
//! every coordinator replica works from the same books, so the atomic
//! operations here are what keeps concurrent replicas consistent.

use crate::{NodeId, PackId, StoreError};

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its identity.
    pub id: NodeId,
    /// Its X25519 key for private messages.
    pub exchange_key: [u8; 32],
    /// Bytes it offers to others.
    pub offer: u64,
    /// Bytes others placed on it (reserved or stored).
    pub held: u64,
    /// Bytes it placed on others, every replica counted.
    pub placed: u64,
    /// Whether its channel is connected.
    pub online: bool,
    /// Last time it was heard from, ms since the epoch.
    pub last_seen_ms: u64,
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

/// A node's manifest kept at the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRecord {
    /// Its version.
    pub version: u64,
    /// The opaque (encrypted, signed) bytes.
    pub blob: Vec<u8>,
}

/// The coordinator's store.
#[async_trait::async_trait]
pub trait BooksStore: Send + Sync {
    /// Registers a node or updates its exchange key and offer; usage stays.
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
    /// Up to `limit` nodes with at least `size` bytes of free offer, a
    /// random sample when there are more (so load spreads), online ones first.
    async fn candidates(&self, size: u64, limit: usize) -> Result<Vec<NodeRecord>, StoreError>;
    /// Changes a node's offer; refused (false) below what it already holds
    /// or has placed.
    async fn set_offer(&self, id: &NodeId, offer: u64) -> Result<bool, StoreError>;
    /// Records that a node came online or went offline.
    async fn presence(&self, id: &NodeId, online: bool, now_ms: u64) -> Result<(), StoreError>;
    /// Atomically reserves `size` bytes of `storer`'s free offer for one
    /// replica of `owner`'s, within `owner`'s own quota (what it placed may
    /// not exceed what it offers). False, changing nothing, when either
    /// would be over-committed.
    async fn reserve(&self, owner: &NodeId, storer: &NodeId, size: u64)
        -> Result<bool, StoreError>;
    /// Records a placed replica (after its reservation).
    async fn record_replica(&self, replica: &ReplicaRecord) -> Result<(), StoreError>;
    /// The replicas of one owner's packs.
    async fn replicas_of(&self, owner: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError>;
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
}
