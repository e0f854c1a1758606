//! Restore: recreate a snapshot's files under a target directory.
//!
//! Every blob is authenticated and checked against its id before a byte of
//! it is written. Files are written to a temporary name in their directory
//! and renamed into place once complete, with their mode and mtime already
//! set, so a file under its real name is always whole. A file already there
//! with the snapshot's size and mtime is taken as restored, which is how a
//! second run completes an interrupted one.
//!
//! Nothing outside the target is touched: names in trees are single path
//! components (the decoder refuses anything else), an existing symlink or
//! file where the snapshot has a directory is replaced by a real directory,
//! and files are created with `O_EXCL`, which never follows a link.

use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use pluto_plugins_api::{BlobKind, SnapshotRecord};
use rayon::prelude::*;

use crate::index::Index;
use crate::repo::{clean_absolute, lock, Repo, RepoError};
use crate::tree::{Node, NodeContent};

/// What to restore and where.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Directory to restore into (created when missing).
    pub target: PathBuf,
    /// Only these snapshot paths (and what is below them); empty means all.
    /// A relative path is taken from the current directory, as backup takes
    /// its paths; one the snapshot does not hold is refused
    /// ([`RepoError::NotInSnapshot`]) before anything is written.
    pub include: Vec<PathBuf>,
    /// Worker threads (0: the config's, else one per core).
    pub threads: usize,
}

/// Progress hooks; may be called from several threads.
pub trait RestoreProgress: Send + Sync {
    /// How many bytes the restore will write at most (known once the trees
    /// are read).
    fn total(&self, _bytes: u64) {}
    /// Bytes written (or found already in place).
    fn bytes(&self, _n: u64) {}
    /// A file could not be restored; the restore goes on.
    fn error(&self, _message: &str) {}
}

/// Shows nothing.
#[derive(Debug)]
pub struct NoRestoreProgress;
impl RestoreProgress for NoRestoreProgress {}

/// What a restore did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    /// Files written.
    pub files_restored: u64,
    /// Files already in place from an earlier run.
    pub files_already_there: u64,
    /// Directories at or below what was restored (the includes, else the
    /// snapshot's paths), the same as the backup's `dirs` for a whole
    /// snapshot; the parents created to lead there are not counted.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Files that could not be restored, with why.
    pub errors: Vec<String>,
}

struct Job<'a> {
    rel: PathBuf,
    node: &'a Node,
}

