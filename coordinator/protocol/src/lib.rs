//! pluto's control protocol between nodes and the coordinator.
//!
//! The broker in between is an untrusted pipe: anyone who can publish may
//! try to impersonate, replay or read. So every control message travels in
//! an [`Envelope`] that is
//!
//! - **signed** with the sender's Ed25519 identity (the `from` field names
//!   the key, so nobody can speak for another node),
//! - **addressed** to one recipient (`to`), so a message to one party cannot
//!   be replayed to another,
//! - **timestamped and nonced**, so a [`ReplayGuard`] refuses stale,
//!   future-dated and repeated messages,
//! - and, when private, its body is **sealed to the recipient's X25519
//!   key** ([`seal_to`]), so only the recipient reads it.
//!
//! Everything here is pure: time and randomness are passed in.
//!
//! ```
//! use ed25519_dalek::SigningKey;
//! use pluto_protocol::{Envelope, Message, ReplayGuard};
//! # let mut rng = rand_core::OsRng;
//! let node = SigningKey::generate(&mut rng);
//! let coordinator = SigningKey::generate(&mut rng);
//! let to = pluto_plugins_api::NodeId(coordinator.verifying_key().to_bytes());
//! let env = Envelope::new(&node, to, 1_000, [7; 16], None, &Message::Hello);
//! let bytes = env.sign(&node).unwrap();
//! let got = Envelope::verify(&bytes).unwrap();
//! let mut guard = ReplayGuard::new(60_000, 100_000);
//! guard.check(&got, 1_500).unwrap();
//! assert!(guard.check(&got, 1_600).is_err(), "a replay is refused");
//! assert_eq!(got.message().unwrap(), Message::Hello);
//! ```

mod envelope;
mod messages;
mod private;
pub mod proof;
mod replay;
mod statement;
mod ticket;

pub use envelope::{Envelope, EnvelopeError, PrivateError, MAX_ENVELOPE, SEALED_BIT};
pub use messages::{
    AuditOutcome, ErrorCode, HeldReport, Message, NodeAddresses, PeerReport, ProofAnswer, Quota,
    RepairItem, RepairReason, StatusReport, MAX_ADDRESSES, MAX_HELD_REPORTS, MAX_REPAIRS,
};
pub use private::{exchange_public, open_sealed, seal_to, SealedError};
pub use replay::{Refused, ReplayGuard};
pub use statement::{delete_message, verify, ReplicaStatement};
pub use ticket::{Ticket, TicketError, SIGNED_TICKET_LEN, TICKET_LEN};

/// An Ed25519 identity key logging in to a broker that checks keys
/// ([`pluto_plugins_api::ChannelSigner`]): what nodes and the coordinator
/// give their channel.
pub struct KeySigner(pub ed25519_dalek::SigningKey);

impl pluto_plugins_api::ChannelSigner for KeySigner {
    fn id(&self) -> pluto_plugins_api::NodeId {
        pluto_plugins_api::NodeId(self.0.verifying_key().to_bytes())
    }
    fn sign(&self, message: &[u8]) -> [u8; 64] {
        ed25519_dalek::Signer::sign(&self.0, message).to_bytes()
    }
}
