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
//! Receiving streams: the link's frames go through a small bounded queue
//! to a worker thread that hashes them, builds the outboard, obfuscates
//! them and writes them through [`BlobStore::put_stream`] (the `fs` store:
//! temporary file, fsync, rename, fsync of the directory). The object
//! becomes visible only once the bytes hashed to the announced root, so a
//! replica is there whole, with its root checked, or not at all. Memory
//! per link is a frame or two, and all links together have at most
//! [`RECEIVE_BUDGET`] bytes queued.
//!
//! Audits ([`Held::prove`]) read the range, the 16 KiB group around it and
//! a few dozen stored hashes, and check their own proof before answering:
//! an outboard missing (an object written before outboards, or a crash
//! between the two writes) or damaged is rebuilt from the replica once.
//!
//! Manifests of owners are kept beside, one per owner (`HOME/held/manifests`).
//! No file is touched on the async executor: every store and file call
//! runs on a blocking thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{BlobStore, Link, NodeId, PackId, StoreError, TransportError};
use pluto_protocol::proof::{self, outboard, ProofError};
use pluto_protocol::{HeldReport, ProofAnswer, ReplicaStatement, Ticket, SIGNED_TICKET_LEN};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::client::now_ms;
use crate::exchange::{delete_message, PeerError, PeerMsg, DATA_FRAME, MAX_CONTROL};
use crate::keystream::StreamKey;
use crate::manifest;
use crate::repo::lock;

const MAGIC: &[u8; 8] = b"PLUTOHD2";
/// Bytes before the replica in a held object.
pub const HEADER_LEN: usize = 8 + SIGNED_TICKET_LEN + 32 + 64;
/// How long a tombstone is kept (an owner audits what it still lists).
const TOMBSTONE_KEEP_MS: u64 = 90 * 24 * 3_600_000;
/// How far a delete request's time may be from the storer's clock.
const DELETE_WINDOW_MS: u64 = 10 * 60_000;
/// Largest replica accepted (the largest pack a node may write).
pub const MAX_REPLICA: u64 = 1 << 30;
/// Links one peer may have open at once, and all peers together.
const LINKS_PER_PEER: usize = 16;
const LINKS_TOTAL: usize = 256;
/// Bytes of replicas received but not yet written, all links together: a
/// link whose peer sends faster than the disk writes waits for room.
pub const RECEIVE_BUDGET: usize = 64 << 20;
/// Frames queued per link between the link and the writer.
const QUEUED_FRAMES: usize = 2;
/// What is read at a time to rebuild an outboard.
const REBUILD_WINDOW: u64 = 1 << 20;
/// How long a peer may keep a link open without sending (a slot held by a
/// silent peer is a slot nobody else gets).
const IDLE_LINK: std::time::Duration = std::time::Duration::from_secs(30);

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

#[derive(Default)]
struct Ledger {
    /// By root.
    held: HashMap<[u8; 32], HeldEntry>,
    /// Ticket id -> the root stored under it.
    tickets: HashMap<[u8; 32], [u8; 32]>,
    /// Replicas being received, so two links cannot race one root or ticket.
    incoming: HashMap<[u8; 32], [u8; 32]>,
    /// Bytes held, and being received.
    bytes: u64,
    /// Open links per peer.
    links: HashMap<NodeId, usize>,
}

/// What to do with an incoming replica.
enum Admit {
    /// Already held for this owner: its entry.
    Have(HeldEntry),
    /// Room reserved: receive it.
    Receive,
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
        write!(f, "Held({} replicas)", lock(&self.ledger).held.len())
    }
}

/// Gives a link slot back however serving ends.
struct Slot<'a>(&'a Held, NodeId);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut l = lock(&self.0.ledger);
        if let Some(n) = l.links.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                l.links.remove(&self.1);
            }
        }
    }
}

/// Forgets a replica being received however receiving ends.
struct Incoming<'a>(&'a Held, [u8; 32], u64);

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        let mut l = lock(&self.0.ledger);
        l.incoming.remove(&self.1);
        l.bytes = l.bytes.saturating_sub(self.2);
    }
}

