//! The tests every [`BlobStore`] must pass: a store plugin calls
//! [`blob_store_conformance`] with a fresh, empty store of its kind.
//!
//! ```ignore
//! #[test]
//! fn conformance() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = my_plugin::Store::open(dir.path()).unwrap();
//!     pluto_plugins_api::testkit::blob_store_conformance(&store);
//! }
//! ```

use std::io::Read;

use crate::{BlobStore, PackId, StoreError};

/// Runs every check against `store`, which must be empty; panics with a
/// message naming what broke. The store is left empty again.
pub fn blob_store_conformance(store: &dyn BlobStore) {
    assert!(
        store.list().unwrap().is_empty(),
        "the store must start empty"
    );
    objects_round_trip(store);
    ranges_are_checked(store);
    a_stream_is_stored_whole(store);
    a_failed_stream_leaves_nothing(store);
    objects_are_renamed(store);
    assert!(store.list().unwrap().is_empty(), "the store ends empty");
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn objects_round_trip(s: &dyn BlobStore) {
    let a = bytes(10_000, 1);
    let id = PackId::of(&a);
    s.put(&id, &a).unwrap();
    s.put(&id, &a).expect("storing an object again succeeds");
    assert_eq!(s.get(&id).unwrap(), a);
    assert_eq!(s.size(&id).unwrap(), Some(a.len() as u64));
    assert_eq!(s.list().unwrap(), vec![(id, a.len() as u64)]);
    let empty = PackId::of(b"");
    s.put(&empty, b"").unwrap();
    assert_eq!(s.get(&empty).unwrap(), b"");
    assert_eq!(s.size(&empty).unwrap(), Some(0));
    s.delete(&id).unwrap();
    s.delete(&id).expect("deleting an absent object succeeds");
    s.delete(&empty).unwrap();
    assert!(matches!(s.get(&id), Err(StoreError::NotFound(_))));
    assert_eq!(s.size(&id).unwrap(), None);
}

fn ranges_are_checked(s: &dyn BlobStore) {
    let a = bytes(4096, 2);
    let id = PackId::of(&a);
    s.put(&id, &a).unwrap();
    assert_eq!(s.get_range(&id, 100, 50).unwrap(), &a[100..150]);
    assert_eq!(s.get_range(&id, 4096, 0).unwrap(), b"");
    assert_eq!(s.get_range(&id, 4000, 96).unwrap(), &a[4000..]);
    for (offset, len) in [(4000, 97), (4097, 0), (u64::MAX, 2), (1, u64::MAX)] {
        assert!(
            matches!(
                s.get_range(&id, offset, len),
                Err(StoreError::OutOfRange(_))
            ),
            "{len} bytes at {offset} of 4096 must be out of range"
        );
    }
    let absent = PackId::of(b"absent");
    assert!(matches!(
        s.get_range(&absent, 0, 1),
        Err(StoreError::NotFound(_))
    ));
    s.delete(&id).unwrap();
}

/// Yields `data` in small reads, then fails when `fail` is set.
struct Source {
    data: Vec<u8>,
    at: usize,
    fail: bool,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.data.len() {
            if self.fail {
                return Err(std::io::Error::other("the sender went away"));
            }
            return Ok(0);
        }
        let n = buf.len().min(7_777).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn a_stream_is_stored_whole(s: &dyn BlobStore) {
    let a = bytes(3 << 20, 3);
    let id = PackId::of(&a);
    let mut src = Source {
        data: a.clone(),
        at: 0,
        fail: false,
    };
    s.put_stream(&id, &mut src).unwrap();
    assert_eq!(s.size(&id).unwrap(), Some(a.len() as u64));
    assert!(
        s.get(&id).unwrap() == a,
        "a streamed object reads back whole"
    );
    s.delete(&id).unwrap();
}

fn a_failed_stream_leaves_nothing(s: &dyn BlobStore) {
    let a = bytes(1 << 20, 4);
    let id = PackId::of(&a);
    let mut src = Source {
        data: a,
        at: 0,
        fail: true,
    };
    assert!(
        s.put_stream(&id, &mut src).is_err(),
        "a failing source fails the store"
    );
    assert_eq!(
        s.size(&id).unwrap(),
        None,
        "nothing half-written is visible"
    );
    assert!(
        s.list().unwrap().is_empty(),
        "nothing half-written is listed"
    );
}

fn objects_are_renamed(s: &dyn BlobStore) {
    let a = bytes((2 << 20) + 17, 5);
    let (from, to) = (PackId::of(b"from"), PackId::of(&a));
    s.put(&from, &a).unwrap();
    s.rename(&from, &to).unwrap();
    assert_eq!(s.size(&from).unwrap(), None, "the old name is gone");
    assert!(
        s.get(&to).unwrap() == a,
        "a renamed object reads back whole"
    );
    // A name taken already keeps its object; the source goes.
    s.put(&from, b"other").unwrap();
    s.rename(&from, &to).unwrap();
    assert_eq!(s.size(&from).unwrap(), None);
    assert_eq!(s.size(&to).unwrap(), Some(a.len() as u64));
    assert!(
        matches!(s.rename(&from, &to), Err(StoreError::NotFound(_))),
        "renaming an absent object is NotFound"
    );
    s.delete(&to).unwrap();
}

/// A store that counts the bytes read from the store it wraps (what an
/// audit or a restore costs in reads).
#[derive(Debug)]
pub struct CountingStore<S> {
    inner: S,
    read: std::sync::atomic::AtomicU64,
}

impl<S: BlobStore> CountingStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0.into(),
        }
    }

    /// Bytes read since the last call.
    pub fn take(&self) -> u64 {
        self.read.swap(0, std::sync::atomic::Ordering::SeqCst)
    }

    fn count(&self, n: usize) {
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<S: BlobStore> BlobStore for CountingStore<S> {
    fn put(&self, id: &PackId, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.put(id, bytes)
    }
    fn put_stream(&self, id: &PackId, src: &mut dyn Read) -> Result<(), StoreError> {
        self.inner.put_stream(id, src)
    }
    fn get(&self, id: &PackId) -> Result<Vec<u8>, StoreError> {
        let b = self.inner.get(id)?;
        self.count(b.len());
        Ok(b)
    }
    fn get_range(&self, id: &PackId, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let b = self.inner.get_range(id, offset, len)?;
        self.count(b.len());
        Ok(b)
    }
    fn size(&self, id: &PackId) -> Result<Option<u64>, StoreError> {
        self.inner.size(id)
    }
    fn list(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        self.inner.list()
    }
    fn delete(&self, id: &PackId) -> Result<(), StoreError> {
        self.inner.delete(id)
    }
    fn rename(&self, from: &PackId, to: &PackId) -> Result<(), StoreError> {
        self.inner.rename(from, to)
    }
}
