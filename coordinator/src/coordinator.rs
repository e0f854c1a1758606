//! The coordinator's state: who it is, its books, its settings, and the
//! in-memory tables of each concern, each behind a lock of its own.
//!
//! ```text
//! Coordinator
//!   identity, exchange  its keys (kept in their own file, not in the books)
//!   books               BooksStore: the only state that outlives a restart
//!   guard               ReplayGuard    router: stale, future-dated, replayed
//!   answers             Answers        router: a repeated request, the same answer
//!   sessions            Sessions       login challenges (Hello, Auth)
//!   relay               TokenBuckets   relayed bytes per node
//!   audits              Audits         pending audits, owners' audit rate, the schedule
//!   standing            (tokio lock)   a standing is read, changed and written back whole
//! ```
//!
//! The tables are plain values whose methods take the time (and the
//! randomness) as arguments; no lock but `standing` is held across an
//! await. Each concern adds its message handlers to [`Coordinator`] in its
//! own module, and [`crate::router`] sends each message to one of them.

use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{BooksStore, NodeId, StoreError};
use pluto_protocol::{exchange_public, EnvelopeError, ErrorCode, Message, Refused, ReplayGuard};
use rand_core::CryptoRngCore;
use x25519_dalek::StaticSecret;

use crate::answers::Answers;
use crate::audits::Audits;
use crate::limits::TokenBuckets;
use crate::sessions::Sessions;
use crate::CoordinatorConfig;

/// The recipient of a first Hello to a coordinator not yet pinned.
pub const ANY_COORDINATOR: NodeId = NodeId([0; 32]);

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
    /// Not a handshake, on the newcomers' topic.
    #[error("from {0}: only Hello and Auth are taken from a newcomer")]
    NotHandshake(NodeId),
}

/// Makes each node's account on a broker that keeps accounts (Mosquitto's
/// dynamic security plugin), when a node that has none registers.
#[pluto_plugins_api::async_trait]
pub trait BrokerAccounts: Send + Sync {
    /// Makes `node`'s account, confined to its own topics, with `password`
    /// (or sets the password of the one it has).
    async fn provision(
        &self,
        node: &NodeId,
        password: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// To whom.
    pub to: NodeId,
    /// The signed envelope.
    pub bytes: Vec<u8>,
}

/// What one sweep of the books did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Reservations that lapsed and were released.
    pub released: u64,
    /// Nodes marked offline because they fell silent.
    pub silent: Vec<NodeId>,
    /// Presence changes forgotten.
    pub pruned: u64,
}

/// Handshake messages one key may have in the handshake replay guard
/// (the replay window long): a node running a command every second
/// (each a Hello and an Auth) stays well within it, and a key cannot
/// take more than this of the guard.
const HANDSHAKES_PER_SENDER: usize = 512;

/// The coordinator.
pub struct Coordinator {
    pub(crate) identity: SigningKey,
    pub(crate) exchange: StaticSecret,
    pub(crate) books: Arc<dyn BooksStore>,
    pub(crate) config: CoordinatorConfig,
    pub(crate) guard: Mutex<ReplayGuard>,
    /// Hello and Auth, apart from the rest (see the router).
    pub(crate) handshake_guard: Mutex<ReplayGuard>,
    pub(crate) answers: Mutex<Answers>,
    pub(crate) sessions: Mutex<Sessions>,
    pub(crate) relay: Mutex<TokenBuckets>,
    /// Match requests per owner.
    pub(crate) matches: Mutex<TokenBuckets>,
    /// Owners refused for want of quota lately (storers of choice).
    pub(crate) hungry: Mutex<crate::matching::Hungry>,
    pub(crate) audits: Mutex<Audits>,
    /// Standing is read, changed and written back under this lock.
    pub(crate) standing: tokio::sync::Mutex<()>,
    /// Whether the channel's presence notices can be believed (the broker
    /// lets a node publish on its own presence topic only).
    presence_trusted: std::sync::atomic::AtomicBool,
    /// Where nodes' broker accounts are made, if the broker keeps any.
    pub(crate) accounts: std::sync::OnceLock<Arc<dyn BrokerAccounts>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Coordinator({})", self.id().short())
    }
}