fn refuse<T>(code: PeerError, why: impl Into<String>) -> Result<T, ServeError> {
    Err(ServeError::Refused(code, why.into()))
}

impl Held {
    /// Opens the held replicas in `store` and rebuilds the ledger from
    /// their headers. Objects whose header does not parse are left alone
    /// and reported; outboards of replicas no longer held are removed.
    /// Blocking: call it from a worker thread.
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
        let mut outboards = Vec::new();
        for (id, size) in store.list()? {
            let head = store.get_range(&id, 0, size.min(HEADER_LEN as u64))?;
            if outboard::is_outboard(&head) {
                outboards.push((id, outboard::header(&head).map(|h| h.0)));
                continue;
            }
            let Some((ticket, t, pack, attest)) = parse_header(&head) else {
                tracing::warn!("held object {} has no valid header; ignored", id.short());
                continue;
            };
            ledger.tickets.insert(t.id(), id.0);
            ledger.bytes += size - HEADER_LEN as u64;
            ledger.held.insert(
                id.0,
                HeldEntry {
                    owner: t.owner,
                    pack,
                    size: size - HEADER_LEN as u64,
                    ticket,
                    attest,
                },
            );
        }
        for (id, root) in outboards {
            let kept = root.is_some_and(|r| ledger.held.contains_key(&r) && outboard_id(&r) == id);
            if !kept {
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

    /// Changes the most bytes held (a new offer); what is held stays.
    pub fn set_capacity(&self, bytes: u64) {
        *lock(&self.capacity) = bytes;
    }

    /// Bytes held and replicas.
    pub fn usage(&self) -> (u64, usize) {
        let l = lock(&self.ledger);
        (l.held.values().map(|e| e.size).sum(), l.held.len())
    }

    /// Every replica held, by root.
    pub fn entries(&self) -> Vec<([u8; 32], HeldEntry)> {
        lock(&self.ledger)
            .held
            .iter()
            .map(|(r, e)| (*r, e.clone()))
            .collect()
    }

    /// What to report to a coordinator that lost its books.
    pub fn reports(&self) -> Vec<HeldReport> {
        lock(&self.ledger)
            .held
            .iter()
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
        let held = matches!(
            lock(&self.ledger).held.get(&root),
            Some(e) if e.owner == *owner && e.pack == *pack && e.size == size
        );
        if !held {
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
        let replica = StoredReplica {
            store: self.store.clone(),
            root,
            size,
            key: StreamKey::obfuscation(&self.obfuscation, &root),
        };
        match tokio::task::spawn_blocking(move || replica.prove(offset, len)).await {
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
        let slot = {
            let mut l = lock(&self.ledger);
            let total: usize = l.links.values().sum();
            let mine = l.links.entry(peer).or_insert(0);
            if *mine >= LINKS_PER_PEER || total >= LINKS_TOTAL {
                None
            } else {
                *mine += 1;
                Some(Slot(self, peer))
            }
        };
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
        if first.len() > MAX_CONTROL {
            return refuse(PeerError::Malformed, "control frame too big");
        }
        let msg = match PeerMsg::decode(&first) {
            Ok(m) => m,
            Err(e) => return refuse(PeerError::Malformed, e.to_string()),
        };
        match msg {
            PeerMsg::Put {
                ticket,
                pack,
                root,
                size,
                attest,
            } => {
                let statement = ReplicaStatement {
                    owner: *peer,
                    storer: self.me,
                    pack,
                    size,
                    root,
                };
                if !statement.signed_by(peer, &attest) {
                    return refuse(
                        PeerError::Unauthorized,
                        "the replica's statement is not signed by you",
                    );
                }
                self.put(link, peer, ticket, statement, attest).await
            }
            PeerMsg::Get { root, offset, len } => self.get(link, peer, root, offset, len).await,
            PeerMsg::Delete {
                root,
                at_ms,
                signature,
            } => {
                self.delete(peer, &root, at_ms, &signature).await?;
                link.send(&PeerMsg::Ok.encode()).await?;
                Ok(())
            }
            PeerMsg::PutManifest { blob } => {
                self.put_manifest(peer, blob).await?;
                link.send(&PeerMsg::Ok.encode()).await?;
                Ok(())
            }
            PeerMsg::GetManifest => {
                let path = self.manifests.join(peer.to_hex());
                match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
                    Ok(Ok(blob)) => link.send(&PeerMsg::Manifest { blob }.encode()).await?,
                    _ => return refuse(PeerError::NotFound, "no manifest of yours here"),
                }
                Ok(())
            }
            other => refuse(PeerError::Malformed, format!("{other:?} is not a request")),
        }
    }

    async fn put(
        &self,
        link: &mut dyn Link,
        peer: &NodeId,
        ticket: Vec<u8>,
        statement: ReplicaStatement,
        attest: [u8; 64],
    ) -> Result<(), ServeError> {
        let ReplicaStatement {
            pack, size, root, ..
        } = statement;
        let t = match Ticket::check(&ticket, &self.coordinator, &self.me, peer, now_ms()) {
            Ok(t) => t,
            Err(e) => return refuse(PeerError::Ticket, e.to_string()),
        };
        if t.pack != pack {
            return refuse(PeerError::Ticket, "the ticket is for another pack");
        }
        if size > t.size || size > MAX_REPLICA {
            return refuse(
                PeerError::Ticket,
                format!("{size} bytes, the ticket allows {}", t.size),
            );
        }
        let admitted = self.admit(peer, &t, root, size);
        let guard = match admitted? {
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
            Admit::Receive => Incoming(self, root, size),
        };
        link.send(&PeerMsg::Ready.encode()).await?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&ticket);
        header.extend_from_slice(&pack.0);
        header.extend_from_slice(&attest);
        let ob = self.receive(link, root, size, header).await?;
        let (store, id) = (self.store.clone(), outboard_id(&root));
        // Without its outboard the replica is still whole: the first audit
        // rebuilds it.
        match tokio::task::spawn_blocking(move || store.put(&id, &ob)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("writing an outboard: {e}"),
            Err(e) => tracing::warn!("writing an outboard: {e}"),
        }
        {
            let mut l = lock(&self.ledger);
            l.tickets.insert(t.id(), root);
            l.held.insert(
                root,
                HeldEntry {
                    owner: *peer,
                    pack,
                    size,
                    ticket,
                    attest,
                },
            );
            // The bytes move from "incoming" to "held".
            l.bytes += size;
        }
        drop(guard);
        tracing::debug!("holding {} bytes for {}", size, peer.short());
        let receipt = self.receipt(peer, pack, size, root);
        link.send(&PeerMsg::Kept { receipt }.encode()).await?;
        Ok(())
    }

    /// Decides whether a replica may come in, and reserves its room.
    fn admit(
        &self,
        peer: &NodeId,
        t: &Ticket,
        root: [u8; 32],
        size: u64,
    ) -> Result<Admit, ServeError> {
        let mut l = lock(&self.ledger);
        if let Some(e) = l.held.get(&root) {
            if e.owner == *peer {
                return Ok(Admit::Have(e.clone()));
            }
            return refuse(PeerError::Ticket, "that replica is held for someone else");
        }
        if l.tickets.contains_key(&t.id()) || l.incoming.values().any(|i| *i == t.id()) {
            return refuse(PeerError::Ticket, "the ticket was used already");
        }
        if l.incoming.contains_key(&root) {
            return refuse(PeerError::Busy, "that replica is being received");
        }
        if l.bytes + size > *lock(&self.capacity) {
            return refuse(PeerError::Full, "no room left under this node's offer");
        }
        l.incoming.insert(root, t.id());
        l.bytes += size;
        Ok(Admit::Receive)
    }

    fn owned(&self, peer: &NodeId, root: &[u8; 32]) -> Result<HeldEntry, ServeError> {
        // Someone else's replica and no replica at all get the same answer,
        // so nobody learns what is held for others.
        match lock(&self.ledger).held.get(root) {
            Some(e) if e.owner == *peer => Ok(e.clone()),
            _ => refuse(PeerError::NotFound, "no replica of yours by that root"),
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
        let key = StreamKey::obfuscation(&self.obfuscation, &root);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(DATA_FRAME as u64);
            let store = self.store.clone();
            let start = HEADER_LEN as u64 + at;
            let mut buf =
                tokio::task::spawn_blocking(move || store.get_range(&PackId(root), start, n))
                    .await
                    .map_err(|e| StoreError::Corrupt(format!("reading a replica: {e}")))??;
            key.apply(at, &mut buf);
            link.send(&buf).await?;
            at += n;
        }
        Ok(())
    }

    /// Receives a replica's `size` bytes from `link` and stores them behind
    /// `header` under `root`, streaming (see the module doc). Returns the
    /// replica's outboard; nothing is stored unless the bytes hash to
    /// `root`.
    async fn receive(
        &self,
        link: &mut dyn Link,
        root: [u8; 32],
        size: u64,
        header: Vec<u8>,
    ) -> Result<Vec<u8>, ServeError> {
        let (tx, rx) = mpsc::channel(QUEUED_FRAMES);
        let mut writer = Receiving {
            rx,
            pending: header,
            pos: 0,
            permit: None,
            key: StreamKey::obfuscation(&self.obfuscation, &root),
            at: 0,
            builder: Some(outboard::Builder::new()),
            root,
            outcome: None,
        };
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            let r = store.put_stream(&PackId(root), &mut writer);
            (r, writer.outcome)
        });
        let mut got = 0u64;
        while got < size {
            let Some(frame) = recv_within(link).await? else {
                return refuse(
                    PeerError::Malformed,
                    format!("the stream ended after {got} of {size} bytes"),
                );
            };
            let n = frame.len() as u64;
            if got + n > size {
                return refuse(PeerError::Malformed, "more bytes than announced");
            }
            let permit = u32::try_from(frame.len())
                .ok()
                .filter(|n| *n as usize <= RECEIVE_BUDGET);
            let Some(permits) = permit else {
                return refuse(PeerError::Malformed, "a frame larger than allowed");
            };
            let Ok(permit) = self.receiving.clone().acquire_many_owned(permits).await else {
                return refuse(PeerError::Internal, "the storer is stopping");
            };
            got += n;
            if tx.send(Received::Data(frame, permit)).await.is_err() {
                // The writer stopped: its error is told below.
                break;
            }
        }
        if got == size {
            let _ = tx.send(Received::End).await;
        }
        drop(tx);
        let (r, outcome) = written
            .await
            .map_err(|e| StoreError::Corrupt(format!("writing a replica: {e}")))?;
        match (r, outcome) {
            (_, Some(Err(()))) => refuse(PeerError::BadRoot, "the bytes do not match their root"),
            (Ok(()), Some(Ok(ob))) => Ok(ob),
            (Err(e), _) => Err(e.into()),
            (Ok(()), None) => refuse(PeerError::Internal, "the replica was not written whole"),
        }
    }

