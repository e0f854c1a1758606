//! The relay payload codec: pure encoding and decoding, no I/O, no keys.
//!
//! Public so that tests and fuzzers can feed it arbitrary bytes; the
//! transport is its only real user. Every payload the coordinator carries
//! for this transport is one of:
//!
//! ```text
//! header  = version (1) = 1 || kind (1) || session id (16)
//! HELLO   = header(kind 1) || initiator id (32) || responder id (32)
//!           || initiator X25519 ephemeral (32) || Ed25519 signature (64)
//! WELCOME = header(kind 2) || responder X25519 ephemeral (32) || Ed25519 signature (64)
//! SEALED  = header(kind 3) || packet number (u64 BE)
//!           || AES-256-GCM(plain) || tag (16)           aad = header || packet number
//! plain   = flags (1) || ack (u64) || max_data (u64) || n (1) || n x sack
//!           || [segment, when flags has SEGMENT]
//! sack    = first seq (u64) || end seq, exclusive (u64)
//! segment = seq (u64) || stream offset (u64) || segment flags (1) || data (rest)
//! ```
//!
//! All integers are big-endian. See `docs/relay.md` for what each field means.

use std::ops::Range;

/// The random id that names one link on both ends.
pub type SessionId = [u8; 16];

/// The only version this codec speaks.
pub const VERSION: u8 = 1;
/// Bytes of the common header.
pub const HEADER_LEN: usize = 18;
/// Bytes of a HELLO payload.
pub const HELLO_LEN: usize = HEADER_LEN + 32 + 32 + 32 + 64;
/// Bytes of a WELCOME payload.
pub const WELCOME_LEN: usize = HEADER_LEN + 32 + 64;
/// Bytes of a SEALED payload's cleartext header (common header and packet number).
pub const SEALED_HEADER_LEN: usize = HEADER_LEN + 8;
/// Bytes of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes of the fixed part of the plaintext (flags, ack, max_data, sack count).
pub const PLAIN_FIXED_LEN: usize = 1 + 8 + 8 + 1;
/// Bytes of one selective-ack range.
pub const SACK_LEN: usize = 16;
/// Bytes of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 8 + 8 + 1;
/// Most selective-ack ranges in one packet.
pub const MAX_SACKS: usize = 16;
/// What a SEALED payload carrying a segment (without sack ranges) adds to its data.
pub const DATA_OVERHEAD: usize = SEALED_HEADER_LEN + PLAIN_FIXED_LEN + SEGMENT_HEADER_LEN + TAG_LEN;

/// Plaintext flag: the sender asks for an acknowledgement (keepalive, probe).
pub const FLAG_PING: u8 = 1;
/// Plaintext flag: the sender has closed the link and forgets it.
pub const FLAG_CLOSE: u8 = 2;
/// Plaintext flag: a segment follows.
pub const FLAG_SEGMENT: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_PING | FLAG_CLOSE | FLAG_SEGMENT;

/// Segment flag: the segment ends a frame.
pub const SEG_END_OF_FRAME: u8 = 1;
/// Segment flag: the sender's end marker (no data; nothing follows it).
pub const SEG_FIN: u8 = 2;
/// Segment flag: the initiator's first segment, proving it holds the keys.
pub const SEG_OPEN: u8 = 4;
const KNOWN_SEG_FLAGS: u8 = SEG_END_OF_FRAME | SEG_FIN | SEG_OPEN;

/// What a payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The initiator's half of the handshake.
    Hello,
    /// The responder's half of the handshake.
    Welcome,
    /// Everything after the handshake, encrypted.
    Sealed,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::Welcome => 2,
            Kind::Sealed => 3,
        }
    }
}

/// Why bytes are not a relay payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the layout needs.
    #[error("payload too short")]
    Short,
    /// Another protocol version.
    #[error("unknown relay version {0}")]
    Version(u8),
    /// An unknown payload kind.
    #[error("unknown payload kind {0}")]
    Kind(u8),
    /// Bytes left over, unknown flags, impossible values.
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

/// The common header of every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What follows.
    pub kind: Kind,
    /// The link it belongs to.
    pub sid: SessionId,
}

