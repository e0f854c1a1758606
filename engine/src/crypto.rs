//! Sealing blobs: optional zstd, then AES-256-GCM.
//!
//! A sealed blob is `nonce (12) || ciphertext || tag (16)`. The plaintext is
//! one codec byte (`0` raw, `1` zstd) followed by the body. The associated
//! data binds the blob's kind and id:
//!
//! ```text
//! aad = "pluto blob v1" || kind (1 byte) || id (32 bytes)
//! ```
//!
//! so a blob cannot be moved under another id or passed off as another kind.
//! Nonces are 96 random bits from the operating system for every seal: a
//! node recovered from its words on a new machine never repeats a key+nonce
//! pair that the old machine used.

use std::cell::RefCell;

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use pluto_plugins_api::{BlobId, BlobKind};
use rand_core::{OsRng, RngCore};

/// Bytes a seal adds: nonce and tag.
pub const SEAL_OVERHEAD: usize = 12 + 16;
/// Associated-data prefix of blobs.
const BLOB_AAD: &[u8] = b"pluto blob v1";
/// Associated data of pack headers.
pub const PACK_HEADER_AAD: &[u8] = b"pluto pack header v1";

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// Why a blob could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Authentication failed: wrong key, wrong id or kind, or damaged bytes.
    #[error("authentication failed (damaged or forged)")]
    Auth,
    /// Authenticated, but the body does not decode.
    #[error("undecodable body: {0}")]
    Body(String),
    /// The plaintext does not hash to the id it was stored under.
    #[error("content does not match its id")]
    IdMismatch,
}

/// An AES-256-GCM key.
#[derive(Clone)]
pub struct SealKey(Aes256Gcm);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// From 32 key bytes.
    pub fn new(key: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(key.into()))
    }

    /// Encrypts `plaintext` with a fresh random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        buf.extend_from_slice(&[0u8; 12]);
        buf.extend_from_slice(plaintext);
        self.seal_in_place(aad, &mut buf);
        buf
    }

    /// Encrypts `buf[12..]` in place: the first 12 bytes are overwritten
    /// with a fresh random nonce and the tag is appended.
    fn seal_in_place(&self, aad: &[u8], buf: &mut Vec<u8>) {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        buf[..12].copy_from_slice(&nonce);
        // Encryption with a valid key only fails for inputs over 64 GiB,
        // which no blob or header reaches.
        let tag = self
            .0
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf[12..])
            .unwrap_or_default();
        buf.extend_from_slice(&tag);
    }

    /// Decrypts and authenticates.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError::Auth);
        }
        let (nonce, ct) = sealed.split_at(12);
        self.0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| OpenError::Auth)
    }
}

fn blob_aad(kind: BlobKind, id: &BlobId) -> [u8; 46] {
    let mut aad = [0u8; 46];
    aad[..13].copy_from_slice(BLOB_AAD);
    aad[13] = kind as u8;
    aad[14..].copy_from_slice(&id.0);
    aad
}

thread_local! {
    /// A zstd context and its output buffer, reused for every blob a
    /// thread seals (no allocation per blob).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compresses with a per-thread zstd context and hands the result to
/// `emit`; returns false (emitting nothing) when zstd does not make the body
/// smaller by at least 1/64.
fn compress(level: i32, raw: &[u8], emit: impl FnOnce(&[u8])) -> bool {
    if level == 0 || raw.len() < 64 {
        return false;
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _, _)| *l != level) {
            let Ok(comp) = zstd::bulk::Compressor::new(level) else {
                return false;
            };
            *c = Some((level, comp, Vec::new()));
        }
        let Some((_, comp, out)) = c.as_mut() else {
            return false;
        };
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        if comp.compress_to_buffer(raw, out).is_err() || out.len() >= raw.len() - raw.len() / 64 {
            return false;
        }
        emit(out);
        true
    })
}

fn decompress(body: &[u8], raw_len: usize) -> Result<Vec<u8>, OpenError> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| OpenError::Body(e.to_string()))?);
        }
        let dec = d
            .as_mut()
            .ok_or_else(|| OpenError::Body("no zstd context".into()))?;
        let out = dec
            .decompress(body, raw_len)
            .map_err(|e| OpenError::Body(format!("zstd: {e}")))?;
        if out.len() != raw_len {
            return Err(OpenError::Body(format!(
                "decompressed to {} bytes, expected {raw_len}",
                out.len()
            )));
        }
        Ok(out)
    })
}

