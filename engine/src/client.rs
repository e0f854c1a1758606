//! The node's side of the coordinator channel: connect, authenticate, ask.
//!
//! ```text
//! connect(url) --Hello--> coordinator --Challenge (signed; pins or checks its key)-->
//!              --Auth(challenge, exchange key, offer)--> --Welcome-->  ready
//! request(msg) --envelope(nonce)--> ... <--reply (from the pinned key, to us,
//!              answering that nonce, fresh; opened when sealed to us)
//!              the same envelope again every RESEND_AFTER until answered
//! ```
//!
//! One task reads the channel: answers go to the request waiting for their
//! nonce (so requests run concurrently), relayed payloads to the relay
//! transport. Replies that are not from the pinned coordinator, not to this
//! node, not an answer to a pending request, or not fresh are ignored, so
//! nobody else on the broker can answer in the coordinator's name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{
    connect_channel, ChannelError, ChannelEvent, ChannelOptions, ChannelRole, ControlChannel,
    Login, NodeId, RelayCarrier, TransportError,
};
use pluto_protocol::{exchange_public, Envelope, ErrorCode, Message, ReplayGuard, MAX_ENVELOPE};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, oneshot};
use x25519_dalek::StaticSecret;

use crate::keys::Keys;
use crate::repo::lock;

/// How long a request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long before a request without an answer is sent again (the same
/// bytes: the coordinator answers a repeated request from its answer cache,
/// without carrying it out twice).
pub const RESEND_AFTER: Duration = Duration::from_secs(3);
/// The recipient of every Hello: the coordinator accepts it whatever its
/// key, and the signed challenge it answers with says who answered.
const ANY_COORDINATOR: NodeId = NodeId([0; 32]);
/// How long an answer from the pinned key may come after one signed by
/// another key, before the other key is reported (see
/// [`CoordinatorClient::connect`]).
const OTHER_SIGNER_GRACE: Duration = Duration::from_secs(2);

/// Why talking to the coordinator failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The channel failed.
    #[error("coordinator channel: {0}")]
    Channel(#[from] ChannelError),
    /// Nothing accepts connections at the URL (refused, or no route).
    #[error("cannot connect to {url}: {why} (is the coordinator running, and is the URL right?)")]
    Unreachable {
        /// Where.
        url: String,
        /// The channel's words.
        why: String,
    },
    /// The broker turned this node away (its login or a subscription).
    #[error("the broker at {url} turned this node away: {why}")]
    Denied {
        /// Where.
        url: String,
        /// The channel's words.
        why: String,
    },
    /// No answer in time.
    #[error("the coordinator did not answer within {0:?} (is it running, and is the URL right?)")]
    Timeout(Duration),
    /// The coordinator answered, signed by another key than the pinned one.
    #[error("the coordinator's key does not match: expected {pinned}, it answers as {seen}")]
    KeyChanged {
        /// Pinned.
        pinned: NodeId,
        /// Seen.
        seen: NodeId,
    },
    /// The pinned key in the config is not a key.
    #[error("coordinator_key in config.toml: {0}")]
    BadPin(String),
    /// The coordinator refused.
    #[error("the coordinator refused: {message} ({code:?})")]
    Refused {
        /// Code.
        code: ErrorCode,
        /// Its words.
        message: String,
    },
    /// An answer that does not fit the question.
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// Whether trying again later may succeed (the coordinator or the
    /// network down, an answer lost), as opposed to a mistake in the URL or
    /// the key that only a person can fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Channel(ChannelError::UnknownScheme(..) | ChannelError::BadUrl(..))
            | Self::KeyChanged { .. }
            | Self::Denied { .. }
            | Self::BadPin(_) => false,
            Self::Channel(_)
            | Self::Unreachable { .. }
            | Self::Timeout(_)
            | Self::Refused { .. }
            | Self::Unexpected(_) => true,
        }
    }
}

/// Milliseconds since the epoch, as envelopes and tickets count time.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long a node waits to be let in once its broker account was made
/// (the channel retries with a backoff of at most 5 s).
const ACCOUNT_GRACE: Duration = Duration::from_secs(12);

