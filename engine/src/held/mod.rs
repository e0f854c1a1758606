//! The storer's side: replicas this node keeps for others, in a blob store
//! of their own (`HOME/held`, `fs` by default), and the links it serves.
//!
//! Each replica is one object named by its BLAKE3 root, with its outboard
//! (the replica's BLAKE3 tree, [`pluto_protocol::proof::outboard`]) beside
//! it as a second object:
//!
//! ```text
//! held object = "PLUTOHD2" || signed ticket (176) || pack id (32)
//!               || owner's signature of the replica's statement (64)
//!               || replica bytes XOR ChaCha20(obfuscation key of the root)
//! outboard    = object named BLAKE3-derive-key("pluto v1 held outboard", root):
//!               "PLUTOOB1" || root || size || the tree's chaining values
//! tombstone   = HOME/held-manifests/deleted-<root hex>:
//!               owner (32) || at_ms (u64 LE) || owner's signed delete (64)
//! ```
//!
//! The ticket and the owner's signature travel with the bytes, so the
//! ledger (which ticket was used for what, whose replica it is) is rebuilt
//! from the objects at start and can be reported again to a coordinator
//! that lost its books. A replica deleted at its owner's request leaves a
//! tombstone: the owner's signed request, which answers an audit of it.
//!
//! The parts, each testable alone:
//! - [`ledger`]: the books, pure: room, tickets, links, kept transfers;
//! - [`request`]: a peer's first frame checked (signatures, tickets, times)
//!   against a clock passed in, giving what to do or what to refuse;
//! - [`obfuscation`]: the bytes on disk, as decorators on the streams;
//! - [`receive`]: streaming a replica in, with a bounded queue per link and
//!   [`RECEIVE_BUDGET`] in all, and keeping what came of a transfer that
//!   broke so its owner can resume it;
//! - [`audit`]: proofs from the outboard, reading kilobytes.
//!
//! This module is the shell that does the I/O the parts ask for. Owners'
//! manifests are kept beside, one per owner (`HOME/held/manifests`). No
//! file is touched on the async executor: every store and file call runs
//! on a blocking thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{BlobStore, Link, NodeId, PackId, StoreError, TransportError};
use pluto_protocol::proof::outboard;
use pluto_protocol::{HeldReport, ProofAnswer, ReplicaStatement, Ticket, SIGNED_TICKET_LEN};
use tokio::sync::Semaphore;

use crate::client::now_ms;
use crate::exchange::{PeerError, PeerMsg, DATA_FRAME};
use crate::manifest;
use crate::repo::lock;

pub mod audit;
pub mod ledger;
pub mod obfuscation;
pub mod receive;
pub mod request;

use ledger::{Admit, Ledger, Partial};
use receive::{partial_id, Got, Indexed};
use request::{Context, Request};

const MAGIC: &[u8; 8] = b"PLUTOHD2";
/// Bytes before the replica in a held object.
pub const HEADER_LEN: usize = 8 + SIGNED_TICKET_LEN + 32 + 64;
/// How long a tombstone is kept (an owner audits what it still lists).
const TOMBSTONE_KEEP_MS: u64 = 90 * 24 * 3_600_000;
/// Largest replica accepted (the largest pack a node may write).
pub const MAX_REPLICA: u64 = 1 << 30;
/// Bytes of replicas received but not yet written, all links together: a
/// link whose peer sends faster than the disk writes waits for room.
pub const RECEIVE_BUDGET: usize = 64 << 20;
/// How long a peer may keep a link open without sending a frame (a slot
/// held by a silent peer is a slot nobody else gets); as long as an owner
/// waits for a storer that makes no progress.
const IDLE_LINK: std::time::Duration = std::time::Duration::from_secs(60);

/// The next frame, or a refusal when the peer stays silent too long.
async fn recv_within(link: &mut dyn Link) -> Result<Option<Vec<u8>>, ServeError> {
    match tokio::time::timeout(IDLE_LINK, link.recv()).await {
        Ok(r) => Ok(r?),
        Err(_) => refuse(
            PeerError::Busy,
            format!("nothing received for {IDLE_LINK:?}"),
        ),
    }
}

/// One replica held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldEntry {
    /// Whose it is.
    pub owner: NodeId,
    /// The owner's pack.
    pub pack: PackId,
    /// Replica bytes.
    pub size: u64,
    /// The ticket it came under.
    pub ticket: Vec<u8>,
    /// The owner's signature of the replica's statement.
    pub attest: [u8; 64],
}

