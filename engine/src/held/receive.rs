//! Receiving a replica, streaming, and keeping what came of a transfer
//! that broke so its owner can send only the rest.
//!
//! The link's frames go through a small bounded queue to a worker thread
//! that hashes them, builds the outboard and writes them obfuscated
//! through [`BlobStore::put_stream`] under a temporary name
//! ([`partial_id`]). When every byte came and they hash to the announced
//! root, the object is renamed to the root: a replica is there whole, with
//! its root checked, or not under its name at all. When the transfer
//! breaks, what came is committed under the temporary name and listed in
//! an index file beside the tombstones:
//!
//! ```text
//! HOME/held-manifests/partial-<root hex> =
//!     "PLUTOPI1" || owner (32) || size (u64 LE) || started at_ms (u64 LE)
//!     || nonce (u64 LE) || previous nonce (u64 LE, 0: none)
//! object partial_id(root, nonce) = a held object's header || the bytes that came
//! ```
//!
//! The index is written before the object, so every such object is known
//! at start and never taken for a replica held. A resumed transfer reads
//! the kept bytes back (hashing them again), then goes on with the link's
//! frames into a new object under a new nonce; the index names both until
//! the old one is removed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pluto_plugins_api::{BlobStore, Link, NodeId, PackId, StoreError};
use pluto_protocol::proof::outboard;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::ledger::Partial;
use super::obfuscation::{self, Obfuscating, Replica};
use super::{recv_within, Held, ServeError, RECEIVE_BUDGET};
use crate::exchange::PeerError;

/// Frames queued per link between the link and the writer.
const QUEUED_FRAMES: usize = 2;
/// What is read back at a time of the bytes a broken transfer kept.
const KEPT_WINDOW: u64 = 256 << 10;
const INDEX_MAGIC: &[u8; 8] = b"PLUTOPI1";
const INDEX_LEN: usize = 8 + 32 + 8 + 8 + 8 + 8;

/// The temporary name of replica `root` being received (`nonce` tells
/// transfers apart).
pub fn partial_id(root: &[u8; 32], nonce: u64) -> PackId {
    let mut h = blake3::Hasher::new_derive_key("pluto v1 held partial");
    h.update(root);
    h.update(&nonce.to_le_bytes());
    PackId(*h.finalize().as_bytes())
}

/// A transfer's entry in the index of kept transfers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Indexed {
    /// Whose.
    pub owner: NodeId,
    /// The replica's size.
    pub size: u64,
    /// When the first transfer started.
    pub at_ms: u64,
    /// The object being (or last) written.
    pub nonce: u64,
    /// The object of the transfer before it, 0 for none.
    pub prev: u64,
}

impl Indexed {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(INDEX_LEN);
        b.extend_from_slice(INDEX_MAGIC);
        b.extend_from_slice(&self.owner.0);
        for v in [self.size, self.at_ms, self.nonce, self.prev] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != INDEX_LEN || &b[..8] != INDEX_MAGIC {
            return None;
        }
        let u = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
        Some(Self {
            owner: NodeId(b[8..40].try_into().ok()?),
            size: u(40)?,
            at_ms: u(48)?,
            nonce: u(56)?,
            prev: u(64)?,
        })
    }
}

fn index_path(dir: &Path, root: &[u8; 32]) -> PathBuf {
    dir.join(format!("partial-{}", PackId(*root).to_hex()))
}

/// Writes (or replaces) the index entry of `root`.
pub fn write_index(dir: &Path, root: &[u8; 32], ix: &Indexed) -> Result<(), StoreError> {
    let path = index_path(dir, root);
    crate::home::write_atomic(&path, &ix.encode())
        .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))
}

/// Removes the index entry of `root`.
pub fn remove_index(dir: &Path, root: &[u8; 32]) {
    let _ = std::fs::remove_file(index_path(dir, root));
}