/// Waits for `channel`'s first connection. A refusal ends the wait at once
/// (nothing listens there); silence (a firewall that drops, a broker that
/// does not answer) waits. With `denied_grace`, the broker's refusals are
/// waited past for that long (its last one is the error).
async fn connected(
    channel: &dyn ControlChannel,
    url: &str,
    denied_grace: Option<Duration>,
) -> Result<(), ClientError> {
    let started = tokio::time::Instant::now();
    let mut last_denied = None;
    let wait = async {
        while let Some(ev) = channel.next_event().await {
            match ev {
                ChannelEvent::Connected => return Ok(()),
                ChannelEvent::Refused(why) => {
                    return Err(ClientError::Unreachable {
                        url: pluto_plugins_api::redact_url(url),
                        why,
                    })
                }
                ChannelEvent::Denied(why) => {
                    let denied = ClientError::Denied {
                        url: pluto_plugins_api::redact_url(url),
                        why,
                    };
                    match denied_grace {
                        Some(g) if started.elapsed() < g => last_denied = Some(denied),
                        _ => return Err(denied),
                    }
                }
                _ => {}
            }
        }
        Err(ChannelError::Closed.into())
    };
    let limit = denied_grace.map_or(REQUEST_TIMEOUT, |g| g.max(REQUEST_TIMEOUT));
    match tokio::time::timeout(limit, wait).await {
        Ok(r) => r,
        Err(_) => Err(last_denied.unwrap_or(ClientError::Timeout(limit))),
    }
}

/// Relayed payloads waiting for the relay transport; beyond this they are
/// dropped (the relay re-sends).
const RELAY_QUEUE: usize = 256;
/// Room left in an envelope around a relay payload.
const RELAY_OVERHEAD: usize = 1024;

/// A verified answer and who signed it.
type Answer = (Message, NodeId);
/// Requests waiting, by nonce: where the answer goes, and whether any
/// signer is accepted (first contact).
type Pending = HashMap<[u8; 16], (oneshot::Sender<Answer>, bool)>;
/// Where relayed payloads go, with their sender.
type RelayQueue = mpsc::Sender<(NodeId, Vec<u8>)>;
/// Challenges waiting for the storer; beyond this they are dropped (and
/// count as late).
const CHALLENGE_QUEUE: usize = 1024;

/// What the reader task and the requests share.
struct Shared {
    channel: Arc<dyn ControlChannel>,
    identity: SigningKey,
    exchange: StaticSecret,
    me: NodeId,
    coordinator: Mutex<NodeId>,
    /// The coordinator's X25519 key, once its challenge said it: every
    /// message after the Hello is sealed to it.
    sealing: Mutex<Option<[u8; 32]>>,
    guard: Mutex<ReplayGuard>,
    pending: Mutex<Pending>,
    /// The last answer signed by another key than the pinned one.
    other_signer: Mutex<Option<NodeId>>,
    /// Wakes the requests when such an answer came.
    other_signed: tokio::sync::Notify,
    relayed: Mutex<Option<RelayQueue>>,
    /// Where audits of what this node holds go ([`Message::Prove`]).
    challenges: Mutex<Option<mpsc::Sender<Message>>>,
}

impl Shared {
    fn coordinator(&self) -> NodeId {
        *lock(&self.coordinator)
    }

    /// `msg` to `to`, signed, and sealed to the coordinator once its key is
    /// known (a Hello never is: it goes out before).
    fn envelope(&self, to: NodeId, nonce: [u8; 16], msg: &Message) -> Result<Vec<u8>, String> {
        let sealing = match msg {
            Message::Hello => None,
            _ => *lock(&self.sealing),
        };
        let env = match sealing {
            Some(key) => Envelope::new_private(
                &self.identity,
                to,
                &key,
                now_ms(),
                nonce,
                None,
                msg,
                &mut OsRng,
            )
            .map_err(|e| e.to_string())?,
            None => Envelope::new(&self.identity, to, now_ms(), nonce, None, msg),
        };
        env.sign(&self.identity).map_err(|e| e.to_string())
    }

