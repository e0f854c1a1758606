//! What the audit modes place and challenge: a few random blobs that every
//! replica is one of, placements of them from owners on storers, and the
//! sizes of the envelopes one audit puts on the wire.
//!
//! Every proof a challenge of the coordinator's default range (one 1 KiB
//! chunk) can ask for is worked out beforehand, so a simulated storer
//! answers with a lookup and the load lands on the coordinator.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{NodeId, PackId};
use pluto_protocol::{
    exchange_public, proof, AuditOutcome, Envelope, Message, ProofAnswer, ReplicaStatement,
};
use rand_core::{OsRng, RngCore};
use x25519_dalek::StaticSecret;

/// One blob and the proofs of its chunks.
struct Blob {
    bytes: Vec<u8>,
    /// By (offset, len): every chunk-sized range.
    proofs: HashMap<(u64, u64), Vec<u8>>,
}

/// The blobs replicas are made of, by BLAKE3 root.
pub struct Blobs {
    by_root: HashMap<[u8; 32], Blob>,
    roots: Vec<[u8; 32]>,
    size: u64,
}

impl Blobs {
    /// `count` random blobs of `size` bytes, with the proof of each of
    /// their chunks.
    pub fn new(count: usize, size: usize) -> Self {
        let mut by_root = HashMap::new();
        let mut roots = Vec::new();
        for _ in 0..count.max(1) {
            let mut bytes = vec![0; size];
            OsRng.fill_bytes(&mut bytes);
            let root = *blake3::hash(&bytes).as_bytes();
            let proofs = (0..size as u64)
                .step_by(proof::CHUNK as usize)
                .filter_map(|offset| {
                    let len = proof::CHUNK.min(size as u64 - offset);
                    let p = proof::prove(&bytes, offset, len).ok()?;
                    Some(((offset, len), p))
                })
                .collect();
            roots.push(root);
            by_root.insert(root, Blob { bytes, proofs });
        }
        Self {
            by_root,
            roots,
            size: size as u64,
        }
    }

    /// The root of the `i`-th replica's blob.
    fn root(&self, i: usize) -> [u8; 32] {
        self.roots[i % self.roots.len()]
    }

    /// A storer's honest answer to a challenge of `offset..offset + len`
    /// of the blob `root`.
    pub fn answer(&self, root: &[u8; 32], offset: u64, len: u64) -> ProofAnswer {
        let Some(blob) = self.by_root.get(root) else {
            return ProofAnswer::NotHeld;
        };
        match blob.proofs.get(&(offset, len)) {
            Some(p) => ProofAnswer::Held(p.clone()),
            // A range other than one chunk (another `audit_bytes`).
            None => match proof::prove(&blob.bytes, offset, len) {
                Ok(p) => ProofAnswer::Held(p),
                Err(_) => ProofAnswer::NotHeld,
            },
        }
    }
}

/// One replica: an owner's pack on a storer (indices into the owners and
/// the storers).
#[derive(Clone, Debug)]
pub struct Placement {
    pub owner: usize,
    pub storer: usize,
    pub pack: PackId,
    pub root: [u8; 32],
    pub size: u64,
}

impl Placement {
    /// The owner's request for this storer (a friend, so it is the one
    /// matched).
    pub fn match_request(&self, storer: NodeId) -> Message {
        Message::MatchRequest {
            pack: self.pack,
            size: self.size,
            copies: 1,
            friends: vec![storer],
            friend_copies: 1,
            exclude: vec![],
        }
    }

    /// The owner's record of the replica, with the storer's receipt.
    pub fn record(&self, owner: NodeId, storer: &SigningKey) -> Message {
        let storer_id = NodeId(storer.verifying_key().to_bytes());
        let receipt = ReplicaStatement {
            owner,
            storer: storer_id,
            pack: self.pack,
            size: self.size,
            root: self.root,
        }
        .sign(storer);
        Message::RecordReplica {
            pack: self.pack,
            storer: storer_id,
            size: self.size,
            root: self.root,
            receipt,
            micros: 0,
        }
    }

    /// The owner's audit request.
    pub fn audit(&self, storer: NodeId) -> Message {
        Message::Audit {
            pack: self.pack,
            storer,
        }
    }
}

