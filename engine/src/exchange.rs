//! What two nodes say over a link (any transport): an owner stores, reads
//! and deletes replicas at a storer, and keeps its manifest there.
//!
//! One request per link. Control frames are encoded messages; after
//! `Ready` (to a `Put`) or `Sending` (to a `Get`) the bytes of the replica
//! follow as raw frames, as many as the announced length, so a raw frame is
//! never read as a message.
//!
//! ```text
//! owner                                   storer
//! Put{ticket, pack, root, size,  ------>  ticket checked, owner's signature checked,
//!     attest, resume}                     room checked
//!                                <------  Ready | ReadyFrom{offset} (resume only)
//!                                         | Have{size, receipt} (already held) | Error
//! raw frames (size bytes, or     ------>  hashed as they come
//!   size - offset after ReadyFrom)
//!                                <------  Kept{receipt} (root matched, written, synced) | Error
//! Get{root, offset, len}         ------>  only the replica's owner
//!                                <------  Sending{len} + raw frames | Error
//! Delete{root, at_ms, signature} ------>  owner's signature, fresh
//!                                <------  Ok | Error
//! PutManifest{blob}              ------>  owner-signed, newer than kept
//! GetManifest                    ------>  Manifest{blob} | Error
//! ```
//!
//! A `Put` with `resume` set (kind 13; storers that predate it refuse the
//! kind as malformed, and the owner asks again without it) lets the storer
//! answer `ReadyFrom{offset}` when it kept the first `offset` bytes of the
//! same replica from a transfer that broke: only the rest is sent.
//!
//! `attest` and `receipt` are the owner's and the storer's signatures of
//! the replica's statement (owner, storer, pack, size, root:
//! [`pluto_protocol::ReplicaStatement`]); the coordinator records a replica
//! only with both, and audits it against that root.

use pluto_plugins_api::wire::{DecodeError, Reader, Writer};
use pluto_plugins_api::PackId;
pub use pluto_protocol::delete_message;

/// Largest raw frame a sender uses.
pub const DATA_FRAME: usize = 1 << 20;
/// Raw frames an owner sends a replica in: small enough that a frame
/// crosses even a slow, shared uplink well within the storer's patience
/// for a silent link (256 KiB take 33 s at 64 kbit/s).
pub const UPLOAD_FRAME: usize = 256 << 10;
/// Largest control frame (a manifest is the biggest).
pub const MAX_CONTROL: usize = 16 << 20;
/// Largest frame on a link.
pub const MAX_FRAME: usize = MAX_CONTROL + 64;

/// Why a storer refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum PeerError {
    /// Did not decode or broke the protocol.
    Malformed = 1,
    /// The ticket is not good (signature, storer, owner, deadline, pack, size).
    Ticket = 2,
    /// The storer has no room left.
    Full = 3,
    /// The bytes do not hash to the announced root.
    BadRoot = 4,
    /// Nothing of the asker's by that root.
    NotFound = 5,
    /// A signature does not verify, or its time is off.
    Unauthorized = 6,
    /// Too many links at once.
    Busy = 7,
    /// The storer failed.
    Internal = 8,
}

impl PeerError {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::Ticket,
            3 => Self::Full,
            4 => Self::BadRoot,
            5 => Self::NotFound,
            6 => Self::Unauthorized,
            7 => Self::Busy,
            8 => Self::Internal,
            _ => return None,
        })
    }
}

/// One control frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerMsg {
    /// Owner: keep this replica.
    Put {
        /// The coordinator's signed placement ticket.
        ticket: Vec<u8>,
        /// The pack it is a replica of.
        pack: PackId,
        /// BLAKE3 of the replica's bytes.
        root: [u8; 32],
        /// Its length.
        size: u64,
        /// The owner's signature of the replica's statement.
        attest: [u8; 64],
        /// The owner can resume: the storer may answer `ReadyFrom`.
        resume: bool,
    },
    /// Storer: send the bytes.
    Ready,
    /// Storer: the first `offset` bytes are here already; send the rest.
    ReadyFrom {
        /// Bytes kept from an earlier transfer.
        offset: u64,
    },
    /// Storer: already held for you, with this size.
    Have {
        /// Bytes.
        size: u64,
        /// The storer's signature of the replica's statement (with this size).
        receipt: [u8; 64],
    },
    /// Storer: the replica is checked and kept.
    Kept {
        /// The storer's signature of the replica's statement.
        receipt: [u8; 64],
    },
    /// Owner: send these bytes of a replica.
    Get {
        /// The replica.
        root: [u8; 32],
        /// First byte.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// Storer: this many bytes follow.
    Sending {
        /// Bytes.
        len: u64,
    },
    /// Owner: drop a replica.
    Delete {
        /// The replica.
        root: [u8; 32],
        /// When asked, ms since the epoch.
        at_ms: u64,
        /// The owner's Ed25519 signature ([`delete_message`]).
        signature: [u8; 64],
    },
    /// Owner: keep my (signed, encrypted) manifest.
    PutManifest {
        /// Its bytes.
        blob: Vec<u8>,
    },
    /// Owner: give my manifest back.
    GetManifest,
    /// Storer: the kept manifest.
    Manifest {
        /// Its bytes.
        blob: Vec<u8>,
    },
    /// Done.
    Ok,
    /// Refused.
    Error {
        /// Why, for programs.
        code: PeerError,
        /// Why, for people.
        message: String,
    },
}