/// Why serving a link failed (the peer gets an `Error` frame when it can).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The link broke.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The peer broke the protocol or was refused.
    #[error("{0:?}: {1}")]
    Refused(PeerError, String),
}

/// The replicas a node holds for others.
pub struct Held {
    me: NodeId,
    identity: SigningKey,
    coordinator: NodeId,
    store: Arc<dyn BlobStore>,
    obfuscation: [u8; 32],
    manifests: PathBuf,
    /// Most bytes held (the node's offer).
    capacity: Mutex<u64>,
    ledger: Mutex<Ledger>,
    /// Room for received bytes not yet written ([`RECEIVE_BUDGET`]).
    receiving: Arc<Semaphore>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({} replicas)", lock(&self.ledger).held().count())
    }
}

/// Gives a link slot back however serving ends.
struct Slot<'a>(&'a Held, NodeId);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.0.ledger).close_link(&self.1);
    }
}

/// Gives the room of a replica being received back however receiving
/// ends, unless it was committed or kept.
struct Incoming<'a>(&'a Held, [u8; 32]);

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        lock(&self.0.ledger).abandon(&self.1);
    }
}

fn refuse<T>(code: PeerError, why: impl Into<String>) -> Result<T, ServeError> {
    Err(ServeError::Refused(code, why.into()))
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?
}