    /// Handles one payload from the channel.
    fn take(&self, payload: &[u8]) {
        let Ok(env) = Envelope::verify(payload) else {
            return;
        };
        if env.to != self.me {
            return;
        }
        let waiter = env.reply_to.and_then(|n| {
            let learn = lock(&self.pending).get(&n).map(|(_, learn)| *learn)?;
            Some((n, learn))
        });
        let learn = waiter.is_some_and(|(_, l)| l);
        if !learn && env.from != self.coordinator() {
            if waiter.is_some() {
                *lock(&self.other_signer) = Some(env.from);
                self.other_signed.notify_one();
            }
            return;
        }
        if lock(&self.guard).check(&env, now_ms()).is_err() {
            return;
        }
        let msg = if env.is_private() {
            env.open_private(&self.exchange).map_err(|e| e.to_string())
        } else {
            env.message().map_err(|e| e.to_string())
        };
        let Ok(msg) = msg else {
            tracing::debug!("an answer from the coordinator that does not open");
            return;
        };
        match (waiter, msg) {
            (Some((nonce, _)), m) => {
                if let Some((tx, _)) = lock(&self.pending).remove(&nonce) {
                    let _ = tx.send((m, env.from));
                }
            }
            (None, Message::Relayed { from, payload }) => {
                let tx = lock(&self.relayed).clone();
                if let Some(tx) = tx {
                    if tx.try_send((from, payload)).is_err() {
                        tracing::debug!(
                            "relay queue full; a payload from {} dropped",
                            from.short()
                        );
                    }
                }
            }
            (None, m @ Message::Prove { .. }) => {
                let tx = lock(&self.challenges).clone();
                match tx {
                    Some(tx) if tx.try_send(m).is_ok() => {}
                    _ => tracing::warn!("a challenge came and nobody takes it; dropped"),
                }
            }
            (None, _) => {}
        }
    }
}

/// An authenticated session with the coordinator. Requests may run
/// concurrently from several tasks.
pub struct CoordinatorClient {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    /// Heartbeat interval the coordinator asked for.
    pub heartbeat: Duration,
}

impl std::fmt::Debug for CoordinatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CoordinatorClient({})",
            self.shared.coordinator().short()
        )
    }
}

impl Drop for CoordinatorClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl CoordinatorClient {
    /// Connects to `url`, checks (or, with `pinned` None, learns) the
    /// coordinator's key, and authenticates with `offer`. `presence` marks
    /// the node's long-lived connection (its daemon): that one announces the
    /// node online and leaves a last will; short-lived ones beside it
    /// (commands) say nothing about presence.
    ///
    /// The node logs in to the broker with a signature (the embedded
    /// broker) or with its account's password (Mosquitto with accounts).
    /// When the broker refuses both, the node may have no account yet: it
    /// registers through the newcomers' account, sending the password for
    /// the coordinator to make its account, and then logs in with that.
    pub async fn connect(
        url: &str,
        keys: &Keys,
        mut pinned: Option<NodeId>,
        offer: u64,
        presence: bool,
    ) -> Result<Self, ClientError> {
        let id = keys.node_id();
        let (will, hello) = if presence {
            (b"offline".to_vec(), b"online".to_vec())
        } else {
            (Vec::new(), Vec::new())
        };
        let signer: Arc<dyn pluto_plugins_api::ChannelSigner> =
            Arc::new(pluto_protocol::KeySigner(keys.identity.clone()));
        let channel: Arc<dyn ControlChannel> = connect_channel(
            url,
            ChannelOptions {
                role: ChannelRole::Node { id, will, hello },
                max_payload: MAX_ENVELOPE,
                logins: vec![
                    // For the coordinator this node pinned: a login seen on
                    // the wire opens nothing on another coordinator's broker.
                    Login::Signed(signer.clone(), pinned.unwrap_or(ANY_COORDINATOR)),
                    Login::Password {
                        user: id.to_hex(),
                        password: hex::encode(*keys.broker_password()),
                    },
                    // Refused both ways: perhaps the pinned key is not this
                    // broker's coordinator's. Logged in for any, the node
                    // hears who answers, and says which key it met.
                    Login::Signed(signer, ANY_COORDINATOR),
                ],
            },
        )
        .await?
        .into();
        let connected = match connected(&*channel, url, None).await {
            Err(denied @ ClientError::Denied { .. }) => {
                match Self::newcomer(url, keys, pinned, offer).await {
                    Ok(coordinator) => {
                        pinned = Some(coordinator);
                        // The channel retries on its own; refusals from
                        // before the account was made may still be queued.
                        connected(&*channel, url, Some(ACCOUNT_GRACE)).await
                    }
                    // The coordinator answered, with another key than the
                    // one given: that is the mistake to name.
                    Err(e @ ClientError::KeyChanged { .. }) => Err(e),
                    Err(e) => {
                        tracing::debug!("registering as a newcomer: {e}");
                        Err(denied)
                    }
                }
            }
            other => other,
        };
        if let Err(e) = connected {
            channel.close().await;
            return Err(e);
        }
        Self::session(channel, keys, pinned, offer, None).await
    }

