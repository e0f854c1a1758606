//! The storer's side: replicas this node keeps for others, in a blob store
//! of their own (`HOME/held`, `fs` by default), and the links it serves.
//!
//! Each replica is one object named by its BLAKE3 root:
//!
//! ```text
//! held object = "PLUTOHD2" || signed ticket (176) || pack id (32)
//!               || owner's signature of the replica's statement (64)
//!               || replica bytes XOR ChaCha20(obfuscation key of the root)
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
//! Audits ([`Held::prove`]) read the replica whole, undo the obfuscation
//! and answer with a BLAKE3 range proof ([`pluto_protocol::proof`]). Objects are
//! written through [`BlobStore::put`], which is atomic and durable (the `fs`
//! store: temporary file, fsync, rename, fsync of the directory): a replica
//! is there whole, with its root checked, or not at all.
//!
//! Manifests of owners are kept beside, one per owner (`HOME/held/manifests`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{BlobStore, Link, NodeId, PackId, StoreError, TransportError};
use pluto_protocol::{proof, HeldReport, ProofAnswer, ReplicaStatement, Ticket, SIGNED_TICKET_LEN};

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
    /// and reported.
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
        for (id, size) in store.list()? {
            let parsed = if size >= HEADER_LEN as u64 {
                parse_header(&store.get_range(&id, 0, HEADER_LEN as u64)?)
            } else {
                None
            };
            let Some((ticket, t, pack, attest)) = parsed else {
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
            return match self.tombstone(owner, &root) {
                Some((at_ms, signature)) => ProofAnswer::Deleted { at_ms, signature },
                None => ProofAnswer::NotHeld,
            };
        }
        let store = self.store.clone();
        let key = StreamKey::obfuscation(&self.obfuscation, &root);
        let r = tokio::task::spawn_blocking(move || {
            let mut bytes = store.get_range(&PackId(root), HEADER_LEN as u64, size)?;
            key.apply(0, &mut bytes);
            Ok::<_, StoreError>(proof::prove(&bytes, offset, len))
        })
        .await;
        match r {
            Ok(Ok(Ok(p))) => ProofAnswer::Held(p),
            Ok(Ok(Err(e))) => {
                tracing::warn!("an audit names a range it may not: {e}");
                ProofAnswer::NotHeld
            }
            Ok(Err(e)) => {
                tracing::warn!("reading a replica for an audit: {e}");
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

    /// The owner's signed delete of `root`, if it had it deleted here.
    fn tombstone(&self, owner: &NodeId, root: &[u8; 32]) -> Option<(u64, [u8; 64])> {
        let t = std::fs::read(self.tombstone_path(root)).ok()?;
        if t.len() != 32 + 8 + 64 || t[..32] != owner.0 {
            return None;
        }
        let at_ms = u64::from_le_bytes(t[32..40].try_into().ok()?);
        let signature: [u8; 64] = t[40..].try_into().ok()?;
        Some((at_ms, signature))
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
                self.delete(peer, &root, at_ms, &signature)?;
                link.send(&PeerMsg::Ok.encode()).await?;
                Ok(())
            }
            PeerMsg::PutManifest { blob } => {
                self.put_manifest(peer, &blob)?;
                link.send(&PeerMsg::Ok.encode()).await?;
                Ok(())
            }
            PeerMsg::GetManifest => {
                let path = self.manifests.join(peer.to_hex());
                match std::fs::read(&path) {
                    Ok(blob) => link.send(&PeerMsg::Manifest { blob }.encode()).await?,
                    Err(_) => return refuse(PeerError::NotFound, "no manifest of yours here"),
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
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        // Grown as bytes arrive: an announced size is not an allocation.
        let mut object = Vec::with_capacity(HEADER_LEN + len.min(16 << 20));
        object.extend_from_slice(MAGIC);
        object.extend_from_slice(&ticket);
        object.extend_from_slice(&pack.0);
        object.extend_from_slice(&attest);
        let mut hasher = blake3::Hasher::new();
        while object.len() < HEADER_LEN + len {
            let Some(frame) = recv_within(link).await? else {
                return refuse(
                    PeerError::Malformed,
                    format!(
                        "the stream ended after {} of {size} bytes",
                        object.len() - HEADER_LEN
                    ),
                );
            };
            if object.len() + frame.len() > HEADER_LEN + len {
                return refuse(PeerError::Malformed, "more bytes than announced");
            }
            hasher.update(&frame);
            object.extend_from_slice(&frame);
        }
        if *hasher.finalize().as_bytes() != root {
            return refuse(PeerError::BadRoot, "the bytes do not match their root");
        }
        StreamKey::obfuscation(&self.obfuscation, &root).apply(0, &mut object[HEADER_LEN..]);
        let store = self.store.clone();
        let id = PackId(root);
        tokio::task::spawn_blocking(move || store.put(&id, &object))
            .await
            .map_err(|e| StoreError::Corrupt(format!("writing a replica: {e}")))??;
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

    fn delete(
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
        crate::home::write_atomic(&path, &tomb)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        self.store.delete(&PackId(*root))?;
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
    fn put_manifest(&self, peer: &NodeId, blob: &[u8]) -> Result<(), ServeError> {
        if !lock(&self.ledger).held.values().any(|e| e.owner == *peer) {
            return refuse(PeerError::NotFound, "no replica of yours is held here");
        }
        let Some(version) = manifest::verify(peer, blob) else {
            return refuse(PeerError::Unauthorized, "the manifest is not signed by you");
        };
        let path = self.manifests.join(peer.to_hex());
        if let Ok(old) = std::fs::read(&path) {
            if manifest::verify(peer, &old).is_some_and(|v| v >= version) {
                return refuse(PeerError::Malformed, "a newer manifest is kept");
            }
        }
        crate::home::write_atomic(&path, blob)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        Ok(())
    }
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