fn to_time(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Whether `path` (components below the root) is wanted by the includes.
fn wanted(path: &Path, include: &[PathBuf]) -> bool {
    include.is_empty()
        || include
            .iter()
            .any(|i| i.starts_with(path) || path.starts_with(i))
}

/// Refuses a target that is, or lies below, something other than a
/// directory (a symlink to a directory is followed, as `mkdir -p` does).
fn check_target(target: &Path) -> Result<(), RepoError> {
    for p in target.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match fs::metadata(p) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(RepoError::TargetNotADirectory {
                    target: target.to_path_buf(),
                    blocker: p.to_path_buf(),
                })
            }
            // Missing, or below a file: the parents say which.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => {
                return Err(RepoError::io(
                    format!("cannot restore into {}", target.display()),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Chunks of one large file opened in parallel at once.
const CHUNK_BATCH: usize = 4;

/// What marks a file a restore is still writing.
const TMP_MARK: &[u8] = b".pluto-restore-";

/// The temporary name a file is written under before it is renamed.
fn tmp_name(name: &[u8]) -> Vec<u8> {
    let short = &name[..name.len().min(100)];
    let suffix = format!(
        "{:016x}",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    [b".", short, TMP_MARK, suffix.as_bytes()].concat()
}

/// True for a temporary file an interrupted restore left behind.
fn is_tmp_name(name: &[u8]) -> bool {
    name.len() > TMP_MARK.len() + 16
        && name.starts_with(b".")
        && name[name.len() - 16 - TMP_MARK.len()..name.len() - 16] == *TMP_MARK
        && name[name.len() - 16..].iter().all(u8::is_ascii_hexdigit)
}

/// Makes `path` a real directory: an existing symlink or file there is
/// removed first, so nothing below it can lead outside the target. In a
/// directory that already existed, temporary files of an interrupted
/// restore are removed.
fn ensure_dir(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            for e in fs::read_dir(path)?.flatten() {
                if is_tmp_name(e.file_name().as_bytes()) {
                    let _ = fs::remove_file(e.path());
                }
            }
            return Ok(());
        }
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::DirBuilder::new().create(path)
}

struct Restorer<'a> {
    repo: &'a Repo,
    index: &'a Index,
    target: PathBuf,
    written: AtomicU64,
    errors: Mutex<Vec<String>>,
    progress: &'a dyn RestoreProgress,
}

impl Restorer<'_> {
    fn fail(&self, rel: &Path, why: impl std::fmt::Display) {
        let msg = format!("/{}: {why}", rel.display());
        self.progress.error(&msg);
        lock(&self.errors).push(msg);
    }

    /// Returns whether the file was written (false: already there).
    fn file(
        &self,
        rel: &Path,
        node: &Node,
        chunks: &[pluto_plugins_api::BlobId],
    ) -> Result<bool, RepoError> {
        let dest = self.target.join(rel);
        if let Ok(m) = fs::symlink_metadata(&dest) {
            if m.is_file()
                && m.size() == node.size
                && m.mtime()
                    .saturating_mul(1_000_000_000)
                    .saturating_add(m.mtime_nsec())
                    == node.mtime_ns
                && self.holds(&dest, chunks)
            {
                self.progress.bytes(node.size);
                return Ok(false);
            }
        }
        let dir = dest.parent().unwrap_or(&self.target);
        let name = dest.file_name().map(|n| n.as_bytes()).unwrap_or(b"file");
        let tmp = dir.join(std::ffi::OsStr::from_bytes(&tmp_name(name)));
        let result = self.write_file(&tmp, node, chunks).and_then(|()| {
            fs::rename(&tmp, &dest)
                .map_err(|e| RepoError::io(format!("moving into {}", dest.display()), e))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| true)
    }

    /// True when the file at `path` holds exactly these chunks (checked by
    /// their keyed hashes), so an earlier run restored it completely.
    fn holds(&self, path: &Path, chunks: &[pluto_plugins_api::BlobId]) -> bool {
        let Ok(mut f) = File::open(path) else {
            return false;
        };
        let mut buf = Vec::new();
        for c in chunks {
            let Some(loc) = self.index.get(BlobKind::Data, c) else {
                return false;
            };
            buf.resize(loc.raw_length as usize, 0);
            if std::io::Read::read_exact(&mut f, &mut buf).is_err()
                || self.repo.keys.blob_id(&buf) != *c
            {
                return false;
            }
        }
        std::io::Read::read(&mut f, &mut [0u8; 1]).is_ok_and(|n| n == 0)
    }

    fn write_file(
        &self,
        tmp: &Path,
        node: &Node,
        chunks: &[pluto_plugins_api::BlobId],
    ) -> Result<(), RepoError> {
        let io =
            |what: &'static str| move |e| RepoError::io(format!("{what} {}", tmp.display()), e);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(io("creating"))?;
        let mut total = 0u64;
        // Chunks of a large file are opened in parallel, written in order.
        for batch in chunks.chunks(CHUNK_BATCH) {
            let opened: Vec<Vec<u8>> = if batch.len() > 1 {
                batch
                    .par_iter()
                    .map(|c| self.repo.read_by_id(self.index, BlobKind::Data, c))
                    .collect::<Result<_, _>>()?
            } else {
                vec![self
                    .repo
                    .read_by_id(self.index, BlobKind::Data, &batch[0])?]
            };
            for data in opened {
                f.write_all(&data).map_err(io("writing"))?;
                total += data.len() as u64;
                self.written.fetch_add(data.len() as u64, Relaxed);
                self.progress.bytes(data.len() as u64);
            }
        }
        if total != node.size {
            return Err(RepoError::io(
                "restoring",
                std::io::Error::other(format!(
                    "chunks hold {total} bytes, the tree says {}",
                    node.size
                )),
            ));
        }
        set_owner(&f, node);
        f.set_permissions(fs::Permissions::from_mode(node.mode))
            .map_err(io("setting mode of"))?;
        f.set_times(
            FileTimes::new()
                .set_modified(to_time(node.mtime_ns))
                .set_accessed(to_time(node.mtime_ns)),
        )
        .map_err(io("setting times of"))?;
        Ok(())
    }

    fn symlink(&self, rel: &Path, node: &Node, target: &[u8]) -> std::io::Result<()> {
        let dest = self.target.join(rel);
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => {
                return Err(std::io::Error::other("a directory is in the way"));
            }
            Ok(_) => fs::remove_file(&dest)?,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &dest)?;
        let _ = std::os::unix::fs::lchown(&dest, Some(node.uid), Some(node.gid));
        let t = filetime::FileTime::from_unix_time(
            node.mtime_ns.div_euclid(1_000_000_000),
            node.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        filetime::set_symlink_file_times(&dest, t, t)
    }
}

/// Owner and group, when the process may set them (as root); silently
/// skipped otherwise, like `cp -p`.
fn set_owner(f: &File, node: &Node) {
    let _ = std::os::unix::fs::fchown(f, Some(node.uid), Some(node.gid));
}

/// Restores a snapshot. Call from a blocking context.
pub fn restore(
    repo: &Repo,
    index: &Index,
    snap: &SnapshotRecord,
    opts: &RestoreOptions,
    progress: &dyn RestoreProgress,
) -> Result<RestoreReport, RepoError> {
    check_target(&opts.target)?;
    // Relative includes are taken from the current directory, as backup
    // takes its paths; stored relative to the snapshot's root.
    let include_abs = opts
        .include
        .iter()
        .map(|p| clean_absolute(p))
        .collect::<Result<Vec<_>, _>>()?;
    let below_root = |p: &Path| -> PathBuf {
        p.components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect()
    };
    let include: Vec<PathBuf> = include_abs.iter().map(|p| below_root(p)).collect();

    // Read every tree first: directories in pre-order, then files and links.
    let mut found = vec![false; include.len()];
    let mut trees = Vec::new();
    let mut stack = vec![(PathBuf::new(), snap.tree)];
    while let Some((rel, id)) = stack.pop() {
        let t = repo.load_tree(index, &id)?;
        for n in &t.nodes {
            let child = rel.join(std::ffi::OsStr::from_bytes(&n.name));
            for (f, i) in found.iter_mut().zip(&include) {
                *f |= *i == child;
            }
            if let NodeContent::Dir { tree } = n.content {
                if wanted(&child, &include) {
                    stack.push((child, tree));
                }
            }
        }
        trees.push((rel, t));
    }
    // An include that names nothing is a mistake (a typo, another
    // snapshot's path): said before anything is written.
    if let Some(missing) = include
        .iter()
        .zip(&found)
        .position(|(i, f)| !f && !i.as_os_str().is_empty())
    {
        return Err(RepoError::NotInSnapshot {
            path: include_abs[missing].clone(),
            snapshot: snap.id.short(),
        });
    }
    // The directories counted are those of what was chosen (the includes,
    // else the snapshot's paths), as backup counts those of its paths; the
    // parents leading to them are created but not counted.
    let chosen: Vec<PathBuf> = if include.is_empty() {
        snap.paths
            .iter()
            .map(|p| below_root(Path::new(p)))
            .collect()
    } else {
        include.clone()
    };
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut links = Vec::new();
    for (rel, t) in &trees {
        for n in &t.nodes {
            let child = rel.join(std::ffi::OsStr::from_bytes(&n.name));
            if !wanted(&child, &include) {
                continue;
            }
            let job = Job {
                rel: child,
                node: n,
            };
            match n.content {
                NodeContent::Dir { .. } => dirs.push(job),
                NodeContent::File { .. } => files.push(job),
                NodeContent::Symlink { .. } => links.push(job),
            }
        }
    }
    // Parents before children.
    dirs.sort_by(|a, b| a.rel.cmp(&b.rel));
    // Largest files first, so no large file is left to run alone at the end.
    files.sort_by_key(|j| std::cmp::Reverse(j.node.size));
    progress.total(files.iter().map(|j| j.node.size).sum());

    let r = Restorer {
        repo,
        index,
        target: opts.target.clone(),
        written: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
        progress,
    };
    let mut report = RestoreReport::default();
    fs::create_dir_all(&opts.target)
        .map_err(|e| RepoError::io(format!("creating {}", opts.target.display()), e))?;
    ensure_dir(&r.target)
        .map_err(|e| RepoError::io(format!("preparing {}", r.target.display()), e))?;
    let mut bad_dirs: Vec<&Path> = Vec::new();
    for d in &dirs {
        if bad_dirs.iter().any(|b| d.rel.starts_with(b)) {
            continue;
        }
        match ensure_dir(&r.target.join(&d.rel)) {
            Ok(()) => {
                if chosen.iter().any(|c| d.rel.starts_with(c)) {
                    report.dirs += 1;
                }
            }
            Err(e) => {
                r.fail(&d.rel, e);
                bad_dirs.push(&d.rel);
            }
        }
    }
    let under_bad = |p: &Path| bad_dirs.iter().any(|b| p.starts_with(b));

    let threads = crate::backup::worker_threads(opts.threads, repo.config.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| RepoError::io("starting workers", std::io::Error::other(e)))?;
    let (restored, already) = pool.install(|| {
        files
            .par_iter()
            .filter(|j| !under_bad(&j.rel))
            .map(|j| {
                let NodeContent::File { chunks } = &j.node.content else {
                    return (0, 0);
                };
                match r.file(&j.rel, j.node, chunks) {
                    Ok(true) => (1, 0),
                    Ok(false) => (0, 1),
                    Err(e) => {
                        r.fail(&j.rel, e);
                        (0, 0)
                    }
                }
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    report.files_restored = restored;
    report.files_already_there = already;
    for l in links.iter().filter(|j| !under_bad(&j.rel)) {
        if let NodeContent::Symlink { target } = &l.node.content {
            match r.symlink(&l.rel, l.node, target) {
                Ok(()) => report.symlinks += 1,
                Err(e) => r.fail(&l.rel, e),
            }
        }
    }
    // Directory metadata last, deepest first, so writing inside does not
    // change a restored mtime.
    for d in dirs.iter().rev().filter(|j| !under_bad(&j.rel)) {
        let path = r.target.join(&d.rel);
        let set = || -> std::io::Result<()> {
            let f = File::open(&path)?;
            let _ = std::os::unix::fs::fchown(&f, Some(d.node.uid), Some(d.node.gid));
            f.set_permissions(fs::Permissions::from_mode(d.node.mode))?;
            f.set_times(FileTimes::new().set_modified(to_time(d.node.mtime_ns)))
        };
        if let Err(e) = set() {
            r.fail(&d.rel, format!("setting metadata: {e}"));
        }
    }
    report.bytes_written = r.written.load(Relaxed);
    report.errors = r.errors.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised() {
        assert!(is_tmp_name(&tmp_name(b"file.txt")));
        assert!(!is_tmp_name(b".file.pluto-restore-xyz"));
        assert!(!is_tmp_name(b"file.txt"));
        assert!(!is_tmp_name(b".pluto-restore-0123456789abcdef"));
    }
}
