//! Placement tickets: the coordinator's signed word that an owner may store
//! one replica of one pack, of up to `size` bytes, on a storer until a
//! deadline.
//!
//! A match answers with one ticket per storer. The owner shows the ticket
//! to the storer, which checks it offline against the coordinator key it
//! pinned: the signature, that it names the storer itself and the owner at
//! the other end of the link, and that it has not lapsed; it then keeps the
//! ticket with the replica, so one ticket covers one replica. Naming the
//! pack also binds what a storer may report again to books that lost it:
//! one replica per ticket, never invented ones.
//!
//! ```text
//! ticket = owner (32) || storer (32) || size (u64 LE) || expires_ms (u64 LE) || pack (32)
//! signed = ticket || Ed25519(coordinator, "pluto ticket v1\0" || ticket)
//! ```

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use pluto_plugins_api::{NodeId, PackId};

const DOMAIN: &[u8] = b"pluto ticket v1\0";
/// Encoded size of a ticket without its signature.
pub const TICKET_LEN: usize = 32 + 32 + 8 + 8 + 32;
/// Encoded size of a signed ticket.
pub const SIGNED_TICKET_LEN: usize = TICKET_LEN + 64;

/// What a ticket allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Who may store.
    pub owner: NodeId,
    /// On whom.
    pub storer: NodeId,
    /// Bytes at most.
    pub size: u64,
    /// Until when (ms since the epoch), the reservation's deadline.
    pub expires_ms: u64,
    /// The pack whose replica it is for.
    pub pack: PackId,
}

/// Why a ticket is not good.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TicketError {
    /// Not the length of a signed ticket.
    #[error("a ticket of {0} bytes (a signed ticket has {SIGNED_TICKET_LEN})")]
    Length(usize),
    /// Not signed by the coordinator.
    #[error("the ticket is not signed by the coordinator")]
    Signature,
    /// For another storer.
    #[error("the ticket is for storer {0}")]
    OtherStorer(NodeId),
    /// Shown by someone else than its owner.
    #[error("the ticket belongs to {0}")]
    OtherOwner(NodeId),
    /// Past its deadline.
    #[error("the ticket lapsed at {0} ms")]
    Lapsed(u64),
}

impl Ticket {
    fn encode(&self) -> [u8; TICKET_LEN] {
        let mut b = [0u8; TICKET_LEN];
        b[..32].copy_from_slice(&self.owner.0);
        b[32..64].copy_from_slice(&self.storer.0);
        b[64..72].copy_from_slice(&self.size.to_le_bytes());
        b[72..80].copy_from_slice(&self.expires_ms.to_le_bytes());
        b[80..].copy_from_slice(&self.pack.0);
        b
    }

    /// Its identity (BLAKE3 of its fields), for counting what it was used for.
    pub fn id(&self) -> [u8; 32] {
        *blake3::hash(&self.encode()).as_bytes()
    }

    /// Signs it as the coordinator.
    pub fn sign(&self, coordinator: &SigningKey) -> Vec<u8> {
        let body = self.encode();
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        let sig = coordinator.sign(&msg);
        let mut out = body.to_vec();
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    /// Reads a signed ticket and checks its signature against `coordinator`.
    pub fn verify(bytes: &[u8], coordinator: &NodeId) -> Result<Self, TicketError> {
        if bytes.len() != SIGNED_TICKET_LEN {
            return Err(TicketError::Length(bytes.len()));
        }
        let (body, sig) = bytes.split_at(TICKET_LEN);
        let key = VerifyingKey::from_bytes(&coordinator.0).map_err(|_| TicketError::Signature)?;
        let sig = <[u8; 64]>::try_from(sig).map_err(|_| TicketError::Signature)?;
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(body);
        key.verify_strict(&msg, &Signature::from_bytes(&sig))
            .map_err(|_| TicketError::Signature)?;
        Ok(Self::parse_body(body))
    }

    /// Reads a signed ticket without checking its signature (one the
    /// storer checked on receipt and kept on its own disk).
    pub fn parse_unverified(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == SIGNED_TICKET_LEN).then(|| Self::parse_body(&bytes[..TICKET_LEN]))
    }

    fn parse_body(body: &[u8]) -> Self {
        let id = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&body[r]);
            a
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(a)
        };
        Self {
            owner: NodeId(id(0..32)),
            storer: NodeId(id(32..64)),
            size: u64_at(64),
            expires_ms: u64_at(72),
            pack: PackId(id(80..112)),
        }
    }

    /// The storer's whole check: signed by `coordinator`, for `me`, shown
    /// by its owner `peer`, not lapsed at `now_ms`.
    pub fn check(
        bytes: &[u8],
        coordinator: &NodeId,
        me: &NodeId,
        peer: &NodeId,
        now_ms: u64,
    ) -> Result<Self, TicketError> {
        let t = Self::verify(bytes, coordinator)?;
        if t.storer != *me {
            return Err(TicketError::OtherStorer(t.storer));
        }
        if t.owner != *peer {
            return Err(TicketError::OtherOwner(t.owner));
        }
        if t.expires_ms <= now_ms {
            return Err(TicketError::Lapsed(t.expires_ms));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    #[test]
    fn a_ticket_is_good_only_for_its_storer_owner_and_time() {
        let c = SigningKey::generate(&mut OsRng);
        let cid = NodeId(c.verifying_key().to_bytes());
        let (owner, storer) = (NodeId([1; 32]), NodeId([2; 32]));
        let t = Ticket {
            owner,
            storer,
            size: 16 << 20,
            expires_ms: 1_000,
            pack: PackId([3; 32]),
        };
        let b = t.sign(&c);
        assert_eq!(Ticket::check(&b, &cid, &storer, &owner, 999), Ok(t));
        assert_eq!(
            Ticket::check(&b, &cid, &owner, &owner, 999),
            Err(TicketError::OtherStorer(storer))
        );
        assert_eq!(
            Ticket::check(&b, &cid, &storer, &NodeId([9; 32]), 999),
            Err(TicketError::OtherOwner(owner))
        );
        assert_eq!(
            Ticket::check(&b, &cid, &storer, &owner, 1_000),
            Err(TicketError::Lapsed(1_000))
        );
        // Signed by someone else, or changed after signing.
        let other = SigningKey::generate(&mut OsRng);
        assert_eq!(
            Ticket::check(&t.sign(&other), &cid, &storer, &owner, 0),
            Err(TicketError::Signature)
        );
        let mut bigger = b.clone();
        bigger[64] ^= 0x80;
        assert_eq!(
            Ticket::check(&bigger, &cid, &storer, &owner, 0),
            Err(TicketError::Signature)
        );
        assert_eq!(
            Ticket::check(&b[1..], &cid, &storer, &owner, 0),
            Err(TicketError::Length(SIGNED_TICKET_LEN - 1))
        );
        let again = Ticket {
            pack: PackId([4; 32]),
            ..t
        };
        assert_ne!(t.id(), again.id(), "every ticket counts on its own");
    }

    proptest! {
        #[test]
        fn verifying_never_panics(data: Vec<u8>, key: [u8; 32]) {
            let _ = Ticket::verify(&data, &NodeId(key));
        }
    }
}
