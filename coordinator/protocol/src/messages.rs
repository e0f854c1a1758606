//! The messages nodes and the coordinator exchange, and their encodings.
//!
//! ```text
//! message = kind (u8) || fields, in the order declared, with the wire codec:
//!           u64 as 8 bytes LE, u8 as 1 byte, ids as 32 bytes,
//!           lists and byte strings as varint count or length first
//! ```

use pluto_plugins_api::wire::{DecodeError, Reader, Writer};
use pluto_plugins_api::{NodeId, PackId};

/// Most node ids a list in one message may hold.
const MAX_IDS: usize = 1024;
/// Most addresses a node may announce, and the longest one.
pub const MAX_ADDRESSES: usize = 16;
const MAX_ADDRESS_LEN: usize = 256;
/// Most held replicas one [`Message::ReportHeld`] carries.
pub const MAX_HELD_REPORTS: usize = 512;
/// Encoded size of one [`PeerReport`].
const PEER_REPORT_LEN: usize = 32 + 1 + 8 + 2 + 4 + 8 + 4 + 8 + 2 * 3 + 8 * 4 + 1;
/// Most entries in one [`Message::Repairs`].
pub const MAX_REPAIRS: usize = 16_384;

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Did not decode.
    Malformed = 1,
    /// Not authenticated (no valid `Auth` yet).
    Unauthenticated = 2,
    /// Stale, future-dated or replayed.
    NotFresh = 3,
    /// Understood but not allowed.
    Refused = 4,
    /// Nothing there.
    NotFound = 5,
    /// A manifest version not newer than the one kept.
    StaleVersion = 6,
    /// Not enough storers with free space.
    NoCapacity = 7,
    /// Too much at once.
    Busy = 8,
    /// The coordinator failed.
    Internal = 9,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::Unauthenticated,
            3 => Self::NotFresh,
            4 => Self::Refused,
            5 => Self::NotFound,
            6 => Self::StaleVersion,
            7 => Self::NoCapacity,
            8 => Self::Busy,
            9 => Self::Internal,
            _ => return None,
        })
    }
}

/// What the coordinator's books say about one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// Bytes the node offers to others.
    pub offered: u64,
    /// Bytes others placed on the node.
    pub held: u64,
    /// Bytes the node placed on others, every replica counted.
    pub placed: u64,
    /// Nodes the node stores with or for.
    pub peers: u32,
    /// What the node may place in all (the grant plus `earned`, within its
    /// offer), and what it is proven to hold for others; absent from
    /// coordinators that predate earned quotas.
    pub quota: Option<Quota>,
}

/// What a node may place, in a [`StatusReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Bytes it may place on others in all.
    pub may_place: u64,
    /// Bytes it holds for others in replicas that passed an audit.
    pub earned: u64,
    /// The grant every node gets.
    pub grant: u64,
}

/// One peer in a [`Message::Peers`] answer: a node that stores for the
/// asker, or one the asker stores for, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerReport {
    /// The peer.
    pub id: NodeId,
    /// Whether its channel is connected now.
    pub online: bool,
    /// When it was last heard from, ms since the epoch.
    pub last_seen_ms: u64,
    /// Its online fraction over the coordinator's uptime window (or its
    /// life, when younger), in thousandths; None while it is too new to
    /// have a record. On the wire: flag bit 2 set and 0 in the field.
    pub uptime_permille: Option<u16>,
    /// Replicas of the asker's packs it holds.
    pub replicas_held: u32,
    /// Their bytes.
    pub bytes_held: u64,
    /// Replicas of its packs the asker holds.
    pub replicas_stored: u32,
    /// Their bytes.
    pub bytes_stored: u64,
    /// Its audit score (right answers), in thousandths.
    pub audit_permille: u16,
    /// Its score for answering audits in time, in thousandths.
    pub timeout_permille: u16,
    /// Its uptime score (recent time online weighs most), in thousandths.
    pub uptime_score_permille: u16,
    /// Its transfer speed as owners measured it, bytes per second (0: none).
    pub speed_bps: u64,
    /// Audits it passed.
    pub audits_passed: u64,
    /// Audits it failed.
    pub audits_failed: u64,
    /// Audits it let lapse while online.
    pub audits_timed_out: u64,
    /// Excluded for failing audits: it gets no new data, and what it holds
    /// is placed elsewhere.
    pub excluded: bool,
    /// Below a minimum (uptime, answers in time, speed): no new data for now.
    pub held_back: bool,
}

/// What an audit of one replica came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum AuditOutcome {
    /// The storer proved it holds the challenged bytes.
    Proven = 1,
    /// The storer answered without the bytes (a wrong proof, or "not held").
    Failed = 2,
    /// The storer was online and did not answer in time.
    TimedOut = 3,
    /// The storer is offline; no challenge was sent.
    Offline = 4,
    /// The storer showed that the owner itself had it deleted; the replica
    /// is forgotten.
    Released = 5,
}