    async fn delete(
        &self,
        peer: &NodeId,
        root: &[u8; 32],
        at_ms: u64,
        signature: &[u8; 64],
    ) -> Result<(), ServeError> {
        self.owned(peer, root)?;
        if now_ms().abs_diff(at_ms) > DELETE_WINDOW_MS {
            return refuse(PeerError::Unauthorized, "the request's time is off");
        }
        if !pluto_protocol::verify(peer, &delete_message(&self.me, root, at_ms), signature) {
            return refuse(PeerError::Unauthorized, "bad signature");
        }
        // The owner's word first, so an audit of what is gone is answered
        // with it.
        let mut tomb = Vec::with_capacity(104);
        tomb.extend_from_slice(&peer.0);
        tomb.extend_from_slice(&at_ms.to_le_bytes());
        tomb.extend_from_slice(signature);
        let path = self.tombstone_path(root);
        let (store, root_id, ob) = (self.store.clone(), PackId(*root), outboard_id(root));
        tokio::task::spawn_blocking(move || {
            crate::home::write_atomic(&path, &tomb)
                .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
            store.delete(&root_id)?;
            store.delete(&ob)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("deleting a replica: {e}")))??;
        let mut l = lock(&self.ledger);
        if let Some(e) = l.held.remove(root) {
            l.bytes = l.bytes.saturating_sub(e.size);
            if let Some(t) = Ticket::parse_unverified(&e.ticket) {
                l.tickets.remove(&t.id());
            }
        }
        tracing::info!("deleted a replica of {} at its request", peer.short());
        Ok(())
    }

