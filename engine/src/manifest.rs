//! Where this node's pack replicas live (the *placement*), and the signed,
//! encrypted *manifest* that carries it to the coordinator and to peers, so
//! that the 24 words are enough to find everything again.
//!
//! ```text
//! placement = "PLUTOPL1" || version (u64) || count (varint) ||
//!             count x (pack id (32) || size (u64) || n (u8) || n x (storer (32) || root (32)))
//! manifest  = body || Ed25519 signature (64) of the node over "pluto manifest v1\0" || body
//! body      = "PLUTOMF1" || owner (32) || version (u64) ||
//!             AES-256-GCM(metadata key, zstd(placement); AAD = the 48 bytes before)
//! ```
//!
//! Anybody can check that a manifest is its owner's and which version it is
//! ([`verify`]), so a storer keeps only the owner's own and newest one; only
//! the owner can read it. The pack list and every replica's root are inside,
//! and each pack's header (in the pack) lists its blobs: with the manifest,
//! the catalog can be rebuilt from the peers alone.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use pluto_plugins_api::wire::{DecodeError, Reader, Writer};
use pluto_plugins_api::{NodeId, PackId};

use crate::crypto::SealKey;

const PLACEMENT_MAGIC: &[u8; 8] = b"PLUTOPL1";
const MANIFEST_MAGIC: &[u8; 8] = b"PLUTOMF1";
const SIGN_DOMAIN: &[u8] = b"pluto manifest v1\0";
const BODY_HEAD: usize = 8 + 32 + 8;
/// Largest manifest accepted (a storer keeps one per owner).
pub const MAX_MANIFEST: usize = 15 << 20;

/// One replica of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Who holds it.
    pub storer: NodeId,
    /// BLAKE3 of its bytes.
    pub root: [u8; 32],
}

/// Where one pack's replicas are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackPlacement {
    /// The pack's size (every replica has it).
    pub size: u64,
    /// Confirmed replicas (stored, root checked by the storer).
    pub replicas: Vec<Replica>,
}

/// Where every pack of this node has replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Bumped at every change that is published.
    pub version: u64,
    /// By pack.
    pub packs: BTreeMap<PackId, PackPlacement>,
}

impl Placement {
    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.buf.extend_from_slice(PLACEMENT_MAGIC);
        w.u64(self.version);
        w.varint(self.packs.len() as u64);
        for (id, p) in &self.packs {
            w.id(&id.0);
            w.u64(p.size);
            w.u8(p.replicas.len().min(255) as u8);
            for r in p.replicas.iter().take(255) {
                w.id(&r.storer.0);
                w.id(&r.root);
            }
        }
        w.finish()
    }

    /// Decodes it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "placement");
        if r.take(8)? != PLACEMENT_MAGIC {
            return Err(r.error("not a placement"));
        }
        let version = r.u64()?;
        let n = r.count(41)?;
        let mut packs = BTreeMap::new();
        for _ in 0..n {
            let id = PackId(r.id()?);
            let size = r.u64()?;
            let k = r.u8()?;
            let replicas = (0..k)
                .map(|_| {
                    Ok(Replica {
                        storer: NodeId(r.id()?),
                        root: r.id()?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            packs.insert(id, PackPlacement { size, replicas });
        }
        r.finish()?;
        Ok(Self { version, packs })
    }

    /// Reads the placement file; an absent one is empty.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        match std::fs::read(path) {
            Ok(b) => Self::decode(&b).map_err(|source| ManifestError::Decode {
                path: path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ManifestError::Io {
                context: format!("reading {}", path.display()),
                source,
            }),
        }
    }

    /// Writes the placement file atomically.
    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        crate::home::write_atomic(path, &self.encode()).map_err(|source| ManifestError::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    }

    /// The signed, encrypted manifest of this placement.
    pub fn seal(&self, identity: &SigningKey, metadata: &SealKey) -> Vec<u8> {
        let owner = identity.verifying_key().to_bytes();
        let mut body = MANIFEST_MAGIC.to_vec();
        body.extend_from_slice(&owner);
        body.extend_from_slice(&self.version.to_le_bytes());
        let plain = zstd::bulk::compress(&self.encode(), 3).unwrap_or_else(|_| self.encode());
        let sealed = metadata.seal(&body, &plain);
        body.extend_from_slice(&sealed);
        let mut msg = SIGN_DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        body.extend_from_slice(&identity.sign(&msg).to_bytes());
        body
    }

    /// Opens a manifest of `owner`'s (signature first).
    pub fn open(owner: &NodeId, metadata: &SealKey, blob: &[u8]) -> Result<Self, ManifestError> {
        let version = verify(owner, blob).ok_or(ManifestError::NotSigned)?;
        let body = &blob[..blob.len() - 64];
        let plain = metadata
            .open(&body[..BODY_HEAD], &body[BODY_HEAD..])
            .map_err(|e| ManifestError::Sealed(e.to_string()))?;
        let raw =
            zstd::bulk::decompress(&plain, MAX_MANIFEST * 4).map_err(ManifestError::Decompress)?;
        let p = Self::decode(&raw).map_err(ManifestError::Malformed)?;
        if p.version != version {
            return Err(ManifestError::Versions);
        }
        Ok(p)
    }
}

/// Why a placement file or a manifest could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The placement file does not decode.
    #[error("{path}: {source}")]
    Decode {
        /// The file.
        path: String,
        /// Why.
        source: DecodeError,
    },
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest is not this node's, or its signature does not hold.
    #[error("the manifest is not signed by this node")]
    NotSigned,
    /// The manifest does not open with this node's metadata key.
    #[error("the manifest does not open: {0}")]
    Sealed(String),
    /// The opened manifest does not decompress.
    #[error("the manifest does not decompress: {0}")]
    Decompress(std::io::Error),
    /// The decompressed manifest does not decode.
    #[error("the manifest does not decode: {0}")]
    Malformed(DecodeError),
    /// The signed version and the sealed one differ.
    #[error("the manifest's versions disagree")]
    Versions,
}