impl AuditOutcome {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Proven,
            2 => Self::Failed,
            3 => Self::TimedOut,
            4 => Self::Offline,
            5 => Self::Released,
            _ => return None,
        })
    }

    /// A word for people and `--json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Proven => "proven",
            Self::Failed => "failed",
            Self::TimedOut => "timed out",
            Self::Offline => "unreachable",
            Self::Released => "released",
        }
    }
}

/// A storer's answer to a challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProofAnswer {
    /// The range proof ([`crate::proof`]): the chaining values the path
    /// needs, then the challenged bytes.
    Held(Vec<u8>),
    /// The storer does not have it.
    NotHeld,
    /// The owner had it deleted: its signed delete
    /// ([`crate::delete_message`]).
    Deleted {
        /// When the owner asked, ms since the epoch.
        at_ms: u64,
        /// The owner's signature.
        signature: [u8; 64],
    },
}

/// Why a replica should be placed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum RepairReason {
    /// An audit proved it is not held.
    Lost = 1,
    /// Its storer is excluded.
    Excluded = 2,
    /// Its storer has been offline longer than the grace period.
    Offline = 3,
}

impl RepairReason {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Lost,
            2 => Self::Excluded,
            3 => Self::Offline,
            _ => return None,
        })
    }

    /// A word for people and `--json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Excluded => "storer excluded",
            Self::Offline => "storer offline",
        }
    }
}

/// One replica to place elsewhere, in a [`Message::Repairs`] answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepairItem {
    /// The pack.
    pub pack: PackId,
    /// The storer that held the replica.
    pub storer: NodeId,
    /// Why.
    pub reason: RepairReason,
}

/// Where one node can be reached, in a [`Message::Located`] answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddresses {
    /// The node.
    pub id: NodeId,
    /// Whether its channel is connected now.
    pub online: bool,
    /// What it announced, in the transports' own syntax (`quic:IP:PORT`).
    pub addresses: Vec<String>,
}

