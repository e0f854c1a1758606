//! An opened home: keys, catalog and pack store, with the blob-level reads
//! and writes that backup, restore and check share.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pluto_plugins_api::{
    BlobId, BlobKind, BlobLocation, BlobStore, MetaStore, PackId, PackRecord, SnapshotId,
    SnapshotRecord, StoreError,
};

use crate::crypto::{open_blob, seal_blob, seal_blob_into, OpenError, SealKey};
use crate::home::{Config, ConfigError, Home, SettingError};
use crate::index::Index;
use crate::keys::{KeyError, Keys, MasterKey};
use crate::pack::{self, FinishedPack, PackError, PackWriter, TRAILER_LEN};
use crate::snapshot::Snapshot;
use crate::tree::Tree;
use crate::wire::DecodeError;

/// Why an operation on a home failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// No `init` here.
    #[error("no pluto home at {0} (run `pluto init` first, or pass --home)")]
    NotInitialized(String),
    /// `init` already ran here.
    #[error("{0} already holds a pluto home (`pluto join URL` joins a coordinator from it; or choose another --home)")]
    AlreadyInitialized(String),
    /// Another process holds the home.
    #[error("another pluto process is using {0}; try again when it has finished")]
    Locked(String),
    /// The config file could not be read, or a setting in it is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A setting is wrong (in a config not read from a file).
    #[error("config: {0}")]
    Setting(#[from] SettingError),
    /// An exclude pattern does not parse.
    #[error("--exclude: {0}")]
    Exclude(#[from] globset::Error),
    /// A backup was asked for without anything to back up.
    #[error("nothing to back up: give at least one path")]
    NothingToBackUp,
    /// A path to back up is inside pluto's own files.
    #[error("refusing to back up {}: it is inside pluto's own {}", .path.display(), .own.display())]
    OwnFiles {
        /// The path asked for.
        path: PathBuf,
        /// pluto's file or directory that holds it.
        own: PathBuf,
    },
    /// Keys or the secrets file.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A store plugin failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pack does not parse.
    #[error("pack {pack}: {source}")]
    Pack {
        /// The pack.
        pack: PackId,
        /// Why.
        source: PackError,
    },
    /// A blob does not open.
    #[error("{kind} blob {id} in pack {pack}: {source}")]
    Blob {
        /// Kind.
        kind: &'static str,
        /// Blob.
        id: BlobId,
        /// Pack.
        pack: PackId,
        /// Why.
        source: OpenError,
    },
    /// A blob is not in the index.
    #[error("{0} blob {1} is missing from every pack")]
    MissingBlob(&'static str, BlobId),
    /// A decoded blob does not parse.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// No snapshot matches.
    #[error("no snapshot matches {0:?}")]
    NoSnapshot(String),
    /// More than one snapshot matches.
    #[error("{0:?} matches more than one snapshot; give more digits")]
    AmbiguousSnapshot(String),
    /// A path given to restore is not in the snapshot.
    #[error("{} is not in snapshot {snapshot}; `pluto ls {snapshot}` shows what it holds", .path.display())]
    NotInSnapshot {
        /// The path, made absolute.
        path: PathBuf,
        /// The snapshot's short id.
        snapshot: String,
    },
    /// The restore's target exists and is not a directory.
    #[error("cannot restore into {}: {} is not a directory", .target.display(), .blocker.display())]
    TargetNotADirectory {
        /// The target asked for.
        target: PathBuf,
        /// The target itself, or the one of its parents that is not a directory.
        blocker: PathBuf,
    },
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl RepoError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// What a catalog rebuild found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RebuildReport {
    /// Packs recorded.
    pub packs: usize,
    /// Snapshots recorded.
    pub snapshots: usize,
    /// Packs or snapshots that could not be read and were left out.
    pub problems: Vec<String>,
}

/// How the home is held while open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Readers share the home.
    Shared,
    /// One writer at a time.
    Exclusive,
    /// No lock: the daemon's uploads, which only read packs (immutable,
    /// written atomically) and the catalog (transactional) and so may run
    /// beside a backup. Whoever deletes packs must take the upload lock.
    Unlocked,
}

/// An opened home.
pub struct Repo {
    /// The home.
    pub home: Home,
    /// Its settings.
    pub config: Config,
    /// Every key.
    pub keys: Keys,
    data_key: SealKey,
    meta_key: SealKey,
    /// The catalog.
    pub catalog: Arc<dyn MetaStore>,
    /// The local pack store.
    pub packs: Arc<dyn BlobStore>,
    _lock: File,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repo({})", self.home.root().display())
    }
}

