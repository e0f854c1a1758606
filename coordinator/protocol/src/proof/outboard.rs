//! Proofs that read kilobytes: a blob's BLAKE3 tree kept beside it (its
//! *outboard*), so that proving a range reads the range, the group around
//! it and a logarithmic number of stored chaining values instead of
//! hashing the whole blob.
//!
//! The outboard keeps, for each level `L >= 0`, the CVs of the complete
//! subtrees of `GROUP << L` bytes, left to right. BLAKE3's tree splits every
//! subtree at the largest power of two below its length, so every aligned,
//! complete power-of-two run of chunks is a node of the tree, and a subtree
//! that is not one (the ones along the right edge of an unbalanced tree)
//! splits into one that is and a smaller rest. Subtrees below `GROUP` are
//! hashed from the bytes, which a proof reads anyway: they lie in the
//! groups the range touches, or in the last, partial group.
//!
//! ```text
//! outboard = "PLUTOOB1" || root (32) || size (u64 LE)
//!            || level 0 CVs || level 1 CVs || ...
//! level L  = floor(size / (GROUP << L)) CVs of 32 bytes, for each L where that is > 0
//! ```
//!
//! It costs 64 bytes per 16 KiB (0.4%), is built in the same pass that
//! hashes the blob ([`Builder`]), and is checked by nothing but the result:
//! a prover verifies its proof against the root before sending it, so a
//! damaged outboard shows as a proof that does not verify, and is rebuilt.

use blake3::hazmat::{merge_subtrees_non_root, ChainingValue, Mode};

use super::{left_len, proof_len, sides, subtree_cv, ProofError, Visit, CV_LEN};

/// The bytes under one CV of level 0 (16 BLAKE3 chunks).
pub const GROUP: u64 = 16 * 1024;
/// The outboard's header: magic, root, size.
pub const HEADER: usize = 8 + 32 + 8;
const MAGIC: &[u8; 8] = b"PLUTOOB1";

/// Where each level of a blob's outboard lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    size: u64,
    /// Offset in the outboard of each level's first CV.
    starts: Vec<u64>,
    /// CVs in each level.
    counts: Vec<u64>,
}

impl Layout {
    /// The layout for a blob of `size` bytes.
    pub fn new(size: u64) -> Self {
        let (mut starts, mut counts) = (Vec::new(), Vec::new());
        let mut at = HEADER as u64;
        // GROUP << 49 is the largest level a u64 size can fill.
        for level in 0..50 {
            let count = size / (GROUP << level);
            if count == 0 {
                break;
            }
            starts.push(at);
            counts.push(count);
            at += count * CV_LEN as u64;
        }
        Self {
            size,
            starts,
            counts,
        }
    }

    /// The outboard's whole length.
    pub fn len(&self) -> u64 {
        match (self.starts.last(), self.counts.last()) {
            (Some(s), Some(c)) => s + c * CV_LEN as u64,
            _ => HEADER as u64,
        }
    }

    /// Always false: an outboard has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Where CV `index` of `level` lies in the outboard, if there is one.
    pub fn position(&self, level: u32, index: u64) -> Option<u64> {
        let l = usize::try_from(level).ok()?;
        let (start, count) = (self.starts.get(l)?, self.counts.get(l)?);
        (index < *count).then(|| start + index * CV_LEN as u64)
    }
}

/// Hashes a blob as it streams by, giving its root and its outboard.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    hasher: blake3::Hasher,
    group: Vec<u8>,
    size: u64,
    level0: Vec<ChainingValue>,
}

impl Builder {
    /// A builder for a blob that starts now.
    pub fn new() -> Self {
        Self::default()
    }

    /// The blob's next bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.hasher.update(bytes);
        while !bytes.is_empty() {
            let room = GROUP as usize - self.group.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.group.extend_from_slice(now);
            bytes = rest;
            if self.group.len() == GROUP as usize {
                let start = self.size - self.size % GROUP;
                self.level0.push(subtree_cv(start, &self.group));
                self.group.clear();
            }
            self.size += now.len() as u64;
        }
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blob's root and its outboard.
    pub fn finish(self) -> ([u8; 32], Vec<u8>) {
        let root = *self.hasher.finalize().as_bytes();
        let layout = Layout::new(self.size);
        let mut out = Vec::with_capacity(usize::try_from(layout.len()).unwrap_or(0));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&root);
        out.extend_from_slice(&self.size.to_le_bytes());
        let mut level = self.level0;
        while !level.is_empty() {
            for cv in &level {
                out.extend_from_slice(cv);
            }
            level = level
                .chunks_exact(2)
                .map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash))
                .collect();
        }
        (root, out)
    }
}

