//! Storage contracts: where packs are kept ([`BlobStore`]) and the node's
//! catalog ([`MetaStore`]).

use crate::{BlobId, BlobKind, PackId, SnapshotId};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The named object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An operating system I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store holds something that does not parse or does not match.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// No linked plugin handles this URL.
    #[error("no store plugin handles {0:?} (known schemes: {1})")]
    UnknownScheme(String, String),
    /// A URL a plugin understands but whose contents are wrong.
    #[error("bad store URL {0:?}: {1}")]
    BadUrl(String, String),
    /// The store's server cannot be reached (nothing listens, no route, no
    /// answer in time): the URL may be right and the server down.
    #[error("cannot reach the database at {0}: {1}")]
    Unreachable(String, String),
    /// A request outside the object's bounds.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// An error of the plugin's own.
    #[error("{0}")]
    Plugin(Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where pack files live: a flat namespace of immutable objects named by
/// their [`PackId`].
///
/// The contract is blocking: callers run it on worker threads, never on an
/// async executor. This keeps the trait identical to the C ABI that
/// dynamically loaded plugins export, and lets the hot paths of backup and
/// restore call it without a runtime hop per blob.
///
/// Implementations must make [`put`](BlobStore::put) atomic and durable: after
/// it returns the whole object is there and survives a crash; before it
/// returns, a reader sees either nothing or (if it already existed) the old
/// whole object, never a prefix.
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `id`. Storing an id that already exists succeeds.
    fn put(&self, id: &PackId, bytes: &[u8]) -> Result<(), StoreError>;
    /// The whole object.
    fn get(&self, id: &PackId) -> Result<Vec<u8>, StoreError>;
    /// `len` bytes starting at `offset`; a range past the end is an error.
    fn get_range(&self, id: &PackId, offset: u64, len: u64) -> Result<Vec<u8>, StoreError>;
    /// The object's size, or `None` when it is absent.
    fn size(&self, id: &PackId) -> Result<Option<u64>, StoreError>;
    /// Every object with its size.
    fn list(&self) -> Result<Vec<(PackId, u64)>, StoreError>;
    /// Removes an object; removing an absent one succeeds.
    fn delete(&self, id: &PackId) -> Result<(), StoreError>;
    /// Stores what `src` yields until its end under `id`, with the same
    /// promise as [`put`](BlobStore::put): when `src` fails, or anything
    /// else does, nothing is stored under `id` and the error is returned.
    ///
    /// A store that can write as the bytes come (a temporary file renamed
    /// at the end, a multipart upload) should: a storer receives replicas
    /// of up to a GiB through this, many at once. The default reads `src`
    /// whole into memory and calls `put`, so older plugins keep working.
    fn put_stream(&self, id: &PackId, src: &mut dyn std::io::Read) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        src.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(format!("reading object {id}"), e))?;
        self.put(id, &bytes)
    }

    /// Gives the object `from` the name `to`, with the promise of
    /// [`put`](BlobStore::put) for `to`; afterwards `from` is gone. When
    /// `to` exists already it is kept (objects are immutable) and `from` is
    /// removed. `from` absent is [`StoreError::NotFound`].
    ///
    /// A store that can rename in place (a file system) should: a storer
    /// names a replica it received this way. The default copies the object
    /// through [`put_stream`](BlobStore::put_stream) a window at a time,
    /// then deletes `from`.
    fn rename(&self, from: &PackId, to: &PackId) -> Result<(), StoreError> {
        let size = self
            .size(from)?
            .ok_or_else(|| StoreError::NotFound(format!("object {from}")))?;
        if self.size(to)?.is_none() {
            let mut src = Copying {
                store: self,
                id: from,
                size,
                at: 0,
                window: Vec::new(),
                pos: 0,
            };
            self.put_stream(to, &mut src)?;
        }
        self.delete(from)
    }
}

/// An object read a window at a time, as [`BlobStore::rename`]'s default
/// copies it.
struct Copying<'a, S: ?Sized> {
    store: &'a S,
    id: &'a PackId,
    size: u64,
    at: u64,
    window: Vec<u8>,
    pos: usize,
}

impl<S: BlobStore + ?Sized> std::io::Read for Copying<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.window.len() {
            if self.at == self.size {
                return Ok(0);
            }
            let n = (self.size - self.at).min(1 << 20);
            self.window = self
                .store
                .get_range(self.id, self.at, n)
                .map_err(std::io::Error::other)?;
            self.at += n;
            self.pos = 0;
        }
        let n = buf.len().min(self.window.len() - self.pos);
        buf[..n].copy_from_slice(&self.window[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Where one blob lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    /// What the blob holds.
    pub kind: BlobKind,
    /// Its id.
    pub id: BlobId,
    /// The pack that holds it.
    pub pack: PackId,
    /// Byte offset of the sealed blob in the pack.
    pub offset: u64,
    /// Length of the sealed blob (nonce, ciphertext, tag).
    pub length: u32,
    /// Length of the plaintext once opened and decompressed.
    pub raw_length: u32,
}

/// A pack and every blob in it, as the catalog records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRecord {
    /// The pack.
    pub id: PackId,
    /// Its size in bytes.
    pub size: u64,
    /// Its blobs.
    pub blobs: Vec<BlobLocation>,
}

/// What the catalog keeps of a snapshot, enough to list and find it. The
/// snapshot blob itself is the authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The snapshot.
    pub id: SnapshotId,
    /// When it was taken, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// Host it was taken on.
    pub host: String,
    /// The paths it saved, as shown to people.
    pub paths: Vec<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// The snapshot it was based on.
    pub parent: Option<SnapshotId>,
    /// Its root tree.
    pub tree: BlobId,
}

/// The node's catalog: a cache of what its packs say, so that nothing needs
/// to read every pack to find a blob. Everything in it can be rebuilt from
/// the packs alone.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync {
    /// Records a pack with all its blobs, atomically. Recording a pack
    /// already recorded changes nothing.
    async fn add_pack(&self, pack: &PackRecord) -> Result<(), StoreError>;
    /// Records several packs in one transaction.
    async fn add_packs(&self, packs: &[PackRecord]) -> Result<(), StoreError> {
        for p in packs {
            self.add_pack(p).await?;
        }
        Ok(())
    }
    /// Every pack with its size.
    async fn packs(&self) -> Result<Vec<(PackId, u64)>, StoreError>;
    /// Every blob location, in no particular order (a blob kept in two
    /// packs has two).
    async fn blobs(&self) -> Result<Vec<BlobLocation>, StoreError>;
    /// Forgets a pack and its blobs; forgetting an absent one succeeds.
    async fn remove_pack(&self, id: &PackId) -> Result<(), StoreError>;
    /// Records a snapshot; recording one already recorded keeps one.
    async fn add_snapshot(&self, snap: &SnapshotRecord) -> Result<(), StoreError>;
    /// Every snapshot, oldest first.
    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError>;
    /// Forgets a snapshot; forgetting an absent one succeeds.
    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), StoreError>;
    /// A small named value.
    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets a small named value.
    async fn set_value(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Forgets every pack, blob and snapshot (values stay), before a rebuild.
    async fn clear(&self) -> Result<(), StoreError>;
    /// Flushes and closes; called once when the node is done with the store.
    async fn close(&self) {}
}
