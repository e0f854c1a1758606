//! The handshake and the per-direction packet protection. Pure: randomness
//! (session id, ephemeral secrets) is passed in.
//!
//! ```text
//! initiator I                                   responder R
//! HELLO  sid, I, R, eI, sigI(T1)        ---->   checks sigI with I's key, R is itself
//!        <----   WELCOME sid, eR, sigR(T2)
//! checks sigR with R's key
//! T1 = "pluto relay v1 hello\0" || sid || I || R || eI
//! T2 = "pluto relay v1 welcome\0" || T1 || eR
//! k_IR || k_RI = BLAKE3-XOF(derive_key "pluto v1 relay keys", X25519(e, e') || BLAKE3(T2))
//! ```
//!
//! The responder learns that I is *live* (holds eI's secret) only from the
//! first packet that opens under k_IR, so a replayed HELLO never yields a link.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use pluto_plugins_api::NodeId;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::wire::{self, Hello, Plain, SessionId, Welcome, WireError};

const KDF_CONTEXT: &str = "pluto v1 relay keys";

/// Why a handshake message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("the signature does not verify")]
    Signature,
    #[error("degenerate key exchange")]
    Degenerate,
}

/// Which end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Initiator,
    Responder,
}

/// Both direction keys of a session, as seen by one end.
pub(crate) struct Keys {
    pub(crate) seal: Sealer,
    pub(crate) open: Opener,
}

fn verify(node: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Result<(), HandshakeError> {
    let key = VerifyingKey::from_bytes(node).map_err(|_| HandshakeError::Signature)?;
    key.verify_strict(msg, &Signature::from_bytes(sig))
        .map_err(|_| HandshakeError::Signature)
}

fn derive(
    role: Role,
    sid: SessionId,
    mine: &StaticSecret,
    theirs: &[u8; 32],
    t2: &[u8],
) -> Result<Keys, HandshakeError> {
    let shared = mine.diffie_hellman(&PublicKey::from(*theirs));
    if !shared.was_contributory() {
        return Err(HandshakeError::Degenerate);
    }
    let mut kdf = blake3::Hasher::new_derive_key(KDF_CONTEXT);
    kdf.update(shared.as_bytes());
    kdf.update(blake3::hash(t2).as_bytes());
    let mut okm = [0u8; 64];
    kdf.finalize_xof().fill(&mut okm);
    let k_ir = Aes256Gcm::new_from_slice(&okm[..32]).map_err(|_| HandshakeError::Degenerate)?;
    let k_ri = Aes256Gcm::new_from_slice(&okm[32..]).map_err(|_| HandshakeError::Degenerate)?;
    okm.fill(0);
    let (seal, open) = match role {
        Role::Initiator => ((k_ir, 0), (k_ri, 1)),
        Role::Responder => ((k_ri, 1), (k_ir, 0)),
    };
    Ok(Keys {
        seal: Sealer {
            cipher: seal.0,
            dir: seal.1,
            sid,
            next_pn: 0,
        },
        open: Opener {
            cipher: open.0,
            dir: open.1,
            window: ReplayWindow::default(),
        },
    })
}

/// The initiator's HELLO to `peer`.
pub(crate) fn hello(
    me: &SigningKey,
    peer: &NodeId,
    sid: SessionId,
    ephemeral: &StaticSecret,
) -> Hello {
    let mut h = Hello {
        sid,
        initiator: me.verifying_key().to_bytes(),
        responder: peer.0,
        ephemeral: PublicKey::from(ephemeral).to_bytes(),
        signature: [0; 64],
    };
    h.signature = me.sign(&h.transcript()).to_bytes();
    h
}

/// Whether a HELLO is signed by the initiator it names.
pub(crate) fn verify_hello(h: &Hello) -> Result<(), HandshakeError> {
    verify(&h.initiator, &h.transcript(), &h.signature)
}

/// The responder's answer to a verified HELLO, and its keys.
pub(crate) fn respond(
    me: &SigningKey,
    hello: &Hello,
    ephemeral: &StaticSecret,
) -> Result<(Welcome, Keys), HandshakeError> {
    let mut w = Welcome {
        sid: hello.sid,
        ephemeral: PublicKey::from(ephemeral).to_bytes(),
        signature: [0; 64],
    };
    let t2 = w.transcript(hello);
    w.signature = me.sign(&t2).to_bytes();
    let keys = derive(Role::Responder, hello.sid, ephemeral, &hello.ephemeral, &t2)?;
    Ok((w, keys))
}

/// The initiator's keys once `welcome` proved `peer`'s key.
pub(crate) fn complete(
    hello: &Hello,
    ephemeral: &StaticSecret,
    welcome: &Welcome,
    peer: &NodeId,
) -> Result<Keys, HandshakeError> {
    let t2 = welcome.transcript(hello);
    verify(&peer.0, &t2, &welcome.signature)?;
    derive(
        Role::Initiator,
        hello.sid,
        ephemeral,
        &welcome.ephemeral,
        &t2,
    )
}

fn nonce(dir: u8, pn: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = dir;
    n[4..].copy_from_slice(&pn.to_be_bytes());
    n
}

/// Encrypts this end's packets.
pub(crate) struct Sealer {
    cipher: Aes256Gcm,
    dir: u8,
    sid: SessionId,
    next_pn: u64,
}

impl Sealer {
    /// A SEALED payload carrying `plain` and `data`, under the next packet number.
    pub(crate) fn seal(&mut self, plain: &Plain, data: &[u8]) -> Option<Vec<u8>> {
        let pn = self.next_pn;
        self.next_pn = pn.checked_add(1)?;
        let mut out = Vec::with_capacity(
            wire::SEALED_HEADER_LEN + plain.encoded_len() + data.len() + wire::TAG_LEN,
        );
        wire::put_sealed_header(&mut out, &self.sid, pn);
        plain.encode_into(&mut out);
        out.extend_from_slice(data);
        let (aad, body) = out.split_at_mut(wire::SEALED_HEADER_LEN);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce(self.dir, pn)), aad, body)
            .ok()?;
        out.extend_from_slice(&tag);
        Some(out)
    }
}

