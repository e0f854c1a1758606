//! Message handling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{BooksStore, NodeId, NodeRecord, ReplicaRecord, StoreError};
use pluto_protocol::{
    exchange_public, Envelope, EnvelopeError, ErrorCode, Message, Refused, ReplayGuard,
    StatusReport,
};
use rand::seq::SliceRandom;
use rand_core::CryptoRngCore;
use x25519_dalek::StaticSecret;

/// The recipient of a first Hello to a coordinator not yet pinned.
pub const ANY_COORDINATOR: NodeId = NodeId([0; 32]);

/// Settings; every interval is a setting so tests can run on a short clock.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How far a message's timestamp may be from the coordinator's clock.
    pub window_ms: u64,
    /// How many nonces the replay guard remembers at most.
    pub replay_capacity: usize,
    /// How long a challenge may be answered.
    pub challenge_ttl_ms: u64,
    /// How many challenges may be outstanding.
    pub max_challenges: usize,
    /// How often nodes must send a heartbeat.
    pub heartbeat_ms: u64,
    /// Most replicas one request may ask for.
    pub max_copies: u8,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            window_ms: 120_000,
            replay_capacity: 1_000_000,
            challenge_ttl_ms: 60_000,
            max_challenges: 100_000,
            heartbeat_ms: 30_000,
            max_copies: 8,
        }
    }
}

/// Why an envelope got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// Did not decode or verify.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// Addressed to someone else.
    #[error("addressed to {0}, not to this coordinator")]
    WrongRecipient(NodeId),
    /// Published on one node's topic, signed by another.
    #[error("signed by {signer} but sent as {claimed}")]
    SenderMismatch {
        /// Who signed.
        signer: NodeId,
        /// Whose topic it came on.
        claimed: NodeId,
    },
    /// Stale, future-dated, replayed, or too many.
    #[error("from {0}: {1}")]
    NotFresh(NodeId, Refused),
    /// The books failed.
    #[error("books: {0}")]
    Store(#[from] StoreError),
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// To whom.
    pub to: NodeId,
    /// The signed envelope.
    pub bytes: Vec<u8>,
}

/// The coordinator.
pub struct Coordinator {
    identity: SigningKey,
    exchange: StaticSecret,
    books: Arc<dyn BooksStore>,
    config: CoordinatorConfig,
    guard: Mutex<ReplayGuard>,
    challenges: Mutex<HashMap<[u8; 32], (NodeId, u64)>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Coordinator({})", self.id().short())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a message handler answers: a message, and whether it is private.
struct Reply {
    msg: Message,
    private: bool,
}

fn public(msg: Message) -> Reply {
    Reply {
        msg,
        private: false,
    }
}

fn private(msg: Message) -> Reply {
    Reply { msg, private: true }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
    public(Message::Error {
        code,
        message: message.into(),
    })
}

impl Coordinator {
    /// A coordinator with this identity (kept in its own key file, not in
    /// the books) and exchange secret.
    pub fn new(
        identity: SigningKey,
        exchange: StaticSecret,
        books: Arc<dyn BooksStore>,
        config: CoordinatorConfig,
    ) -> Self {
        Self {
            identity,
            exchange,
            books,
            guard: Mutex::new(ReplayGuard::new(config.window_ms, config.replay_capacity)),
            challenges: Mutex::new(HashMap::new()),
            config,
        }
    }

    /// The coordinator's identity, which nodes pin.
    pub fn id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    /// The coordinator's X25519 public key.
    pub fn exchange_key(&self) -> [u8; 32] {
        exchange_public(&self.exchange)
    }

