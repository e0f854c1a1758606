//! Signed statements about one replica that a third party (the
//! coordinator) checks without seeing the bytes.
//!
//! A replica's *statement* names the owner, the storer, the pack, the
//! replica's size and its BLAKE3 root. Both ends sign it: the owner when it
//! sends the replica (the storer keeps that signature with the bytes), the
//! storer when it has checked and kept them (its *receipt*, which the owner
//! shows when it records the replica). The coordinator records a replica's
//! root only under both signatures, so audits are checked against a root
//! neither side chose alone: an owner cannot record a root the storer never
//! saw (and make an honest storer fail), and a storer reporting again to
//! books that lost it cannot name a root of bytes it made up.
//!
//! An owner's signed *delete* lets a storer drop a replica, and proves
//! later, to the coordinator, that it was the owner who asked.
//!
//! ```text
//! statement = "pluto replica v1\0" || owner (32) || storer (32) || pack (32) || size (u64 LE) || root (32)
//! delete    = "pluto delete v1\0"  || storer (32) || root (32) || at_ms (u64 LE)
//! each signed with Ed25519 by the party it speaks for
//! ```

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use pluto_plugins_api::{NodeId, PackId};

const REPLICA_DOMAIN: &[u8] = b"pluto replica v1\0";
const DELETE_DOMAIN: &[u8] = b"pluto delete v1\0";

/// What both ends of a placement sign about the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaStatement {
    /// Whose pack.
    pub owner: NodeId,
    /// Who keeps the replica.
    pub storer: NodeId,
    /// The pack.
    pub pack: PackId,
    /// The replica's size.
    pub size: u64,
    /// BLAKE3 of the replica's bytes.
    pub root: [u8; 32],
}

impl ReplicaStatement {
    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(REPLICA_DOMAIN.len() + 136);
        m.extend_from_slice(REPLICA_DOMAIN);
        m.extend_from_slice(&self.owner.0);
        m.extend_from_slice(&self.storer.0);
        m.extend_from_slice(&self.pack.0);
        m.extend_from_slice(&self.size.to_le_bytes());
        m.extend_from_slice(&self.root);
        m
    }

    /// Signs it (as the owner or as the storer).
    pub fn sign(&self, key: &SigningKey) -> [u8; 64] {
        key.sign(&self.message()).to_bytes()
    }

    /// Whether `signer` signed it.
    pub fn signed_by(&self, signer: &NodeId, signature: &[u8; 64]) -> bool {
        verify(signer, &self.message(), signature)
    }
}

/// The bytes an owner signs to have `storer` drop the replica `root`.
pub fn delete_message(storer: &NodeId, root: &[u8; 32], at_ms: u64) -> Vec<u8> {
    let mut m = DELETE_DOMAIN.to_vec();
    m.extend_from_slice(&storer.0);
    m.extend_from_slice(root);
    m.extend_from_slice(&at_ms.to_le_bytes());
    m
}

/// Whether `signer`'s key made `signature` over `message` (strict
/// verification: no malleable or small-order signatures).
pub fn verify(signer: &NodeId, message: &[u8], signature: &[u8; 64]) -> bool {
    VerifyingKey::from_bytes(&signer.0)
        .and_then(|k| k.verify_strict(message, &Signature::from_bytes(signature)))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_signer_and_the_same_statement_verify() {
        let owner = SigningKey::from_bytes(&[1; 32]);
        let storer = SigningKey::from_bytes(&[2; 32]);
        let s = ReplicaStatement {
            owner: NodeId(owner.verifying_key().to_bytes()),
            storer: NodeId(storer.verifying_key().to_bytes()),
            pack: PackId([3; 32]),
            size: 100,
            root: [4; 32],
        };
        let by_owner = s.sign(&owner);
        assert!(s.signed_by(&s.owner, &by_owner));
        assert!(!s.signed_by(&s.storer, &by_owner));
        let other = ReplicaStatement { root: [5; 32], ..s };
        assert!(!other.signed_by(&s.owner, &by_owner));
        let bigger = ReplicaStatement { size: 101, ..s };
        assert!(!bigger.signed_by(&s.owner, &by_owner));
        assert!(!s.signed_by(&NodeId([0; 32]), &by_owner));
        let del = delete_message(&s.storer, &s.root, 7);
        let sig = owner.sign(&del).to_bytes();
        assert!(verify(&s.owner, &del, &sig));
        assert!(!verify(
            &s.owner,
            &delete_message(&s.storer, &s.root, 8),
            &sig
        ));
    }
}