impl Held {
    /// Opens the held replicas in `store` and rebuilds the ledger from
    /// their headers and the index of kept transfers. Objects whose header
    /// does not parse are left alone and reported; outboards of replicas
    /// no longer held, and kept transfers that are too old or lost their
    /// object, are removed. Blocking: call it from a worker thread.
    pub fn open(
        identity: SigningKey,
        coordinator: NodeId,
        store: Arc<dyn BlobStore>,
        obfuscation: [u8; 32],
        manifests: PathBuf,
        capacity: u64,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&manifests)
            .map_err(|e| StoreError::io(format!("creating {}", manifests.display()), e))?;
        let mut ledger = Ledger::default();
        let indexes = receive::read_indexes(&manifests);
        let mut transfers = std::collections::HashMap::new();
        for (root, ix) in &indexes {
            transfers.insert(partial_id(root, ix.nonce), *root);
            if ix.prev != 0 {
                transfers.insert(partial_id(root, ix.prev), *root);
            }
        }
        let mut kept = std::collections::HashMap::new();
        let mut outboards = Vec::new();
        for (id, size) in store.list()? {
            if transfers.contains_key(&id) {
                kept.insert(id, size);
                continue;
            }
            let head = store.get_range(&id, 0, size.min(HEADER_LEN as u64))?;
            if outboard::is_outboard(&head) {
                outboards.push((id, outboard::header(&head).map(|h| h.0)));
                continue;
            }
            let Some((ticket, t, pack, attest)) = parse_header(&head) else {
                tracing::warn!("held object {} has no valid header; ignored", id.short());
                continue;
            };
            let entry = HeldEntry {
                owner: t.owner,
                pack,
                size: size - HEADER_LEN as u64,
                ticket,
                attest,
            };
            ledger.found(id.0, t.id(), entry);
        }
        for (root, ix) in indexes {
            Self::reopen_transfer(&*store, &manifests, &mut ledger, &kept, root, ix)?;
        }
        for (id, root) in outboards {
            let held = root.is_some_and(|r| {
                outboard_id(&r) == id && ledger.held().any(|(held, _)| *held == r)
            });
            if !held {
                store.delete(&id)?;
            }
        }
        prune_tombstones(&manifests);
        Ok(Self {
            me: NodeId(identity.verifying_key().to_bytes()),
            identity,
            coordinator,
            store,
            obfuscation,
            manifests,
            capacity: Mutex::new(capacity),
            ledger: Mutex::new(ledger),
            receiving: Arc::new(Semaphore::new(RECEIVE_BUDGET)),
        })
    }

    /// Takes up, at start, a transfer the index lists: the newest of its
    /// objects is kept when it is sound and young enough, the rest removed.
    fn reopen_transfer(
        store: &dyn BlobStore,
        dir: &std::path::Path,
        ledger: &mut Ledger,
        kept: &std::collections::HashMap<PackId, u64>,
        root: [u8; 32],
        ix: Indexed,
    ) -> Result<(), StoreError> {
        let objects = [ix.nonce, ix.prev]
            .into_iter()
            .filter(|n| *n != 0)
            .filter_map(|n| Some((n, *kept.get(&partial_id(&root, n))?)));
        let mut chosen = None;
        for (nonce, size) in objects {
            if chosen.is_none() {
                chosen = Some((nonce, size));
            } else {
                store.delete(&partial_id(&root, nonce))?;
            }
        }
        let young = now_ms().saturating_sub(ix.at_ms) <= ledger::PARTIAL_KEEP_MS;
        let held = ledger.held().any(|(r, _)| *r == root);
        match chosen {
            Some((nonce, size))
                if young
                    && !held
                    && size >= HEADER_LEN as u64
                    && size - HEADER_LEN as u64 <= ix.size =>
            {
                if nonce != ix.nonce || ix.prev != 0 {
                    let ix = Indexed {
                        nonce,
                        prev: 0,
                        ..ix
                    };
                    receive::write_index(dir, &root, &ix)?;
                }
                let p = Partial {
                    owner: ix.owner,
                    size: ix.size,
                    have: size - HEADER_LEN as u64,
                    nonce,
                    at_ms: ix.at_ms,
                    resumes: 0,
                };
                ledger.found_partial(root, p);
            }
            other => {
                if let Some((nonce, _)) = other {
                    store.delete(&partial_id(&root, nonce))?;
                }
                receive::remove_index(dir, &root);
            }
        }
        Ok(())
    }

    /// Changes the most bytes held (a new offer); what is held stays.
    pub fn set_capacity(&self, bytes: u64) {
        *lock(&self.capacity) = bytes;
    }

    /// Bytes held and replicas.
    pub fn usage(&self) -> (u64, usize) {
        let l = lock(&self.ledger);
        l.held()
            .fold((0, 0), |(bytes, n), (_, e)| (bytes + e.size, n + 1))
    }

    /// Bytes kept of transfers that broke, and how many.
    pub fn kept_transfers(&self) -> (u64, usize) {
        let l = lock(&self.ledger);
        l.partials()
            .fold((0, 0), |(bytes, n), (_, p)| (bytes + p.have, n + 1))
    }

    /// Every replica held, by root.
    pub fn entries(&self) -> Vec<([u8; 32], HeldEntry)> {
        lock(&self.ledger)
            .held()
            .map(|(r, e)| (*r, e.clone()))
            .collect()
    }

    /// What to report to a coordinator that lost its books.
    pub fn reports(&self) -> Vec<HeldReport> {
        lock(&self.ledger)
            .held()
            .map(|(root, e)| HeldReport {
                ticket: e.ticket.clone(),
                pack: e.pack,
                size: e.size,
                root: *root,
                attest: e.attest,
            })
            .collect()
    }

    /// The storer's receipt for a replica: its signature of the statement.
    fn receipt(&self, owner: &NodeId, pack: PackId, size: u64, root: [u8; 32]) -> [u8; 64] {
        ReplicaStatement {
            owner: *owner,
            storer: self.me,
            pack,
            size,
            root,
        }
        .sign(&self.identity)
    }

    /// Answers an audit of `owner`'s replica of `pack` (as the coordinator
    /// recorded it: `root`, `size`) on `offset..offset + len`: a range
    /// proof over the replica's bytes, the owner's signed delete when the
    /// owner had it deleted, or "not held".
    pub async fn prove(
        &self,
        owner: &NodeId,
        pack: &PackId,
        root: [u8; 32],
        size: u64,
        offset: u64,
        len: u64,
    ) -> ProofAnswer {
        if !lock(&self.ledger).holds(owner, pack, &root, size) {
            let path = self.tombstone_path(&root);
            let owner = *owner;
            let found = tokio::task::spawn_blocking(move || read_tombstone(&path, &owner))
                .await
                .ok()
                .flatten();
            return match found {
                Some((at_ms, signature)) => ProofAnswer::Deleted { at_ms, signature },
                None => ProofAnswer::NotHeld,
            };
        }
        let audited = audit::Audited {
            replica: obfuscation::Replica {
                store: self.store.clone(),
                object: PackId(root),
                key: obfuscation::key(&self.obfuscation, &root),
            },
            root,
            size,
        };
        match tokio::task::spawn_blocking(move || audited.prove(offset, len)).await {
            Ok(Ok(p)) => ProofAnswer::Held(p),
            Ok(Err(e)) => {
                tracing::warn!("answering an audit: {e}");
                ProofAnswer::NotHeld
            }
            Err(e) => {
                tracing::warn!("proving: {e}");
                ProofAnswer::NotHeld
            }
        }
    }

    fn tombstone_path(&self, root: &[u8; 32]) -> PathBuf {
        self.manifests
            .join(format!("deleted-{}", PackId(*root).to_hex()))
    }

    /// Serves one link a peer opened: one request, answered. Refusals are
    /// told to the peer and returned.
    pub async fn serve(&self, mut link: Box<dyn Link>) -> Result<(), ServeError> {
        let peer = link.peer();
        let slot = lock(&self.ledger).open_link(peer).then(|| Slot(self, peer));
        let r = match slot {
            None => refuse(PeerError::Busy, "too many links at once"),
            Some(_slot) => self.serve_one(&mut *link, &peer).await,
        };
        if let Err(ServeError::Refused(code, why)) = &r {
            let _ = link
                .send(&PeerMsg::error(*code, why.clone()).encode())
                .await;
        }
        let _ = link.finish().await;
        r
    }

    async fn serve_one(&self, link: &mut dyn Link, peer: &NodeId) -> Result<(), ServeError> {
        let Some(first) = recv_within(link).await? else {
            return Ok(());
        };
        let cx = Context {
            me: self.me,
            coordinator: self.coordinator,
            now_ms: now_ms(),
        };
        match request::request(&first, peer, &cx)? {
            Request::Store {
                ticket,
                t,
                statement,
                attest,
                resume,
            } => {
                self.put(link, peer, ticket, &t, statement, attest, resume)
                    .await
            }
            Request::Read { root, offset, len } => self.get(link, peer, root, offset, len).await,
            Request::Delete {
                root,
                at_ms,
                signature,
            } => {
                self.delete(peer, &root, at_ms, &signature).await?;
                link.send(&PeerMsg::Ok.encode()).await?;
                Ok(())
            }
            Request::KeepManifest { blob } => {
                self.put_manifest(peer, blob).await?;
                link.send(&PeerMsg::Ok.encode()).await?;
                Ok(())
            }
            Request::GiveManifest => {
                let path = self.manifests.join(peer.to_hex());
                match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
                    Ok(Ok(blob)) => link.send(&PeerMsg::Manifest { blob }.encode()).await?,
                    _ => return refuse(PeerError::NotFound, "no manifest of yours here"),
                }
                Ok(())
            }
        }
    }

    /// Removes kept transfers that are too old.
    async fn drop_expired(&self) {
        let expired = lock(&self.ledger).expired_partials(now_ms());
        if expired.is_empty() {
            return;
        }
        let (store, dir) = (self.store.clone(), self.manifests.clone());
        let _ = blocking("removing old transfers", move || {
            for (root, p) in &expired {
                receive::drop_kept(&*store, &dir, root, p);
            }
            Ok(())
        })
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn put(
        &self,
        link: &mut dyn Link,
        peer: &NodeId,
        ticket: Vec<u8>,
        t: &Ticket,
        statement: ReplicaStatement,
        attest: [u8; 64],
        resume: bool,
    ) -> Result<(), ServeError> {
        let ReplicaStatement {
            pack, size, root, ..
        } = statement;
        self.drop_expired().await;
        let capacity = *lock(&self.capacity);
        let admitted =
            lock(&self.ledger).admit(peer, t.id(), root, size, resume, capacity, now_ms())?;
        let (from, dropped) = match admitted {
            Admit::Have(e) => {
                let receipt = self.receipt(peer, e.pack, e.size, root);
                link.send(
                    &PeerMsg::Have {
                        size: e.size,
                        receipt,
                    }
                    .encode(),
                )
                .await?;
                return Ok(());
            }
            Admit::Receive { from, dropped } => (from, dropped),
        };
        let guard = Incoming(self, root);
        // The index first: an object under a temporary name is always known.
        let nonce = rand_core::RngCore::next_u64(&mut rand_core::OsRng).max(1);
        let ix = Indexed {
            owner: *peer,
            size,
            at_ms: from.map_or(now_ms(), |p| p.at_ms),
            nonce,
            prev: from.map_or(0, |p| p.nonce),
        };
        let (store, dir) = (self.store.clone(), self.manifests.clone());
        blocking("starting a transfer", move || {
            if let Some(d) = dropped {
                store.delete(&partial_id(&root, d.nonce))?;
            }
            receive::write_index(&dir, &root, &ix)
        })
        .await?;
        match &from {
            Some(p) => {
                tracing::debug!("resuming a replica of {} at byte {}", peer.short(), p.have);
                link.send(&PeerMsg::ReadyFrom { offset: p.have }.encode())
                    .await?;
            }
            None => link.send(&PeerMsg::Ready.encode()).await?,
        }
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&ticket);
        header.extend_from_slice(&pack.0);
        header.extend_from_slice(&attest);
        let got = self
            .receive(link, root, size, header, from.as_ref(), nonce)
            .await;
        let (store, dir) = (self.store.clone(), self.manifests.clone());
        let old = from.map(|p| partial_id(&root, p.nonce));
        match got {
            Got::Whole(ob) => {
                blocking("keeping a replica", move || {
                    store.rename(&partial_id(&root, nonce), &PackId(root))?;
                    // Without its outboard the replica is still whole: the
                    // first audit rebuilds it.
                    if let Err(e) = store.put(&outboard_id(&root), &ob) {
                        tracing::warn!("writing an outboard: {e}");
                    }
                    if let Some(old) = old {
                        store.delete(&old)?;
                    }
                    receive::remove_index(&dir, &root);
                    Ok(())
                })
                .await?;
            }
            Got::Cut(have, why) => {
                let kept = Partial {
                    owner: *peer,
                    size,
                    have,
                    nonce,
                    at_ms: ix.at_ms,
                    resumes: from.map_or(0, |p| p.resumes),
                };
                let evicted = lock(&self.ledger).keep_partial(root, kept);
                tracing::info!(
                    "a transfer from {} broke after {have} of {size} bytes; kept for resuming",
                    peer.short()
                );
                let _ = blocking("keeping a transfer", move || {
                    if let Some(old) = old {
                        store.delete(&old)?;
                    }
                    receive::write_index(&dir, &root, &Indexed { prev: 0, ..ix })?;
                    for (r, p) in &evicted {
                        receive::drop_kept(&*store, &dir, r, p);
                    }
                    Ok(())
                })
                .await;
                return Err(why);
            }
            Got::Failed(e) => {
                let _ = blocking("dropping a transfer", move || {
                    store.delete(&partial_id(&root, nonce))?;
                    if let Some(old) = old {
                        store.delete(&old)?;
                    }
                    receive::remove_index(&dir, &root);
                    Ok(())
                })
                .await;
                return Err(e);
            }
        }
        let entry = HeldEntry {
            owner: *peer,
            pack,
            size,
            ticket,
            attest,
        };
        lock(&self.ledger).commit(root, entry, t.id());
        drop(guard);
        tracing::debug!("holding {} bytes for {}", size, peer.short());
        let receipt = self.receipt(peer, pack, size, root);
        link.send(&PeerMsg::Kept { receipt }.encode()).await?;
        Ok(())
    }

    fn owned(&self, peer: &NodeId, root: &[u8; 32]) -> Result<HeldEntry, ServeError> {
        // Someone else's replica and no replica at all get the same answer,
        // so nobody learns what is held for others.
        match lock(&self.ledger).owned(peer, root) {
            Some(e) => Ok(e.clone()),
            None => refuse(PeerError::NotFound, "no replica of yours by that root"),
        }
    }

    async fn get(
        &self,
        link: &mut dyn Link,
        peer: &NodeId,
        root: [u8; 32],
        offset: u64,
        len: u64,
    ) -> Result<(), ServeError> {
        let e = self.owned(peer, &root)?;
        if offset.checked_add(len).is_none_or(|end| end > e.size) {
            return refuse(
                PeerError::Malformed,
                format!("{len} bytes at {offset} of a {}-byte replica", e.size),
            );
        }
        link.send(&PeerMsg::Sending { len }.encode()).await?;
        let replica = Arc::new(obfuscation::Replica {
            store: self.store.clone(),
            object: PackId(root),
            key: obfuscation::key(&self.obfuscation, &root),
        });
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(DATA_FRAME as u64);
            let r = replica.clone();
            let buf = blocking("reading a replica", move || r.read(at, n)).await?;
            link.send(&buf).await?;
            at += n;
        }
        Ok(())
    }

    async fn delete(
        &self,
        peer: &NodeId,
        root: &[u8; 32],
        at_ms: u64,
        signature: &[u8; 64],
    ) -> Result<(), ServeError> {
        let e = self.owned(peer, root)?;
        // The owner's word first, so an audit of what is gone is answered
        // with it.
        let mut tomb = Vec::with_capacity(104);
        tomb.extend_from_slice(&peer.0);
        tomb.extend_from_slice(&at_ms.to_le_bytes());
        tomb.extend_from_slice(signature);
        let path = self.tombstone_path(root);
        let (store, root_id, ob) = (self.store.clone(), PackId(*root), outboard_id(root));
        blocking("deleting a replica", move || {
            crate::home::write_atomic(&path, &tomb)
                .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
            store.delete(&root_id)?;
            store.delete(&ob)
        })
        .await?;
        let ticket = Ticket::parse_unverified(&e.ticket).map(|t| t.id());
        lock(&self.ledger).remove(root, ticket);
        tracing::info!("deleted a replica of {} at its request", peer.short());
        Ok(())
    }

    /// Keeps an owner's manifest: only for owners whose replicas are held,
    /// signed by the owner, newer than the one kept.
    async fn put_manifest(&self, peer: &NodeId, blob: Vec<u8>) -> Result<(), ServeError> {
        if !lock(&self.ledger).holds_any_of(peer) {
            return refuse(PeerError::NotFound, "no replica of yours is held here");
        }
        let (peer, path) = (*peer, self.manifests.join(peer.to_hex()));
        tokio::task::spawn_blocking(move || {
            let Some(version) = manifest::verify(&peer, &blob) else {
                return refuse(PeerError::Unauthorized, "the manifest is not signed by you");
            };
            if let Ok(old) = std::fs::read(&path) {
                if manifest::verify(&peer, &old).is_some_and(|v| v >= version) {
                    return refuse(PeerError::Malformed, "a newer manifest is kept");
                }
            }
            crate::home::write_atomic(&path, &blob)
                .map_err(|e| StoreError::io(format!("writing {}", path.display()), e).into())
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("keeping a manifest: {e}")))?
    }
}

