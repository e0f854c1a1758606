//! A [`BlobStore`] on a local filesystem: one file per pack under a
//! two-hex-digit fan-out (`ab/abcd…`), written atomically (temporary file,
//! fsync, rename, fsync of the directory).
//!
//! Registered as the `fs` plugin: `fs:/path/to/dir` opens (and creates) a store.
//!
//! ```no_run
//! use pluto_plugins_api::{BlobStore, PackId};
//! let store = pluto_store_fs::FsBlobStore::open("/tmp/packs").unwrap();
//! let id = PackId::of(b"bytes");
//! store.put(&id, b"bytes").unwrap();
//! assert_eq!(store.get(&id).unwrap(), b"bytes");
//! ```

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pluto_plugins_api::{BlobStore, BlobStoreDescriptor, PackId, StoreError, PLUGIN_ABI_VERSION};

/// Temporary files older than this are left-overs of a killed writer.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// What a stream is gathered into before each write.
const WRITE_BUFFER: usize = 256 << 10;
/// How many pack files are kept open for reading.
const OPEN_FILES: usize = 128;

/// Packs as files in a directory.
#[derive(Debug)]
pub struct FsBlobStore {
    root: PathBuf,
    open: Mutex<HashMap<PackId, Arc<File>>>,
}

impl FsBlobStore {
    /// Opens the store in `root`, creating it when needed, and removes stale
    /// temporary files that a killed writer left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp)
            .map_err(|e| StoreError::io(format!("creating {}", tmp.display()), e))?;
        if let Ok(entries) = fs::read_dir(&tmp) {
            let now = SystemTime::now();
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|m| now.duration_since(m).unwrap_or_default() > STALE_TMP)
                    .unwrap_or(false);
                if old {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Self {
            root,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, id: &PackId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    fn reader(&self, id: &PackId) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.lock().get(id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(|e| not_found_or(e, &path))?);
        let mut open = self.lock();
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        open.insert(*id, f.clone());
        Ok(f)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PackId, Arc<File>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn not_found_or(e: std::io::Error, path: &Path) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound(path.display().to_string())
    } else {
        StoreError::io(format!("opening {}", path.display()), e)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))
}

impl BlobStore for FsBlobStore {
    fn put(&self, id: &PackId, bytes: &[u8]) -> Result<(), StoreError> {
        self.put_stream(id, &mut &bytes[..])
    }

