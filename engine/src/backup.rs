//! Backup: walk paths, chunk, deduplicate, compress, encrypt, pack.
//!
//! ```text
//!   walker (rayon, one task per directory entry, work-stealing across both cores)
//!     |-- unchanged file (size, mtime, inode, ctime as in the parent): reuse its chunk list
//!     |-- changed or new file: read -> FastCDC -> keyed BLAKE3 -> dedup
//!     |                          -> zstd (when it shrinks) -> AES-256-GCM -> data pack
//!     '-- directory: its entries first, then its tree blob -> metadata pack
//!   full pack -> local pack store (fsync, rename) -> catalog
//!   end: flush data pack, then one pack with the last trees, an index segment and the snapshot
//! ```
//!
//! Files are read through a reusable window; the chunks of one window are
//! sealed in parallel, so a single big file also uses every core. Packs are durable before anything that refers
//! to them is written, so a backup killed at any point leaves packs the next
//! one reuses and never a snapshot that points at missing data.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use pluto_plugins_api::{BlobId, BlobKind, PackRecord, SnapshotId};
use rayon::prelude::*;

use crate::home::ChunkerConfig;
use crate::index::{encode_segment, Index};
use crate::pack::PackWriter;
use crate::repo::{clean_absolute, lock, snapshot_record, Repo, RepoError};
use crate::snapshot::{Snapshot, Summary};
use crate::tree::{Node, NodeContent, Tree};

/// How often a file that changes while it is read is read again.
const READ_ATTEMPTS: usize = 3;
/// Smallest read window (files up to this size are read in one go).
const MIN_WINDOW: usize = 4 << 20;

thread_local! {
    /// Each worker's read window, reused from file to file.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each worker's sealing buffer, reused from blob to blob.
    static SEALED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes a thread's buffer out (rayon may run another task on this thread
/// while the buffer is in use; that task then simply allocates its own).
fn take_buffer(slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u8>>>) -> Vec<u8> {
    slot.with(|b| std::mem::take(&mut *b.borrow_mut()))
}

fn put_buffer(slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u8>>>, buf: Vec<u8>) {
    slot.with(|b| *b.borrow_mut() = buf);
}

/// What to back up and how.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Paths to save.
    pub paths: Vec<PathBuf>,
    /// Glob patterns to leave out: without `/` they match a file name
    /// anywhere, with `/` the whole absolute path.
    pub excludes: Vec<String>,
    /// Tags for the snapshot.
    pub tags: Vec<String>,
    /// Host name to record (default: this machine's).
    pub host: Option<String>,
    /// Parent snapshot (default: the latest of this host with the same paths).
    pub parent: Option<String>,
    /// Read every file, ignoring the parent.
    pub force: bool,
    /// Compare only size and mtime with the parent (for file systems whose
    /// inode numbers or ctimes are not stable).
    pub ignore_inode: bool,
    /// Worker threads (0: the config's, else one per core).
    pub threads: usize,
}

/// Hooks a front end uses to show progress. All methods may be called from
/// several threads at once.
pub trait BackupProgress: Send + Sync {
    /// Bytes read from a file.
    fn bytes(&self, _n: u64) {}
    /// A file was read and saved.
    fn file(&self, _path: &Path, _size: u64) {}
    /// A file was unchanged since the parent and saved without reading it.
    fn reused(&self, _path: &Path, _size: u64) {}
    /// Something could not be saved; the backup goes on.
    fn warning(&self, _message: &str) {}
    /// A FIFO, socket or device was left out (backup saves none); the
    /// snapshot is still complete. The message names the path and what it is.
    fn skipped(&self, _message: &str) {}
}

/// A progress sink that shows nothing.
#[derive(Debug)]
pub struct NoProgress;
impl BackupProgress for NoProgress {}

/// What a backup did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackupReport {
    /// The new snapshot.
    pub snapshot: SnapshotId,
    /// Its parent.
    pub parent: Option<SnapshotId>,
    /// Counters.
    pub summary: Summary,
    /// What could not be saved. Non-empty means the snapshot is partial.
    pub warnings: Vec<String>,
    /// FIFOs, sockets and devices left out: backup saves none of them, and
    /// the snapshot is complete without them.
    pub skipped: Vec<SkippedPath>,
}