/// Every index entry in `dir`; unreadable ones are removed.
pub fn read_indexes(dir: &Path) -> Vec<([u8; 32], Indexed)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_prefix("partial-")) else {
            continue;
        };
        let root = hex.parse::<PackId>().ok().map(|p| p.0);
        let ix = std::fs::read(e.path())
            .ok()
            .and_then(|b| Indexed::decode(&b));
        match (root, ix) {
            (Some(r), Some(ix)) => out.push((r, ix)),
            _ => {
                tracing::warn!("{} is not an index entry; removed", e.path().display());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    out
}

/// Removes a kept transfer: its object and its index entry.
pub fn drop_kept(store: &dyn BlobStore, dir: &Path, root: &[u8; 32], p: &Partial) {
    if let Err(e) = store.delete(&partial_id(root, p.nonce)) {
        tracing::warn!("removing a kept transfer: {e}");
    }
    remove_index(dir, root);
}

/// How a transfer ended.
#[derive(Debug)]
pub enum Got {
    /// Every byte, hashing to the root: the replica's outboard. The object
    /// is under its temporary name.
    Whole(Vec<u8>),
    /// The transfer broke after this many bytes, which are kept under the
    /// temporary name; and why it broke.
    Cut(u64, ServeError),
    /// Nothing kept.
    Failed(ServeError),
}

/// What goes from a link to the thread that writes its replica.
enum Received {
    /// Replica bytes, with their room in [`RECEIVE_BUDGET`].
    Data(Vec<u8>, OwnedSemaphorePermit),
    /// Every byte came.
    End,
}

/// How the writer ended.
enum Outcome {
    Whole(Vec<u8>),
    Cut(u64),
    BadRoot,
}

/// A replica's plain bytes as they arrive, hashed on the way: first what
/// a broken transfer kept, read back from its object, then the link's
/// frames. It ends cleanly at [`Received::End`] with the bytes hashing to
/// the root, or when the link stops after some bytes came (they are
/// kept); anything else is a read error, so the store keeps nothing.
struct Arriving {
    rx: mpsc::Receiver<Received>,
    pending: Vec<u8>,
    pos: usize,
    /// The room `pending` takes, given back once it is written.
    permit: Option<OwnedSemaphorePermit>,
    /// The bytes kept, and how many of them are still to be read back.
    kept: Option<(Replica, u64)>,
    at: u64,
    builder: Option<outboard::Builder>,
    root: [u8; 32],
    outcome: Option<Outcome>,
}

impl Read for Arriving {
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
            if let Some((replica, have)) = &self.kept {
                if self.at < *have {
                    let n = (*have - self.at).min(KEPT_WINDOW);
                    let bytes = replica.read(self.at, n).map_err(std::io::Error::other)?;
                    builder.update(&bytes);
                    self.at += n;
                    (self.pending, self.pos) = (bytes, 0);
                    continue;
                }
                self.kept = None;
            }
            match self.rx.blocking_recv() {
                Some(Received::Data(frame, permit)) => {
                    builder.update(&frame);
                    self.at += frame.len() as u64;
                    (self.pending, self.pos, self.permit) = (frame, 0, Some(permit));
                }
                Some(Received::End) => {
                    let (root, ob) = self.builder.take().map(|b| b.finish()).unwrap_or_default();
                    if root != self.root {
                        self.outcome = Some(Outcome::BadRoot);
                        return Err(std::io::Error::other("the bytes do not match their root"));
                    }
                    self.outcome = Some(Outcome::Whole(ob));
                    return Ok(0);
                }
                None if self.at > 0 => {
                    self.builder = None;
                    self.outcome = Some(Outcome::Cut(self.at));
                    return Ok(0);
                }
                None => return Err(std::io::Error::other("the transfer stopped")),
            }
        }
    }
}