    /// Handles one envelope that arrived on `claimed`'s topic (the channel's
    /// unauthenticated idea of the sender) at `now_ms`.
    pub async fn handle(
        &self,
        claimed: Option<NodeId>,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let env = Envelope::verify(bytes)?;
        // A node that does not know the coordinator yet (trust on first use)
        // may address its Hello to "any coordinator" (all zeros); the signed
        // challenge it gets back tells it whom to pin.
        let first_contact = env.to == ANY_COORDINATOR && env.kind == Message::Hello.kind();
        if env.to != self.id() && !first_contact {
            return Err(Rejected::WrongRecipient(env.to));
        }
        if let Some(c) = claimed {
            if c != env.from {
                return Err(Rejected::SenderMismatch {
                    signer: env.from,
                    claimed: c,
                });
            }
        }
        lock(&self.guard)
            .check(&env, now_ms)
            .map_err(|r| Rejected::NotFresh(env.from, r))?;
        let msg = if env.is_private() {
            env.open_private(&self.exchange).map_err(|e| e.to_string())
        } else {
            env.message().map_err(|e| e.to_string())
        };
        let reply = match msg {
            Ok(m) => self.dispatch(&env.from, m, now_ms, rng).await?,
            Err(e) => error(ErrorCode::Malformed, e),
        };
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let out = if reply.private {
            let node = self.books.node(&env.from).await?;
            let Some(node) = node else {
                return Ok(None);
            };
            Envelope::new_private(
                &self.identity,
                env.from,
                &node.exchange_key,
                now_ms,
                nonce,
                Some(env.nonce),
                &reply.msg,
                rng,
            )
            .map_err(|e| Rejected::Store(StoreError::Corrupt(format!("node exchange key: {e}"))))?
        } else {
            Envelope::new(
                &self.identity,
                env.from,
                now_ms,
                nonce,
                Some(env.nonce),
                &reply.msg,
            )
        };
        let bytes = out.sign(&self.identity)?;
        Ok(Some(Outgoing {
            to: env.from,
            bytes,
        }))
    }