/// `per_owner` replicas for each of `owners`, each of another pack, on the
/// storers round robin; listed replica by replica across owners so that
/// consecutive audits go to different owners and storers.
pub fn plan(owners: usize, storers: usize, per_owner: usize, blobs: &Blobs) -> Vec<Placement> {
    let mut out = Vec::with_capacity(owners * per_owner);
    for r in 0..per_owner {
        for o in 0..owners {
            let mut pack = [0u8; 32];
            pack[..8].copy_from_slice(&(o as u64).to_le_bytes());
            pack[8..16].copy_from_slice(&(r as u64).to_le_bytes());
            out.push(Placement {
                owner: o,
                storer: (o * per_owner + r) % storers,
                pack: PackId(pack),
                root: blobs.root(o * per_owner + r),
                size: blobs.size,
            });
        }
    }
    out
}

/// The bytes of each envelope of one audit.
#[derive(Clone, Copy, Debug, Default)]
pub struct WireSizes {
    /// Owner to coordinator.
    pub audit: usize,
    /// Coordinator to storer, sealed.
    pub prove: usize,
    /// Storer to coordinator.
    pub proof: usize,
    /// Coordinator to owner.
    pub audited: usize,
}

impl WireSizes {
    /// The envelopes of an audit whose challenge was `prove` and answer
    /// `proof`, encoded as the parties encode them. An envelope's length
    /// depends only on its message's, so stand-in keys sign.
    pub fn encoded(prove: &Message, proof: &Message) -> Self {
        let key = SigningKey::generate(&mut OsRng);
        let id = NodeId(key.verifying_key().to_bytes());
        let exchange = exchange_public(&StaticSecret::random_from_rng(OsRng));
        let (now, nonce) = (1_800_000_000_000, [7; 16]);
        let sign = |env: Envelope| env.sign(&key).map(|b| b.len()).unwrap_or(0);
        let pack = match prove {
            Message::Prove { pack, .. } => *pack,
            _ => PackId([0; 32]),
        };
        let audit = Message::Audit { pack, storer: id };
        let audited = Message::Audited {
            outcome: AuditOutcome::Proven,
        };
        // Requests are sealed to the coordinator, as nodes send them.
        let sealed = |msg: &Message| {
            Envelope::new_private(&key, id, &exchange, now, nonce, None, msg, &mut OsRng)
                .map(sign)
                .unwrap_or(0)
        };
        Self {
            audit: sealed(&audit),
            prove: sealed(prove),
            proof: sealed(proof),
            audited: sign(Envelope::new(&key, id, now, nonce, Some(nonce), &audited)),
        }
    }

    /// All four.
    pub fn per_challenge(&self) -> usize {
        self.audit + self.prove + self.proof + self.audited
    }

    /// One line: each envelope and the sum.
    pub fn line(&self) -> String {
        format!(
            "Audit {} + Prove {} + Proof {} + Audited {} = {} bytes per challenge",
            self.audit,
            self.prove,
            self.proof,
            self.audited,
            self.per_challenge()
        )
    }

    /// The same through an MQTT broker with topic prefix `prefix`: each
    /// envelope in a QoS 1 PUBLISH (MQTT 3.1.1) and its PUBACK, on both hops
    /// (sender to broker, broker to receiver); TCP/IP headers not counted.
    pub fn mqtt_per_challenge(&self, prefix: &str) -> usize {
        // PREFIX/v1/to-coordinator/<64 hex> and PREFIX/v1/to-node/<64 hex>.
        let to_coordinator = prefix.len() + "/v1/to-coordinator/".len() + 64;
        let to_node = prefix.len() + "/v1/to-node/".len() + 64;
        let hop = |topic: usize, payload: usize| {
            let rest = 2 + topic + 2 + payload;
            let varint = match rest {
                0..=127 => 1,
                128..=16_383 => 2,
                16_384..=2_097_151 => 3,
                _ => 4,
            };
            1 + varint + rest + 4
        };
        2 * (hop(to_coordinator, self.audit)
            + hop(to_node, self.prove)
            + hop(to_coordinator, self.proof)
            + hop(to_node, self.audited))
    }
}

/// Fails unless all `n` audits came back proven.
pub fn all_proven(
    outcomes: &std::collections::BTreeMap<String, usize>,
    n: usize,
) -> anyhow::Result<()> {
    let proven = outcomes
        .get(pluto_protocol::AuditOutcome::Proven.as_str())
        .copied()
        .unwrap_or(0);
    if proven != n {
        anyhow::bail!("{} of {n} audits were not proven", n - proven);
    }
    Ok(())
}