impl Held {
    /// Receives replica `root` of `size` bytes from `link` into the object
    /// `partial_id(root, nonce)` behind `header`, after the bytes kept in
    /// `from` when resuming.
    pub(super) async fn receive(
        &self,
        link: &mut dyn Link,
        root: [u8; 32],
        size: u64,
        header: Vec<u8>,
        from: Option<&Partial>,
        nonce: u64,
    ) -> Got {
        let key = obfuscation::key(&self.obfuscation, &root);
        let (tx, rx) = mpsc::channel(QUEUED_FRAMES);
        let have = from.map_or(0, |p| p.have);
        let kept = from.map(|p| {
            let replica = Replica {
                store: self.store.clone(),
                object: partial_id(&root, p.nonce),
                key: key.clone(),
            };
            (replica, p.have)
        });
        let arriving = Arriving {
            rx,
            pending: Vec::new(),
            pos: 0,
            permit: None,
            kept,
            at: 0,
            builder: Some(outboard::Builder::new()),
            root,
            outcome: None,
        };
        let mut writer = Obfuscating::new(header, arriving, key);
        let store: Arc<dyn BlobStore> = self.store.clone();
        let id = partial_id(&root, nonce);
        let written = tokio::task::spawn_blocking(move || {
            let r = store.put_stream(&id, &mut writer);
            (r, writer.inner.outcome)
        });
        let mut got = have;
        let stopped = loop {
            if got == size {
                let _ = tx.send(Received::End).await;
                break None;
            }
            let frame = match recv_within(link).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    break Some(ServeError::Refused(
                        PeerError::Malformed,
                        format!("the stream ended after {got} of {size} bytes"),
                    ))
                }
                Err(e) => break Some(e),
            };
            let n = frame.len() as u64;
            if got + n > size {
                break Some(ServeError::Refused(
                    PeerError::Malformed,
                    "more bytes than announced".into(),
                ));
            }
            let Some(permits) = u32::try_from(frame.len())
                .ok()
                .filter(|n| *n as usize <= RECEIVE_BUDGET)
            else {
                break Some(ServeError::Refused(
                    PeerError::Malformed,
                    "a frame larger than allowed".into(),
                ));
            };
            let Ok(permit) = self.receiving.clone().acquire_many_owned(permits).await else {
                break Some(ServeError::Refused(
                    PeerError::Internal,
                    "the storer is stopping".into(),
                ));
            };
            got += n;
            if tx.send(Received::Data(frame, permit)).await.is_err() {
                // The writer stopped: its error is told below.
                break None;
            }
        };
        drop(tx);
        let (r, outcome) = match written.await {
            Ok(done) => done,
            Err(e) => {
                let e = StoreError::Corrupt(format!("writing a replica: {e}"));
                return Got::Failed(e.into());
            }
        };
        match (r, outcome, stopped) {
            (_, Some(Outcome::BadRoot), _) => Got::Failed(ServeError::Refused(
                PeerError::BadRoot,
                "the bytes do not match their root".into(),
            )),
            (Ok(()), Some(Outcome::Whole(ob)), None) => Got::Whole(ob),
            (Ok(()), Some(Outcome::Cut(kept)), Some(why)) => Got::Cut(kept, why),
            // The writer failed because the link stopped it: the link's error.
            (_, _, Some(why)) => Got::Failed(why),
            (Err(e), _, None) => Got::Failed(e.into()),
            (Ok(()), _, None) => Got::Failed(ServeError::Refused(
                PeerError::Internal,
                "the replica was not written whole".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_entries_round_trip_and_garbage_is_refused() {
        let ix = Indexed {
            owner: NodeId([5; 32]),
            size: 1 << 30,
            at_ms: 77,
            nonce: 9,
            prev: 0,
        };
        assert_eq!(Indexed::decode(&ix.encode()), Some(ix));
        let mut bad = ix.encode();
        bad[0] ^= 1;
        assert_eq!(Indexed::decode(&bad), None);
        assert_eq!(Indexed::decode(&ix.encode()[..INDEX_LEN - 1]), None);
        assert_ne!(partial_id(&[1; 32], 1), partial_id(&[1; 32], 2));
        assert_ne!(partial_id(&[1; 32], 1), PackId([1; 32]));
    }
}