/// Reads an outboard's header: the root and size it was built for.
pub fn header(bytes: &[u8]) -> Option<([u8; 32], u64)> {
    let h = bytes.get(..HEADER)?;
    if &h[..8] != MAGIC {
        return None;
    }
    let root: [u8; 32] = h[8..40].try_into().ok()?;
    let size = u64::from_le_bytes(h[40..48].try_into().ok()?);
    Some((root, size))
}

/// Whether `bytes` start like an outboard.
pub fn is_outboard(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// What a prover reads: stored CVs and the blob's bytes.
pub trait Source {
    /// CV `index` of `level` (see [`Layout::position`]).
    fn cv(&mut self, level: u32, index: u64) -> Result<ChainingValue, ProofError>;
    /// The blob's bytes `start..start + n`; asked only for runs within the
    /// groups the range touches and the last, partial group, so a source
    /// that reads whole groups and keeps them reads each once.
    fn bytes(&mut self, start: u64, n: u64) -> Result<Vec<u8>, ProofError>;
}

/// The proof for `offset..offset + len` of a blob of `size` bytes, the
/// same as [`super::prove`] gives, read from `source`.
pub fn prove(
    size: u64,
    offset: u64,
    len: u64,
    source: &mut dyn Source,
) -> Result<Vec<u8>, ProofError> {
    let want = proof_len(size, offset, len)?;
    let mut prover = Prover {
        size,
        source,
        out: Vec::with_capacity(want),
    };
    if size > super::CHUNK {
        sides(&mut prover, offset, offset + len, 0, size)?;
    }
    let mut out = prover.out;
    out.extend_from_slice(&prover.source.bytes(offset, len)?);
    if out.len() != want {
        return Err(ProofError::Unreadable(format!(
            "{} bytes gathered, a proof has {want}",
            out.len()
        )));
    }
    Ok(out)
}

struct Prover<'a> {
    size: u64,
    source: &'a mut dyn Source,
    out: Vec<u8>,
}

impl Prover<'_> {
    /// The CV of the non-root subtree `start..start + n`.
    fn cv(&mut self, start: u64, n: u64) -> Result<ChainingValue, ProofError> {
        if n >= GROUP && n.is_power_of_two() && start.is_multiple_of(n) && start + n <= self.size {
            let level = (n / GROUP).trailing_zeros();
            return self.source.cv(level, start / n);
        }
        if n > GROUP {
            let left = left_len(n);
            let l = self.cv(start, left)?;
            let r = self.cv(start + left, n - left)?;
            return Ok(merge_subtrees_non_root(&l, &r, Mode::Hash));
        }
        let bytes = self.source.bytes(start, n)?;
        if bytes.len() as u64 != n {
            return Err(ProofError::Unreadable(format!(
                "{} bytes read where {n} were asked",
                bytes.len()
            )));
        }
        Ok(subtree_cv(start, &bytes))
    }
}

impl Visit for Prover<'_> {
    type Cv = ();
    fn outside(&mut self, start: u64, n: u64) -> Result<(), ProofError> {
        let cv = self.cv(start, n)?;
        self.out.extend_from_slice(&cv);
        Ok(())
    }
    fn inside(&mut self, _: u64, _: u64) -> Result<(), ProofError> {
        Ok(())
    }
    fn merge(&mut self, _: (), _: ()) {}
}

/// A [`Source`] over a blob and its outboard in memory (for tests, and
/// for callers that hold both).
#[derive(Debug)]
pub struct InMemory<'a> {
    /// The blob.
    pub blob: &'a [u8],
    /// Its outboard.
    pub outboard: &'a [u8],
    /// Bytes of the blob and the outboard handed out so far.
    pub read: u64,
}