/// A path backup left out because of what it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SkippedPath {
    /// The path.
    pub path: String,
    /// `fifo`, `socket`, `block_device`, `char_device` or `other`.
    pub kind: &'static str,
}

/// What a special file is: its kind for [`SkippedPath`] and its name for people.
fn special_kind(ft: fs::FileType) -> (&'static str, &'static str) {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        ("fifo", "a named pipe (FIFO)")
    } else if ft.is_socket() {
        ("socket", "a socket")
    } else if ft.is_block_device() {
        ("block_device", "a block device")
    } else if ft.is_char_device() {
        ("char_device", "a character device")
    } else {
        ("other", "a special file")
    }
}

#[derive(Default)]
struct Counters {
    files_new: AtomicU64,
    files_changed: AtomicU64,
    files_unmodified: AtomicU64,
    dirs: AtomicU64,
    bytes_read: AtomicU64,
    bytes_added_raw: AtomicU64,
    bytes_added_packed: AtomicU64,
    blobs_added: AtomicU64,
}

struct Excludes {
    names: GlobSet,
    paths: GlobSet,
    /// pluto's own files: the home, and the catalog and pack store when
    /// they live elsewhere. Never saved.
    own: Vec<PathBuf>,
}

impl Excludes {
    fn new(patterns: &[String], own: Vec<PathBuf>) -> Result<Self, RepoError> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(p).literal_separator(true).build()?;
            if p.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        Ok(Self {
            names: names.build()?,
            paths: paths.build()?,
            own,
        })
    }

    fn excluded(&self, path: &Path, name: &[u8]) -> bool {
        self.own.iter().any(|o| o == path)
            || self.names.is_match(std::ffi::OsStr::from_bytes(name))
            || self.paths.is_match(path)
    }
}

/// pluto's own files for a repo: its home, and its catalog and pack store
/// paths when their URLs name local paths.
fn own_paths(repo: &Repo) -> Result<Vec<PathBuf>, RepoError> {
    let mut own = vec![clean_absolute(repo.home.root())?];
    for url in [&repo.config.catalog, &repo.config.packs] {
        let url = repo.home.resolve_url(url);
        for scheme in ["sqlite:", "fs:"] {
            if let Some(p) = url.strip_prefix(scheme) {
                let p = p.trim_start_matches("//");
                let p = p.split('?').next().unwrap_or(p);
                if p.starts_with('/') {
                    own.push(clean_absolute(Path::new(p))?);
                }
            }
        }
    }
    Ok(own)
}

/// The state that every worker shares during one backup.
struct Saver<'a> {
    repo: &'a Repo,
    index: &'a Index,
    /// Finished packs go to the catalog writer, off the workers' path.
    recorder: tokio::sync::mpsc::UnboundedSender<PackRecord>,
    new_blobs: Mutex<HashSet<(BlobKind, BlobId)>>,
    data_pack: Mutex<PackWriter>,
    meta_pack: Mutex<PackWriter>,
    /// The buffer of the last data pack written, for the next one.
    spare_pack: Mutex<Option<Vec<u8>>>,
    written: Mutex<Vec<PackRecord>>,
    excludes: Excludes,
    chunker: ChunkerConfig,
    opts: &'a BackupOptions,
    counters: Counters,
    warnings: Mutex<Vec<String>>,
    skipped: Mutex<Vec<SkippedPath>>,
    progress: &'a dyn BackupProgress,
}

fn time_ns(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
}

impl Stamp {
    fn of(m: &Metadata) -> Self {
        Self {
            size: m.size(),
            mtime_ns: time_ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: time_ns(m.ctime(), m.ctime_nsec()),
            inode: m.ino(),
        }
    }
}

fn node_for(name: Vec<u8>, m: &Metadata, content: NodeContent) -> Node {
    let size = match content {
        NodeContent::File { .. } => m.size(),
        _ => 0,
    };
    Node {
        name,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: time_ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: time_ns(m.ctime(), m.ctime_nsec()),
        inode: m.ino(),
        device: m.dev(),
        size,
        content,
    }
}

