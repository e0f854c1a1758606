//! Verified range proofs over BLAKE3: how a storer shows that it still holds
//! the bytes of a replica, to someone who knows only the replica's BLAKE3
//! root and size.
//!
//! A challenge names a few chunks of the replica; the answer is those bytes
//! plus the chaining values (CVs) the verifier needs to rebuild the root
//! from them. BLAKE3 hashes a blob as a binary tree over 1024-byte chunks: a
//! subtree of `n > 1024` bytes splits at `left_subtree_len(n)` (the largest
//! power of two below `n`), and a subtree's CV is the parent node of its two
//! sides' CVs. The proof carries the CV of every subtree that the path from
//! the root down to the range passes by, but that lies wholly outside the
//! range, in the order a depth-first, left-to-right descent meets them; the
//! range's bytes come last, so [`verify`] can hand them back as one slice.
//! For a blob of 5000 bytes and the range `2048..3072`:
//!
//! ```text
//!                    root (merge_subtrees_root)
//!                 /                          \
//!            0..4096                      4096..5000  (3)
//!           /       \
//!     0..2048 (1)   2048..4096
//!                   /         \
//!           [2048..3072]     3072..4096  (2)
//!
//! proof = CV (1) (32) || CV (2) (32) || CV (3) (32) || bytes 2048..3072 (1024)
//! ```
//!
//! This is Bao's verified slicing at BLAKE3's own chunk size, without Bao's
//! length prefix: the verifier takes the size from its own records. The
//! proof's length follows from `(size, offset, len)` alone ([`proof_len`]),
//! so a decoder refuses any other length before hashing anything. A range
//! passes at most two outside subtrees per tree level, so a proof is at most
//! [`MAX_PROOF`] bytes for any blob; verifying costs hashing the range plus
//! about two parent nodes per level. Proving hashes the whole blob.
//!
//! The root commits to the size only through the shape of the path to the
//! range (and the last chunk, when the range holds it): a wrong size that
//! splits that path the same way still verifies. The bytes returned are then
//! still the blob's own, at their place in it, so the verifier loses nothing
//! by taking the size from its own records.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use blake3::Hasher;
use rand_core::RngCore;

pub mod outboard;

/// BLAKE3's chunk: the smallest part of a blob with a CV of its own, and
/// the unit a challenge's range is aligned to.
pub const CHUNK: u64 = 1024;
/// Longest range a challenge may name.
pub const MAX_RANGE: u64 = 16 * 1024;
/// The length of one chaining value in a proof.
pub const CV_LEN: usize = 32;
/// Longest proof for any range of any blob: the range, and at most two
/// outside subtrees at each of the at most 54 levels below the root of a
/// tree of up to 2^54 chunks (`u64::MAX` bytes).
pub const MAX_PROOF: usize = MAX_RANGE as usize + 2 * 54 * CV_LEN;

/// Why a range cannot be challenged, or a proof does not hold.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// The blob is empty: there is nothing to prove.
    #[error("a blob of 0 bytes cannot be challenged")]
    EmptyBlob,
    /// The range is empty.
    #[error("an empty range cannot be challenged")]
    EmptyRange,
    /// The range is longer than [`MAX_RANGE`].
    #[error("a range of {len} bytes (a challenge names at most {MAX_RANGE})")]
    TooLong {
        /// The range's length.
        len: u64,
    },
    /// The range does not start on a chunk boundary, or ends on neither a
    /// chunk boundary nor the end of the blob.
    #[error("the range of {len} bytes at {offset} is not aligned to {CHUNK}-byte chunks")]
    Unaligned {
        /// Where the range starts.
        offset: u64,
        /// The range's length.
        len: u64,
    },
    /// The range reaches past the end of the blob.
    #[error("the range of {len} bytes at {offset} lies outside a blob of {size} bytes")]
    Outside {
        /// Where the range starts.
        offset: u64,
        /// The range's length.
        len: u64,
        /// The blob's size.
        size: u64,
    },
    /// The proof is not the length a proof for this range has.
    #[error("a proof of {got} bytes (the proof for this range has {want})")]
    Length {
        /// The proof's length.
        got: usize,
        /// The length a proof for this range has.
        want: usize,
    },
    /// The proof does not hash to the root: the bytes are not the blob's.
    #[error("the proof does not hash to the blob's root")]
    Mismatch,
    /// What a proof is made from (the blob's bytes, its outboard) could not
    /// be read.
    #[error("reading the blob: {0}")]
    Unreadable(String),
}