impl Coordinator {
    /// A coordinator with this identity (kept in its own key file, not in
    /// the books) and exchange secret. The settings should have passed
    /// [`CoordinatorConfig::validate`]; settings that did not make little
    /// sense, but panic nowhere.
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
            guard: Mutex::new(ReplayGuard::with_sender_limit(
                config.window_ms,
                config.replay_capacity,
                config.replay_per_sender,
            )),
            handshake_guard: Mutex::new(ReplayGuard::with_sender_limit(
                config.window_ms,
                config.max_challenges.saturating_mul(4),
                HANDSHAKES_PER_SENDER.min(config.max_challenges).max(1),
            )),
            answers: Mutex::new(Answers::new(config.answer_cache_bytes)),
            sessions: Mutex::new(Sessions::new(
                config.max_challenges,
                config.challenges_per_node,
                config.challenge_ttl_ms,
            )),
            hungry: Mutex::new(crate::matching::Hungry::default()),
            matches: Mutex::new(TokenBuckets::new(config.matches_per_s, config.match_burst)),
            relay: Mutex::new(TokenBuckets::new(
                config.relay_bytes_per_s,
                config.relay_burst_bytes,
            )),
            audits: Mutex::new(Audits::new(&config)),
            standing: tokio::sync::Mutex::new(()),
            presence_trusted: std::sync::atomic::AtomicBool::new(false),
            accounts: std::sync::OnceLock::new(),
            config,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The coordinator's identity, which nodes pin.
    pub fn id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    /// Believe the channel's presence notices (a node's will: "offline"):
    /// only when the broker confines each node's presence topic to that
    /// node's own authenticated connection, as the embedded broker with
    /// logins does. Otherwise (the default) anyone could publish them, and
    /// a node goes offline only when the sweeper finds it silent.
    pub fn trust_presence(&self, trusted: bool) {
        self.presence_trusted
            .store(trusted, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes each newcomer's broker account with `accounts` when it
    /// registers (a node that logged in as a newcomer sends the password
    /// in its `Auth`). Such a broker confines presence topics, so presence
    /// is trusted too. Only the first call counts.
    pub fn keep_broker_accounts(&self, accounts: Arc<dyn BrokerAccounts>) {
        let _ = self.accounts.set(accounts);
        self.trust_presence(true);
    }

    /// See [`Coordinator::trust_presence`].
    pub fn presence_trusted(&self) -> bool {
        self.presence_trusted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The coordinator's X25519 public key.
    pub fn exchange_key(&self) -> [u8; 32] {
        exchange_public(&self.exchange)
    }

    /// Releases lapsed reservations, marks nodes that fell silent (no
    /// heartbeat for three intervals) offline, and forgets old presence
    /// changes. Run every `sweep_ms`.
    pub async fn sweep(&self, now_ms: u64) -> Result<Sweep, StoreError> {
        let released = self.books.release_expired(now_ms).await?;
        let silent = self
            .books
            .mark_silent_offline(
                now_ms.saturating_sub(self.config.heartbeat_ms.saturating_mul(3)),
                now_ms,
            )
            .await?;
        let pruned = self
            .books
            .prune_presence(now_ms.saturating_sub(self.config.presence_keep_ms))
            .await?;
        Ok(Sweep {
            released,
            silent,
            pruned,
        })
    }
}

/// Locks a table; a panic elsewhere while it was held does not poison it
/// for good (each table stays consistent between method calls).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a message handler answers: a message, and whether it is private.
pub(crate) struct Reply {
    pub(crate) msg: Message,
    pub(crate) private: bool,
}

/// An answer in the clear.
pub(crate) fn public(msg: Message) -> Reply {
    Reply {
        msg,
        private: false,
    }
}

/// An answer sealed to its recipient.
pub(crate) fn private(msg: Message) -> Reply {
    Reply { msg, private: true }
}

/// An error the sender can act on.
pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
    public(Message::Error {
        code,
        message: message.into(),
    })
}

/// rand's `SliceRandom` wants a `rand::RngCore`; ours is rand_core's (the
/// same trait, re-exported), reached through a mutable reference.
pub(crate) struct RngAdapter<'a, R: ?Sized>(pub(crate) &'a mut R);

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