/// Why a SEALED payload was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Not a well-formed SEALED payload (anyone could have sent it).
    Wire(WireError),
    /// Does not authenticate under the session key (forged, altered).
    Auth,
    /// A packet number already seen or too old.
    Replay,
    /// Authenticated, but the plaintext is malformed: the peer broke the protocol.
    Violation(WireError),
}

/// Decrypts the peer's packets and refuses replays.
pub(crate) struct Opener {
    cipher: Aes256Gcm,
    dir: u8,
    window: ReplayWindow,
}

impl Opener {
    /// The plaintext header and the segment data of a SEALED payload.
    pub(crate) fn open(&mut self, mut payload: Vec<u8>) -> Result<(Plain, Vec<u8>), OpenError> {
        let (_, pn) = wire::sealed_header(&payload).map_err(OpenError::Wire)?;
        if !self.window.fresh(pn) {
            return Err(OpenError::Replay);
        }
        let tag_at = payload.len() - wire::TAG_LEN;
        let tag = *Tag::from_slice(&payload[tag_at..]);
        let (aad, body) = payload[..tag_at].split_at_mut(wire::SEALED_HEADER_LEN);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(&nonce(self.dir, pn)), aad, body, &tag)
            .map_err(|_| OpenError::Auth)?;
        self.window.mark(pn);
        let (plain, data) = Plain::decode(body).map_err(OpenError::Violation)?;
        payload.truncate(wire::SEALED_HEADER_LEN + data.end);
        payload.drain(..wire::SEALED_HEADER_LEN + data.start);
        Ok((plain, payload))
    }
}

/// Packet numbers seen: the highest and a bitmap of the 128 below it.
#[derive(Default)]
pub(crate) struct ReplayWindow {
    highest: Option<u64>,
    bits: u128,
}

