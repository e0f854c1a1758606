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
//! Replies that are not from the pinned coordinator, not to this node, not
//! an answer to the pending request, or not fresh are ignored, so nobody
//! else on the broker can answer in the coordinator's name.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{
    connect_channel, ChannelError, ChannelEvent, ChannelOptions, ChannelRole, ControlChannel,
    NodeId,
};
use pluto_protocol::{exchange_public, Envelope, ErrorCode, Message, ReplayGuard, MAX_ENVELOPE};
use rand_core::{OsRng, RngCore};
use x25519_dalek::StaticSecret;

use crate::keys::Keys;

/// How long a request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long before a request without an answer is sent again (the same
/// bytes: the coordinator answers a repeated request from its answer cache,
/// without carrying it out twice).
pub const RESEND_AFTER: Duration = Duration::from_secs(3);
/// The recipient of a first Hello when no coordinator is pinned yet.
const ANY_COORDINATOR: NodeId = NodeId([0; 32]);

/// Why talking to the coordinator failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The channel failed.
    #[error("coordinator channel: {0}")]
    Channel(#[from] ChannelError),
    /// No answer in time.
    #[error("the coordinator did not answer within {0:?} (is it running, and is the URL right?)")]
    Timeout(Duration),
    /// The coordinator answered with another key than the pinned one.
    #[error("the coordinator's key changed: pinned {pinned}, it now signs as {seen}; if that is expected, set coordinator_key in config.toml")]
    KeyChanged {
        /// Pinned.
        pinned: NodeId,
        /// Seen.
        seen: NodeId,
    },
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An authenticated session with the coordinator.
pub struct CoordinatorClient {
    channel: Box<dyn ControlChannel>,
    identity: SigningKey,
    exchange: StaticSecret,
    coordinator: NodeId,
    guard: std::sync::Mutex<ReplayGuard>,
    /// Heartbeat interval the coordinator asked for.
    pub heartbeat: Duration,
}

impl std::fmt::Debug for CoordinatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CoordinatorClient({})", self.coordinator.short())
    }
}

impl CoordinatorClient {
    /// Connects to `url`, checks (or, with `pinned` None, learns) the
    /// coordinator's key, and authenticates with `offer`. `presence` marks
    /// the node's long-lived connection (its daemon): that one announces the
    /// node online and leaves a last will; short-lived ones beside it
    /// (commands) say nothing about presence.
    pub async fn connect(
        url: &str,
        keys: &Keys,
        pinned: Option<NodeId>,
        offer: u64,
        presence: bool,
    ) -> Result<Self, ClientError> {
        let id = keys.node_id();
        let (will, hello) = if presence {
            (b"offline".to_vec(), b"online".to_vec())
        } else {
            (Vec::new(), Vec::new())
        };
        let channel = connect_channel(
            url,
            ChannelOptions {
                role: ChannelRole::Node { id, will, hello },
                max_payload: MAX_ENVELOPE,
            },
        )
        .await?;
        let wait = async {
            while let Some(ev) = channel.next_event().await {
                if ev == ChannelEvent::Connected {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, wait).await {
            Ok(true) => {}
            Ok(false) => return Err(ChannelError::Closed.into()),
            Err(_) => return Err(ClientError::Timeout(REQUEST_TIMEOUT)),
        }
        let mut client = Self {
            channel,
            identity: keys.identity.clone(),
            exchange: StaticSecret::from(*keys.exchange),
            coordinator: pinned.unwrap_or(ANY_COORDINATOR),
            guard: std::sync::Mutex::new(ReplayGuard::new(120_000, 100_000)),
            heartbeat: Duration::from_secs(30),
        };
        let (challenge, signer) = match client
            .exchange_msg(&Message::Hello, pinned.is_none())
            .await?
        {
            (Message::Challenge { challenge }, signer) => (challenge, signer),
            (other, _) => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        client.coordinator = signer;
        let auth = Message::Auth {
            challenge,
            exchange_key: exchange_public(&client.exchange),
            offer,
        };
        match client.request(&auth).await? {
            Message::Welcome { heartbeat_ms, .. } => {
                client.heartbeat = Duration::from_millis(heartbeat_ms.clamp(1000, 3_600_000));
                Ok(client)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The coordinator's (pinned) identity.
    pub fn coordinator(&self) -> NodeId {
        self.coordinator
    }

    /// Sends a request and waits for its answer; an `Error` answer is
    /// returned as [`ClientError::Refused`].
    pub async fn request(&self, msg: &Message) -> Result<Message, ClientError> {
        match self.exchange_msg(msg, false).await? {
            (Message::Error { code, message }, _) => Err(ClientError::Refused { code, message }),
            (m, _) => Ok(m),
        }
    }

    /// One request and its verified answer, with the answer's signer.
    /// `learn` accepts any signer (first contact); otherwise only the pinned one.
    async fn exchange_msg(
        &self,
        msg: &Message,
        learn: bool,
    ) -> Result<(Message, NodeId), ClientError> {
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let env = Envelope::new(&self.identity, self.coordinator, now_ms(), nonce, None, msg);
        let bytes = env
            .sign(&self.identity)
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        self.channel.send(None, &bytes).await?;
        // An answer signed by another key is ignored, not fatal: anyone on
        // the broker sees the request's nonce and could otherwise break every
        // request by answering first. Only when the pinned key never answers
        // is the other key reported.
        let mut other_signer = None;
        let wait = async {
            let mut resend =
                tokio::time::interval_at(tokio::time::Instant::now() + RESEND_AFTER, RESEND_AFTER);
            loop {
                let ev = tokio::select! {
                    ev = self.channel.next_event() => ev,
                    _ = resend.tick() => {
                        // Lost on the way (a broker restart, a coordinator not
                        // yet subscribed), or its answer was: ask again.
                        // A failure here is the channel reconnecting: the
                        // next tick tries again.
                        let _ = self.channel.send(None, &bytes).await;
                        continue;
                    }
                };
                let Some(ev) = ev else {
                    return Err(ClientError::Channel(ChannelError::Closed));
                };
                let ChannelEvent::Message { payload, .. } = ev else {
                    continue;
                };
                let Ok(reply) = Envelope::verify(&payload) else {
                    continue;
                };
                let me = NodeId(self.identity.verifying_key().to_bytes());
                if reply.to != me || reply.reply_to != Some(nonce) {
                    continue;
                }
                if !learn && reply.from != self.coordinator {
                    other_signer = Some(reply.from);
                    continue;
                }
                let fresh = crate::repo::lock(&self.guard).check(&reply, now_ms());
                if fresh.is_err() {
                    continue;
                }
                let m = if reply.is_private() {
                    reply
                        .open_private(&self.exchange)
                        .map_err(|e| ClientError::Unexpected(e.to_string()))?
                } else {
                    reply
                        .message()
                        .map_err(|e| ClientError::Unexpected(e.to_string()))?
                };
                return Ok((m, reply.from));
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, wait).await {
            Ok(r) => r,
            Err(_) => Err(match other_signer {
                Some(seen) => ClientError::KeyChanged {
                    pinned: self.coordinator,
                    seen,
                },
                None => ClientError::Timeout(REQUEST_TIMEOUT),
            }),
        }
    }

    /// Says goodbye.
    pub async fn close(self) {
        self.channel.close().await;
    }
}
