//! Bodies sealed to one recipient's X25519 key.
//!
//! ```text
//! sealed = ephemeral public key (32) || nonce (12) || AES-256-GCM ciphertext || tag (16)
//! key    = BLAKE3.derive_key("pluto v1 sealed-to-node aes-256-gcm",
//!                            ephemeral public || recipient public || X25519 shared secret)
//! aad    = caller's associated data (the envelope's from, to, kind and nonce)
//! ```
//!
//! A fresh ephemeral key per message gives forward secrecy against a later
//! leak of the sender's keys; a shared secret from a low-order point is
//! refused.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand_core::CryptoRngCore;
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};

const KDF_CONTEXT: &str = "pluto v1 sealed-to-node aes-256-gcm";

/// Why a sealed body could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealedError {
    /// Too short to be a sealed body.
    #[error("sealed body too short")]
    Short,
    /// Wrong key, wrong associated data, or damaged.
    #[error("sealed body does not authenticate")]
    Auth,
    /// The sender's ephemeral key is degenerate.
    #[error("degenerate key exchange")]
    Degenerate,
}

/// The X25519 public key of a secret.
pub fn exchange_public(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

fn cipher(eph: &[u8; 32], recipient: &[u8; 32], shared: &[u8; 32]) -> Aes256Gcm {
    let mut material = [0u8; 96];
    material[..32].copy_from_slice(eph);
    material[32..64].copy_from_slice(recipient);
    material[64..].copy_from_slice(shared);
    Aes256Gcm::new(&blake3::derive_key(KDF_CONTEXT, &material).into())
}

/// Seals `plaintext` so only the holder of `recipient`'s secret opens it.
pub fn seal_to(
    recipient: &[u8; 32],
    aad: &[u8],
    plaintext: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, SealedError> {
    let eph = EphemeralSecret::random_from_rng(&mut *rng);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient));
    if !shared.was_contributory() {
        return Err(SealedError::Degenerate);
    }
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let ct = cipher(&eph_pub, recipient, shared.as_bytes())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SealedError::Auth)?;
    let mut out = Vec::with_capacity(44 + ct.len());
    out.extend_from_slice(&eph_pub);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens what [`seal_to`] sealed to `secret`'s public key.
pub fn open_sealed(
    secret: &StaticSecret,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, SealedError> {
    if sealed.len() < 32 + 12 + 16 {
        return Err(SealedError::Short);
    }
    let mut eph = [0u8; 32];
    eph.copy_from_slice(&sealed[..32]);
    let shared = secret.diffie_hellman(&PublicKey::from(eph));
    if !shared.was_contributory() {
        return Err(SealedError::Degenerate);
    }
    cipher(&eph, &exchange_public(secret), shared.as_bytes())
        .decrypt(
            Nonce::from_slice(&sealed[32..44]),
            Payload {
                msg: &sealed[44..],
                aad,
            },
        )
        .map_err(|_| SealedError::Auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn only_the_recipient_opens() {
        let alice = StaticSecret::random_from_rng(OsRng);
        let eve = StaticSecret::random_from_rng(OsRng);
        let sealed = seal_to(&exchange_public(&alice), b"aad", b"secret", &mut OsRng).unwrap();
        assert_eq!(open_sealed(&alice, b"aad", &sealed).unwrap(), b"secret");
        assert_eq!(open_sealed(&eve, b"aad", &sealed), Err(SealedError::Auth));
        assert_eq!(
            open_sealed(&alice, b"other", &sealed),
            Err(SealedError::Auth)
        );
        let mut flipped = sealed.clone();
        flipped[50] ^= 1;
        assert_eq!(
            open_sealed(&alice, b"aad", &flipped),
            Err(SealedError::Auth)
        );
        assert_eq!(
            open_sealed(&alice, b"aad", &sealed[..40]),
            Err(SealedError::Short)
        );
        // A low-order (all-zero) ephemeral key is refused.
        let mut zero = sealed;
        zero[..32].fill(0);
        assert_eq!(
            open_sealed(&alice, b"aad", &zero),
            Err(SealedError::Degenerate)
        );
        assert_eq!(
            seal_to(&[0; 32], b"", b"x", &mut OsRng),
            Err(SealedError::Degenerate)
        );
    }
}