fn lock_home(home: &Home, mode: LockMode) -> Result<File, RepoError> {
    let path = home.lock_path();
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| RepoError::io(format!("opening {}", path.display()), e))?;
    let r = match mode {
        LockMode::Shared => f.try_lock_shared(),
        LockMode::Exclusive => f.try_lock(),
        LockMode::Unlocked => Ok(()),
    };
    match r {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => {
            Err(RepoError::Locked(home.root().display().to_string()))
        }
        Err(fs::TryLockError::Error(e)) => {
            Err(RepoError::io(format!("locking {}", path.display()), e))
        }
    }
}

impl Repo {
    /// Creates a home: directory, secrets, config. Returns the master key.
    pub fn init(home: &Home, master: &MasterKey, config: &Config) -> Result<(), RepoError> {
        if home.exists() {
            return Err(RepoError::AlreadyInitialized(
                home.root().display().to_string(),
            ));
        }
        config.validate()?;
        home.create_dir()
            .map_err(|e| RepoError::io(format!("creating {}", home.root().display()), e))?;
        home.save_config(config)?;
        master.save(&home.secrets())?;
        Ok(())
    }

    /// Opens an initialised home.
    pub async fn open(home: Home, mode: LockMode) -> Result<Self, RepoError> {
        if !home.exists() {
            return Err(RepoError::NotInitialized(home.root().display().to_string()));
        }
        let lock = lock_home(&home, mode)?;
        let config = home.load_config()?;
        let keys = MasterKey::load(&home.secrets())?.keys();
        let catalog: Arc<dyn MetaStore> =
            pluto_plugins_api::open_meta_store(&home.resolve_url(&config.catalog))
                .await?
                .into();
        let packs: Arc<dyn BlobStore> =
            pluto_plugins_api::open_blob_store(&home.resolve_url(&config.packs))?.into();
        Ok(Self {
            data_key: SealKey::new(&keys.data),
            meta_key: SealKey::new(&keys.metadata),
            keys,
            config,
            catalog,
            packs,
            home,
            _lock: lock,
        })
    }

    /// The key that seals blobs of `kind`.
    pub fn key_for(&self, kind: BlobKind) -> &SealKey {
        match kind {
            BlobKind::Data => &self.data_key,
            _ => &self.meta_key,
        }
    }

    /// Id and sealed bytes of a plaintext blob.
    pub fn seal(&self, kind: BlobKind, raw: &[u8]) -> (BlobId, Vec<u8>) {
        let id = self.keys.blob_id(raw);
        let sealed = seal_blob(self.key_for(kind), self.config.compression, kind, &id, raw);
        (id, sealed)
    }

    /// Seals with a known id (the caller hashed already) into `out`.
    pub fn seal_into(&self, kind: BlobKind, id: &BlobId, raw: &[u8], out: &mut Vec<u8>) {
        seal_blob_into(
            self.key_for(kind),
            self.config.compression,
            kind,
            id,
            raw,
            out,
        )
    }

    /// Finishes a pack and writes it durably to the local pack store.
    /// Returns its record and its buffer, for the next pack to reuse.
    pub fn write_pack(&self, w: PackWriter) -> Result<(PackRecord, Vec<u8>), RepoError> {
        let FinishedPack { id, bytes, blobs } = w.finish(&self.meta_key);
        self.packs.put(&id, &bytes)?;
        let record = PackRecord {
            id,
            size: bytes.len() as u64,
            blobs,
        };
        Ok((record, bytes))
    }

    /// Opens a sealed blob, authenticating it and checking its id.
    pub fn open_sealed(&self, loc: &BlobLocation, sealed: &[u8]) -> Result<Vec<u8>, RepoError> {
        open_blob(
            self.key_for(loc.kind),
            loc.kind,
            &loc.id,
            loc.raw_length as usize,
            sealed,
            |raw| self.keys.blob_id(raw),
        )
        .map_err(|source| RepoError::Blob {
            kind: loc.kind.name(),
            id: loc.id,
            pack: loc.pack,
            source,
        })
    }

    /// Reads one blob from the local pack store, authenticated.
    pub fn read_blob(&self, loc: &BlobLocation) -> Result<Vec<u8>, RepoError> {
        let sealed = self
            .packs
            .get_range(&loc.pack, loc.offset, u64::from(loc.length))?;
        self.open_sealed(loc, &sealed)
    }