    /// Keeps an owner's manifest: only for owners whose replicas are held,
    /// signed by the owner, newer than the one kept.
    async fn put_manifest(&self, peer: &NodeId, blob: Vec<u8>) -> Result<(), ServeError> {
        if !lock(&self.ledger).held.values().any(|e| e.owner == *peer) {
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

/// What goes from a link to the thread that writes its replica.
enum Received {
    /// Replica bytes, with their room in [`RECEIVE_BUDGET`].
    Data(Vec<u8>, OwnedSemaphorePermit),
    /// Every byte came.
    End,
}

/// The object being written, as [`BlobStore::put_stream`] reads it: the
/// header, then the frames as they arrive, hashed and obfuscated. It ends
/// cleanly only at [`Received::End`] with the bytes hashing to the root;
/// anything else is a read error, so the store keeps nothing.
struct Receiving {
    rx: mpsc::Receiver<Received>,
    pending: Vec<u8>,
    pos: usize,
    /// The room `pending` takes, given back once it is written.
    permit: Option<OwnedSemaphorePermit>,
    key: StreamKey,
    at: u64,
    builder: Option<outboard::Builder>,
    root: [u8; 32],
    /// The outboard when the bytes hashed to the root; `Err` when not.
    outcome: Option<Result<Vec<u8>, ()>>,
}

impl std::io::Read for Receiving {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos < self.pending.len() {
                let n = buf.len().min(self.pending.len() - self.pos);
                buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            self.permit = None;
            let Some(builder) = self.builder.as_mut() else {
                return Ok(0);
            };
            match self.rx.blocking_recv() {
                Some(Received::Data(mut frame, permit)) => {
                    builder.update(&frame);
                    self.key.apply(self.at, &mut frame);
                    self.at += frame.len() as u64;
                    (self.pending, self.pos, self.permit) = (frame, 0, Some(permit));
                }
                Some(Received::End) => {
                    let (root, ob) = self.builder.take().map(|b| b.finish()).unwrap_or_default();
                    if root != self.root {
                        self.outcome = Some(Err(()));
                        return Err(std::io::Error::other("the bytes do not match their root"));
                    }
                    self.outcome = Some(Ok(ob));
                    return Ok(0);
                }
                None => return Err(std::io::Error::other("the transfer stopped")),
            }
        }
    }
}

/// A replica in the store, as an audit reads it.
struct StoredReplica {
    store: Arc<dyn BlobStore>,
    root: [u8; 32],
    size: u64,
    key: StreamKey,
}

impl StoredReplica {
    /// The proof for `offset..offset + len`, from the outboard; one that
    /// does not verify (the outboard missing or damaged) is made again
    /// from an outboard rebuilt from the replica.
    fn prove(&self, offset: u64, len: u64) -> Result<Vec<u8>, ProofError> {
        let unreadable = |e: StoreError| ProofError::Unreadable(e.to_string());
        let id = outboard_id(&self.root);
        let layout = outboard::Layout::new(self.size);
        let stored = self.store.size(&id).map_err(unreadable)? == Some(layout.len())
            && self
                .store
                .get_range(&id, 0, outboard::HEADER as u64)
                .ok()
                .and_then(|h| outboard::header(&h))
                == Some((self.root, self.size));
        if stored {
            let mut src = Source::new(self, OutboardAt::Store(id));
            let p = outboard::prove(self.size, offset, len, &mut src)?;
            if proof::verify(&self.root, self.size, offset, len, &p).is_ok() {
                return Ok(p);
            }
            tracing::warn!(
                "the outboard of {} does not give a proof that holds; rebuilding it",
                PackId(self.root).short()
            );
        }
        let (root, ob) = self.rebuild().map_err(unreadable)?;
        if root == self.root {
            // Replaced, not added to: `put` keeps an object already there.
            self.store.delete(&id).map_err(unreadable)?;
            self.store.put(&id, &ob).map_err(unreadable)?;
        } else {
            tracing::warn!(
                "the replica {} no longer hashes to its root",
                PackId(self.root).short()
            );
        }
        outboard::prove(
            self.size,
            offset,
            len,
            &mut Source::new(self, OutboardAt::Memory(ob)),
        )
    }

    /// Hashes the whole replica again: its root and outboard as they are now.
    fn rebuild(&self) -> Result<([u8; 32], Vec<u8>), StoreError> {
        let mut b = outboard::Builder::new();
        let mut at = 0;
        while at < self.size {
            let n = (self.size - at).min(REBUILD_WINDOW);
            let mut buf = self
                .store
                .get_range(&PackId(self.root), HEADER_LEN as u64 + at, n)?;
            self.key.apply(at, &mut buf);
            b.update(&buf);
            at += n;
        }
        Ok(b.finish())
    }
}

/// Where an audit finds the outboard.
enum OutboardAt {
    Store(PackId),
    Memory(Vec<u8>),
}

/// An audit's reads: stored hashes, and whole 16 KiB groups of the replica,
/// each read once.
struct Source<'a> {
    replica: &'a StoredReplica,
    outboard: OutboardAt,
    layout: outboard::Layout,
    groups: HashMap<u64, Vec<u8>>,
}

impl<'a> Source<'a> {
    fn new(replica: &'a StoredReplica, outboard: OutboardAt) -> Self {
        Self {
            replica,
            outboard,
            layout: outboard::Layout::new(replica.size),
            groups: HashMap::new(),
        }
    }