/// The version of a manifest when it is `owner`'s and signed by it.
pub fn verify(owner: &NodeId, blob: &[u8]) -> Option<u64> {
    if blob.len() < BODY_HEAD + 64 || blob.len() > MAX_MANIFEST || &blob[..8] != MANIFEST_MAGIC {
        return None;
    }
    if blob[8..40] != owner.0 {
        return None;
    }
    let (body, sig) = blob.split_at(blob.len() - 64);
    let key = VerifyingKey::from_bytes(&owner.0).ok()?;
    let sig = Signature::from_bytes(&<[u8; 64]>::try_from(sig).ok()?);
    let mut msg = SIGN_DOMAIN.to_vec();
    msg.extend_from_slice(body);
    key.verify_strict(&msg, &sig).ok()?;
    let mut v = [0u8; 8];
    v.copy_from_slice(&blob[40..48]);
    Some(u64::from_le_bytes(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Placement {
        let mut p = Placement {
            version: 7,
            ..Placement::default()
        };
        p.packs.insert(
            PackId([1; 32]),
            PackPlacement {
                size: 100,
                replicas: vec![
                    Replica {
                        storer: NodeId([2; 32]),
                        root: [3; 32],
                    },
                    Replica {
                        storer: NodeId([4; 32]),
                        root: [5; 32],
                    },
                ],
            },
        );
        p.packs.insert(PackId([6; 32]), PackPlacement::default());
        p
    }

    #[test]
    fn placement_round_trips() {
        let p = sample();
        assert_eq!(Placement::decode(&p.encode()).unwrap(), p);
        let b = p.encode();
        for cut in [0, 8, 20, b.len() - 1] {
            assert!(Placement::decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn manifests_are_signed_and_sealed() {
        let id = SigningKey::from_bytes(&[9; 32]);
        let owner = NodeId(id.verifying_key().to_bytes());
        let key = SealKey::new(&[8; 32]);
        let p = sample();
        let m = p.seal(&id, &key);
        assert_eq!(verify(&owner, &m), Some(7));
        assert_eq!(Placement::open(&owner, &key, &m).unwrap(), p);
        // Another node's key, another reader's key, a flipped byte.
        assert_eq!(verify(&NodeId([1; 32]), &m), None);
        assert!(Placement::open(&owner, &SealKey::new(&[7; 32]), &m).is_err());
        for at in [0, 9, 41, 60, m.len() - 1] {
            let mut bad = m.clone();
            bad[at] ^= 1;
            assert!(Placement::open(&owner, &key, &bad).is_err(), "byte {at}");
        }
    }
}