/// Checks that a range is one a challenge may name for a blob of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), ProofError> {
    if size == 0 {
        return Err(ProofError::EmptyBlob);
    }
    if len == 0 {
        return Err(ProofError::EmptyRange);
    }
    if len > MAX_RANGE {
        return Err(ProofError::TooLong { len });
    }
    let end = match offset.checked_add(len) {
        Some(end) if end <= size => end,
        _ => return Err(ProofError::Outside { offset, len, size }),
    };
    if !offset.is_multiple_of(CHUNK) || (!end.is_multiple_of(CHUNK) && end != size) {
        return Err(ProofError::Unaligned { offset, len });
    }
    Ok(())
}

/// A random range for a challenge: a random chunk-aligned start, up to
/// `want` bytes (rounded up to whole chunks, at least one, at most
/// [`MAX_RANGE`]), clipped at the end of the blob.
///
/// `size` must be > 0; for an empty blob it returns `(0, 0)`, which
/// [`check_range`] refuses.
pub fn pick_range(size: u64, want: u64, rng: &mut impl RngCore) -> (u64, u64) {
    if size == 0 {
        return (0, 0);
    }
    let offset = below(rng, size.div_ceil(CHUNK)) * CHUNK;
    let want = want.div_ceil(CHUNK).clamp(1, MAX_RANGE / CHUNK) * CHUNK;
    (offset, want.min(size - offset))
}

/// A uniform number below `n` (> 0), by rejecting the draws that would bias
/// a plain remainder.
fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    // 2^64 mod n: the draws above u64::MAX - rem would make low numbers likelier.
    let rem = (u64::MAX % n + 1) % n;
    loop {
        let x = rng.next_u64();
        if x <= u64::MAX - rem {
            return x % n;
        }
    }
}

/// The proof for `offset..offset+len` of `blob` (the whole blob is needed
/// to compute the hashes of the parts outside the range;
/// [`outboard::prove`] needs only the range and a few stored hashes).
pub fn prove(blob: &[u8], offset: u64, len: u64) -> Result<Vec<u8>, ProofError> {
    let size = blob.len() as u64;
    let want = proof_len(size, offset, len)?;
    let (lo, hi) = (offset, offset + len);
    let mut prover = Prover {
        blob,
        out: Vec::with_capacity(want),
    };
    if size > CHUNK {
        sides(&mut prover, lo, hi, 0, size)?;
    }
    let mut out = prover.out;
    out.extend_from_slice(part(blob, lo, len)?);
    Ok(out)
}

/// Checks a proof; returns the range's bytes (a slice of `proof`) when it holds.
pub fn verify<'a>(
    root: &[u8; 32],
    size: u64,
    offset: u64,
    len: u64,
    proof: &'a [u8],
) -> Result<&'a [u8], ProofError> {
    let want = proof_len(size, offset, len)?;
    if proof.len() != want {
        return Err(ProofError::Length {
            got: proof.len(),
            want,
        });
    }
    let len_bytes = usize::try_from(len).map_err(|_| ProofError::Mismatch)?;
    let (cvs, data) = proof
        .split_at_checked(want - len_bytes)
        .ok_or(ProofError::Mismatch)?;
    let (lo, hi) = (offset, offset + len);
    let mut checker = Checker { cvs, data, lo };
    let got = if size <= CHUNK {
        blake3::hash(data)
    } else {
        let (left, right) = sides(&mut checker, lo, hi, 0, size)?;
        hazmat::merge_subtrees_root(&left, &right, Mode::Hash)
    };
    // `blake3::Hash` compares in constant time.
    if !checker.cvs.is_empty() || got != blake3::Hash::from_bytes(*root) {
        return Err(ProofError::Mismatch);
    }
    Ok(data)
}

/// The exact length of a proof for this range (so a decoder can refuse
/// anything else before hashing).
pub fn proof_len(size: u64, offset: u64, len: u64) -> Result<usize, ProofError> {
    check_range(size, offset, len)?;
    let cvs = if size <= CHUNK {
        0
    } else {
        let (left, right) = sides(&mut Counter, offset, offset + len, 0, size)?;
        left + right
    };
    // At most MAX_PROOF: never overflows, but checked all the same.
    usize::try_from(len)
        .ok()
        .zip(cvs.checked_mul(CV_LEN))
        .and_then(|(len, cvs)| cvs.checked_add(len))
        .ok_or(ProofError::TooLong { len })
}

