//! The local pack store backed by the peers: a pack that is not (or no
//! longer) on this machine is fetched whole from one of its replicas,
//! checked, and kept in the local store, which then serves it.
//!
//! Restore, check and the catalog rebuild go through [`BlobStore`] and are
//! unchanged; several of their worker threads fetch several packs at once,
//! and two that want the same pack wait for one fetch.
//!
//! With [`PeerPacks::ranges_only`] (a recovery rebuilding the catalog, which
//! reads the packs' headers and snapshots and nothing else), a range of a
//! pack that is not here is fetched alone and not kept: the data packs are
//! not downloaded until a restore or a check wants them. Such a range is
//! not checked against the replica's root (that takes the whole replica);
//! what it holds is sealed (headers and blobs are AES-GCM), so a wrong
//! range is refused when it is opened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use pluto_plugins_api::{BlobStore, PackId, StoreError};

use crate::keystream::StreamKey;
use crate::manifest::Placement;
use crate::network::Net;
use crate::peers::{fetch_pack, get_range};
use crate::repo::lock;

/// A [`BlobStore`] that fetches what the local one lacks from peers.
pub struct PeerPacks {
    local: Arc<dyn BlobStore>,
    placement: Placement,
    net: Arc<Net>,
    replica_keys: zeroize::Zeroizing<[u8; 32]>,
    rt: tokio::runtime::Handle,
    fetching: Mutex<HashMap<PackId, Arc<tokio::sync::Mutex<()>>>>,
    fetched: Mutex<(usize, u64)>,
    ranges_only: bool,
}

impl std::fmt::Debug for PeerPacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerPacks({} placed packs)", self.placement.packs.len())
    }
}

impl PeerPacks {
    /// Wraps `local`; packs missing from it are fetched with `net` from the
    /// replicas `placement` lists. `rt` runs the fetches.
    pub fn new(
        local: Arc<dyn BlobStore>,
        placement: Placement,
        net: Arc<Net>,
        replica_keys: zeroize::Zeroizing<[u8; 32]>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            local,
            placement,
            net,
            replica_keys,
            rt,
            fetching: Mutex::new(HashMap::new()),
            fetched: Mutex::new((0, 0)),
            ranges_only: false,
        }
    }

    /// Ranges of packs not here are fetched alone, and kept nowhere; whole
    /// packs are still fetched (and kept) for [`BlobStore::get`].
    pub fn ranges_only(mut self) -> Self {
        self.ranges_only = true;
        self
    }

    /// Whole packs fetched from peers so far, and the bytes fetched (whole
    /// packs and ranges).
    pub fn fetched(&self) -> (usize, u64) {
        *lock(&self.fetched)
    }

    /// Runs a future to completion from a blocking context: a worker thread
    /// of the runtime (moved out of the way first) or any other thread.
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| h.block_on(f))
            }
            _ => self.rt.block_on(f),
        }
    }

    /// Makes sure `id` is in the local store (from a blocking context).
    fn ensure(&self, id: &PackId) -> Result<(), StoreError> {
        if self.local.size(id)?.is_some() {
            return Ok(());
        }
        self.block_on(self.fetch(id))
    }

    /// Fetches `id` into the local store unless it is there; one fetch per
    /// pack however many ask at once.
    pub async fn fetch(&self, id: &PackId) -> Result<(), StoreError> {
        let Some(placed) = self.placement.packs.get(id).cloned() else {
            return Err(StoreError::NotFound(format!(
                "pack {} is neither here nor placed at any peer",
                id.short()
            )));
        };
        let gate = lock(&self.fetching)
            .entry(*id)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _one = gate.lock().await;
        if self.local.size(id)?.is_some() {
            return Ok(());
        }
        let bytes = fetch_pack(&self.net, &self.replica_keys, id, &placed)
            .await
            .map_err(|e| StoreError::NotFound(e.to_string()))?;
        let local = self.local.clone();
        let (id2, n) = (*id, bytes.len() as u64);
        tokio::task::spawn_blocking(move || local.put(&id2, &bytes))
            .await
            .map_err(|e| StoreError::Corrupt(format!("caching a pack: {e}")))??;
        let mut f = lock(&self.fetched);
        f.0 += 1;
        f.1 += n;
        drop(f);
        lock(&self.fetching).remove(id);
        Ok(())
    }

    /// Fetches `len` bytes at `offset` of pack `id` from one of its
    /// replicas, the storers tried in turn.
    async fn fetch_range(&self, id: &PackId, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let Some(placed) = self.placement.packs.get(id) else {
            return Err(StoreError::NotFound(format!(
                "pack {} is neither here nor placed at any peer",
                id.short()
            )));
        };
        let mut why = Vec::new();
        for r in &placed.replicas {
            match get_range(&self.net, &r.storer, &r.root, offset, len).await {
                Ok(mut bytes) => {
                    StreamKey::replica(&self.replica_keys, id, &r.storer).apply(offset, &mut bytes);
                    let mut f = lock(&self.fetched);
                    f.1 += len;
                    return Ok(bytes);
                }
                Err(e) => why.push(format!("{}: {e}", r.storer.short())),
            }
        }
        if why.is_empty() {
            why.push("no replica is recorded".into());
        }
        Err(StoreError::NotFound(format!(
            "pack {} could not be read: {}",
            id.short(),
            why.join("; ")
        )))
    }

    /// Fetches every placed pack that is not here, `parallel` at a time,
    /// ahead of a reader that will want them all (a full restore). Failures
    /// are left for the reader to meet (and report) on its own.
    pub async fn prefetch(self: Arc<Self>, parallel: usize) {
        let mut missing = Vec::new();
        for id in self.placement.packs.keys() {
            if matches!(self.local.size(id), Ok(None)) {
                missing.push(*id);
            }
        }
        let this = &self;
        futures_util::stream::iter(missing)
            .for_each_concurrent(parallel.max(1), |id| async move {
                if let Err(e) = this.fetch(&id).await {
                    tracing::debug!("prefetching {}: {e}", id.short());
                }
            })
            .await;
    }
}

impl BlobStore for PeerPacks {
    fn put(&self, id: &PackId, bytes: &[u8]) -> Result<(), StoreError> {
        self.local.put(id, bytes)
    }

    fn get(&self, id: &PackId) -> Result<Vec<u8>, StoreError> {
        self.ensure(id)?;
        self.local.get(id)
    }

    fn get_range(&self, id: &PackId, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        if self.ranges_only && self.local.size(id)?.is_none() {
            return self.block_on(self.fetch_range(id, offset, len));
        }
        self.ensure(id)?;
        self.local.get_range(id, offset, len)
    }

    fn size(&self, id: &PackId) -> Result<Option<u64>, StoreError> {
        match self.local.size(id)? {
            Some(n) => Ok(Some(n)),
            None => Ok(self.placement.packs.get(id).map(|p| p.size)),
        }
    }

    fn list(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        let mut all: HashMap<PackId, u64> = self
            .placement
            .packs
            .iter()
            .filter(|(_, p)| !p.replicas.is_empty())
            .map(|(id, p)| (*id, p.size))
            .collect();
        all.extend(self.local.list()?);
        Ok(all.into_iter().collect())
    }

    fn delete(&self, id: &PackId) -> Result<(), StoreError> {
        self.local.delete(id)
    }
}
