//! Packs: many sealed blobs in one file, with an encrypted header that
//! lists them.
//!
//! ```text
//! pack    = blob_0 || blob_1 || ... || blob_n-1 || header || header_len (u32 LE) || "PLUTOPK1"
//! header  = seal(metadata key, aad = "pluto pack header v1", entries)
//! entries = varint n, then n times: kind (u8) || id (32) || length (u32 LE) || raw_length (u32 LE)
//! ```
//!
//! Offsets are implicit: blob `i` starts where blob `i-1` ended, the first at
//! 0. The pack id is the plain BLAKE3 of all of its bytes, so a storer can
//! verify what it received without any key.

use pluto_plugins_api::{BlobId, BlobKind, BlobLocation, PackId};

use crate::crypto::{OpenError, SealKey, PACK_HEADER_AAD, SEAL_OVERHEAD};
use crate::wire::{DecodeError, Reader, Writer};

/// The last 8 bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"PLUTOPK1";
/// Bytes after the header: its length and the magic.
pub const TRAILER_LEN: usize = 4 + 8;
/// Bytes per header entry.
const ENTRY_LEN: usize = 1 + 32 + 4 + 4;
/// Largest header a reader accepts (about 400,000 blobs).
pub const MAX_HEADER_LEN: usize = 16 << 20;