    fn group(&mut self, g: u64) -> Result<&[u8], ProofError> {
        let r = self.replica;
        match self.groups.entry(g) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let start = g * outboard::GROUP;
                let n = outboard::GROUP.min(r.size.saturating_sub(start));
                let mut bytes = r
                    .store
                    .get_range(&PackId(r.root), HEADER_LEN as u64 + start, n)
                    .map_err(|e| ProofError::Unreadable(e.to_string()))?;
                r.key.apply(start, &mut bytes);
                Ok(e.insert(bytes))
            }
        }
    }
}

impl outboard::Source for Source<'_> {
    fn cv(&mut self, level: u32, index: u64) -> Result<[u8; 32], ProofError> {
        let at = self
            .layout
            .position(level, index)
            .ok_or_else(|| ProofError::Unreadable(format!("no hash {index} at level {level}")))?;
        let bytes = match &self.outboard {
            OutboardAt::Store(id) => self
                .replica
                .store
                .get_range(id, at, proof::CV_LEN as u64)
                .map_err(|e| ProofError::Unreadable(e.to_string()))?,
            OutboardAt::Memory(ob) => usize::try_from(at)
                .ok()
                .and_then(|at| ob.get(at..at + proof::CV_LEN))
                .unwrap_or_default()
                .to_vec(),
        };
        bytes
            .try_into()
            .map_err(|_| ProofError::Unreadable("the outboard is short".into()))
    }

    fn bytes(&mut self, start: u64, n: u64) -> Result<Vec<u8>, ProofError> {
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        let end = start + n;
        let mut at = start;
        while at < end {
            let g = at / outboard::GROUP;
            let g_start = g * outboard::GROUP;
            let group = self.group(g)?;
            let from = usize::try_from(at - g_start).unwrap_or(usize::MAX);
            let to = usize::try_from((end - g_start).min(group.len() as u64)).unwrap_or(0);
            let part = group
                .get(from..to)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| ProofError::Unreadable("the replica is short".into()))?;
            out.extend_from_slice(part);
            at += part.len() as u64;
        }
        Ok(out)
    }
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
