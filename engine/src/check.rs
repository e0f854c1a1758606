//! Check: is everything that every snapshot needs there and intact?
//!
//! Without `read_data`: every pack the catalog lists exists with its size,
//! its header authenticates and lists the blobs the catalog says, every
//! snapshot decodes, and every tree and chunk it refers to is indexed.
//! With `read_data`: every pack's bytes hash to its id and every blob
//! decrypts, authenticates and hashes to its id; damaged blobs are traced to
//! the files (and snapshots) that need them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Mutex;

use pluto_plugins_api::{BlobId, BlobKind, BlobLocation, PackId, PackRecord, SnapshotId};
use rayon::prelude::*;

use crate::index::{decode_segment, Index};
use crate::repo::{lock, Repo, RepoError};
use crate::snapshot::Snapshot;
use crate::tree::NodeContent;

/// What to check.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckOptions {
    /// Read and verify every blob.
    pub read_data: bool,
}

/// Progress hooks.
pub trait CheckProgress: Send + Sync {
    /// A pack was checked.
    fn pack(&self, _bytes: u64) {}
}

/// Shows nothing.
#[derive(Debug)]
pub struct NoCheckProgress;
impl CheckProgress for NoCheckProgress {}

/// A file some snapshot cannot restore intact.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct DamagedFile {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// The file's path in it.
    pub path: String,
}

/// What check found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Packs checked.
    pub packs: usize,
    /// Bytes of packs read in full (with `read_data`).
    pub bytes_read: u64,
    /// Blobs indexed.
    pub blobs: usize,
    /// Snapshots checked.
    pub snapshots: usize,
    /// Trees walked.
    pub trees: usize,
    /// Problems found; empty means all is well.
    pub errors: Vec<String>,
    /// Notes that are not errors (e.g. packs no snapshot needs).
    pub notes: Vec<String>,
    /// Files that cannot be restored intact.
    pub damaged_files: Vec<DamagedFile>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.damaged_files.is_empty()
    }
}