/// What a descent of the tree does with the subtrees it meets: those wholly
/// outside the range and those wholly inside it are leaves of the descent;
/// the ones in between are split and their sides merged.
trait Visit {
    /// What a subtree gives (its CV, a count of CVs, or nothing).
    type Cv;
    /// A subtree wholly outside the range.
    fn outside(&mut self, start: u64, n: u64) -> Result<Self::Cv, ProofError>;
    /// A subtree wholly inside the range.
    fn inside(&mut self, start: u64, n: u64) -> Result<Self::Cv, ProofError>;
    /// The parent (never the root) of two sides.
    fn merge(&mut self, left: Self::Cv, right: Self::Cv) -> Self::Cv;
}

/// Which side is left of the split of a subtree of `n` bytes (`n > CHUNK`):
/// `hazmat::left_subtree_len`, whose `n + 1` would overflow at `u64::MAX`.
fn left_len(n: u64) -> u64 {
    match n.checked_add(1) {
        Some(_) => hazmat::left_subtree_len(n),
        None => 1 << 63,
    }
}

/// The two sides of the subtree `start..start + n` (`n > CHUNK`), each as
/// the visitor makes it, left first. `lo..hi` is the range, `start + n` is
/// at most the blob's size, so nothing here overflows.
fn sides<V: Visit>(
    v: &mut V,
    lo: u64,
    hi: u64,
    start: u64,
    n: u64,
) -> Result<(V::Cv, V::Cv), ProofError> {
    let left = left_len(n);
    let l = subtree(v, lo, hi, start, left)?;
    let r = subtree(v, lo, hi, start + left, n - left)?;
    Ok((l, r))
}

/// One non-root subtree `start..start + n`.
fn subtree<V: Visit>(v: &mut V, lo: u64, hi: u64, start: u64, n: u64) -> Result<V::Cv, ProofError> {
    let end = start + n;
    if end <= lo || hi <= start {
        return v.outside(start, n);
    }
    if lo <= start && end <= hi {
        return v.inside(start, n);
    }
    if n <= CHUNK {
        // A chunk the range covers in part: `check_range` rules it out.
        return Err(ProofError::Unaligned {
            offset: lo,
            len: hi - lo,
        });
    }
    let (l, r) = sides(v, lo, hi, start, n)?;
    Ok(v.merge(l, r))
}

/// `n` bytes of `bytes` from `from`, or an error where a slice would panic.
fn part(bytes: &[u8], from: u64, n: u64) -> Result<&[u8], ProofError> {
    let from = usize::try_from(from).map_err(|_| ProofError::Mismatch)?;
    let n = usize::try_from(n).map_err(|_| ProofError::Mismatch)?;
    let end = from.checked_add(n).ok_or(ProofError::Mismatch)?;
    bytes.get(from..end).ok_or(ProofError::Mismatch)
}

/// The CV of the non-root subtree of `bytes` that starts at `start` in the blob.
fn subtree_cv(start: u64, bytes: &[u8]) -> ChainingValue {
    Hasher::new()
        .set_input_offset(start)
        .update(bytes)
        .finalize_non_root()
}

/// Counts the CVs a proof carries.
struct Counter;

impl Visit for Counter {
    type Cv = usize;
    fn outside(&mut self, _: u64, _: u64) -> Result<usize, ProofError> {
        Ok(1)
    }
    fn inside(&mut self, _: u64, _: u64) -> Result<usize, ProofError> {
        Ok(0)
    }
    fn merge(&mut self, left: usize, right: usize) -> usize {
        left + right
    }
}

/// Writes the CVs of the outside subtrees, hashed from the blob.
struct Prover<'a> {
    blob: &'a [u8],
    out: Vec<u8>,
}

impl Visit for Prover<'_> {
    type Cv = ();
    fn outside(&mut self, start: u64, n: u64) -> Result<(), ProofError> {
        let cv = subtree_cv(start, part(self.blob, start, n)?);
        self.out.extend_from_slice(&cv);
        Ok(())
    }
    fn inside(&mut self, _: u64, _: u64) -> Result<(), ProofError> {
        Ok(())
    }
    fn merge(&mut self, _: (), _: ()) {}
}