impl Source for InMemory<'_> {
    fn cv(&mut self, level: u32, index: u64) -> Result<ChainingValue, ProofError> {
        let at = Layout::new(self.blob.len() as u64)
            .position(level, index)
            .and_then(|p| usize::try_from(p).ok())
            .ok_or_else(|| ProofError::Unreadable(format!("no CV {index} at level {level}")))?;
        let cv: ChainingValue = self
            .outboard
            .get(at..at + CV_LEN)
            .and_then(|c| c.try_into().ok())
            .ok_or_else(|| ProofError::Unreadable("the outboard is short".into()))?;
        self.read += CV_LEN as u64;
        Ok(cv)
    }
    fn bytes(&mut self, start: u64, n: u64) -> Result<Vec<u8>, ProofError> {
        let b = super::part(self.blob, start, n)?;
        self.read += n;
        Ok(b.to_vec())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn blob(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect()
    }

    fn built(b: &[u8], step: usize) -> ([u8; 32], Vec<u8>) {
        let mut builder = Builder::new();
        for part in b.chunks(step.max(1)) {
            builder.update(part);
        }
        builder.finish()
    }

    #[test]
    fn the_builder_gives_the_root_and_a_layout_sized_outboard() {
        for size in [0, 1, 1024, 16 * 1024, 16 * 1024 + 1, 100_000, 1 << 20] {
            let b = blob(size, 3);
            let (root, ob) = built(&b, 7_000);
            assert_eq!(root, *blake3::hash(&b).as_bytes(), "size {size}");
            assert_eq!(
                ob.len() as u64,
                Layout::new(size as u64).len(),
                "size {size}"
            );
            assert_eq!(header(&ob), Some((root, size as u64)));
            assert!(is_outboard(&ob));
        }
    }

    #[test]
    fn a_16_mib_blob_is_proven_reading_kilobytes() {
        let b = blob(16 << 20, 9);
        let (root, ob) = built(&b, 1 << 20);
        let size = b.len() as u64;
        for offset in [0, 5 << 20, size - 1024, 8 * 1024 * 1024 + 15 * 1024] {
            let mut src = InMemory {
                blob: &b,
                outboard: &ob,
                read: 0,
            };
            let p = prove(size, offset, 1024, &mut src).unwrap();
            assert_eq!(p, super::super::prove(&b, offset, 1024).unwrap());
            super::super::verify(&root, size, offset, 1024, &p).unwrap();
            assert!(src.read <= 48 * 1024, "{} bytes read", src.read);
        }
    }

    #[test]
    fn a_damaged_outboard_gives_a_proof_that_fails() {
        let b = blob(1 << 20, 1);
        let (root, mut ob) = built(&b, 4096);
        let last = ob.len() - 1;
        for byte in &mut ob[HEADER..=last] {
            *byte ^= 0x55;
        }
        let mut src = InMemory {
            blob: &b,
            outboard: &ob,
            read: 0,
        };
        let p = prove(b.len() as u64, 0, 1024, &mut src).unwrap();
        assert_eq!(
            super::super::verify(&root, b.len() as u64, 0, 1024, &p),
            Err(ProofError::Mismatch)
        );
    }

    #[test]
    fn a_short_outboard_is_an_error_not_a_panic() {
        let b = blob(200_000, 2);
        let (_, ob) = built(&b, 4096);
        let mut src = InMemory {
            blob: &b,
            outboard: &ob[..HEADER + 40],
            read: 0,
        };
        assert!(matches!(
            prove(b.len() as u64, 150 * 1024, 1024, &mut src),
            Err(ProofError::Unreadable(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn outboard_proofs_equal_whole_blob_proofs(
            size in 1usize..600_000,
            at in any::<u64>(),
            chunks in 1u64..=16,
            step in 1usize..70_000,
        ) {
            let b = blob(size, 5);
            let (root, ob) = built(&b, step);
            let size = size as u64;
            let offset = (at % size.div_ceil(1024)) * 1024;
            let len = (chunks * 1024).min(size - offset);
            let mut src = InMemory { blob: &b, outboard: &ob, read: 0 };
            let p = prove(size, offset, len, &mut src).unwrap();
            prop_assert_eq!(&p, &super::super::prove(&b, offset, len).unwrap());
            prop_assert!(super::super::verify(&root, size, offset, len, &p).is_ok());
        }
    }
}