    /// Reads a blob by kind and id through the index.
    pub fn read_by_id(
        &self,
        index: &Index,
        kind: BlobKind,
        id: &BlobId,
    ) -> Result<Vec<u8>, RepoError> {
        let loc = index
            .get(kind, id)
            .ok_or(RepoError::MissingBlob(kind.name(), *id))?;
        self.read_blob(loc)
    }

    /// Reads and decodes a tree.
    pub fn load_tree(&self, index: &Index, id: &BlobId) -> Result<Tree, RepoError> {
        Ok(Tree::decode(&self.read_by_id(
            index,
            BlobKind::Tree,
            id,
        )?)?)
    }

    /// Reads and decodes a snapshot.
    pub fn load_snapshot(&self, index: &Index, id: &SnapshotId) -> Result<Snapshot, RepoError> {
        let raw = self.read_by_id(index, BlobKind::Snapshot, &BlobId(id.0))?;
        Ok(Snapshot::decode(&raw)?)
    }

    /// Every pack a snapshot needs: its own, its trees' and its files'.
    pub fn snapshot_packs(
        &self,
        index: &Index,
        id: &SnapshotId,
    ) -> Result<std::collections::BTreeSet<PackId>, RepoError> {
        let mut packs = std::collections::BTreeSet::new();
        let locate = |kind: BlobKind, blob: &BlobId| {
            index.get(kind, blob).map(|l| l.pack).ok_or_else(|| {
                RepoError::Store(StoreError::Corrupt(format!(
                    "blob {} is in no pack",
                    blob.short()
                )))
            })
        };
        packs.insert(locate(BlobKind::Snapshot, &BlobId(id.0))?);
        let snapshot = self.load_snapshot(index, id)?;
        let mut todo = vec![snapshot.tree];
        let mut seen = std::collections::HashSet::new();
        while let Some(tree) = todo.pop() {
            if !seen.insert(tree) {
                continue;
            }
            packs.insert(locate(BlobKind::Tree, &tree)?);
            for node in self.load_tree(index, &tree)?.nodes {
                match node.content {
                    crate::tree::NodeContent::Dir { tree } => todo.push(tree),
                    crate::tree::NodeContent::File { chunks } => {
                        for c in &chunks {
                            packs.insert(locate(BlobKind::Data, c)?);
                        }
                    }
                    crate::tree::NodeContent::Symlink { .. } => {}
                }
            }
        }
        Ok(packs)
    }

    /// The in-memory index of everything in the catalog.
    pub async fn load_index(&self) -> Result<Index, RepoError> {
        Ok(Index::from_locations(self.catalog.blobs().await?))
    }

    /// Reads a pack's header from the pack store.
    pub fn read_pack_header(&self, id: &PackId, size: u64) -> Result<PackRecord, RepoError> {
        let pack_err = |source| RepoError::Pack { pack: *id, source };
        let tail_len = (64 << 10).min(size);
        let tail = self.packs.get_range(id, size - tail_len, tail_len)?;
        let n = pack::header_len(&tail, size).map_err(pack_err)?;
        let sealed = if n + TRAILER_LEN <= tail.len() {
            tail[tail.len() - TRAILER_LEN - n..tail.len() - TRAILER_LEN].to_vec()
        } else {
            self.packs
                .get_range(id, size - (n + TRAILER_LEN) as u64, n as u64)?
        };
        let entries = pack::read_header(&self.meta_key, &sealed, size).map_err(pack_err)?;
        Ok(PackRecord {
            id: *id,
            size,
            blobs: pack::locate(*id, &entries),
        })
    }

    /// Parses a whole pack held in memory.
    pub fn parse_pack(&self, id: &PackId, bytes: &[u8]) -> Result<PackRecord, RepoError> {
        let entries = pack::parse(&self.meta_key, bytes)
            .map_err(|source| RepoError::Pack { pack: *id, source })?;
        Ok(PackRecord {
            id: *id,
            size: bytes.len() as u64,
            blobs: pack::locate(*id, &entries),
        })
    }

    /// Brings the catalog up to date with the pack store, and returns the
    /// index of everything it then knows. A backup killed after writing
    /// packs but before recording them (or before recording its snapshot)
    /// leaves packs the catalog does not know; they are recorded here, with
    /// the snapshots they hold. Unreadable packs are skipped with a warning.
    pub async fn sync_catalog(&self) -> Result<Index, RepoError> {
        let known: HashSet<PackId> = self
            .catalog
            .packs()
            .await?
            .into_iter()
            .map(|p| p.0)
            .collect();
        let unknown: Vec<(PackId, u64)> = self
            .packs
            .list()?
            .into_iter()
            .filter(|(id, _)| !known.contains(id))
            .collect();
        let (records, problems) = self.read_headers(&unknown);
        for p in &problems {
            tracing::warn!("{p}");
        }
        if !records.is_empty() {
            tracing::info!(
                "recording {} packs left by an interrupted backup",
                records.len()
            );
            self.catalog.add_packs(&records).await?;
        }
        let blobs = self.catalog.blobs().await?;
        let (_, problems) = self.recover_snapshots(&blobs).await?;
        for p in &problems {
            tracing::warn!("{p}");
        }
        Ok(Index::from_locations(blobs))
    }