/// Why a pack could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// Too short, bad magic or a header length that does not fit.
    #[error("not a pluto pack: {0}")]
    Structure(String),
    /// The header does not authenticate.
    #[error("pack header: {0}")]
    Header(#[from] OpenError),
    /// The header authenticates but does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// One blob as a pack header lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// Kind.
    pub kind: BlobKind,
    /// Id.
    pub id: BlobId,
    /// Sealed length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// Collects sealed blobs into a pack.
#[derive(Debug, Default)]
pub struct PackWriter {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack.
#[derive(Debug)]
pub struct FinishedPack {
    /// BLAKE3 of `bytes`.
    pub id: PackId,
    /// The whole pack.
    pub bytes: Vec<u8>,
    /// Where each blob is.
    pub blobs: Vec<BlobLocation>,
}

impl PackWriter {
    /// An empty pack with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
            entries: Vec::new(),
        }
    }
    /// An empty pack that reuses `buf`'s allocation.
    pub fn from_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self {
            bytes: buf,
            entries: Vec::new(),
        }
    }
    /// Appends a sealed blob.
    pub fn add(&mut self, kind: BlobKind, id: BlobId, sealed: &[u8], raw_length: u32) {
        self.bytes.extend_from_slice(sealed);
        self.entries.push(PackEntry {
            kind,
            id,
            length: sealed.len() as u32,
            raw_length,
        });
    }
    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Appends the header and computes the id.
    pub fn finish(mut self, header_key: &SealKey) -> FinishedPack {
        let mut w = Writer::new();
        w.varint(self.entries.len() as u64);
        for e in &self.entries {
            w.u8(e.kind as u8);
            w.id(&e.id.0);
            w.u32(e.length);
            w.u32(e.raw_length);
        }
        let header = header_key.seal(PACK_HEADER_AAD, &w.finish());
        self.bytes.extend_from_slice(&header);
        self.bytes
            .extend_from_slice(&(header.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(PACK_MAGIC);
        let id = PackId::of(&self.bytes);
        let blobs = locate(id, &self.entries);
        FinishedPack {
            id,
            bytes: self.bytes,
            blobs,
        }
    }
}

/// Turns header entries into locations with offsets.
pub fn locate(pack: PackId, entries: &[PackEntry]) -> Vec<BlobLocation> {
    let mut offset = 0u64;
    entries
        .iter()
        .map(|e| {
            let loc = BlobLocation {
                kind: e.kind,
                id: e.id,
                pack,
                offset,
                length: e.length,
                raw_length: e.raw_length,
            };
            offset += u64::from(e.length);
            loc
        })
        .collect()
}

/// Reads the trailer: how long the header is. `tail` is the last bytes of a
/// pack of `pack_len` bytes (at least [`TRAILER_LEN`]).
pub fn header_len(tail: &[u8], pack_len: u64) -> Result<usize, PackError> {
    if tail.len() < TRAILER_LEN || pack_len < TRAILER_LEN as u64 {
        return Err(PackError::Structure(format!(
            "{pack_len} bytes is too short"
        )));
    }
    let t = &tail[tail.len() - TRAILER_LEN..];
    if &t[4..] != PACK_MAGIC {
        return Err(PackError::Structure("bad magic".into()));
    }
    let n = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize;
    if !(SEAL_OVERHEAD..=MAX_HEADER_LEN).contains(&n) || (n + TRAILER_LEN) as u64 > pack_len {
        return Err(PackError::Structure(format!(
            "header length {n} does not fit"
        )));
    }
    Ok(n)
}

/// Opens and decodes a sealed header, and checks that the blobs it lists
/// fill the pack exactly up to the header.
pub fn read_header(
    key: &SealKey,
    sealed: &[u8],
    pack_len: u64,
) -> Result<Vec<PackEntry>, PackError> {
    let plain = key.open(PACK_HEADER_AAD, sealed)?;
    let body_len = pack_len
        .checked_sub((sealed.len() + TRAILER_LEN) as u64)
        .ok_or_else(|| {
            PackError::Structure(format!("header longer than the pack ({pack_len} bytes)"))
        })?;
    decode_header(&plain, body_len)
}

/// Decodes a header's plaintext and checks that its blobs fill exactly the
/// `body_len` bytes before the header.
pub fn decode_header(plain: &[u8], body_len: u64) -> Result<Vec<PackEntry>, PackError> {
    let mut r = Reader::new(plain, "pack header");
    let n = r.count(ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(n);
    let mut total = 0u64;
    for _ in 0..n {
        let kind = r.u8()?;
        let kind = BlobKind::from_u8(kind).ok_or_else(|| r.error(format!("blob kind {kind}")))?;
        let id = BlobId(r.id()?);
        let length = r.u32()?;
        let raw_length = r.u32()?;
        if (length as usize) < SEAL_OVERHEAD {
            return Err(r.error(format!("blob of {length} bytes")).into());
        }
        total += u64::from(length);
        entries.push(PackEntry {
            kind,
            id,
            length,
            raw_length,
        });
    }
    r.finish()?;
    if total != body_len {
        return Err(PackError::Structure(format!(
            "blobs take {total} bytes, the pack has {body_len} before its header"
        )));
    }
    Ok(entries)
}

/// Parses a whole pack held in memory.
pub fn parse(key: &SealKey, bytes: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    let n = header_len(bytes, bytes.len() as u64)?;
    let end = bytes.len() - TRAILER_LEN;
    read_header(key, &bytes[end - n..end], bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (SealKey, FinishedPack, Vec<Vec<u8>>) {
        let key = SealKey::new(&[3; 32]);
        let mut w = PackWriter::default();
        let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 40 + i as usize]).collect();
        for (i, b) in blobs.iter().enumerate() {
            w.add(BlobKind::Data, BlobId([i as u8; 32]), b, 7);
        }
        (key.clone(), w.finish(&key), blobs)
    }

    #[test]
    fn round_trip() {
        let (key, p, blobs) = sample();
        assert_eq!(p.id, PackId::of(&p.bytes));
        let entries = parse(&key, &p.bytes).unwrap();
        assert_eq!(locate(p.id, &entries), p.blobs);
        for (loc, b) in p.blobs.iter().zip(&blobs) {
            let s = loc.offset as usize;
            assert_eq!(&p.bytes[s..s + loc.length as usize], &b[..]);
        }
    }

    #[test]
    fn damage_is_refused() {
        let (key, p, _) = sample();
        let n = p.bytes.len();
        let mut header_flip = p.bytes.clone();
        header_flip[n - TRAILER_LEN - 5] ^= 1;
        assert!(matches!(
            parse(&key, &header_flip),
            Err(PackError::Header(_))
        ));
        let mut magic = p.bytes.clone();
        magic[n - 1] ^= 1;
        assert!(matches!(parse(&key, &magic), Err(PackError::Structure(_))));
        let truncated = &p.bytes[10..];
        assert!(parse(&key, truncated).is_err());
        let mut huge = p.bytes.clone();
        huge[n - 12..n - 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&key, &huge), Err(PackError::Structure(_))));
        assert!(
            parse(&SealKey::new(&[4; 32]), &p.bytes).is_err(),
            "other key"
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(data: Vec<u8>) {
            let key = SealKey::new(&[3; 32]);
            let _ = parse(&key, &data);
            let mut with_magic = data.clone();
            with_magic.extend_from_slice(&(data.len() as u32 / 2).to_le_bytes());
            with_magic.extend_from_slice(PACK_MAGIC);
            let _ = parse(&key, &with_magic);
        }
    }
}