/// The name of the outboard of the replica with BLAKE3 root `root`.
pub fn outboard_id(root: &[u8; 32]) -> PackId {
    PackId(blake3::derive_key("pluto v1 held outboard", root))
}

/// The owner's signed delete kept at `path`, if it is `owner`'s.
fn read_tombstone(path: &std::path::Path, owner: &NodeId) -> Option<(u64, [u8; 64])> {
    let t = std::fs::read(path).ok()?;
    if t.len() != 32 + 8 + 64 || t[..32] != owner.0 {
        return None;
    }
    let at_ms = u64::from_le_bytes(t[32..40].try_into().ok()?);
    let signature: [u8; 64] = t[40..].try_into().ok()?;
    Some((at_ms, signature))
}

fn parse_header(h: &[u8]) -> Option<(Vec<u8>, Ticket, PackId, [u8; 64])> {
    if h.len() != HEADER_LEN || &h[..8] != MAGIC {
        return None;
    }
    let ticket = h[8..8 + SIGNED_TICKET_LEN].to_vec();
    // Our own disk: the signature was checked on receipt (and the
    // coordinator may have changed its key since).
    let t = Ticket::parse_unverified(&ticket)?;
    let at = 8 + SIGNED_TICKET_LEN;
    let pack: [u8; 32] = h[at..at + 32].try_into().ok()?;
    let attest: [u8; 64] = h[at + 32..].try_into().ok()?;
    Some((ticket, t, PackId(pack), attest))
}

/// Forgets tombstones older than [`TOMBSTONE_KEEP_MS`].
fn prune_tombstones(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = now_ms();
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("deleted-") {
            continue;
        }
        let old = std::fs::read(e.path()).ok().and_then(|t| {
            let at = u64::from_le_bytes(t.get(32..40)?.try_into().ok()?);
            Some(now.saturating_sub(at) > TOMBSTONE_KEEP_MS)
        });
        if old != Some(false) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