fn signature(r: &mut Reader<'_>) -> Result<[u8; 64], DecodeError> {
    let mut s = [0u8; 64];
    s.copy_from_slice(r.take(64)?);
    Ok(s)
}

impl PeerMsg {
    /// An error answer.
    pub fn error(code: PeerError, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Self::Put {
                ticket,
                pack,
                root,
                size,
                attest,
                resume,
            } => {
                w.u8(if *resume { 13 } else { 1 });
                w.bytes(ticket);
                w.id(&pack.0);
                w.id(root);
                w.u64(*size);
                w.buf.extend_from_slice(attest);
            }
            Self::Ready => w.u8(2),
            Self::ReadyFrom { offset } => {
                w.u8(14);
                w.u64(*offset);
            }
            Self::Have { size, receipt } => {
                w.u8(3);
                w.u64(*size);
                w.buf.extend_from_slice(receipt);
            }
            Self::Kept { receipt } => {
                w.u8(12);
                w.buf.extend_from_slice(receipt);
            }
            Self::Get { root, offset, len } => {
                w.u8(4);
                w.id(root);
                w.u64(*offset);
                w.u64(*len);
            }
            Self::Sending { len } => {
                w.u8(5);
                w.u64(*len);
            }
            Self::Delete {
                root,
                at_ms,
                signature,
            } => {
                w.u8(6);
                w.id(root);
                w.u64(*at_ms);
                w.buf.extend_from_slice(signature);
            }
            Self::PutManifest { blob } => {
                w.u8(7);
                w.bytes(blob);
            }
            Self::GetManifest => w.u8(8),
            Self::Manifest { blob } => {
                w.u8(9);
                w.bytes(blob);
            }
            Self::Ok => w.u8(10),
            Self::Error { code, message } => {
                w.u8(11);
                w.u8(*code as u8);
                w.bytes(message.as_bytes());
            }
        }
        w.finish()
    }

    /// Decodes a control frame, refusing unknown kinds and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "peer message");
        let m = match r.u8()? {
            k @ (1 | 13) => Self::Put {
                ticket: r.bytes()?.to_vec(),
                pack: PackId(r.id()?),
                root: r.id()?,
                size: r.u64()?,
                attest: signature(&mut r)?,
                resume: k == 13,
            },
            2 => Self::Ready,
            14 => Self::ReadyFrom { offset: r.u64()? },
            3 => Self::Have {
                size: r.u64()?,
                receipt: signature(&mut r)?,
            },
            12 => Self::Kept {
                receipt: signature(&mut r)?,
            },
            4 => Self::Get {
                root: r.id()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            5 => Self::Sending { len: r.u64()? },
            6 => Self::Delete {
                root: r.id()?,
                at_ms: r.u64()?,
                signature: signature(&mut r)?,
            },
            7 => Self::PutManifest {
                blob: r.bytes()?.to_vec(),
            },
            8 => Self::GetManifest,
            9 => Self::Manifest {
                blob: r.bytes()?.to_vec(),
            },
            10 => Self::Ok,
            11 => {
                let c = r.u8()?;
                Self::Error {
                    code: PeerError::from_u8(c)
                        .ok_or_else(|| r.error(format!("error code {c}")))?,
                    message: r.string()?,
                }
            }
            k => return Err(r.error(format!("unknown peer message kind {k}"))),
        };
        r.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_message_round_trips() {
        let all = [
            PeerMsg::Put {
                ticket: vec![1; 176],
                pack: PackId([2; 32]),
                root: [3; 32],
                size: 4,
                attest: [13; 64],
                resume: false,
            },
            PeerMsg::Put {
                ticket: vec![1; 176],
                pack: PackId([2; 32]),
                root: [3; 32],
                size: 4,
                attest: [13; 64],
                resume: true,
            },
            PeerMsg::Ready,
            PeerMsg::ReadyFrom { offset: 77 },
            PeerMsg::Have {
                size: 9,
                receipt: [14; 64],
            },
            PeerMsg::Kept { receipt: [15; 64] },
            PeerMsg::Get {
                root: [5; 32],
                offset: 6,
                len: 7,
            },
            PeerMsg::Sending { len: 8 },
            PeerMsg::Delete {
                root: [9; 32],
                at_ms: 10,
                signature: [11; 64],
            },
            PeerMsg::PutManifest { blob: vec![12; 3] },
            PeerMsg::GetManifest,
            PeerMsg::Manifest { blob: vec![] },
            PeerMsg::Ok,
            PeerMsg::error(PeerError::Full, "no room"),
        ];
        for m in all {
            assert_eq!(PeerMsg::decode(&m.encode()).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PeerMsg::decode(&data);
        }
    }
}