/// Seals one blob: compresses when that helps, encrypts, binds kind and id.
pub fn seal_blob(key: &SealKey, level: i32, kind: BlobKind, id: &BlobId, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    seal_blob_into(key, level, kind, id, raw, &mut out);
    out
}

/// [`seal_blob`] into a buffer the caller reuses.
pub fn seal_blob_into(
    key: &SealKey,
    level: i32,
    kind: BlobKind,
    id: &BlobId,
    raw: &[u8],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&[0u8; 12]);
    let compressed = compress(level, raw, |z| {
        out.reserve(z.len() + 1 + 16);
        out.push(CODEC_ZSTD);
        out.extend_from_slice(z);
    });
    if !compressed {
        out.reserve(raw.len() + 1 + 16);
        out.push(CODEC_RAW);
        out.extend_from_slice(raw);
    }
    key.seal_in_place(&blob_aad(kind, id), out);
}

/// Opens one blob: authenticates, decompresses, and checks the plaintext
/// against its id with `id_of`.
pub fn open_blob(
    key: &SealKey,
    kind: BlobKind,
    id: &BlobId,
    raw_len: usize,
    sealed: &[u8],
    id_of: impl Fn(&[u8]) -> BlobId,
) -> Result<Vec<u8>, OpenError> {
    let mut body = key.open(&blob_aad(kind, id), sealed)?;
    let raw = match body.first() {
        Some(&CODEC_RAW) => {
            body.remove(0);
            body
        }
        Some(&CODEC_ZSTD) => decompress(&body[1..], raw_len)?,
        Some(c) => return Err(OpenError::Body(format!("unknown codec {c}"))),
        None => return Err(OpenError::Body("empty body".into())),
    };
    if raw.len() != raw_len {
        return Err(OpenError::Body(format!(
            "{} bytes, the index says {raw_len}",
            raw.len()
        )));
    }
    if id_of(&raw) != *id {
        return Err(OpenError::IdMismatch);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(b: &[u8]) -> BlobId {
        BlobId(*blake3::hash(b).as_bytes())
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let key = SealKey::new(&[9; 32]);
        for raw in [
            vec![],
            vec![1u8; 10_000],
            (0..5000u32).map(|i| (i * 7919) as u8).collect(),
        ] {
            let id = id_of(&raw);
            let sealed = seal_blob(&key, 3, BlobKind::Data, &id, &raw);
            assert_eq!(
                open_blob(&key, BlobKind::Data, &id, raw.len(), &sealed, id_of).unwrap(),
                raw
            );
            assert_eq!(
                open_blob(&key, BlobKind::Tree, &id, raw.len(), &sealed, id_of),
                Err(OpenError::Auth),
                "kind is bound"
            );
            let other = id_of(b"x");
            assert_eq!(
                open_blob(&key, BlobKind::Data, &other, raw.len(), &sealed, id_of),
                Err(OpenError::Auth),
                "id is bound"
            );
            let mut flipped = sealed.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            assert_eq!(
                open_blob(&key, BlobKind::Data, &id, raw.len(), &flipped, id_of),
                Err(OpenError::Auth)
            );
        }
        let compressible = vec![0u8; 100_000];
        let sealed = seal_blob(
            &key,
            3,
            BlobKind::Data,
            &id_of(&compressible),
            &compressible,
        );
        assert!(sealed.len() < 1000, "zeros compress");
        let a = seal_blob(&key, 3, BlobKind::Data, &id_of(b"same"), b"same");
        let b = seal_blob(&key, 3, BlobKind::Data, &id_of(b"same"), b"same");
        assert_ne!(a[..12], b[..12], "fresh nonce every time");
    }

    #[test]
    fn truncated_sealed_blobs_are_refused() {
        let key = SealKey::new(&[9; 32]);
        for n in 0..SEAL_OVERHEAD + 2 {
            let junk = vec![0u8; n];
            assert!(open_blob(&key, BlobKind::Data, &BlobId([0; 32]), 0, &junk, id_of).is_err());
        }
    }
}