impl Saver<'_> {
    fn warn(&self, message: String) {
        self.progress.warning(&message);
        lock(&self.warnings).push(message);
    }

    /// True the first time a blob that the index lacks is seen.
    fn claim(&self, kind: BlobKind, id: &BlobId) -> bool {
        !self.index.contains(kind, id) && lock(&self.new_blobs).insert((kind, *id))
    }

    fn known(&self, kind: BlobKind, id: &BlobId) -> bool {
        self.index.contains(kind, id) || lock(&self.new_blobs).contains(&(kind, *id))
    }

    /// Seals a claimed blob and adds it to the right pack, writing the pack
    /// out when it is full.
    fn store(&self, kind: BlobKind, id: BlobId, raw: &[u8]) -> Result<(), RepoError> {
        let mut sealed = take_buffer(&SEALED);
        self.repo.seal_into(kind, &id, raw, &mut sealed);
        let c = &self.counters;
        c.blobs_added.fetch_add(1, Relaxed);
        c.bytes_added_raw.fetch_add(raw.len() as u64, Relaxed);
        c.bytes_added_packed.fetch_add(sealed.len() as u64, Relaxed);
        let slot = if kind == BlobKind::Data {
            &self.data_pack
        } else {
            &self.meta_pack
        };
        let target = self.repo.config.pack_size;
        let full = {
            let mut p = lock(slot);
            p.add(kind, id, &sealed, raw.len() as u32);
            if p.len() >= target {
                let next = match lock(&self.spare_pack).take() {
                    Some(buf) if kind == BlobKind::Data => PackWriter::from_buffer(buf),
                    _ => PackWriter::with_capacity(self.pack_capacity(kind)),
                };
                Some(std::mem::replace(&mut *p, next))
            } else {
                None
            }
        };
        put_buffer(&SEALED, sealed);
        match full {
            Some(p) => self.flush(p),
            None => Ok(()),
        }
    }

    /// Room for a full pack, so that filling it never reallocates (and
    /// never holds two copies of it): the target, one more blob, the header.
    fn pack_capacity(&self, kind: BlobKind) -> usize {
        match kind {
            BlobKind::Data => self.repo.config.pack_size + self.chunker.max as usize + (1 << 16),
            _ => 0,
        }
    }

    fn flush(&self, pack: PackWriter) -> Result<(), RepoError> {
        if pack.is_empty() {
            return Ok(());
        }
        let (record, buf) = self.repo.write_pack(pack)?;
        if buf.capacity() >= self.pack_capacity(BlobKind::Data) {
            *lock(&self.spare_pack) = Some(buf);
        }
        // If the catalog writer has stopped, its error is reported at the end.
        let _ = self.recorder.send(record.clone());
        lock(&self.written).push(record);
        Ok(())
    }

    fn store_if_new(&self, kind: BlobKind, raw: &[u8]) -> Result<BlobId, RepoError> {
        let id = self.repo.keys.blob_id(raw);
        if self.claim(kind, &id) {
            self.store(kind, id, raw)?;
        }
        Ok(id)
    }

    /// The parent snapshot's tree for a directory, when it had one there. An
    /// unreadable one is not fatal: everything below is read instead.
    fn parent_subtree(&self, path: &Path, parent: Option<&Node>) -> Option<Tree> {
        let NodeContent::Dir { tree } = &parent?.content else {
            return None;
        };
        self.repo
            .load_tree(self.index, tree)
            .map_err(|e| {
                tracing::warn!(
                    "parent tree of {} unreadable, reading all: {e}",
                    path.display()
                )
            })
            .ok()
    }

    /// Saves one directory entry. `None` when it is excluded or could not be
    /// read (a warning says which).
    fn save_entry(
        &self,
        path: &Path,
        name: Vec<u8>,
        meta: &Metadata,
        parent: Option<&Node>,
    ) -> Result<Option<Node>, RepoError> {
        let ft = meta.file_type();
        if ft.is_dir() {
            let parent_tree = self.parent_subtree(path, parent);
            let tree = self.save_dir(path, parent_tree.as_ref())?;
            let Some(tree) = tree else { return Ok(None) };
            let id = self.store_if_new(BlobKind::Tree, &tree.encode())?;
            self.counters.dirs.fetch_add(1, Relaxed);
            Ok(Some(node_for(name, meta, NodeContent::Dir { tree: id })))
        } else if ft.is_file() {
            self.save_file(path, name, meta, parent)
        } else if ft.is_symlink() {
            match fs::read_link(path) {
                Ok(t) => Ok(Some(node_for(
                    name,
                    meta,
                    NodeContent::Symlink {
                        target: t.as_os_str().as_bytes().to_vec(),
                    },
                ))),
                Err(e) => {
                    self.warn(format!("{}: cannot read link: {e}", path.display()));
                    Ok(None)
                }
            }
        } else {
            let (kind, what) = special_kind(ft);
            self.progress.skipped(&format!(
                "{}: skipped: {what} is not backed up",
                path.display()
            ));
            lock(&self.skipped).push(SkippedPath {
                path: path.display().to_string(),
                kind,
            });
            Ok(None)
        }
    }

    /// Saves a directory's entries; `None` when it cannot be listed.
    fn save_dir(&self, path: &Path, parent: Option<&Tree>) -> Result<Option<Tree>, RepoError> {
        let rd = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => {
                self.warn(format!("{}: cannot list directory: {e}", path.display()));
                return Ok(None);
            }
        };
        let mut entries = Vec::new();
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    self.warn(format!("{}: cannot list directory: {err}", path.display()));
                    return Ok(None);
                }
            };
            let name = e.file_name().as_bytes().to_vec();
            let child = e.path();
            if self.excludes.excluded(&child, &name) {
                continue;
            }
            match e.metadata() {
                Ok(m) => entries.push((name, child, m)),
                Err(err) => self.warn(format!("{}: {err}", child.display())),
            }
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let nodes: Vec<Option<Node>> = entries
            .into_par_iter()
            .map(|(name, child, m)| {
                let prev = parent.and_then(|t| t.get(&name));
                self.save_entry(&child, name, &m, prev)
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(Tree {
            nodes: nodes.into_iter().flatten().collect(),
        }))
    }

    fn save_file(
        &self,
        path: &Path,
        name: Vec<u8>,
        meta: &Metadata,
        parent: Option<&Node>,
    ) -> Result<Option<Node>, RepoError> {
        let stamp = Stamp::of(meta);
        if let Some(
            p @ Node {
                content: NodeContent::File { chunks },
                ..
            },
        ) = parent
        {
            let same = p.size == stamp.size
                && p.mtime_ns == stamp.mtime_ns
                && (self.opts.ignore_inode
                    || (p.inode == stamp.inode && p.ctime_ns == stamp.ctime_ns));
            if same && !self.opts.force && chunks.iter().all(|c| self.known(BlobKind::Data, c)) {
                self.counters.files_unmodified.fetch_add(1, Relaxed);
                self.progress.reused(path, stamp.size);
                return Ok(Some(node_for(
                    name,
                    meta,
                    NodeContent::File {
                        chunks: chunks.clone(),
                    },
                )));
            }
        }
        for _ in 0..READ_ATTEMPTS {
            match self.read_file(path) {
                Ok(Some((chunks, meta))) => {
                    let counter = if parent.is_some() {
                        &self.counters.files_changed
                    } else {
                        &self.counters.files_new
                    };
                    counter.fetch_add(1, Relaxed);
                    self.progress.file(path, meta.size());
                    return Ok(Some(node_for(name, &meta, NodeContent::File { chunks })));
                }
                Ok(None) => continue,
                Err(ReadError::Io(e)) => {
                    self.warn(format!("{}: cannot read: {e}", path.display()));
                    return Ok(None);
                }
                Err(ReadError::Repo(e)) => return Err(e),
            }
        }
        self.warn(format!(
            "{}: changed while being read {READ_ATTEMPTS} times; not saved",
            path.display()
        ));
        Ok(None)
    }

    /// Reads and stores a file's chunks. `Ok(None)` when the file changed
    /// while it was read (its stamp before and after differ).
    fn read_file(&self, path: &Path) -> Result<Option<(Vec<BlobId>, Metadata)>, ReadError> {
        // O_NOFOLLOW: a file swapped for a link since it was listed is not
        // followed out of the tree being saved.
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(ReadError::Io)?;
        let before = f.metadata().map_err(ReadError::Io)?;
        if !before.is_file() {
            return Err(ReadError::Io(std::io::Error::other(
                "no longer a regular file",
            )));
        }
        let mut buf = take_buffer(&READ_BUF);
        let result = self.chunk_file(path, &mut f, &mut buf);
        put_buffer(&READ_BUF, buf);
        let (chunks, read) = result?;
        self.counters.bytes_read.fetch_add(read, Relaxed);
        let after = f.metadata().map_err(ReadError::Io)?;
        if Stamp::of(&before) != Stamp::of(&after) || read != after.size() {
            return Ok(None);
        }
        Ok(Some((chunks, after)))
    }

    /// Reads a file through a window of at least twice the largest chunk,
    /// cuts it with FastCDC and stores every chunk; the chunks of one window
    /// are sealed in parallel. The last cut of a window that is not the end
    /// of the file is carried over, so the cuts are those of the whole file.
    fn chunk_file(
        &self,
        path: &Path,
        f: &mut File,
        buf: &mut Vec<u8>,
    ) -> Result<(Vec<BlobId>, u64), ReadError> {
        let c = self.chunker;
        let window = (2 * c.max as usize).max(MIN_WINDOW);
        if buf.len() < window {
            buf.resize(window, 0);
        }
        let mut chunks = Vec::new();
        let mut filled = 0;
        let mut read = 0u64;
        loop {
            let mut eof = false;
            while filled < window {
                match f.read(&mut buf[filled..window]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        filled += n;
                        read += n as u64;
                        self.progress.bytes(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ReadError::Io(e)),
                }
            }
            self.hook_after_read(path);
            let mut cuts: Vec<(usize, usize)> =
                fastcdc::v2020::FastCDC::new(&buf[..filled], c.min, c.avg, c.max)
                    .map(|ch| (ch.offset, ch.length))
                    .collect();
            let carry = if eof { None } else { cuts.pop() };
            let ids: Vec<BlobId> = if cuts.len() > 1 {
                cuts.par_iter()
                    .map(|&(o, l)| self.chunk(&buf[o..o + l]))
                    .collect::<Result<_, _>>()?
            } else {
                cuts.iter()
                    .map(|&(o, l)| self.chunk(&buf[o..o + l]))
                    .collect::<Result<_, _>>()?
            };
            chunks.extend(ids);
            match carry {
                Some((o, l)) => {
                    buf.copy_within(o..o + l, 0);
                    filled = l;
                }
                None => return Ok((chunks, read)),
            }
        }
    }

    fn chunk(&self, data: &[u8]) -> Result<BlobId, RepoError> {
        self.store_if_new(BlobKind::Data, data)
    }

    #[cfg(test)]
    fn hook_after_read(&self, path: &Path) {
        if let Some(f) = lock(&tests::AFTER_READ).as_mut() {
            f(path)
        }
    }

    #[cfg(not(test))]
    fn hook_after_read(&self, _path: &Path) {}

    /// Saves the virtual tree of the given paths: their ancestors are
    /// directories that hold only what leads to a saved path.
    fn save_virtual(
        &self,
        here: &Path,
        v: &VNode,
        parent: Option<&Tree>,
    ) -> Result<Tree, RepoError> {
        let VNode::Inner(children) = v else {
            // "/" itself was given.
            return Ok(self.save_dir(here, parent)?.unwrap_or_default());
        };
        let mut nodes = Vec::new();
        for (name, child) in children {
            let path = here.join(std::ffi::OsStr::from_bytes(name));
            // A given path is saved as what it is (a symlink stays a link);
            // an ancestor is recorded as the directory it leads to.
            let meta = match child {
                VNode::Target => fs::symlink_metadata(&path),
                VNode::Inner(_) => fs::metadata(&path),
            };
            let meta = match meta {
                Ok(m) => m,
                Err(e) => {
                    self.warn(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let prev = parent.and_then(|t| t.get(name));
            let node = match child {
                VNode::Target => self.save_entry(&path, name.clone(), &meta, prev)?,
                VNode::Inner(_) => {
                    let prev_tree = self.parent_subtree(&path, prev);
                    let sub = self.save_virtual(&path, child, prev_tree.as_ref())?;
                    let id = self.store_if_new(BlobKind::Tree, &sub.encode())?;
                    Some(node_for(name.clone(), &meta, NodeContent::Dir { tree: id }))
                }
            };
            nodes.extend(node);
        }
        Ok(Tree { nodes })
    }
}

enum ReadError {
    Io(std::io::Error),
    Repo(RepoError),
}

impl From<RepoError> for ReadError {
    fn from(e: RepoError) -> Self {
        Self::Repo(e)
    }
}

/// The shape of the paths to save, from the root down.
#[derive(Debug)]
enum VNode {
    Target,
    Inner(BTreeMap<Vec<u8>, VNode>),
}

fn virtual_root(paths: &[PathBuf]) -> VNode {
    let mut root = VNode::Inner(BTreeMap::new());
    for p in paths {
        let mut node = &mut root;
        for comp in p.components().skip(1) {
            let VNode::Inner(children) = node else { break };
            node = children
                .entry(comp.as_os_str().as_bytes().to_vec())
                .or_insert_with(|| VNode::Inner(BTreeMap::new()));
        }
        // A path inside one already given is covered by it; one that
        // contains others replaces them.
        if let VNode::Inner(_) = node {
            *node = VNode::Target;
        }
    }
    root
}

/// Worker threads: the option, else the config, else one per core.
pub fn worker_threads(option: usize, config: usize) -> usize {
    match (option, config) {
        (0, 0) => std::thread::available_parallelism().map_or(2, |n| n.get()),
        (0, c) => c,
        (o, _) => o,
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs a backup. Call from a blocking context (not on an async executor
/// thread); `rt` runs the catalog's async calls.
pub fn backup(
    repo: &Repo,
    rt: tokio::runtime::Handle,
    opts: &BackupOptions,
    progress: &dyn BackupProgress,
) -> Result<BackupReport, RepoError> {
    let started = Instant::now();
    if opts.paths.is_empty() {
        return Err(RepoError::NothingToBackUp);
    }
    let index = rt.block_on(repo.sync_catalog())?;
    let mut paths = Vec::new();
    for p in &opts.paths {
        let abs = clean_absolute(p)?;
        fs::symlink_metadata(&abs)
            .map_err(|e| RepoError::io(format!("cannot back up {}", abs.display()), e))?;
        paths.push(abs);
    }
    paths.sort();
    paths.dedup();
    let own = own_paths(repo)?;
    if let Some((p, o)) = paths
        .iter()
        .find_map(|p| own.iter().find(|o| p.starts_with(o)).map(|o| (p, o)))
    {
        return Err(RepoError::OwnFiles {
            path: p.clone(),
            own: o.clone(),
        });
    }
    let host = opts.host.clone().unwrap_or_else(hostname);
    let path_strings: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let parent = match &opts.parent {
        Some(spec) => Some(rt.block_on(repo.find_snapshot(spec))?),
        None => rt
            .block_on(repo.snapshots())?
            .into_iter()
            .rev()
            .find(|s| s.host == host && s.paths == path_strings),
    };
    let parent_tree = match &parent {
        Some(p) if !opts.force => match repo.load_tree(&index, &p.tree) {
            Ok(t) => Some(t),
            Err(e) => {
                // Not fatal, and the snapshot is complete: every file is
                // read instead of compared.
                tracing::warn!(
                    "parent snapshot {} unreadable, reading every file: {e}",
                    p.id.short()
                );
                None
            }
        },
        _ => None,
    };

    // Records packs in the catalog in batches while the workers go on. A
    // pack written but not recorded (the process is killed) is recorded by
    // the next backup's sync_catalog.
    let (recorder, mut recorded) = tokio::sync::mpsc::unbounded_channel::<PackRecord>();
    let catalog = repo.catalog.clone();
    let catalog_writer = rt.spawn(async move {
        let mut batch = Vec::new();
        while recorded.recv_many(&mut batch, 64).await > 0 {
            catalog.add_packs(&batch).await?;
            batch.clear();
        }
        Ok::<(), pluto_plugins_api::StoreError>(())
    });
    let saver = Saver {
        repo,
        index: &index,
        recorder,
        new_blobs: Mutex::new(HashSet::new()),
        data_pack: Mutex::new(PackWriter::with_capacity(
            repo.config.pack_size + repo.config.chunker.max as usize + (1 << 16),
        )),
        meta_pack: Mutex::new(PackWriter::default()),
        spare_pack: Mutex::new(None),
        written: Mutex::new(Vec::new()),
        excludes: Excludes::new(&opts.excludes, own)?,
        chunker: repo.config.chunker,
        opts,
        counters: Counters::default(),
        warnings: Mutex::new(Vec::new()),
        skipped: Mutex::new(Vec::new()),
        progress,
    };
    let threads = worker_threads(opts.threads, repo.config.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("pluto-backup-{i}"))
        .build()
        .map_err(|e| RepoError::io("starting workers", std::io::Error::other(e)))?;
    let root = virtual_root(&paths);
    let tree = pool.install(|| saver.save_virtual(Path::new("/"), &root, parent_tree.as_ref()))?;
    let root_id = saver.store_if_new(BlobKind::Tree, &tree.encode())?;

    // Data first, so nothing written later points at a pack that is not durable.
    let data = std::mem::take(&mut *lock(&saver.data_pack));
    saver.flush(data)?;

    let c = &saver.counters;
    let summary = Summary {
        files_new: c.files_new.load(Relaxed),
        files_changed: c.files_changed.load(Relaxed),
        files_unmodified: c.files_unmodified.load(Relaxed),
        dirs: c.dirs.load(Relaxed),
        bytes_read: c.bytes_read.load(Relaxed),
        bytes_added_raw: c.bytes_added_raw.load(Relaxed),
        bytes_added_packed: c.bytes_added_packed.load(Relaxed),
        blobs_added: c.blobs_added.load(Relaxed),
        duration_ns: started.elapsed().as_nanos() as u64,
    };
    let snapshot = Snapshot {
        time_ns: now_ns(),
        host,
        user: std::env::var("USER").unwrap_or_default(),
        paths: paths
            .iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect(),
        tags: opts.tags.clone(),
        parent: parent.as_ref().map(|p| p.id),
        tree: root_id,
        excludes: opts.excludes.clone(),
        summary: summary.clone(),
    };
    let written = std::mem::take(&mut *lock(&saver.written));
    if !written.is_empty() {
        saver.store_if_new(BlobKind::Index, &encode_segment(&written))?;
    }
    let snap_raw = snapshot.encode();
    let snap_id = saver.store_if_new(BlobKind::Snapshot, &snap_raw)?;
    let meta = std::mem::take(&mut *lock(&saver.meta_pack));
    saver.flush(meta)?;
    let Saver {
        recorder,
        warnings,
        skipped,
        ..
    } = saver;
    drop(recorder);
    rt.block_on(catalog_writer)
        .map_err(|e| RepoError::io("catalog writer", std::io::Error::other(e.to_string())))??;
    let snap_id = SnapshotId(snap_id.0);
    rt.block_on(
        repo.catalog
            .add_snapshot(&snapshot_record(snap_id, &snapshot)),
    )?;
    let warnings = warnings.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut skipped = skipped.into_inner().unwrap_or_else(|p| p.into_inner());
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(BackupReport {
        snapshot: snap_id,
        parent: parent.map(|p| p.id),
        summary,
        warnings,
        skipped,
    })
}

/// Runs [`backup`] on a blocking thread.
pub async fn backup_async(
    repo: Arc<Repo>,
    opts: BackupOptions,
    progress: Arc<dyn BackupProgress>,
) -> Result<BackupReport, RepoError> {
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || backup(&repo, rt, &opts, &*progress))
        .await
        .map_err(|e| RepoError::io("backup worker", std::io::Error::other(e.to_string())))?
}

#[cfg(test)]
pub(crate) mod tests {
    /// Runs after a file's bytes were read, before its stamp is checked.
    #[allow(clippy::type_complexity)]
    pub(crate) static AFTER_READ: std::sync::Mutex<
        Option<Box<dyn FnMut(&std::path::Path) + Send>>,
    > = std::sync::Mutex::new(None);

    use super::*;
    use crate::keys::MasterKey;
    use crate::{Home, LockMode};
    use pluto_store_fs as _;
    use pluto_store_sqlite as _;

    fn repo(dir: &Path, rt: &tokio::runtime::Runtime) -> Repo {
        let home = Home::new(dir.join("home"));
        Repo::init(&home, &MasterKey::generate(), &crate::Config::default()).unwrap();
        rt.block_on(Repo::open(home, LockMode::Exclusive)).unwrap()
    }

    /// Both cases share the global hook, so they run in one test.
    #[test]
    fn a_file_that_changes_while_read_is_read_again_or_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let repo = repo(dir.path(), &rt);
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        let file = src.join("growing.log");
        fs::write(&file, vec![b'a'; 100_000]).unwrap();
        let opts = BackupOptions {
            paths: vec![src.clone()],
            threads: 1,
            ..Default::default()
        };

        // Changes once, during the first read: the second read is stored.
        let target = file.clone();
        let mut done = false;
        *lock(&AFTER_READ) = Some(Box::new(move |p: &Path| {
            if p == target && !done {
                done = true;
                let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
                std::io::Write::write_all(&mut f, b"appended while reading").unwrap();
            }
        }));
        let r = backup(&repo, rt.handle().clone(), &opts, &NoProgress).unwrap();
        *lock(&AFTER_READ) = None;
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let index = rt.block_on(repo.load_index()).unwrap();
        let snap = rt.block_on(repo.find_snapshot("latest")).unwrap();
        let mut tree = repo.load_tree(&index, &snap.tree).unwrap();
        for name in src.components().skip(1) {
            let NodeContent::Dir { tree: id } =
                &tree.get(name.as_os_str().as_bytes()).unwrap().content
            else {
                panic!("not a dir")
            };
            tree = repo.load_tree(&index, id).unwrap();
        }
        let node = tree.get(b"growing.log").unwrap();
        assert_eq!(node.size, 100_000 + 22, "the whole new version, not a mix");
        let NodeContent::File { chunks } = &node.content else {
            panic!()
        };
        let content: Vec<u8> = chunks
            .iter()
            .flat_map(|c| repo.read_by_id(&index, BlobKind::Data, c).unwrap())
            .collect();
        assert_eq!(content, fs::read(&file).unwrap());

        // Changes on every read: left out, with a warning naming it.
        fs::write(&file, vec![b'b'; 50_000]).unwrap();
        let target = file.clone();
        *lock(&AFTER_READ) = Some(Box::new(move |p: &Path| {
            if p == target {
                let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
                std::io::Write::write_all(&mut f, b"x").unwrap();
            }
        }));
        let r = backup(&repo, rt.handle().clone(), &opts, &NoProgress).unwrap();
        *lock(&AFTER_READ) = None;
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("growing.log") && r.warnings[0].contains("changed"));
    }

    #[test]
    fn virtual_root_merges_paths() {
        let r = virtual_root(&[
            PathBuf::from("/a/b"),
            PathBuf::from("/a/b/c"),
            PathBuf::from("/a/d"),
        ]);
        let VNode::Inner(top) = r else { panic!() };
        let VNode::Inner(a) = &top[&b"a"[..]] else {
            panic!()
        };
        assert!(matches!(a[&b"b"[..]], VNode::Target));
        assert!(matches!(a[&b"d"[..]], VNode::Target));
        assert!(matches!(virtual_root(&[PathBuf::from("/")]), VNode::Target));
    }
}