    /// Forgets the catalog and rebuilds it from the pack headers alone.
    pub async fn rebuild_catalog(&self) -> Result<RebuildReport, RepoError> {
        self.catalog.clear().await?;
        let (records, mut problems) = self.read_headers(&self.packs.list()?);
        self.catalog.add_packs(&records).await?;
        let blobs = self.catalog.blobs().await?;
        let (snapshots, more) = self.recover_snapshots(&blobs).await?;
        problems.extend(more);
        Ok(RebuildReport {
            packs: records.len(),
            snapshots,
            problems,
        })
    }

    /// Reads the headers of these packs; unreadable ones are reported, not fatal.
    fn read_headers(&self, packs: &[(PackId, u64)]) -> (Vec<PackRecord>, Vec<String>) {
        let mut records = Vec::new();
        let mut problems = Vec::new();
        for (id, size) in packs {
            match self.read_pack_header(id, *size) {
                Ok(r) => records.push(r),
                Err(e) => problems.push(format!("skipping unreadable pack: {e}")),
            }
        }
        (records, problems)
    }

    /// Records every snapshot whose blob is indexed but which the catalog
    /// does not list. Returns how many were added, and what could not be read.
    async fn recover_snapshots(
        &self,
        blobs: &[BlobLocation],
    ) -> Result<(usize, Vec<String>), RepoError> {
        let listed: HashSet<SnapshotId> = self
            .catalog
            .snapshots()
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let mut added = 0;
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for loc in blobs.iter().filter(|l| l.kind == BlobKind::Snapshot) {
            let id = SnapshotId(loc.id.0);
            if listed.contains(&id) || !seen.insert(id) {
                continue;
            }
            match self
                .read_blob(loc)
                .and_then(|raw| Ok(Snapshot::decode(&raw)?))
            {
                Ok(snap) => {
                    self.catalog
                        .add_snapshot(&snapshot_record(id, &snap))
                        .await?;
                    added += 1;
                }
                Err(e) => {
                    problems.push(format!("skipping unreadable snapshot {}: {e}", id.short()))
                }
            }
        }
        Ok((added, problems))
    }

    /// Every snapshot, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, RepoError> {
        Ok(self.catalog.snapshots().await?)
    }

    /// Finds a snapshot by `latest` or by a unique hex prefix of its id.
    pub async fn find_snapshot(&self, spec: &str) -> Result<SnapshotRecord, RepoError> {
        let all = self.snapshots().await?;
        if spec == "latest" {
            return all
                .into_iter()
                .next_back()
                .ok_or_else(|| RepoError::NoSnapshot(spec.into()));
        }
        let spec_l = spec.to_ascii_lowercase();
        let mut hits = all
            .into_iter()
            .filter(|s| s.id.to_hex().starts_with(&spec_l));
        match (hits.next(), hits.next()) {
            (Some(s), None) if !spec.is_empty() => Ok(s),
            (Some(_), Some(_)) => Err(RepoError::AmbiguousSnapshot(spec.into())),
            _ => Err(RepoError::NoSnapshot(spec.into())),
        }
    }
}

/// Locks a mutex, taking over one a panicked thread left poisoned: every
/// mutex in the engine guards data a panic cannot leave half-updated
/// (collections that are only pushed to or inserted into).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The catalog record of a snapshot.
pub fn snapshot_record(id: SnapshotId, s: &Snapshot) -> SnapshotRecord {
    SnapshotRecord {
        id,
        time_ns: s.time_ns,
        host: s.host.clone(),
        paths: s
            .paths
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
        tags: s.tags.clone(),
        parent: s.parent,
        tree: s.tree,
    }
}

/// Makes a path absolute and removes `.` and `..` lexically.
pub fn clean_absolute(p: &Path) -> Result<std::path::PathBuf, RepoError> {
    let abs = std::path::absolute(p)
        .map_err(|e| RepoError::io(format!("resolving {}", p.display()), e))?;
    let mut out = std::path::PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}