    /// Registers through the newcomers' account of a broker that keeps
    /// accounts, which has the coordinator make this node's account; the
    /// coordinator's key.
    async fn newcomer(
        url: &str,
        keys: &Keys,
        pinned: Option<NodeId>,
        offer: u64,
    ) -> Result<NodeId, ClientError> {
        let channel: Arc<dyn ControlChannel> = connect_channel(
            url,
            ChannelOptions {
                role: ChannelRole::Newcomer { id: keys.node_id() },
                max_payload: MAX_ENVELOPE,
                logins: Vec::new(),
            },
        )
        .await?
        .into();
        if let Err(e) = connected(&*channel, url, None).await {
            channel.close().await;
            return Err(e);
        }
        let password = Some(*keys.broker_password());
        let client = Self::session(channel, keys, pinned, offer, password).await?;
        let coordinator = client.coordinator();
        client.close().await;
        Ok(coordinator)
    }

    /// Shakes hands on a connected channel: Hello, Challenge, Auth, Welcome.
    async fn session(
        channel: Arc<dyn ControlChannel>,
        keys: &Keys,
        pinned: Option<NodeId>,
        offer: u64,
        broker_password: Option<[u8; 32]>,
    ) -> Result<Self, ClientError> {
        let id = keys.node_id();
        let shared = Arc::new(Shared {
            channel: channel.clone(),
            identity: keys.identity.clone(),
            exchange: StaticSecret::from(*keys.exchange),
            me: id,
            coordinator: Mutex::new(pinned.unwrap_or(ANY_COORDINATOR)),
            sealing: Mutex::new(None),
            guard: Mutex::new(ReplayGuard::new(120_000, 100_000)),
            pending: Mutex::new(HashMap::new()),
            other_signer: Mutex::new(None),
            other_signed: tokio::sync::Notify::new(),
            relayed: Mutex::new(None),
            challenges: Mutex::new(None),
        });
        let reader = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(ev) = shared.channel.next_event().await {
                    if let ChannelEvent::Message { payload, .. } = ev {
                        shared.take(&payload);
                    }
                }
                // The channel is gone for good: wake every waiter.
                lock(&shared.pending).clear();
                *lock(&shared.relayed) = None;
                *lock(&shared.challenges) = None;
            })
        };
        let mut client = Self {
            shared,
            reader,
            heartbeat: Duration::from_secs(30),
        };
        let challenge = match client
            .exchange_msg(&Message::Hello, pinned.is_none(), None)
            .await?
        {
            (
                Message::Challenge {
                    challenge,
                    exchange_key,
                },
                signer,
            ) => (challenge, exchange_key, signer),
            (other, _) => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let (challenge, sealing, signer) = challenge;
        *lock(&client.shared.coordinator) = signer;
        // A coordinator that predates sealed requests names no key: then
        // the requests go in the clear, as it expects.
        *lock(&client.shared.sealing) = sealing;
        let auth = Message::Auth {
            challenge,
            exchange_key: exchange_public(&client.shared.exchange),
            offer,
            broker_password,
        };
        let welcome = client.request(&auth).await;
        let welcome = match welcome {
            Ok(w) => w,
            Err(e) => {
                client.shared.channel.close().await;
                return Err(e);
            }
        };
        match welcome {
            Message::Welcome {
                heartbeat_ms,
                exchange_key,
            } => {
                *lock(&client.shared.sealing) = Some(exchange_key);
                client.heartbeat = Duration::from_millis(heartbeat_ms.clamp(1000, 3_600_000));
                Ok(client)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The coordinator's (pinned) identity.
    pub fn coordinator(&self) -> NodeId {
        self.shared.coordinator()
    }

    /// Sends a request and waits for its answer; an `Error` answer is
    /// returned as [`ClientError::Refused`].
    pub async fn request(&self, msg: &Message) -> Result<Message, ClientError> {
        match self.exchange_msg(msg, false, None).await? {
            (Message::Error { code, message }, _) => Err(ClientError::Refused { code, message }),
            (m, _) => Ok(m),
        }
    }

    /// Like [`Self::request`], for a request the coordinator answers only
    /// when something else happened (an audit: when the storer answered):
    /// sent once, waited for up to `wait`.
    pub async fn request_patiently(
        &self,
        msg: &Message,
        wait: Duration,
    ) -> Result<Message, ClientError> {
        match self.exchange_msg(msg, false, Some(wait)).await? {
            (Message::Error { code, message }, _) => Err(ClientError::Refused { code, message }),
            (m, _) => Ok(m),
        }
    }

    /// Sends a message that gets no answer (a storer's proof).
    pub async fn notify(&self, msg: &Message) -> Result<(), ClientError> {
        let s = &self.shared;
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let bytes = s
            .envelope(s.coordinator(), nonce, msg)
            .map_err(ClientError::Unexpected)?;
        s.channel.send(None, &bytes).await?;
        Ok(())
    }

    /// The audits the coordinator sends this node about what it holds
    /// ([`Message::Prove`]), from now on. Only one receiver per session
    /// gets them (the last made).
    pub fn challenges(&self) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(CHALLENGE_QUEUE);
        *lock(&self.shared.challenges) = Some(tx);
        rx
    }

    /// One request and its verified answer, with the answer's signer.
    /// `learn` accepts any signer (first contact); otherwise only the pinned one.
    async fn exchange_msg(
        &self,
        msg: &Message,
        learn: bool,
        patient: Option<Duration>,
    ) -> Result<(Message, NodeId), ClientError> {
        let s = &self.shared;
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        // A Hello goes to any coordinator even with a key pinned: one with
        // another key then answers (rather than dropping a message that is
        // not addressed to it), and the node can say whose key answered.
        let to = if matches!(msg, Message::Hello) {
            ANY_COORDINATOR
        } else {
            s.coordinator()
        };
        let bytes = s
            .envelope(to, nonce, msg)
            .map_err(ClientError::Unexpected)?;
        let (tx, mut rx) = oneshot::channel();
        lock(&s.pending).insert(nonce, (tx, learn));
        let _forget = Forget(s, nonce);
        s.channel.send(None, &bytes).await?;
        // An answer signed by another key is ignored, not fatal at once:
        // anyone on the broker sees the request's nonce and could otherwise
        // break every request by answering first. The other key is reported
        // when the pinned one has not answered within a grace after it (a
        // running coordinator answers in milliseconds).
        let wait = async {
            let mut resend =
                tokio::time::interval_at(tokio::time::Instant::now() + RESEND_AFTER, RESEND_AFTER);
            let mut give_up: Option<tokio::time::Instant> = None;
            loop {
                let other = async {
                    match give_up {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    answer = &mut rx => {
                        return answer.map_err(|_| ClientError::Channel(ChannelError::Closed));
                    }
                    () = s.other_signed.notified(), if give_up.is_none() => {
                        give_up = Some(tokio::time::Instant::now() + OTHER_SIGNER_GRACE);
                    }
                    () = other => {
                        if let Some(seen) = lock(&s.other_signer).take() {
                            return Err(ClientError::KeyChanged {
                                pinned: s.coordinator(),
                                seen,
                            });
                        }
                        give_up = None;
                    }
                    _ = resend.tick(), if patient.is_none() => {
                        // Lost on the way (a broker restart, a coordinator not
                        // yet subscribed), or its answer was: ask again.
                        // A failure here is the channel reconnecting: the
                        // next tick tries again.
                        let _ = s.channel.send(None, &bytes).await;
                    }
                }
            }
        };
        let limit = patient.unwrap_or(REQUEST_TIMEOUT);
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => Err(match lock(&s.other_signer).take() {
                Some(seen) => ClientError::KeyChanged {
                    pinned: s.coordinator(),
                    seen,
                },
                None => ClientError::Timeout(limit),
            }),
        }
    }

    /// The relay path through this session, for the relay transport. Only
    /// one carrier per session receives relayed payloads (the last made).
    pub fn relay_carrier(&self) -> Arc<dyn RelayCarrier> {
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        *lock(&self.shared.relayed) = Some(tx);
        Arc::new(Carrier {
            shared: self.shared.clone(),
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// Says goodbye.
    pub async fn close(self) {
        self.shared.channel.close().await;
    }
}

/// Removes a request from the waiting list however its wait ends.
struct Forget<'a>(&'a Shared, [u8; 16]);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.0.pending).remove(&self.1);
    }
}

/// [`RelayCarrier`] over a coordinator session.
struct Carrier {
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::Receiver<(NodeId, Vec<u8>)>>,
}

#[async_trait::async_trait]
impl RelayCarrier for Carrier {
    fn max_payload(&self) -> usize {
        MAX_ENVELOPE - RELAY_OVERHEAD
    }

    async fn send(&self, to: &NodeId, payload: Vec<u8>) -> Result<(), TransportError> {
        let s = &self.shared;
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let msg = Message::Relay { to: *to, payload };
        let bytes = s
            .envelope(s.coordinator(), nonce, &msg)
            .map_err(TransportError::Other)?;
        s.channel
            .send(None, &bytes)
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))
    }

    async fn recv(&self) -> Option<(NodeId, Vec<u8>)> {
        self.rx.lock().await.recv().await
    }
}
