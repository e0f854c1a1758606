//! Challenge proofs: `verify` never panics on arbitrary claims and proofs,
//! and for small blobs whatever `prove` makes verifies to exactly the
//! range's bytes, and no longer does once any one bit of it changes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_plugins_api::PackId;
use pluto_protocol::proof::{self, ProofError, CHUNK, MAX_PROOF, MAX_RANGE};

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // size (8) || offset (8) || len (8) || root (32) || proof
        let Some((head, proof_bytes)) = rest.split_first_chunk::<56>() else {
            return;
        };
        let (size, offset, len) = (u64_at(head, 0), u64_at(head, 8), u64_at(head, 16));
        let mut root = [0; 32];
        root.copy_from_slice(&head[24..]);
        let _ = proof::verify(&root, size, offset, len, proof_bytes);
        // The same claim pulled into a range a challenge may name, so the
        // hashing runs too.
        let size = size.max(1);
        let offset = (offset % size) / CHUNK * CHUNK;
        let len = (len % MAX_RANGE + 1).min(size - offset);
        let len = if offset + len == size {
            len
        } else {
            len.div_ceil(CHUNK) * CHUNK
        };
        if let Ok(want) = proof::proof_len(size, offset, len) {
            assert!(want <= MAX_PROOF);
            let _ = proof::verify(&root, size, offset, len, proof_bytes);
        }
    } else {
        // start (2) || chunks (1) || flip (2) || blob
        let Some((pick, blob)) = rest.split_first_chunk::<5>() else {
            return;
        };
        if blob.is_empty() {
            return;
        }
        let size = blob.len() as u64;
        let offset =
            u64::from(u16::from_le_bytes([pick[0], pick[1]])) % size.div_ceil(CHUNK) * CHUNK;
        let len = ((u64::from(pick[2]) % (MAX_RANGE / CHUNK) + 1) * CHUNK).min(size - offset);
        let p = proof::prove(blob, offset, len).expect("a valid range proves");
        assert_eq!(Ok(p.len()), proof::proof_len(size, offset, len));
        let root = PackId::of(blob).0;
        let range = &blob[offset as usize..(offset + len) as usize];
        assert_eq!(proof::verify(&root, size, offset, len, &p), Ok(range));
        let mut bad = p.clone();
        let bit = usize::from(u16::from_le_bytes([pick[3], pick[4]])) % (bad.len() * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            proof::verify(&root, size, offset, len, &bad),
            Err(ProofError::Mismatch)
        );
    }
});