/// Rebuilds CVs from the proof's CVs (taken in order) and the range's bytes.
struct Checker<'a> {
    cvs: &'a [u8],
    data: &'a [u8],
    lo: u64,
}

impl Visit for Checker<'_> {
    type Cv = ChainingValue;
    fn outside(&mut self, _: u64, _: u64) -> Result<ChainingValue, ProofError> {
        let (cv, rest) = self
            .cvs
            .split_first_chunk::<CV_LEN>()
            .ok_or(ProofError::Mismatch)?;
        self.cvs = rest;
        Ok(*cv)
    }
    fn inside(&mut self, start: u64, n: u64) -> Result<ChainingValue, ProofError> {
        let from = start.checked_sub(self.lo).ok_or(ProofError::Mismatch)?;
        Ok(subtree_cv(start, part(self.data, from, n)?))
    }
    fn merge(&mut self, left: ChainingValue, right: ChainingValue) -> ChainingValue {
        hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::RngCore;
    use std::time::Instant;

    /// SplitMix64: a small deterministic generator for blobs and ranges.
    struct Mix(u64);

    impl RngCore for Mix {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rand_core::impls::fill_bytes_via_next(self, dest)
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    fn blob(size: usize, seed: u64) -> Vec<u8> {
        let mut b = vec![0; size];
        Mix(seed).fill_bytes(&mut b);
        b
    }

    fn root(blob: &[u8]) -> [u8; 32] {
        *blake3::hash(blob).as_bytes()
    }

    fn bytes(blob: &[u8], offset: u64, len: u64) -> &[u8] {
        &blob[offset as usize..(offset + len) as usize]
    }

    /// Proves, checks the length and that the proof verifies to the range.
    fn round_trip(blob: &[u8], root: &[u8; 32], offset: u64, len: u64) -> Vec<u8> {
        let size = blob.len() as u64;
        let p = prove(blob, offset, len).unwrap();
        assert_eq!(p.len(), proof_len(size, offset, len).unwrap());
        assert!(p.len() <= MAX_PROOF);
        assert_eq!(
            verify(root, size, offset, len, &p),
            Ok(bytes(blob, offset, len)),
            "size {size}, range {offset}+{len}"
        );
        p
    }

    /// Every range a challenge may name in a blob of `size` bytes.
    fn all_ranges(size: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for offset in (0..size).step_by(CHUNK as usize) {
            let mut end = offset + CHUNK;
            loop {
                let end_clipped = end.min(size);
                if end_clipped - offset > MAX_RANGE {
                    break;
                }
                out.push((offset, end_clipped - offset));
                if end_clipped == size {
                    break;
                }
                end += CHUNK;
            }
        }
        out
    }

    #[test]
    fn the_split_is_blake3s() {
        for n in (CHUNK + 1..70_000).chain([u64::MAX - 1, 1 << 63, (1 << 63) + 1, 3 << 40]) {
            assert_eq!(left_len(n), hazmat::left_subtree_len(n), "{n}");
        }
        assert_eq!(left_len(u64::MAX), 1 << 63);
    }

    #[test]
    fn every_range_of_small_blobs_round_trips() {
        for size in [1, 1023, 1024, 1025, 2048, 3 * 1024 + 5, 20 * 1024 + 1] {
            let b = blob(size, size as u64);
            let r = root(&b);
            let ranges = all_ranges(size as u64);
            assert!(!ranges.is_empty());
            for (offset, len) in ranges {
                round_trip(&b, &r, offset, len);
            }
        }
    }

    #[test]
    fn ranges_of_a_16_mib_blob_round_trip() {
        let size = (16 << 20) + 7;
        let b = blob(size, 16);
        let r = root(&b);
        let s = size as u64;
        let mut ranges = vec![
            (0, CHUNK),
            (0, MAX_RANGE),
            (s - 7, 7),
            (s - 7 - 15 * CHUNK, 15 * CHUNK + 7),
            (8 << 20, MAX_RANGE),
            ((8 << 20) - CHUNK, 2 * CHUNK),
            ((8 << 20) - 8 * CHUNK, MAX_RANGE),
        ];
        let mut rng = Mix(99);
        for _ in 0..6 {
            ranges.push(pick_range(s, MAX_RANGE, &mut rng));
        }
        for (offset, len) in ranges {
            let p = round_trip(&b, &r, offset, len);
            // 2^14 chunks: a depth of 15 below the root for the clipped tail.
            assert!(p.len() as u64 <= len + 2 * 15 * 32, "{}", p.len());
        }
    }

    #[test]
    fn the_encoding_is_as_drawn() {
        let b = blob(5000, 5);
        let p = prove(&b, 2048, 1024).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&subtree_cv(0, &b[..2048]));
        want.extend_from_slice(&subtree_cv(3072, &b[3072..4096]));
        want.extend_from_slice(&subtree_cv(4096, &b[4096..]));
        want.extend_from_slice(&b[2048..3072]);
        assert_eq!(p, want);
        // A one-chunk blob's proof is its bytes; so is a whole small blob's.
        assert_eq!(prove(&b[..1000], 0, 1000).unwrap(), &b[..1000]);
        assert_eq!(prove(&b, 0, 5000).unwrap(), b);
        assert_eq!(verify(&root(&b), 5000, 0, 5000, &b), Ok(&b[..]));
    }

    #[test]
    fn a_changed_bit_fails() {
        for (size, offset, len) in [
            (1000, 0, 1000),
            (5000, 2048, 1024),
            (5000, 4096, 904),
            (200_000, 60 * 1024, MAX_RANGE),
            (200_000, 3 * 1024, 5 * 1024),
        ] {
            let b = blob(size, size as u64 + 1);
            let r = root(&b);
            let p = round_trip(&b, &r, offset, len);
            let cvs = p.len() - len as usize;
            // Every bit of the CVs, a sample of the range's bits.
            let positions = (0..cvs * 8).chain((cvs * 8..p.len() * 8).step_by(61));
            for bit in positions {
                let mut bad = p.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(
                    verify(&r, size as u64, offset, len, &bad),
                    Err(ProofError::Mismatch),
                    "size {size}, range {offset}+{len}, bit {bit}"
                );
            }
        }
    }

    #[test]
    fn a_proof_holds_only_for_its_range_blob_and_root() {
        let size = 100_000u64;
        let b = blob(size as usize, 1);
        let r = root(&b);
        let p = round_trip(&b, &r, 8 * CHUNK, 2 * CHUNK);
        // Another range of the same length: refused by its length or its hash.
        let mut same_len = 0;
        for offset in (0..size - 2 * CHUNK).step_by(CHUNK as usize) {
            if offset == 8 * CHUNK {
                continue;
            }
            let want = proof_len(size, offset, 2 * CHUNK).unwrap();
            let got = verify(&r, size, offset, 2 * CHUNK, &p);
            if want == p.len() {
                same_len += 1;
                assert_eq!(got, Err(ProofError::Mismatch), "{offset}");
            } else {
                assert_eq!(got, Err(ProofError::Length { got: p.len(), want }));
            }
        }
        assert!(same_len > 10, "{same_len}");
        // Another blob of the same size, or its root.
        let mut other = b.clone();
        other[50_000] ^= 1;
        let other_root = root(&other);
        let q = round_trip(&other, &other_root, 8 * CHUNK, 2 * CHUNK);
        assert_eq!(
            verify(&r, size, 8 * CHUNK, 2 * CHUNK, &q),
            Err(ProofError::Mismatch)
        );
        assert_eq!(
            verify(&other_root, size, 8 * CHUNK, 2 * CHUNK, &p),
            Err(ProofError::Mismatch)
        );
        assert_eq!(
            verify(&[0; 32], size, 8 * CHUNK, 2 * CHUNK, &p),
            Err(ProofError::Mismatch)
        );
        // A size that splits the path to the range otherwise.
        for wrong in [10 * CHUNK, 12 * CHUNK, 64 * CHUNK, 2 * size, 1 << 40] {
            assert!(
                verify(&r, wrong, 8 * CHUNK, 2 * CHUNK, &p).is_err(),
                "{wrong}"
            );
        }
        // The root commits to the size only through the path's shape: every
        // size from 64 KiB + 1 to 128 KiB splits the path to this range the
        // same way. The bytes are still the blob's.
        for alike in [size - 1024, size - 1, size + 1, size + 1024, 128 * CHUNK] {
            assert_eq!(
                verify(&r, alike, 8 * CHUNK, 2 * CHUNK, &p),
                Ok(bytes(&b, 8 * CHUNK, 2 * CHUNK))
            );
        }
        // A range at the end pins the size.
        let tail = size - size % CHUNK;
        let t = round_trip(&b, &r, tail, size - tail);
        assert!(verify(&r, size + 1, tail, size - tail, &t).is_err());
        let mut longer = t.clone();
        longer.push(0);
        assert!(verify(&r, size + 1, tail, size + 1 - tail, &longer).is_err());
        for shorter in [size - 1, size - 100] {
            let cut = &t[..t.len() - (size - shorter) as usize];
            assert!(verify(&r, shorter, tail, shorter - tail, cut).is_err());
        }
    }

    #[test]
    fn a_proof_of_another_length_is_refused_before_hashing() {
        let b = blob(70_000, 2);
        let r = root(&b);
        let p = round_trip(&b, &r, 4 * CHUNK, 3 * CHUNK);
        let want = p.len();
        for got in [0, 1, want - 32, want - 1, want + 1, want + 32, 2 * want] {
            let mut q = p.clone();
            q.resize(got, 0);
            assert_eq!(
                verify(&r, 70_000, 4 * CHUNK, 3 * CHUNK, &q),
                Err(ProofError::Length { got, want })
            );
        }
    }

    #[test]
    fn bad_ranges_are_refused() {
        use ProofError::*;
        let size = 10 * CHUNK + 5;
        let cases = [
            (0, 0, CHUNK, EmptyBlob),
            (size, 0, 0, EmptyRange),
            (size, 0, MAX_RANGE + 1, TooLong { len: MAX_RANGE + 1 }),
            (u64::MAX, 0, u64::MAX, TooLong { len: u64::MAX }),
            (
                size,
                1,
                CHUNK,
                Unaligned {
                    offset: 1,
                    len: CHUNK,
                },
            ),
            (
                size,
                0,
                1000,
                Unaligned {
                    offset: 0,
                    len: 1000,
                },
            ),
            (
                size,
                0,
                size - 1,
                Unaligned {
                    offset: 0,
                    len: size - 1,
                },
            ),
            (
                size,
                10 * CHUNK,
                6,
                Outside {
                    offset: 10 * CHUNK,
                    len: 6,
                    size,
                },
            ),
            (
                size,
                11 * CHUNK,
                CHUNK,
                Outside {
                    offset: 11 * CHUNK,
                    len: CHUNK,
                    size,
                },
            ),
            (
                u64::MAX,
                u64::MAX - 1023,
                CHUNK,
                Outside {
                    offset: u64::MAX - 1023,
                    len: CHUNK,
                    size: u64::MAX,
                },
            ),
        ];
        let b = blob(size as usize, 3);
        for (sz, offset, len, err) in cases {
            assert_eq!(
                check_range(sz, offset, len),
                Err(err.clone()),
                "{sz} {offset}+{len}"
            );
            assert_eq!(proof_len(sz, offset, len), Err(err.clone()));
            assert_eq!(
                verify(&[0; 32], sz, offset, len, &[0; 64]),
                Err(err.clone())
            );
            if sz == size {
                assert_eq!(prove(&b, offset, len), Err(err));
            }
        }
        assert_eq!(prove(&[], 0, CHUNK), Err(EmptyBlob));
        assert_eq!(check_range(size, 10 * CHUNK, 5), Ok(()));
        assert_eq!(
            check_range(u64::MAX, u64::MAX - CHUNK, CHUNK),
            Err(Unaligned {
                offset: u64::MAX - CHUNK,
                len: CHUNK
            })
        );
        // The last whole chunk of a u64::MAX blob, and its short tail.
        let last = (u64::MAX / CHUNK) * CHUNK;
        assert_eq!(check_range(u64::MAX, last - CHUNK, CHUNK), Ok(()));
        assert_eq!(check_range(u64::MAX, last, u64::MAX - last), Ok(()));
        assert!(proof_len(u64::MAX, last, u64::MAX - last).unwrap() <= MAX_PROOF);
        // Ranges across the deepest splits of the largest blob come close.
        let mut longest = 0;
        for at in [1u64 << 63, 1 << 62, 3 << 62, (1 << 63) + (1 << 40)] {
            for before in 1..MAX_RANGE / CHUNK {
                let n = proof_len(u64::MAX, at - before * CHUNK, MAX_RANGE).unwrap();
                longest = longest.max(n);
            }
        }
        assert!(longest <= MAX_PROOF, "{longest}");
        assert!(longest > MAX_PROOF - 10 * CV_LEN, "{longest}");
    }

    #[test]
    fn picked_ranges_are_valid_and_spread() {
        let mut rng = Mix(7);
        for size in [1, 1023, 1024, 1025, 5000, 100_000, 16 << 20, u64::MAX] {
            for want in [0, 1, 1024, 1500, MAX_RANGE, u64::MAX] {
                let (offset, len) = pick_range(size, want, &mut rng);
                assert_eq!(check_range(size, offset, len), Ok(()), "{size} {want}");
                let rounded = want.div_ceil(CHUNK).clamp(1, MAX_RANGE / CHUNK) * CHUNK;
                assert!(len == rounded || offset + len == size);
            }
        }
        assert_eq!(pick_range(0, CHUNK, &mut rng), (0, 0));
        // Every start of a 10-chunk blob comes up.
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let (offset, _) = pick_range(10 * CHUNK, CHUNK, &mut rng);
            seen[(offset / CHUNK) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    proptest! {
        #[test]
        fn random_blobs_and_ranges_round_trip(
            size in 1usize..200_000,
            seed: u64,
            want in 0..MAX_RANGE + 2048,
            flip: usize,
        ) {
            let b = blob(size, seed);
            let r = root(&b);
            let (offset, len) = pick_range(size as u64, want, &mut Mix(seed));
            let p = round_trip(&b, &r, offset, len);
            let mut bad = p.clone();
            let bit = flip % (p.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(
                verify(&r, size as u64, offset, len, &bad),
                Err(ProofError::Mismatch)
            );
        }

        #[test]
        fn verifying_anything_never_panics(
            size: u64,
            offset: u64,
            len: u64,
            root: [u8; 32],
            proof in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let _ = verify(&root, size, offset, len, &proof);
            let _ = proof_len(size, offset, len);
        }

        #[test]
        fn verifying_a_forged_proof_of_the_right_length_fails(
            size in prop_oneof![1..u64::MAX, Just(u64::MAX), 1..1u64 << 20],
            seed: u64,
            want: u64,
            root: [u8; 32],
        ) {
            let (offset, len) = pick_range(size, want, &mut Mix(seed));
            let n = proof_len(size, offset, len).unwrap();
            prop_assert!(n <= MAX_PROOF);
            let mut forged = vec![0; n];
            Mix(seed ^ 1).fill_bytes(&mut forged);
            prop_assert_eq!(
                verify(&root, size, offset, len, &forged),
                Err(ProofError::Mismatch)
            );
        }
    }

    /// `cargo test --release -p pluto-protocol proof -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark: run it in release with --nocapture"]
    fn bench_proofs() {
        let size = 16usize << 20;
        let b = blob(size, 42);
        let r = root(&b);
        let s = size as u64;
        let mut rng = Mix(1);
        for want in [CHUNK, MAX_RANGE] {
            let ranges: Vec<(u64, u64)> = (0..16).map(|_| pick_range(s, want, &mut rng)).collect();
            let t = Instant::now();
            let proofs: Vec<Vec<u8>> = ranges
                .iter()
                .map(|&(o, l)| prove(&b, o, l).unwrap())
                .collect();
            let prove_ms = t.elapsed().as_secs_f64() * 1e3 / ranges.len() as f64;
            let (min, max) = proofs.iter().fold((usize::MAX, 0), |(lo, hi), p| {
                (lo.min(p.len()), hi.max(p.len()))
            });
            let rounds = 10_000;
            let t = Instant::now();
            for i in 0..rounds {
                let k = i % ranges.len();
                let (o, l) = ranges[k];
                let got = verify(&r, s, o, l, std::hint::black_box(&proofs[k])).unwrap();
                std::hint::black_box(got);
            }
            let verify_us = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
            println!(
                "16 MiB blob, {} KiB ranges: verify {verify_us:.2} µs/proof, \
                 proof {min}..={max} bytes on the wire, prove {prove_ms:.2} ms",
                want / CHUNK
            );
        }
        let t = Instant::now();
        std::hint::black_box(blake3::hash(&b));
        println!(
            "for scale: blake3::hash of the 16 MiB blob {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