    async fn dispatch(
        &self,
        from: &NodeId,
        msg: Message,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Reply, Rejected> {
        // Before authentication: the handshake.
        match msg {
            Message::Hello => {
                let mut challenge = [0u8; 32];
                rng.fill_bytes(&mut challenge);
                let mut pending = lock(&self.challenges);
                pending.retain(|_, (_, expiry)| *expiry > now_ms);
                if pending.len() >= self.config.max_challenges {
                    return Ok(error(ErrorCode::Busy, "too many handshakes at once"));
                }
                pending.insert(challenge, (*from, now_ms + self.config.challenge_ttl_ms));
                return Ok(public(Message::Challenge { challenge }));
            }
            Message::Auth {
                challenge,
                exchange_key,
                offer,
            } => {
                let issued = lock(&self.challenges).remove(&challenge);
                return Ok(match issued {
                    Some((node, expiry)) if node == *from && expiry > now_ms => {
                        self.books
                            .register(from, &exchange_key, offer, now_ms)
                            .await?;
                        self.books.presence(from, true, now_ms).await?;
                        tracing::info!("node {} authenticated", from.short());
                        public(Message::Welcome {
                            exchange_key: self.exchange_key(),
                            heartbeat_ms: self.config.heartbeat_ms,
                        })
                    }
                    _ => error(ErrorCode::Unauthenticated, "unknown or expired challenge"),
                });
            }
            _ => {}
        }
        // Everything else: only from registered nodes.
        let Some(node) = self.books.node(from).await? else {
            return Ok(error(ErrorCode::Unauthenticated, "authenticate first"));
        };
        Ok(match msg {
            Message::Heartbeat => {
                self.books.presence(from, true, now_ms).await?;
                public(Message::Ok)
            }
            Message::SetOffer { bytes } => {
                if self.books.set_offer(from, bytes).await? {
                    public(Message::Ok)
                } else {
                    error(
                        ErrorCode::Refused,
                        format!(
                            "cannot offer less than is in use ({} held, {} placed)",
                            node.held, node.placed
                        ),
                    )
                }
            }
            Message::MatchRequest {
                size,
                copies,
                friends,
                friend_copies,
                exclude,
            } => {
                if copies == 0 || copies > self.config.max_copies || size == 0 {
                    error(
                        ErrorCode::Refused,
                        format!(
                            "copies must be 1..={}, size above 0",
                            self.config.max_copies
                        ),
                    )
                } else {
                    let storers = self
                        .match_storers(&node, size, copies, &friends, friend_copies, &exclude, rng)
                        .await?;
                    if storers.is_empty() {
                        error(
                            ErrorCode::NoCapacity,
                            "no storer has room (or your offer is used up)",
                        )
                    } else {
                        private(Message::MatchReply { storers })
                    }
                }
            }
            Message::RecordReplica {
                pack,
                storer,
                size,
                root,
            } => {
                if storer == *from || self.books.node(&storer).await?.is_none() {
                    error(
                        ErrorCode::Refused,
                        "the storer is not another registered node",
                    )
                } else {
                    self.books
                        .record_replica(&ReplicaRecord {
                            owner: *from,
                            pack,
                            storer,
                            size,
                            root,
                        })
                        .await?;
                    public(Message::Ok)
                }
            }
            Message::PutManifest { version, blob } => {
                if self.books.put_manifest(from, version, &blob).await? {
                    public(Message::Ok)
                } else {
                    error(
                        ErrorCode::StaleVersion,
                        "a manifest of this version or newer is kept",
                    )
                }
            }
            Message::GetManifest => match self.books.manifest(from).await? {
                Some(m) => private(Message::Manifest {
                    version: m.version,
                    blob: m.blob,
                }),
                None => error(ErrorCode::NotFound, "no manifest kept"),
            },
            Message::GetStatus => {
                let replicas = self.books.replicas_of(from).await?;
                let mut peers: Vec<NodeId> = replicas.iter().map(|r| r.storer).collect();
                peers.sort_unstable();
                peers.dedup();
                private(Message::Status(StatusReport {
                    offered: node.offer,
                    held: node.held,
                    placed: node.placed,
                    peers: peers.len() as u32,
                }))
            }
            other => error(
                ErrorCode::Malformed,
                format!("a node does not send message kind {}", other.kind()),
            ),
        })
    }

    /// Picks up to `copies` distinct storers with room, never the asker,
    /// friends first for `friend_copies`, then online nodes in random order
    /// (so load spreads), then offline ones.
    /// Each pick reserves its space atomically; a candidate that filled up
    /// meanwhile is skipped.
    #[allow(clippy::too_many_arguments)]
    async fn match_storers(
        &self,
        owner: &NodeRecord,
        size: u64,
        copies: u8,
        friends: &[NodeId],
        friend_copies: u8,
        exclude: &[NodeId],
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Vec<NodeId>, Rejected> {
        let usable = |n: &NodeRecord| {
            n.id != owner.id && !exclude.contains(&n.id) && n.offer.saturating_sub(n.held) >= size
        };
        // A bounded sample of nodes with room (online first, random order),
        // so a match costs the same with ten nodes or ten thousand.
        let sample = 32 + 4 * copies as usize + exclude.len();
        let others: Vec<NodeRecord> = self
            .books
            .candidates(size, sample)
            .await?
            .into_iter()
            .filter(|n| usable(n) && !friends.contains(&n.id))
            .collect();
        let mut others = others;
        others.shuffle(&mut RngAdapter(rng));
        others.sort_by_key(|n| !n.online);
        let mut friendly = Vec::new();
        for f in friends.iter().take(64) {
            if let Some(n) = self.books.node(f).await? {
                if usable(&n) && !friendly.iter().any(|x: &NodeRecord| x.id == n.id) {
                    friendly.push(n);
                }
            }
        }
        friendly.shuffle(&mut RngAdapter(rng));
        friendly.sort_by_key(|n| !n.online);
        let want_friends = friend_copies.min(copies) as usize;
        let mut picked = Vec::new();
        for n in &friendly {
            if picked.len() >= want_friends {
                break;
            }
            if self.books.reserve(&owner.id, &n.id, size).await? {
                picked.push(n.id);
            }
        }
        // The rest from anyone (friends who are left too, if others lack room).
        for n in others.iter().chain(friendly.iter()) {
            if picked.len() >= copies as usize {
                break;
            }
            if !picked.contains(&n.id) && self.books.reserve(&owner.id, &n.id, size).await? {
                picked.push(n.id);
            }
        }
        Ok(picked)
    }
}

/// rand's `SliceRandom` wants a `rand::RngCore`; ours is rand_core's (the
/// same trait, re-exported), reached through a mutable reference.
struct RngAdapter<'a, R: ?Sized>(&'a mut R);

impl<R: CryptoRngCore + ?Sized> rand::RngCore for RngAdapter<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.try_fill_bytes(dest)
    }
}