/// Runs a check. Call from a blocking context; `rt` runs catalog calls.
pub fn check(
    repo: &Repo,
    rt: &tokio::runtime::Handle,
    opts: CheckOptions,
    progress: &dyn CheckProgress,
) -> Result<CheckReport, RepoError> {
    let mut report = CheckReport::default();
    let catalog_packs: HashMap<PackId, u64> =
        rt.block_on(repo.catalog.packs())?.into_iter().collect();
    let all_blobs = rt.block_on(repo.catalog.blobs())?;
    let mut by_pack: HashMap<PackId, Vec<BlobLocation>> = HashMap::new();
    for b in &all_blobs {
        by_pack.entry(b.pack).or_default().push(*b);
    }
    let index = Index::from_locations(all_blobs);
    report.blobs = index.len();
    let stored: HashMap<PackId, u64> = repo.packs.list()?.into_iter().collect();

    let errors = Mutex::new(Vec::new());
    let err = |m: String| lock(&errors).push(m);
    let bad_blobs: Mutex<HashSet<(BlobKind, BlobId)>> = Mutex::new(HashSet::new());
    let mark_pack_bad = |id: &PackId| {
        let mut b = lock(&bad_blobs);
        for l in by_pack.get(id).into_iter().flatten() {
            b.insert((l.kind, l.id));
        }
    };

    for id in stored.keys().filter(|id| !catalog_packs.contains_key(id)) {
        report
            .notes
            .push(format!("pack {id} is in the store but not in the catalog (a backup was interrupted; the next one records it)"));
    }
    let mut packs: Vec<(PackId, u64)> = catalog_packs.iter().map(|(k, v)| (*k, *v)).collect();
    packs.sort_unstable();
    report.packs = packs.len();
    let bytes_read = std::sync::atomic::AtomicU64::new(0);
    packs.par_iter().for_each(|(id, size)| {
        let expect = |rec: &PackRecord| {
            let mut want: Vec<BlobLocation> = by_pack.get(id).cloned().unwrap_or_default();
            let mut got = rec.blobs.clone();
            let key = |l: &BlobLocation| (l.offset, l.kind, l.id);
            want.sort_by_key(key);
            got.sort_by_key(key);
            if want != got {
                err(format!("pack {id}: its header and the catalog disagree about its blobs (run `pluto rebuild-catalog`)"));
            }
        };
        match stored.get(id) {
            None => {
                err(format!("pack {id} is missing"));
                mark_pack_bad(id);
                return;
            }
            Some(s) if s != size => {
                err(format!("pack {id} has {s} bytes, the catalog says {size}"));
                mark_pack_bad(id);
                return;
            }
            _ => {}
        }
        if !opts.read_data {
            match repo.read_pack_header(id, *size) {
                Ok(rec) => expect(&rec),
                Err(e) => {
                    err(e.to_string());
                    mark_pack_bad(id);
                }
            }
            progress.pack(0);
            return;
        }
        let bytes = match repo.packs.get(id) {
            Ok(b) => b,
            Err(e) => {
                err(format!("pack {id}: {e}"));
                mark_pack_bad(id);
                return;
            }
        };
        bytes_read.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        progress.pack(bytes.len() as u64);
        if PackId::of(&bytes) != *id {
            err(format!("pack {id}: contents do not match its id (damaged on disk)"));
        }
        // Whatever the header says, try every blob the catalog places here.
        if let Ok(rec) = repo.parse_pack(id, &bytes) {
            expect(&rec);
        } else {
            err(format!("pack {id}: header unreadable"));
        }
        for loc in by_pack.get(id).into_iter().flatten() {
            let start = loc.offset as usize;
            let end = start + loc.length as usize;
            let opened = bytes
                .get(start..end)
                .ok_or_else(|| format!("{} blob {} lies past the end of pack {id}", loc.kind.name(), loc.id))
                .and_then(|s| repo.open_sealed(loc, s).map_err(|e| e.to_string()));
            match opened {
                Ok(raw) if loc.kind == BlobKind::Index => {
                    if let Err(e) = decode_segment(&raw) {
                        err(format!("index blob {}: {e}", loc.id));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    err(e);
                    lock(&bad_blobs).insert((loc.kind, loc.id));
                }
            }
        }
    });
    report.bytes_read = bytes_read.into_inner();
    let bad = bad_blobs.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());

    // Walk every snapshot; trees shared between snapshots are read once,
    // but damage is reported for each snapshot that needs it.
    let snapshots = rt.block_on(repo.snapshots())?;
    report.snapshots = snapshots.len();
    let mut tree_cache: HashMap<BlobId, Result<crate::tree::Tree, String>> = HashMap::new();
    let mut damaged = BTreeSet::new();
    for s in &snapshots {
        let snap: Result<Snapshot, _> = repo.load_snapshot(&index, &s.id);
        if let Err(e) = &snap {
            errors.push(format!("snapshot {}: {e}", s.id.short()));
            continue;
        }
        let mut stack = vec![(PathBuf::from("/"), s.tree)];
        while let Some((path, tree_id)) = stack.pop() {
            let t = tree_cache.entry(tree_id).or_insert_with(|| {
                if bad.contains(&(BlobKind::Tree, tree_id)) {
                    return Err("damaged".into());
                }
                repo.load_tree(&index, &tree_id).map_err(|e| e.to_string())
            });
            let t = match t {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!(
                        "snapshot {}: directory {} unreadable: {e}",
                        s.id.short(),
                        path.display()
                    ));
                    damaged.insert(DamagedFile {
                        snapshot: s.id,
                        path: format!("{}/ (whole directory)", path.display()),
                    });
                    continue;
                }
            };
            report.trees += 1;
            for n in &t.nodes {
                let child = path.join(std::ffi::OsStr::from_bytes(&n.name));
                match &n.content {
                    NodeContent::Dir { tree } => stack.push((child, *tree)),
                    NodeContent::File { chunks } => {
                        let broken = chunks.iter().any(|c| {
                            !index.contains(BlobKind::Data, c)
                                || bad.contains(&(BlobKind::Data, *c))
                        });
                        if broken {
                            damaged.insert(DamagedFile {
                                snapshot: s.id,
                                path: child.display().to_string(),
                            });
                        }
                    }
                    NodeContent::Symlink { .. } => {}
                }
            }
        }
    }
    report.damaged_files = damaged.into_iter().collect();
    errors.sort();
    report.errors = errors;
    Ok(report)
}
