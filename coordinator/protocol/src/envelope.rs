//! Signed, addressed, timestamped envelopes.
//!
//! ```text
//! envelope = version (u8 = 1) || kind (u8) || from (32) || to (32) || time_ms (u64 LE)
//!            || nonce (16) || reply_to (16, zero when none) || body (varint length, bytes)
//!            || signature (64)
//! signature = Ed25519(from, "pluto control v1\0" || BLAKE3(every byte before the signature))
//! ```
//!
//! The signature covers a BLAKE3 hash of the envelope rather than the
//! envelope itself: Ed25519 hashes what it signs with SHA-512, twice to sign
//! and once to verify, which made a relayed megabyte cost about 9 ms of CPU
//! across its four signatures; BLAKE3 first brings that to about 1 ms.
//!
//! The kind byte is that of the body's [`Message`]; it sits outside the body
//! so a router can dispatch without decoding. Signatures are verified
//! strictly (no malleable or small-order encodings).

use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use pluto_plugins_api::wire::{DecodeError, Reader, Writer};
use pluto_plugins_api::NodeId;

use x25519_dalek::StaticSecret;

use crate::messages::Message;
use crate::private::{open_sealed, seal_to, SealedError};

/// Why a private body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrivateError {
    /// The body is in the clear.
    #[error("expected a sealed body")]
    NotPrivate,
    /// It does not open.
    #[error(transparent)]
    Sealed(#[from] SealedError),
    /// It opens but does not decode.
    #[error(transparent)]
    Malformed(#[from] DecodeError),
}

const VERSION: u8 = 1;
/// Set in the kind byte when the body is sealed to the recipient.
pub const SEALED_BIT: u8 = 0x80;
const PRIVATE_AAD: &[u8] = b"pluto private v1\0";
const SIGNING_CONTEXT: &[u8] = b"pluto control v1\0";
/// The largest envelope anyone accepts (a manifest must fit in one).
pub const MAX_ENVELOPE: usize = 4 << 20;

/// What is signed: the context and a BLAKE3 hash of the envelope.
fn signing_input(signed: &[u8]) -> Vec<u8> {
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(blake3::hash(signed).as_bytes());
    msg
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Larger than [`MAX_ENVELOPE`].
    #[error("envelope of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Does not decode.
    #[error(transparent)]
    Malformed(#[from] DecodeError),
    /// A protocol version this build does not speak.
    #[error("unknown protocol version {0}")]
    Version(u8),
    /// `from` is not a valid Ed25519 public key.
    #[error("sender key is not a valid Ed25519 key")]
    BadKey,
    /// The signature does not verify under `from`.
    #[error("bad signature")]
    BadSignature,
    /// Signing with a key that is not `from`.
    #[error("signing key does not match the sender")]
    WrongSigner,
}

/// One control message in transit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The message kind (see [`Message::kind`]).
    pub kind: u8,
    /// Sender's identity.
    pub from: NodeId,
    /// Recipient's identity.
    pub to: NodeId,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Random, unique per message.
    pub nonce: [u8; 16],
    /// The nonce of the request this answers, if any.
    pub reply_to: Option<[u8; 16]>,
    /// The encoded message (possibly sealed to the recipient).
    pub body: Vec<u8>,
}

impl Envelope {
    /// An envelope carrying `msg` in the clear.
    pub fn new(
        from: &SigningKey,
        to: NodeId,
        time_ms: u64,
        nonce: [u8; 16],
        reply_to: Option<[u8; 16]>,
        msg: &Message,
    ) -> Self {
        Self {
            kind: msg.kind(),
            from: NodeId(from.verifying_key().to_bytes()),
            to,
            time_ms,
            nonce,
            reply_to,
            body: msg.encode(),
        }
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION);
        w.u8(self.kind);
        w.id(&self.from.0);
        w.id(&self.to.0);
        w.u64(self.time_ms);
        w.buf.extend_from_slice(&self.nonce);
        w.buf.extend_from_slice(&self.reply_to.unwrap_or([0; 16]));
        w.bytes(&self.body);
        w.finish()
    }

    /// Encodes and signs. The key must be the sender's.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, EnvelopeError> {
        if key.verifying_key().to_bytes() != self.from.0 {
            return Err(EnvelopeError::WrongSigner);
        }
        let mut bytes = self.signed_part();
        let sig = ed25519_dalek::Signer::sign(key, &signing_input(&bytes));
        bytes.extend_from_slice(&sig.to_bytes());
        if bytes.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes and verifies the signature against `from`. Says nothing
    /// about freshness: pass the result to a [`crate::ReplayGuard`].
    pub fn verify(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        if bytes.len() < 64 {
            return Err(DecodeError::new("envelope", "too short").into());
        }
        let (signed, sig) = bytes.split_at(bytes.len() - 64);
        let mut r = Reader::new(signed, "envelope");
        let version = r.u8()?;
        if version != VERSION {
            return Err(EnvelopeError::Version(version));
        }
        let kind = r.u8()?;
        let from = NodeId(r.id()?);
        let to = NodeId(r.id()?);
        let time_ms = r.u64()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(r.take(16)?);
        let mut reply = [0u8; 16];
        reply.copy_from_slice(r.take(16)?);
        let body = r.bytes()?.to_vec();
        r.finish()?;
        let key = VerifyingKey::from_bytes(&from.0).map_err(|_| EnvelopeError::BadKey)?;
        let mut sig_bytes = [0u8; 64];
        sig_bytes.copy_from_slice(sig);
        key.verify_strict(&signing_input(signed), &Signature::from_bytes(&sig_bytes))
            .map_err(|_| EnvelopeError::BadSignature)?;
        Ok(Self {
            kind,
            from,
            to,
            time_ms,
            nonce,
            reply_to: (reply != [0; 16]).then_some(reply),
            body,
        })
    }

    /// An envelope carrying `msg` sealed to the recipient's X25519 key:
    /// the broker and everyone but the recipient see only its kind.
    #[allow(clippy::too_many_arguments)]
    pub fn new_private(
        from: &SigningKey,
        to: NodeId,
        to_exchange_key: &[u8; 32],
        time_ms: u64,
        nonce: [u8; 16],
        reply_to: Option<[u8; 16]>,
        msg: &Message,
        rng: &mut impl rand_core::CryptoRngCore,
    ) -> Result<Self, SealedError> {
        let mut env = Self::new(from, to, time_ms, nonce, reply_to, msg);
        env.kind |= SEALED_BIT;
        env.body = seal_to(to_exchange_key, &env.private_aad(), &env.body, rng)?;
        Ok(env)
    }

    /// Whether the body is sealed to the recipient.
    pub fn is_private(&self) -> bool {
        self.kind & SEALED_BIT != 0
    }

    /// The header fields a sealed body is bound to.
    fn private_aad(&self) -> Vec<u8> {
        let mut aad = PRIVATE_AAD.to_vec();
        aad.push(self.kind);
        aad.extend_from_slice(&self.from.0);
        aad.extend_from_slice(&self.to.0);
        aad.extend_from_slice(&self.time_ms.to_le_bytes());
        aad.extend_from_slice(&self.nonce);
        aad.extend_from_slice(&self.reply_to.unwrap_or([0; 16]));
        aad
    }

    /// Opens a sealed body with the recipient's X25519 secret.
    pub fn open_private(&self, secret: &StaticSecret) -> Result<Message, PrivateError> {
        if !self.is_private() {
            return Err(PrivateError::NotPrivate);
        }
        let plain = open_sealed(secret, &self.private_aad(), &self.body)?;
        let m = Message::decode(&plain)?;
        if m.kind() | SEALED_BIT != self.kind {
            return Err(DecodeError::new("envelope", "kind does not match the body").into());
        }
        Ok(m)
    }

    /// Decodes the body as a message in the clear, checking it matches `kind`.
    pub fn message(&self) -> Result<Message, DecodeError> {
        if self.is_private() {
            return Err(DecodeError::new("envelope", "the body is sealed"));
        }
        let m = Message::decode(&self.body)?;
        if m.kind() != self.kind {
            return Err(DecodeError::new("envelope", "kind does not match the body"));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn sample() -> (SigningKey, Envelope) {
        let k = key(1);
        let to = NodeId(key(2).verifying_key().to_bytes());
        let e = Envelope::new(
            &k,
            to,
            42,
            [3; 16],
            Some([4; 16]),
            &Message::SetOffer { bytes: 9 },
        );
        (k, e)
    }

    #[test]
    fn round_trip() {
        let (k, e) = sample();
        let bytes = e.sign(&k).unwrap();
        let got = Envelope::verify(&bytes).unwrap();
        assert_eq!(got, e);
        assert_eq!(got.message().unwrap(), Message::SetOffer { bytes: 9 });
    }

    #[test]
    fn forgeries_are_refused() {
        let (k, e) = sample();
        let bytes = e.sign(&k).unwrap();
        // Any flipped bit: the signature fails (or the envelope no longer decodes).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(Envelope::verify(&b).is_err(), "bit flip at {i} accepted");
        }
        // Claiming to be someone else.
        let mut other = e.clone();
        other.from = NodeId(key(9).verifying_key().to_bytes());
        assert_eq!(other.sign(&k), Err(EnvelopeError::WrongSigner));
        let mut forged = bytes.clone();
        forged[2..34].copy_from_slice(&key(9).verifying_key().to_bytes());
        assert_eq!(Envelope::verify(&forged), Err(EnvelopeError::BadSignature));
        // Too large, truncated.
        assert!(matches!(
            Envelope::verify(&vec![0; MAX_ENVELOPE + 1]),
            Err(EnvelopeError::TooLarge(_))
        ));
        assert!(Envelope::verify(&bytes[..bytes.len() - 1]).is_err());
        // A body whose kind differs from the header's.
        let mut lying = e;
        lying.kind = Message::Hello.kind();
        let got = Envelope::verify(&lying.sign(&k).unwrap()).unwrap();
        assert!(got.message().is_err());
    }

    #[test]
    fn private_bodies_open_only_for_the_recipient() {
        use rand_core::OsRng;
        let (k, _) = sample();
        let bob = StaticSecret::random_from_rng(OsRng);
        let eve = StaticSecret::random_from_rng(OsRng);
        let to = NodeId(key(2).verifying_key().to_bytes());
        let msg = Message::Manifest {
            version: 3,
            blob: b"secret".to_vec(),
        };
        let bob_pub = crate::exchange_public(&bob);
        let env =
            Envelope::new_private(&k, to, &bob_pub, 5, [1; 16], None, &msg, &mut OsRng).unwrap();
        let got = Envelope::verify(&env.sign(&k).unwrap()).unwrap();
        assert!(got.is_private());
        assert!(
            !got.body.windows(6).any(|w| w == b"secret"),
            "sealed on the wire"
        );
        assert_eq!(got.open_private(&bob).unwrap(), msg);
        assert!(got.open_private(&eve).is_err());
        assert!(got.message().is_err(), "not readable as clear text");
        // The sealed body is bound to its header: moved under another nonce it fails.
        let mut moved = got.clone();
        moved.nonce = [2; 16];
        assert!(moved.open_private(&bob).is_err());
    }

    proptest! {
        #[test]
        fn verify_never_panics(data: Vec<u8>) {
            let _ = Envelope::verify(&data);
        }
    }
}