fn array<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], WireError> {
    b.get(at..at + N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(WireError::Short)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, WireError> {
    array::<8>(b, at).map(u64::from_be_bytes)
}

fn put_header(out: &mut Vec<u8>, kind: Kind, sid: &SessionId) {
    out.push(VERSION);
    out.push(kind.byte());
    out.extend_from_slice(sid);
}

/// Reads the common header of any payload.
pub fn header(payload: &[u8]) -> Result<Header, WireError> {
    if payload.len() < HEADER_LEN {
        return Err(WireError::Short);
    }
    if payload[0] != VERSION {
        return Err(WireError::Version(payload[0]));
    }
    let kind = match payload[1] {
        1 => Kind::Hello,
        2 => Kind::Welcome,
        3 => Kind::Sealed,
        k => return Err(WireError::Kind(k)),
    };
    Ok(Header {
        kind,
        sid: array(payload, 2)?,
    })
}

const HELLO_LABEL: &[u8] = b"pluto relay v1 hello\0";
const WELCOME_LABEL: &[u8] = b"pluto relay v1 welcome\0";

/// The initiator's handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The session it opens.
    pub sid: SessionId,
    /// The initiator's node id (Ed25519 public key).
    pub initiator: [u8; 32],
    /// The node id it wants to reach.
    pub responder: [u8; 32],
    /// The initiator's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// The initiator's signature over [`Hello::transcript`].
    pub signature: [u8; 64],
}

impl Hello {
    /// What the initiator signs: label, session id, both ids, its ephemeral key.
    pub fn transcript(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(HELLO_LABEL.len() + 16 + 96);
        t.extend_from_slice(HELLO_LABEL);
        t.extend_from_slice(&self.sid);
        t.extend_from_slice(&self.initiator);
        t.extend_from_slice(&self.responder);
        t.extend_from_slice(&self.ephemeral);
        t
    }

    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_LEN);
        put_header(&mut out, Kind::Hello, &self.sid);
        out.extend_from_slice(&self.initiator);
        out.extend_from_slice(&self.responder);
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads a HELLO payload (exactly [`HELLO_LEN`] bytes).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let h = header(payload)?;
        if h.kind != Kind::Hello {
            return Err(WireError::Kind(payload[1]));
        }
        if payload.len() != HELLO_LEN {
            return Err(WireError::Malformed("hello length"));
        }
        Ok(Self {
            sid: h.sid,
            initiator: array(payload, HEADER_LEN)?,
            responder: array(payload, HEADER_LEN + 32)?,
            ephemeral: array(payload, HEADER_LEN + 64)?,
            signature: array(payload, HEADER_LEN + 96)?,
        })
    }
}

/// The responder's handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The session it answers.
    pub sid: SessionId,
    /// The responder's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// The responder's signature over [`Welcome::transcript`].
    pub signature: [u8; 64],
}

impl Welcome {
    /// What the responder signs: a label, the whole HELLO transcript, its
    /// ephemeral key. The session keys are derived from its hash.
    pub fn transcript(&self, hello: &Hello) -> Vec<u8> {
        let mut t = Vec::with_capacity(WELCOME_LABEL.len() + 200);
        t.extend_from_slice(WELCOME_LABEL);
        t.extend_from_slice(&hello.transcript());
        t.extend_from_slice(&self.ephemeral);
        t
    }

    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WELCOME_LEN);
        put_header(&mut out, Kind::Welcome, &self.sid);
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads a WELCOME payload (exactly [`WELCOME_LEN`] bytes).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let h = header(payload)?;
        if h.kind != Kind::Welcome {
            return Err(WireError::Kind(payload[1]));
        }
        if payload.len() != WELCOME_LEN {
            return Err(WireError::Malformed("welcome length"));
        }
        Ok(Self {
            sid: h.sid,
            ephemeral: array(payload, HEADER_LEN)?,
            signature: array(payload, HEADER_LEN + 32)?,
        })
    }
}

/// Writes a SEALED payload's cleartext header.
pub fn put_sealed_header(out: &mut Vec<u8>, sid: &SessionId, pn: u64) {
    put_header(out, Kind::Sealed, sid);
    out.extend_from_slice(&pn.to_be_bytes());
}

/// Reads a SEALED payload's session id and packet number, checking there is
/// room for a tag and the fixed plaintext.
pub fn sealed_header(payload: &[u8]) -> Result<(SessionId, u64), WireError> {
    let h = header(payload)?;
    if h.kind != Kind::Sealed {
        return Err(WireError::Kind(payload[1]));
    }
    if payload.len() < SEALED_HEADER_LEN + PLAIN_FIXED_LEN + TAG_LEN {
        return Err(WireError::Short);
    }
    Ok((h.sid, u64_at(payload, HEADER_LEN)?))
}

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Its place in the sender's sequence of segments.
    pub seq: u64,
    /// Its first byte's place in the sender's stream of data bytes.
    pub offset: u64,
    /// `SEG_*` flags.
    pub flags: u8,
}

