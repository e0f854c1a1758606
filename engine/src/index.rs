//! Index segments and the in-memory index.
//!
//! An index segment is a blob (kind `index`) that lists where the blobs of
//! some packs are, so a node whose packs live elsewhere can find a blob
//! without fetching every pack header:
//!
//! ```text
//! segment = version (u8 = 1) || varint n || n packs
//! pack    = pack id (32) || size (u64) || varint m || m entries
//! entry   = kind (u8) || id (32) || offset (u64) || length (u32) || raw_length (u32)
//! ```

use std::collections::HashMap;

use pluto_plugins_api::{BlobId, BlobKind, BlobLocation, PackId, PackRecord};

use crate::wire::{DecodeError, Reader, Writer};

const INDEX_VERSION: u8 = 1;

/// Encodes an index segment.
pub fn encode_segment(packs: &[PackRecord]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(INDEX_VERSION);
    w.varint(packs.len() as u64);
    for p in packs {
        w.id(&p.id.0);
        w.u64(p.size);
        w.varint(p.blobs.len() as u64);
        for b in &p.blobs {
            w.u8(b.kind as u8);
            w.id(&b.id.0);
            w.u64(b.offset);
            w.u32(b.length);
            w.u32(b.raw_length);
        }
    }
    w.finish()
}

/// Decodes an index segment.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<PackRecord>, DecodeError> {
    let mut r = Reader::new(bytes, "index segment");
    let v = r.u8()?;
    if v != INDEX_VERSION {
        return Err(r.error(format!("unknown index version {v}")));
    }
    let n = r.count(32 + 8 + 1)?;
    let mut packs = Vec::with_capacity(n);
    for _ in 0..n {
        let id = PackId(r.id()?);
        let size = r.u64()?;
        let m = r.count(1 + 32 + 8 + 4 + 4)?;
        let mut blobs = Vec::with_capacity(m);
        for _ in 0..m {
            let k = r.u8()?;
            let kind = BlobKind::from_u8(k).ok_or_else(|| r.error(format!("blob kind {k}")))?;
            blobs.push(BlobLocation {
                kind,
                id: BlobId(r.id()?),
                pack: id,
                offset: r.u64()?,
                length: r.u32()?,
                raw_length: r.u32()?,
            });
        }
        packs.push(PackRecord { id, size, blobs });
    }
    r.finish()?;
    Ok(packs)
}

/// Where every known blob is.
#[derive(Debug, Default, Clone)]
pub struct Index {
    map: HashMap<(BlobKind, BlobId), BlobLocation>,
}

impl Index {
    /// From a list of locations; the first location of a blob wins.
    pub fn from_locations(locs: impl IntoIterator<Item = BlobLocation>) -> Self {
        let mut map = HashMap::new();
        for l in locs {
            map.entry((l.kind, l.id)).or_insert(l);
        }
        Self { map }
    }
    /// Adds locations.
    pub fn extend(&mut self, locs: impl IntoIterator<Item = BlobLocation>) {
        for l in locs {
            self.map.entry((l.kind, l.id)).or_insert(l);
        }
    }
    /// Where a blob is.
    pub fn get(&self, kind: BlobKind, id: &BlobId) -> Option<&BlobLocation> {
        self.map.get(&(kind, *id))
    }
    /// Whether a blob is known.
    pub fn contains(&self, kind: BlobKind, id: &BlobId) -> bool {
        self.map.contains_key(&(kind, *id))
    }
    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Every location.
    pub fn iter(&self) -> impl Iterator<Item = &BlobLocation> {
        self.map.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(packs in proptest::collection::vec(
            (any::<[u8; 32]>(), any::<u64>(), proptest::collection::vec(
                (any::<[u8; 32]>(), any::<u64>(), any::<u32>(), any::<u32>()), 0..4)), 0..4)
        ) {
            let packs: Vec<PackRecord> = packs.into_iter().map(|(id, size, blobs)| PackRecord {
                id: PackId(id),
                size,
                blobs: blobs.into_iter().map(|(b, offset, length, raw_length)| BlobLocation {
                    kind: BlobKind::Data, id: BlobId(b), pack: PackId(id), offset, length, raw_length,
                }).collect(),
            }).collect();
            prop_assert_eq!(decode_segment(&encode_segment(&packs)).unwrap(), packs);
        }

        #[test]
        fn decoder_never_panics(data: Vec<u8>) {
            let _ = decode_segment(&data);
        }
    }
}