impl ReplayWindow {
    /// Whether `pn` has not been seen and is not too old.
    pub(crate) fn fresh(&self, pn: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if pn > h => true,
            Some(h) => {
                let d = h - pn;
                d < 128 && self.bits & (1u128 << d) == 0
            }
        }
    }

    /// Records `pn` as seen.
    pub(crate) fn mark(&mut self, pn: u64) {
        match self.highest {
            Some(h) if pn <= h => {
                let d = h - pn;
                if d < 128 {
                    self.bits |= 1u128 << d;
                }
            }
            Some(h) => {
                let shift = pn - h;
                self.bits = if shift >= 128 { 0 } else { self.bits << shift };
                self.bits |= 1;
                self.highest = Some(pn);
            }
            None => {
                self.bits = 1;
                self.highest = Some(pn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand_core::OsRng;

    fn pair() -> (Keys, Keys, SigningKey, SigningKey) {
        let a = SigningKey::generate(&mut OsRng);
        let b = SigningKey::generate(&mut OsRng);
        let (ea, eb) = (
            StaticSecret::random_from_rng(OsRng),
            StaticSecret::random_from_rng(OsRng),
        );
        let b_id = NodeId(b.verifying_key().to_bytes());
        let h = hello(&a, &b_id, [7; 16], &ea);
        verify_hello(&h).unwrap();
        let (w, kb) = respond(&b, &h, &eb).unwrap();
        let ka = complete(&h, &ea, &w, &b_id).unwrap();
        (ka, kb, a, b)
    }

    #[test]
    fn both_ends_agree_and_replays_are_refused() {
        let (mut ka, mut kb, _, _) = pair();
        let plain = Plain {
            ack: 3,
            max_data: 9,
            segment: Some(wire::SegmentHeader {
                seq: 1,
                offset: 2,
                flags: wire::SEG_END_OF_FRAME,
            }),
            ..Plain::default()
        };
        let p = ka.seal.seal(&plain, b"hello").unwrap();
        let (got, data) = kb.open.open(p.clone()).unwrap();
        assert_eq!((got, data.as_slice()), (plain.clone(), &b"hello"[..]));
        assert_eq!(kb.open.open(p.clone()), Err(OpenError::Replay));
        // A packet sealed for the other direction does not open here.
        let _ = kb.seal.seal(&plain, b"x").unwrap();
        let back = kb.seal.seal(&plain, b"x").unwrap();
        assert_eq!(kb.open.open(back.clone()).unwrap_err(), OpenError::Auth);
        assert!(ka.open.open(back).is_ok());
        let mut flipped = ka.seal.seal(&plain, b"abc").unwrap();
        let last = flipped.len() - 20;
        flipped[last] ^= 1;
        assert_eq!(kb.open.open(flipped), Err(OpenError::Auth));
    }

    #[test]
    fn a_welcome_from_another_key_is_refused() {
        let a = SigningKey::generate(&mut OsRng);
        let b = SigningKey::generate(&mut OsRng);
        let mallory = SigningKey::generate(&mut OsRng);
        let ea = StaticSecret::random_from_rng(OsRng);
        let b_id = NodeId(b.verifying_key().to_bytes());
        let h = hello(&a, &b_id, [1; 16], &ea);
        let (w, _) = respond(&mallory, &h, &StaticSecret::random_from_rng(OsRng)).unwrap();
        assert_eq!(
            complete(&h, &ea, &w, &b_id).err(),
            Some(HandshakeError::Signature)
        );
        let mut forged = h.clone();
        forged.ephemeral[0] ^= 1;
        assert!(verify_hello(&forged).is_err());
    }

    #[test]
    fn the_replay_window_slides() {
        let mut w = ReplayWindow::default();
        for pn in [5, 3, 200, 199, 100] {
            assert!(w.fresh(pn), "{pn}");
            w.mark(pn);
            assert!(!w.fresh(pn));
        }
        assert!(!w.fresh(3), "older than the window");
        assert!(w.fresh(198));
    }
}