/// The decrypted part of a SEALED payload, apart from segment data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plain {
    /// `FLAG_*` bits (`FLAG_SEGMENT` is set by [`Plain::encode_into`] from `segment`).
    pub flags: u8,
    /// The next segment sequence number the sender expects (all below arrived).
    pub ack: u64,
    /// The sender accepts stream bytes below this offset.
    pub max_data: u64,
    /// Ranges of segments received beyond `ack`, `[start, end)`.
    pub sacks: Vec<(u64, u64)>,
    /// The segment carried, if any; its data is the rest of the plaintext.
    pub segment: Option<SegmentHeader>,
}

impl Plain {
    /// Encoded bytes, not counting segment data.
    pub fn encoded_len(&self) -> usize {
        PLAIN_FIXED_LEN
            + SACK_LEN * self.sacks.len().min(MAX_SACKS)
            + if self.segment.is_some() {
                SEGMENT_HEADER_LEN
            } else {
                0
            }
    }

    /// Appends the encoding (without segment data) to `out`. Keeps at most
    /// [`MAX_SACKS`] ranges.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut flags = self.flags & (FLAG_PING | FLAG_CLOSE);
        if self.segment.is_some() {
            flags |= FLAG_SEGMENT;
        }
        out.push(flags);
        out.extend_from_slice(&self.ack.to_be_bytes());
        out.extend_from_slice(&self.max_data.to_be_bytes());
        let n = self.sacks.len().min(MAX_SACKS);
        out.push(n as u8);
        for (s, e) in &self.sacks[..n] {
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&e.to_be_bytes());
        }
        if let Some(seg) = &self.segment {
            out.extend_from_slice(&seg.seq.to_be_bytes());
            out.extend_from_slice(&seg.offset.to_be_bytes());
            out.push(seg.flags);
        }
    }

    /// Reads a plaintext; returns it and where segment data lies in `plain`.
    pub fn decode(plain: &[u8]) -> Result<(Self, Range<usize>), WireError> {
        let flags = *plain.first().ok_or(WireError::Short)?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::Malformed("unknown flags"));
        }
        let ack = u64_at(plain, 1)?;
        let max_data = u64_at(plain, 9)?;
        let n = *plain.get(17).ok_or(WireError::Short)? as usize;
        if n > MAX_SACKS {
            return Err(WireError::Malformed("too many sack ranges"));
        }
        let mut at = PLAIN_FIXED_LEN;
        let mut sacks = Vec::with_capacity(n);
        for _ in 0..n {
            let (s, e) = (u64_at(plain, at)?, u64_at(plain, at + 8)?);
            if s >= e {
                return Err(WireError::Malformed("empty sack range"));
            }
            sacks.push((s, e));
            at += SACK_LEN;
        }
        let segment = if flags & FLAG_SEGMENT != 0 {
            let seq = u64_at(plain, at)?;
            let offset = u64_at(plain, at + 8)?;
            let sflags = *plain.get(at + 16).ok_or(WireError::Short)?;
            if sflags & !KNOWN_SEG_FLAGS != 0 {
                return Err(WireError::Malformed("unknown segment flags"));
            }
            at += SEGMENT_HEADER_LEN;
            if sflags & (SEG_FIN | SEG_OPEN) != 0 && at != plain.len() {
                return Err(WireError::Malformed("data in a control segment"));
            }
            Some(SegmentHeader {
                seq,
                offset,
                flags: sflags,
            })
        } else {
            if at != plain.len() {
                return Err(WireError::Malformed("trailing bytes"));
            }
            None
        };
        Ok((
            Self {
                flags: flags & !FLAG_SEGMENT,
                ack,
                max_data,
                sacks,
                segment,
            },
            at..plain.len(),
        ))
    }
}

/// A payload as far as it can be read without keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A handshake opening.
    Hello(Hello),
    /// A handshake answer.
    Welcome(Welcome),
    /// An encrypted packet: its session and packet number.
    Sealed(SessionId, u64),
}

/// Reads whatever can be read of a payload without keys.
pub fn decode(payload: &[u8]) -> Result<Payload, WireError> {
    match header(payload)?.kind {
        Kind::Hello => Hello::decode(payload).map(Payload::Hello),
        Kind::Welcome => Welcome::decode(payload).map(Payload::Welcome),
        Kind::Sealed => sealed_header(payload).map(|(sid, pn)| Payload::Sealed(sid, pn)),
    }
}
