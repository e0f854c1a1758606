//! Seekable keystreams (ChaCha20) for the two layers that only need bytes
//! to differ, not to be authenticated (the pack inside is AES-GCM sealed
//! already, and its id is its BLAKE3 hash):
//!
//! - a *replica key* per (pack, storer), from the owner's replica-keys key:
//!   two storers of one pack hold different bytes, so they cannot share one
//!   copy and pretend to hold two;
//! - an *obfuscation key* per stored replica, from the storer's own key: the
//!   files on a storer's disk are not the bytes that went over the wire.
//!
//! ChaCha20 seeks to any byte, so a range of a replica can be read back and
//! turned into plaintext without touching the rest. Each key is used with a
//! single (zero) nonce because each key is derived for one byte string only.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use pluto_plugins_api::{NodeId, PackId};

/// A keystream key for one byte string.
#[derive(Clone)]
pub struct StreamKey([u8; 32]);

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey(<secret>)")
    }
}

impl StreamKey {
    /// The key of the replica of `pack` that `storer` holds.
    pub fn replica(replica_keys: &[u8; 32], pack: &PackId, storer: &NodeId) -> Self {
        let mut h = blake3::Hasher::new_keyed(replica_keys);
        h.update(b"pluto v1 replica\0");
        h.update(&pack.0);
        h.update(&storer.0);
        Self(*h.finalize().as_bytes())
    }

    /// The key a storer obfuscates the replica with BLAKE3 root `root` under.
    pub fn obfuscation(obfuscation_key: &[u8; 32], root: &[u8; 32]) -> Self {
        let mut h = blake3::Hasher::new_keyed(obfuscation_key);
        h.update(b"pluto v1 held\0");
        h.update(root);
        Self(*h.finalize().as_bytes())
    }

    /// XORs `buf`, which sits at byte `offset` of the string, with the
    /// keystream (applying it twice gives the input back).
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
        let mut c = ChaCha20::new((&self.0).into(), (&[0u8; 12]).into());
        c.seek(offset);
        c.apply_keystream(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_the_whole() {
        let k = StreamKey::replica(&[1; 32], &PackId([2; 32]), &NodeId([3; 32]));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = data.clone();
        k.apply(0, &mut whole);
        assert_ne!(whole, data);
        for (at, len) in [
            (0usize, 10usize),
            (63, 2),
            (64, 64),
            (1000, 3333),
            (9999, 1),
        ] {
            let mut part = whole[at..at + len].to_vec();
            k.apply(at as u64, &mut part);
            assert_eq!(part, data[at..at + len]);
        }
    }

    #[test]
    fn each_storer_gets_other_bytes() {
        let a = StreamKey::replica(&[1; 32], &PackId([2; 32]), &NodeId([3; 32]));
        let b = StreamKey::replica(&[1; 32], &PackId([2; 32]), &NodeId([4; 32]));
        let (mut x, mut y) = (vec![0u8; 64], vec![0u8; 64]);
        a.apply(0, &mut x);
        b.apply(0, &mut y);
        assert_ne!(x, y);
    }
}