/// A replica a storer holds, as it reports it again to a coordinator whose
/// books lost it ([`Message::ReportHeld`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldReport {
    /// The placement ticket the coordinator signed for it.
    pub ticket: Vec<u8>,
    /// The owner's pack (as the owner named it).
    pub pack: PackId,
    /// The replica's size.
    pub size: u64,
    /// The replica's BLAKE3 root.
    pub root: [u8; 32],
    /// The owner's signature of the replica's statement
    /// ([`crate::ReplicaStatement`]), kept with the bytes.
    pub attest: [u8; 64],
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Node: "give me a challenge".
    Hello,
    /// Coordinator: sign this to prove your key; and seal what you send
    /// from now on (the `Auth` first) to this X25519 key. The envelope is
    /// signed by the coordinator's identity, which vouches for the key.
    Challenge {
        /// Fresh random bytes.
        challenge: [u8; 32],
        /// The coordinator's X25519 key (absent from coordinators that
        /// predate sealed requests).
        exchange_key: Option<[u8; 32]>,
    },
    /// Node: proof of key (the envelope's signature over the challenge),
    /// with the node's X25519 key for private replies and its offer.
    Auth {
        /// The challenge being answered.
        challenge: [u8; 32],
        /// The node's X25519 public key.
        exchange_key: [u8; 32],
        /// Bytes offered to others.
        offer: u64,
        /// The password of the broker account the coordinator is to make
        /// for this node, on brokers that keep accounts (sent only by a node
        /// that logged in as a newcomer; absent from older nodes).
        broker_password: Option<[u8; 32]>,
    },
    /// Coordinator: authenticated.
    Welcome {
        /// The coordinator's X25519 public key.
        exchange_key: [u8; 32],
        /// How often the node must send a heartbeat.
        heartbeat_ms: u64,
    },
    /// Node: still here.
    Heartbeat,
    /// Node: change the space offered.
    SetOffer {
        /// Bytes.
        bytes: u64,
    },
    /// Node: where may I put a pack?
    MatchRequest {
        /// The pack (named in the tickets).
        pack: PackId,
        /// Size of one replica.
        size: u64,
        /// Replicas wanted.
        copies: u8,
        /// Friends to prefer.
        friends: Vec<NodeId>,
        /// How many of the copies should go to friends.
        friend_copies: u8,
        /// Nodes not to use (those that already hold a replica, say).
        exclude: Vec<NodeId>,
    },
    /// Coordinator: these storers have room for you.
    MatchReply {
        /// Distinct storers, never the asker.
        storers: Vec<NodeId>,
        /// One signed placement ticket per storer, in the same order
        /// ([`crate::Ticket`]): what the owner shows the storer.
        tickets: Vec<Vec<u8>>,
    },
    /// Node: a replica was placed.
    RecordReplica {
        /// The pack.
        pack: PackId,
        /// Who holds the replica.
        storer: NodeId,
        /// Its size.
        size: u64,
        /// BLAKE3 root of the replica's bytes.
        root: [u8; 32],
        /// The storer's signature of the replica's statement
        /// ([`crate::ReplicaStatement`]): it checked and kept these bytes.
        receipt: [u8; 64],
        /// How long sending it took, in microseconds (0: not sent this
        /// time); the storer's measured speed.
        micros: u64,
    },
    /// Node: keep my manifest.
    PutManifest {
        /// Must be greater than the kept version.
        version: u64,
        /// Opaque (encrypted by the node).
        blob: Vec<u8>,
    },
    /// Node: give my manifest back.
    GetManifest,
    /// Coordinator: the kept manifest.
    Manifest {
        /// Its version.
        version: u64,
        /// Opaque bytes.
        blob: Vec<u8>,
    },
    /// Node: what do your books say about me?
    GetStatus,
    /// Coordinator: the books about the asker.
    Status(StatusReport),
    /// Node: who stores for me, and for whom do I store?
    ListPeers,
    /// Coordinator: the asker's peers.
    Peers(Vec<PeerReport>),
    /// Node: where peers reach me directly (replaces what was announced).
    Announce {
        /// Addresses, at most [`MAX_ADDRESSES`].
        addresses: Vec<String>,
    },
    /// Node: where are these nodes?
    Locate {
        /// The nodes.
        nodes: Vec<NodeId>,
    },
    /// Coordinator: where the asked-for nodes are (registered ones only).
    Located(Vec<NodeAddresses>),
    /// Node: pass these bytes to another node (the relay transport; the
    /// payload is end-to-end protected and opaque to the coordinator).
    Relay {
        /// The recipient.
        to: NodeId,
        /// Opaque bytes.
        payload: Vec<u8>,
    },
    /// Coordinator: bytes another node relayed to you.
    Relayed {
        /// The sender, as the coordinator authenticated it.
        from: NodeId,
        /// Opaque bytes.
        payload: Vec<u8>,
    },
    /// Storer: what I hold, each with the ticket it came under, so that
    /// books that lost them can be rebuilt.
    ReportHeld(Vec<HeldReport>),
    /// Coordinator: how many reported replicas the books took.
    HeldTaken {
        /// Recorded (new or already there).
        taken: u32,
    },
    /// Owner: audit my replica of `pack` at `storer` now.
    Audit {
        /// The pack.
        pack: PackId,
        /// The storer.
        storer: NodeId,
    },
    /// Coordinator: what the audit came to (the answer to [`Message::Audit`]).
    Audited {
        /// The outcome.
        outcome: AuditOutcome,
    },
    /// Coordinator to a storer: prove you hold these bytes of a replica.
    Prove {
        /// Fresh random bytes naming this challenge.
        challenge: [u8; 32],
        /// Whose replica.
        owner: NodeId,
        /// The pack.
        pack: PackId,
        /// The replica's root, as recorded.
        root: [u8; 32],
        /// The replica's size, as recorded.
        size: u64,
        /// First byte of the range (a multiple of 1024).
        offset: u64,
        /// Its length.
        len: u64,
        /// The answer must arrive before this time, ms since the epoch.
        deadline_ms: u64,
    },
    /// Storer: the answer to a [`Message::Prove`].
    Proof {
        /// The challenge answered.
        challenge: [u8; 32],
        /// The answer.
        answer: ProofAnswer,
    },
    /// Owner: which of my replicas should be placed elsewhere?
    GetRepairs,
    /// Coordinator: these (lost, or on storers excluded or gone).
    Repairs(Vec<RepairItem>),
    /// Owner: forget my replica of `pack` at `storer` (it was placed
    /// elsewhere, or deleted).
    DropReplica {
        /// The pack.
        pack: PackId,
        /// The storer.
        storer: NodeId,
    },
    /// Coordinator: done.
    Ok,
    /// Coordinator: refused.
    Error {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

fn ids(w: &mut Writer, list: &[NodeId]) {
    w.varint(list.len() as u64);
    for id in list {
        w.id(&id.0);
    }
}

fn read_ids(r: &mut Reader<'_>) -> Result<Vec<NodeId>, DecodeError> {
    let n = r.count(32)?;
    if n > MAX_IDS {
        return Err(r.error(format!("{n} ids in one list")));
    }
    (0..n).map(|_| Ok(NodeId(r.id()?))).collect()
}

fn signature(r: &mut Reader<'_>) -> Result<[u8; 64], DecodeError> {
    let raw = r.take(64)?;
    let mut s = [0u8; 64];
    s.copy_from_slice(raw);
    Ok(s)
}

fn permille(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    let raw = r.take(2)?;
    let v = u16::from_le_bytes([raw[0], raw[1]]);
    if v > 1000 {
        return Err(r.error(format!("a score of {v} per mille")));
    }
    Ok(v)
}

fn strings(w: &mut Writer, list: &[String]) {
    w.varint(list.len() as u64);
    for s in list {
        w.bytes(s.as_bytes());
    }
}

fn read_strings(r: &mut Reader<'_>) -> Result<Vec<String>, DecodeError> {
    let n = r.count(1)?;
    if n > MAX_ADDRESSES {
        return Err(r.error(format!("{n} addresses")));
    }
    (0..n)
        .map(|_| {
            let s = r.string()?;
            if s.len() > MAX_ADDRESS_LEN {
                return Err(r.error(format!("an address of {} bytes", s.len())));
            }
            Ok(s)
        })
        .collect()
}

impl Message {
    /// The kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello => 1,
            Self::Challenge { .. } => 2,
            Self::Auth { .. } => 3,
            Self::Welcome { .. } => 4,
            Self::Heartbeat => 5,
            Self::SetOffer { .. } => 6,
            Self::MatchRequest { .. } => 7,
            Self::MatchReply { .. } => 8,
            Self::RecordReplica { .. } => 9,
            Self::PutManifest { .. } => 10,
            Self::GetManifest => 11,
            Self::Manifest { .. } => 12,
            Self::GetStatus => 13,
            Self::Status(_) => 14,
            Self::Ok => 15,
            Self::Error { .. } => 16,
            Self::ListPeers => 17,
            Self::Peers(_) => 18,
            Self::Announce { .. } => 19,
            Self::Locate { .. } => 20,
            Self::Located(_) => 21,
            Self::Relay { .. } => 22,
            Self::Relayed { .. } => 23,
            Self::ReportHeld(_) => 24,
            Self::HeldTaken { .. } => 25,
            Self::Audit { .. } => 26,
            Self::Audited { .. } => 27,
            Self::Prove { .. } => 28,
            Self::Proof { .. } => 29,
            Self::GetRepairs => 30,
            Self::Repairs(_) => 31,
            Self::DropReplica { .. } => 32,
        }
    }

    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.kind());
        match self {
            Self::Hello
            | Self::Heartbeat
            | Self::GetManifest
            | Self::GetStatus
            | Self::ListPeers
            | Self::GetRepairs
            | Self::Ok => {}
            Self::Peers(list) => {
                w.varint(list.len() as u64);
                for p in list {
                    w.id(&p.id.0);
                    w.u8(u8::from(p.online));
                    w.u64(p.last_seen_ms);
                    w.buf
                        .extend_from_slice(&p.uptime_permille.unwrap_or(0).to_le_bytes());
                    w.u32(p.replicas_held);
                    w.u64(p.bytes_held);
                    w.u32(p.replicas_stored);
                    w.u64(p.bytes_stored);
                    for permille in [
                        p.audit_permille,
                        p.timeout_permille,
                        p.uptime_score_permille,
                    ] {
                        w.buf.extend_from_slice(&permille.to_le_bytes());
                    }
                    w.u64(p.speed_bps);
                    w.u64(p.audits_passed);
                    w.u64(p.audits_failed);
                    w.u64(p.audits_timed_out);
                    w.u8(u8::from(p.excluded)
                        | u8::from(p.held_back) << 1
                        | u8::from(p.uptime_permille.is_none()) << 2);
                }
            }
            Self::Challenge {
                challenge,
                exchange_key,
            } => {
                w.id(challenge);
                if let Some(k) = exchange_key {
                    w.id(k);
                }
            }
            Self::Auth {
                challenge,
                exchange_key,
                offer,
                broker_password,
            } => {
                w.id(challenge);
                w.id(exchange_key);
                w.u64(*offer);
                if let Some(p) = broker_password {
                    w.id(p);
                }
            }
            Self::Welcome {
                exchange_key,
                heartbeat_ms,
            } => {
                w.id(exchange_key);
                w.u64(*heartbeat_ms);
            }
            Self::SetOffer { bytes } => w.u64(*bytes),
            Self::MatchRequest {
                pack,
                size,
                copies,
                friends,
                friend_copies,
                exclude,
            } => {
                w.id(&pack.0);
                w.u64(*size);
                w.u8(*copies);
                ids(&mut w, friends);
                w.u8(*friend_copies);
                ids(&mut w, exclude);
            }
            Self::MatchReply { storers, tickets } => {
                ids(&mut w, storers);
                w.varint(tickets.len() as u64);
                for t in tickets {
                    w.bytes(t);
                }
            }
            Self::RecordReplica {
                pack,
                storer,
                size,
                root,
                receipt,
                micros,
            } => {
                w.id(&pack.0);
                w.id(&storer.0);
                w.u64(*size);
                w.id(root);
                w.buf.extend_from_slice(receipt);
                w.u64(*micros);
            }
            Self::PutManifest { version, blob } | Self::Manifest { version, blob } => {
                w.u64(*version);
                w.bytes(blob);
            }
            Self::Status(s) => {
                w.u64(s.offered);
                w.u64(s.held);
                w.u64(s.placed);
                w.u32(s.peers);
                if let Some(q) = &s.quota {
                    w.u64(q.may_place);
                    w.u64(q.earned);
                    w.u64(q.grant);
                }
            }
            Self::Error { code, message } => {
                w.buf.extend_from_slice(&(*code as u16).to_le_bytes());
                w.bytes(message.as_bytes());
            }
            Self::Announce { addresses } => strings(&mut w, addresses),
            Self::Locate { nodes } => ids(&mut w, nodes),
            Self::Located(list) => {
                w.varint(list.len() as u64);
                for n in list {
                    w.id(&n.id.0);
                    w.u8(u8::from(n.online));
                    strings(&mut w, &n.addresses);
                }
            }
            Self::Relay { to: id, payload } | Self::Relayed { from: id, payload } => {
                w.id(&id.0);
                w.bytes(payload);
            }
            Self::ReportHeld(list) => {
                w.varint(list.len() as u64);
                for h in list {
                    w.bytes(&h.ticket);
                    w.id(&h.pack.0);
                    w.u64(h.size);
                    w.id(&h.root);
                    w.buf.extend_from_slice(&h.attest);
                }
            }
            Self::HeldTaken { taken } => w.u32(*taken),
            Self::Audit { pack, storer } | Self::DropReplica { pack, storer } => {
                w.id(&pack.0);
                w.id(&storer.0);
            }
            Self::Audited { outcome } => w.u8(*outcome as u8),
            Self::Prove {
                challenge,
                owner,
                pack,
                root,
                size,
                offset,
                len,
                deadline_ms,
            } => {
                w.id(challenge);
                w.id(&owner.0);
                w.id(&pack.0);
                w.id(root);
                w.u64(*size);
                w.u64(*offset);
                w.u64(*len);
                w.u64(*deadline_ms);
            }
            Self::Proof { challenge, answer } => {
                w.id(challenge);
                match answer {
                    ProofAnswer::Held(proof) => {
                        w.u8(0);
                        w.bytes(proof);
                    }
                    ProofAnswer::NotHeld => w.u8(1),
                    ProofAnswer::Deleted { at_ms, signature } => {
                        w.u8(2);
                        w.u64(*at_ms);
                        w.buf.extend_from_slice(signature);
                    }
                }
            }
            Self::Repairs(list) => {
                w.varint(list.len() as u64);
                for item in list {
                    w.id(&item.pack.0);
                    w.id(&item.storer.0);
                    w.u8(item.reason as u8);
                }
            }
        }
        w.finish()
    }

    /// Decodes a message, refusing unknown kinds and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "message");
        let kind = r.u8()?;
        let m = match kind {
            1 => Self::Hello,
            2 => Self::Challenge {
                challenge: r.id()?,
                exchange_key: match r.remaining() {
                    0 => None,
                    _ => Some(r.id()?),
                },
            },
            3 => Self::Auth {
                challenge: r.id()?,
                exchange_key: r.id()?,
                offer: r.u64()?,
                broker_password: match r.remaining() {
                    0 => None,
                    _ => Some(r.id()?),
                },
            },
            4 => Self::Welcome {
                exchange_key: r.id()?,
                heartbeat_ms: r.u64()?,
            },
            5 => Self::Heartbeat,
            6 => Self::SetOffer { bytes: r.u64()? },
            7 => Self::MatchRequest {
                pack: PackId(r.id()?),
                size: r.u64()?,
                copies: r.u8()?,
                friends: read_ids(&mut r)?,
                friend_copies: r.u8()?,
                exclude: read_ids(&mut r)?,
            },
            8 => {
                let storers = read_ids(&mut r)?;
                let n = r.count(1)?;
                if n != storers.len() {
                    return Err(r.error(format!("{n} tickets for {} storers", storers.len())));
                }
                let tickets = (0..n)
                    .map(|_| {
                        let t = r.bytes()?;
                        if t.len() != crate::SIGNED_TICKET_LEN {
                            return Err(r.error(format!("a ticket of {} bytes", t.len())));
                        }
                        Ok(t.to_vec())
                    })
                    .collect::<Result<_, _>>()?;
                Self::MatchReply { storers, tickets }
            }
            9 => Self::RecordReplica {
                pack: PackId(r.id()?),
                storer: NodeId(r.id()?),
                size: r.u64()?,
                root: r.id()?,
                receipt: signature(&mut r)?,
                micros: r.u64()?,
            },
            10 => Self::PutManifest {
                version: r.u64()?,
                blob: r.bytes()?.to_vec(),
            },
            11 => Self::GetManifest,
            12 => Self::Manifest {
                version: r.u64()?,
                blob: r.bytes()?.to_vec(),
            },
            13 => Self::GetStatus,
            14 => Self::Status(StatusReport {
                offered: r.u64()?,
                held: r.u64()?,
                placed: r.u64()?,
                peers: r.u32()?,
                quota: match r.remaining() {
                    0 => None,
                    _ => Some(Quota {
                        may_place: r.u64()?,
                        earned: r.u64()?,
                        grant: r.u64()?,
                    }),
                },
            }),
            15 => Self::Ok,
            16 => {
                let raw = r.take(2)?;
                let code = u16::from_le_bytes([raw[0], raw[1]]);
                Self::Error {
                    code: ErrorCode::from_u16(code)
                        .ok_or_else(|| r.error(format!("error code {code}")))?,
                    message: r.string()?,
                }
            }
            17 => Self::ListPeers,
            18 => {
                let n = r.count(PEER_REPORT_LEN)?;
                if n > MAX_IDS {
                    return Err(r.error(format!("{n} peers in one list")));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = NodeId(r.id()?);
                    let online = match r.u8()? {
                        0 => false,
                        1 => true,
                        b => return Err(r.error(format!("online flag {b}"))),
                    };
                    let last_seen_ms = r.u64()?;
                    let raw = r.take(2)?;
                    let uptime_permille = u16::from_le_bytes([raw[0], raw[1]]);
                    let replicas_held = r.u32()?;
                    let bytes_held = r.u64()?;
                    let replicas_stored = r.u32()?;
                    let bytes_stored = r.u64()?;
                    let [audit_permille, timeout_permille, uptime_score_permille] =
                        [permille(&mut r)?, permille(&mut r)?, permille(&mut r)?];
                    if uptime_permille > 1000 {
                        return Err(r.error(format!("uptime of {uptime_permille} per mille")));
                    }
                    let speed_bps = r.u64()?;
                    let audits_passed = r.u64()?;
                    let audits_failed = r.u64()?;
                    let audits_timed_out = r.u64()?;
                    let flags = r.u8()?;
                    if flags > 7 {
                        return Err(r.error(format!("peer flags {flags}")));
                    }
                    let uptime_permille = match (flags & 4 != 0, uptime_permille) {
                        (false, up) => Some(up),
                        (true, 0) => None,
                        (true, up) => {
                            return Err(r.error(format!("a new peer with an uptime of {up}")))
                        }
                    };
                    list.push(PeerReport {
                        id,
                        online,
                        last_seen_ms,
                        uptime_permille,
                        replicas_held,
                        bytes_held,
                        replicas_stored,
                        bytes_stored,
                        audit_permille,
                        timeout_permille,
                        uptime_score_permille,
                        speed_bps,
                        audits_passed,
                        audits_failed,
                        audits_timed_out,
                        excluded: flags & 1 != 0,
                        held_back: flags & 2 != 0,
                    });
                }
                Self::Peers(list)
            }
            19 => Self::Announce {
                addresses: read_strings(&mut r)?,
            },
            20 => Self::Locate {
                nodes: read_ids(&mut r)?,
            },
            21 => {
                let n = r.count(34)?;
                if n > MAX_IDS {
                    return Err(r.error(format!("{n} nodes in one list")));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = NodeId(r.id()?);
                    let online = match r.u8()? {
                        0 => false,
                        1 => true,
                        b => return Err(r.error(format!("online flag {b}"))),
                    };
                    list.push(NodeAddresses {
                        id,
                        online,
                        addresses: read_strings(&mut r)?,
                    });
                }
                Self::Located(list)
            }
            22 => Self::Relay {
                to: NodeId(r.id()?),
                payload: r.bytes()?.to_vec(),
            },
            23 => Self::Relayed {
                from: NodeId(r.id()?),
                payload: r.bytes()?.to_vec(),
            },
            24 => {
                let n = r.count(crate::SIGNED_TICKET_LEN + 72 + 64)?;
                if n > MAX_HELD_REPORTS {
                    return Err(r.error(format!("{n} held replicas in one report")));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let ticket = r.bytes()?;
                    if ticket.len() != crate::SIGNED_TICKET_LEN {
                        return Err(r.error(format!("a ticket of {} bytes", ticket.len())));
                    }
                    list.push(HeldReport {
                        ticket: ticket.to_vec(),
                        pack: PackId(r.id()?),
                        size: r.u64()?,
                        root: r.id()?,
                        attest: signature(&mut r)?,
                    });
                }
                Self::ReportHeld(list)
            }
            25 => Self::HeldTaken { taken: r.u32()? },
            26 => Self::Audit {
                pack: PackId(r.id()?),
                storer: NodeId(r.id()?),
            },
            27 => {
                let v = r.u8()?;
                Self::Audited {
                    outcome: AuditOutcome::from_u8(v)
                        .ok_or_else(|| r.error(format!("audit outcome {v}")))?,
                }
            }
            28 => Self::Prove {
                challenge: r.id()?,
                owner: NodeId(r.id()?),
                pack: PackId(r.id()?),
                root: r.id()?,
                size: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
                deadline_ms: r.u64()?,
            },
            29 => {
                let challenge = r.id()?;
                let answer = match r.u8()? {
                    0 => {
                        let proof = r.bytes()?;
                        if proof.len() > crate::proof::MAX_PROOF {
                            return Err(r.error(format!("a proof of {} bytes", proof.len())));
                        }
                        ProofAnswer::Held(proof.to_vec())
                    }
                    1 => ProofAnswer::NotHeld,
                    2 => ProofAnswer::Deleted {
                        at_ms: r.u64()?,
                        signature: signature(&mut r)?,
                    },
                    b => return Err(r.error(format!("proof answer {b}"))),
                };
                Self::Proof { challenge, answer }
            }
            30 => Self::GetRepairs,
            31 => {
                let n = r.count(65)?;
                if n > MAX_REPAIRS {
                    return Err(r.error(format!("{n} repairs in one list")));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let pack = PackId(r.id()?);
                    let storer = NodeId(r.id()?);
                    let v = r.u8()?;
                    let reason = RepairReason::from_u8(v)
                        .ok_or_else(|| r.error(format!("repair reason {v}")))?;
                    list.push(RepairItem {
                        pack,
                        storer,
                        reason,
                    });
                }
                Self::Repairs(list)
            }
            32 => Self::DropReplica {
                pack: PackId(r.id()?),
                storer: NodeId(r.id()?),
            },
            k => return Err(r.error(format!("unknown message kind {k}"))),
        };
        r.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = NodeId> {
        any::<[u8; 32]>().prop_map(NodeId)
    }

    fn message() -> impl Strategy<Value = Message> {
        let ids = || proptest::collection::vec(id(), 0..5);
        prop_oneof![
            Just(Message::Hello),
            Just(Message::Heartbeat),
            Just(Message::GetManifest),
            Just(Message::GetStatus),
            Just(Message::Ok),
            Just(Message::ListPeers),
            proptest::collection::vec(
                (
                    id(),
                    any::<bool>(),
                    any::<u64>(),
                    0u16..=1000,
                    any::<u32>(),
                    any::<u64>()
                ),
                0..4
            )
            .prop_map(|v| Message::Peers(
                v.into_iter()
                    .map(|(id, online, seen, up, n, b)| PeerReport {
                        id,
                        online,
                        last_seen_ms: seen,
                        // Seen "new" now and then.
                        uptime_permille: (up % 7 != 0).then_some(up),
                        replicas_held: n,
                        bytes_held: b,
                        replicas_stored: n / 2,
                        bytes_stored: b / 3,
                        audit_permille: up / 2,
                        timeout_permille: up / 3,
                        uptime_score_permille: up / 4,
                        speed_bps: b / 5,
                        audits_passed: seen / 7,
                        audits_failed: u64::from(n % 5),
                        audits_timed_out: u64::from(n % 3),
                        excluded: online,
                        held_back: n % 2 == 0,
                    })
                    .collect()
            )),
            (any::<[u8; 32]>(), proptest::option::of(any::<[u8; 32]>())).prop_map(
                |(challenge, exchange_key)| Message::Challenge {
                    challenge,
                    exchange_key
                }
            ),
            (
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                any::<u64>(),
                proptest::option::of(any::<[u8; 32]>())
            )
                .prop_map(|(c, k, o, p)| Message::Auth {
                    challenge: c,
                    exchange_key: k,
                    offer: o,
                    broker_password: p,
                }),
            (any::<[u8; 32]>(), any::<u64>()).prop_map(|(k, h)| Message::Welcome {
                exchange_key: k,
                heartbeat_ms: h
            }),
            any::<u64>().prop_map(|bytes| Message::SetOffer { bytes }),
            (any::<u64>(), any::<u8>(), ids(), any::<u8>(), ids()).prop_map(|(s, c, f, fc, e)| {
                Message::MatchRequest {
                    pack: PackId([c; 32]),
                    size: s,
                    copies: c,
                    friends: f,
                    friend_copies: fc,
                    exclude: e,
                }
            }),
            ids().prop_map(|storers| Message::MatchReply {
                tickets: storers
                    .iter()
                    .map(|_| vec![7u8; crate::SIGNED_TICKET_LEN])
                    .collect(),
                storers,
            }),
            (any::<[u8; 32]>(), id(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(p, s, z, r)| {
                Message::RecordReplica {
                    pack: PackId(p),
                    storer: s,
                    size: z,
                    root: r,
                    receipt: [r[0]; 64],
                    micros: z / 3,
                }
            }),
            (any::<[u8; 32]>(), id()).prop_map(|(p, storer)| Message::Audit {
                pack: PackId(p),
                storer
            }),
            (any::<[u8; 32]>(), id()).prop_map(|(p, storer)| Message::DropReplica {
                pack: PackId(p),
                storer
            }),
            (1u8..=5).prop_map(|v| Message::Audited {
                outcome: AuditOutcome::from_u8(v).unwrap()
            }),
            (any::<[u8; 32]>(), id(), any::<u64>(), any::<u64>()).prop_map(|(c, o, z, t)| {
                Message::Prove {
                    challenge: c,
                    owner: o,
                    pack: PackId([c[1]; 32]),
                    root: [c[2]; 32],
                    size: z,
                    offset: z / 2,
                    len: 1024,
                    deadline_ms: t,
                }
            }),
            (
                any::<[u8; 32]>(),
                0u8..3,
                proptest::collection::vec(any::<u8>(), 0..200)
            )
                .prop_map(|(c, k, proof)| Message::Proof {
                    challenge: c,
                    answer: match k {
                        0 => ProofAnswer::Held(proof),
                        1 => ProofAnswer::NotHeld,
                        _ => ProofAnswer::Deleted {
                            at_ms: proof.len() as u64,
                            signature: [c[0]; 64]
                        },
                    },
                }),
            Just(Message::GetRepairs),
            proptest::collection::vec((any::<[u8; 32]>(), id(), 1u8..=3), 0..4).prop_map(|l| {
                Message::Repairs(
                    l.into_iter()
                        .map(|(p, storer, v)| RepairItem {
                            pack: PackId(p),
                            storer,
                            reason: RepairReason::from_u8(v).unwrap(),
                        })
                        .collect(),
                )
            }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(version, blob)| Message::PutManifest { version, blob }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(version, blob)| Message::Manifest { version, blob }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                proptest::option::of((any::<u64>(), any::<u64>(), any::<u64>()))
            )
                .prop_map(|(o, h, p, n, q)| {
                    Message::Status(StatusReport {
                        offered: o,
                        held: h,
                        placed: p,
                        peers: n,
                        quota: q.map(|(may_place, earned, grant)| Quota {
                            may_place,
                            earned,
                            grant,
                        }),
                    })
                }),
            ".{0,30}".prop_map(|message| Message::Error {
                code: ErrorCode::Refused,
                message
            }),
            proptest::collection::vec(".{0,40}", 0..4)
                .prop_map(|addresses| Message::Announce { addresses }),
            ids().prop_map(|nodes| Message::Locate { nodes }),
            proptest::collection::vec(
                (
                    id(),
                    any::<bool>(),
                    proptest::collection::vec(".{0,20}", 0..3)
                ),
                0..4
            )
            .prop_map(|l| Message::Located(
                l.into_iter()
                    .map(|(id, online, addresses)| NodeAddresses {
                        id,
                        online,
                        addresses
                    })
                    .collect()
            )),
            (id(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(to, payload)| Message::Relay { to, payload }),
            (id(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(from, payload)| Message::Relayed { from, payload }),
            proptest::collection::vec((any::<[u8; 32]>(), any::<u64>(), any::<[u8; 32]>()), 0..3)
                .prop_map(|l| Message::ReportHeld(
                    l.into_iter()
                        .map(|(p, size, root)| HeldReport {
                            ticket: vec![9u8; crate::SIGNED_TICKET_LEN],
                            pack: PackId(p),
                            size,
                            root,
                            attest: [root[0]; 64],
                        })
                        .collect()
                )),
            any::<u32>().prop_map(|taken| Message::HeldTaken { taken }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in message()) {
            prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn decoder_never_panics(data: Vec<u8>) {
            let _ = Message::decode(&data);
        }
    }

    #[test]
    fn unknown_kinds_and_trailing_bytes_are_refused() {
        assert!(Message::decode(&[0]).is_err());
        assert!(Message::decode(&[200]).is_err());
        assert!(Message::decode(&[1, 0]).is_err());
        assert!(Message::decode(&[]).is_err());
        let mut too_many = vec![8];
        too_many.extend_from_slice(&[0x81, 0x08]); // 1025 ids
        too_many.extend(std::iter::repeat_n(0u8, 1025 * 32));
        assert!(Message::decode(&too_many).is_err());
    }
}