    fn put_stream(&self, id: &PackId, src: &mut dyn Read) -> Result<(), StoreError> {
        let dest = self.path(id);
        if dest.exists() {
            // Immutable objects: the one there is the one asked for. The
            // source is still read to its end, so a writer feeding it from
            // another thread is not left blocked.
            return std::io::copy(src, &mut std::io::sink())
                .map(drop)
                .map_err(|e| StoreError::io(format!("reading object {id}"), e));
        }
        let tmp = self.root.join("tmp").join(format!(
            "{}.{:016x}.tmp",
            id.short(),
            rand::random::<u64>()
        ));
        let mut write = || -> std::io::Result<()> {
            let f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            let mut w = std::io::BufWriter::with_capacity(WRITE_BUFFER, f);
            std::io::copy(src, &mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(format!("writing {}", tmp.display()), e));
        }
        let dir = dest.parent().unwrap_or(&self.root);
        if let Err(e) = fs::create_dir_all(dir).and_then(|_| fs::rename(&tmp, &dest)) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(
                format!("moving pack to {}", dest.display()),
                e,
            ));
        }
        sync_dir(dir)
    }

    fn get(&self, id: &PackId) -> Result<Vec<u8>, StoreError> {
        let path = self.path(id);
        fs::read(&path).map_err(|e| not_found_or(e, &path))
    }

    fn get_range(&self, id: &PackId, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let f = self.reader(id)?;
        let size = f
            .metadata()
            .map_err(|e| StoreError::io(format!("stat of pack {id}"), e))?
            .len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(StoreError::OutOfRange(format!(
                "{len} bytes at {offset} of pack {id} ({size} bytes)"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| StoreError::io(format!("reading pack {id}"), e))?;
        Ok(buf)
    }

    fn size(&self, id: &PackId) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.path(id)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("stat of pack {id}"), e)),
        }
    }

    fn list(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        let mut out = Vec::new();
        let top = fs::read_dir(&self.root)
            .map_err(|e| StoreError::io(format!("listing {}", self.root.display()), e))?;
        for sub in top {
            let sub = sub.map_err(|e| StoreError::io("listing packs", e))?;
            let name = sub.file_name();
            if name.len() != 2 || !sub.path().is_dir() {
                continue;
            }
            let entries = fs::read_dir(sub.path())
                .map_err(|e| StoreError::io(format!("listing {}", sub.path().display()), e))?;
            for e in entries {
                let e = e.map_err(|e| StoreError::io("listing packs", e))?;
                let Some(id) = e
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<PackId>().ok())
                else {
                    continue;
                };
                let len = e
                    .metadata()
                    .map_err(|err| StoreError::io(format!("stat of {}", e.path().display()), err))?
                    .len();
                out.push((id, len));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn rename(&self, from: &PackId, to: &PackId) -> Result<(), StoreError> {
        self.lock().remove(from);
        let (src, dest) = (self.path(from), self.path(to));
        if !src.exists() {
            return Err(StoreError::NotFound(src.display().to_string()));
        }
        if dest.exists() {
            return self.delete(from);
        }
        let dir = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir)
            .and_then(|_| fs::rename(&src, &dest))
            .map_err(|e| {
                StoreError::io(format!("moving {} to {}", src.display(), dest.display()), e)
            })?;
        sync_dir(dir)?;
        match src.parent() {
            Some(d) if d != dir => sync_dir(d),
            _ => Ok(()),
        }
    }

    fn delete(&self, id: &PackId) -> Result<(), StoreError> {
        self.lock().remove(id);
        match fs::remove_file(self.path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(format!("deleting pack {id}"), e)),
        }
    }
}

fn open_url(url: &str) -> Result<Box<dyn BlobStore>, StoreError> {
    let path = url.strip_prefix("fs:").unwrap_or(url);
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty() {
        return Err(StoreError::BadUrl(url.into(), "no directory given".into()));
    }
    Ok(Box::new(FsBlobStore::open(path)?))
}

pluto_plugins_api::inventory::submit! {
    BlobStoreDescriptor {
        name: "fs",
        schemes: &["fs"],
        abi_version: PLUGIN_ABI_VERSION,
        open: open_url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_range_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsBlobStore::open(dir.path()).unwrap();
        let id = PackId::of(b"0123456789");
        s.put(&id, b"0123456789").unwrap();
        s.put(&id, b"0123456789").unwrap();
        assert_eq!(s.get(&id).unwrap(), b"0123456789");
        assert_eq!(s.get_range(&id, 2, 3).unwrap(), b"234");
        assert!(matches!(
            s.get_range(&id, 8, 3),
            Err(StoreError::OutOfRange(_))
        ));
        assert!(matches!(
            s.get_range(&id, u64::MAX, 3),
            Err(StoreError::OutOfRange(_))
        ));
        assert_eq!(s.list().unwrap(), vec![(id, 10)]);
        assert_eq!(s.size(&id).unwrap(), Some(10));
        s.delete(&id).unwrap();
        s.delete(&id).unwrap();
        assert!(matches!(s.get(&id), Err(StoreError::NotFound(_))));
        assert_eq!(s.size(&id).unwrap(), None);
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsBlobStore::open(dir.path()).unwrap();
        pluto_plugins_api::testkit::blob_store_conformance(&s);
        let left: Vec<_> = fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "a failed stream leaves no temporary file");
    }

    #[test]
    fn opens_by_url() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("fs:{}", dir.path().display());
        let s = pluto_plugins_api::open_blob_store(&url).unwrap();
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(
            pluto_plugins_api::open_blob_store("nope:x"),
            Err(StoreError::UnknownScheme(..))
        ));
    }
}
