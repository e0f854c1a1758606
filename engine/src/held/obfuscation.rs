//! Held replicas are kept obfuscated: XORed with a ChaCha20 stream under a
//! key of this node and the replica's root, so the bytes on the storer's
//! disk are not the bytes the owner sent, and nobody can plant a file of
//! their choosing there. Obfuscation sits on the byte streams, as
//! decorators: [`Obfuscating`] wraps what is written, [`Replica`] reads
//! back through it. (Not a [`BlobStore`] wrapper keyed by object name: a
//! replica is written under a temporary name and renamed, and its
//! outboard is not obfuscated, so the name does not give the key.)

use std::io::Read;
use std::sync::Arc;

use pluto_plugins_api::{BlobStore, PackId, StoreError};

use super::HEADER_LEN;
use crate::keystream::StreamKey;

/// The key of the replica with BLAKE3 root `root`.
pub fn key(secret: &[u8; 32], root: &[u8; 32]) -> StreamKey {
    StreamKey::obfuscation(secret, root)
}

/// What a held object is made of, as [`BlobStore::put_stream`] reads it:
/// the header as it is, then the replica's bytes from `inner`, obfuscated.
pub struct Obfuscating<R> {
    header: Vec<u8>,
    pos: usize,
    /// The plain replica bytes.
    pub inner: R,
    key: StreamKey,
    at: u64,
}

impl<R: Read> Obfuscating<R> {
    /// `header`, then `inner` under `key`.
    pub fn new(header: Vec<u8>, inner: R, key: StreamKey) -> Self {
        Self {
            header,
            pos: 0,
            inner,
            key,
            at: 0,
        }
    }
}

impl<R: Read> Read for Obfuscating<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos < self.header.len() {
            let n = buf.len().min(self.header.len() - self.pos);
            buf[..n].copy_from_slice(&self.header[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        let n = self.inner.read(buf)?;
        self.key.apply(self.at, &mut buf[..n]);
        self.at += n as u64;
        Ok(n)
    }
}

/// A replica's plain bytes in the held store, read through the
/// obfuscation; offsets are offsets in the replica.
pub struct Replica {
    /// The held store.
    pub store: Arc<dyn BlobStore>,
    /// The object the replica is in.
    pub object: PackId,
    /// Its key.
    pub key: StreamKey,
}

impl Replica {
    /// `len` plain bytes at `offset`.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let mut buf = self
            .store
            .get_range(&self.object, HEADER_LEN as u64 + offset, len)?;
        self.key.apply(offset, &mut buf);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_obfuscated_reads_back_plain_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> =
            Arc::new(pluto_store_fs::FsBlobStore::open(dir.path()).unwrap());
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let root = *blake3::hash(&plain).as_bytes();
        let k = key(&[4; 32], &root);
        let header = vec![0xAB; HEADER_LEN];
        let mut src = Obfuscating::new(header.clone(), &plain[..], k.clone());
        store.put_stream(&PackId(root), &mut src).unwrap();
        let raw = store.get(&PackId(root)).unwrap();
        assert_eq!(&raw[..HEADER_LEN], &header[..]);
        assert_ne!(&raw[HEADER_LEN..], &plain[..], "the disk holds other bytes");
        let r = Replica {
            store,
            object: PackId(root),
            key: k,
        };
        assert_eq!(r.read(0, 100_000).unwrap(), plain);
        assert_eq!(r.read(65_537, 1_000).unwrap(), &plain[65_537..66_537]);
    }
}
