//! The coordinator channel: how control messages travel between nodes and
//! the coordinator (MQTT by default, NATS later).
//!
//! A channel moves opaque bytes addressed by node id, in both directions,
//! and reports presence. Request/reply, signing, freshness and privacy live
//! one layer up (the control protocol), so a broker, and anyone who can
//! publish on it, is an untrusted pipe, and a new channel plugin only has
//! to move bytes.
//!
//! A broker may also check who connects, and confine each client to its
//! own topics: then a channel logs in with one of [`ChannelOptions::logins`]:
//! a signature over [`broker_login_message`] (the embedded broker checks
//! it), or a user name and password the broker keeps (Mosquitto's dynamic
//! security plugin, where the coordinator makes each node's account when
//! it registers, through the newcomer's account). See docs/security.md.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::NodeId;

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// No linked plugin handles this URL.
    #[error("no channel plugin handles {0:?} (known schemes: {1})")]
    UnknownScheme(String, String),
    /// The URL is not usable.
    #[error("bad channel URL {0:?}: {1}")]
    BadUrl(String, String),
    /// The payload is larger than the channel carries.
    #[error("payload of {0} bytes exceeds the channel's limit of {1}")]
    TooLarge(usize, usize),
    /// The channel was closed.
    #[error("channel closed")]
    Closed,
    /// An error of the plugin's own.
    #[error("{0}")]
    Plugin(Box<dyn std::error::Error + Send + Sync>),
}

/// Which end of the channel this is.
#[derive(Clone, Debug)]
pub enum ChannelRole {
    /// A node: receives what is sent to its id.
    Node {
        /// The node.
        id: NodeId,
        /// Published for the coordinator when the connection is lost without
        /// a goodbye (MQTT last will); empty for none.
        will: Vec<u8>,
        /// Published on the presence channel after every (re)connection;
        /// empty for none (a short-lived connection beside the node's
        /// long-lived one says nothing about presence).
        hello: Vec<u8>,
    },
    /// A node that has no account on a broker that keeps accounts yet: it
    /// logs in as [`NEWCOMER_USER`] and may only say `Hello` and `Auth` to
    /// the coordinator (which then makes its account) and hear the answers.
    Newcomer {
        /// The node.
        id: NodeId,
    },
    /// A coordinator replica: receives what nodes send and their presence.
    /// Replicas in the same group share the load (each message reaches one).
    Coordinator {
        /// Load-sharing group; `None` for a single coordinator.
        group: Option<String>,
    },
}

/// Proves this end's identity key to a broker that asks for it.
pub trait ChannelSigner: Send + Sync {
    /// The id (public key) whose key signs.
    fn id(&self) -> NodeId;
    /// An Ed25519 signature of `message` with that key.
    fn sign(&self, message: &[u8]) -> [u8; 64];
}

/// The account every node may log in with before it has its own, on
/// brokers that keep accounts: it reaches the coordinator's newcomer
/// topics and nothing else. Its password is no secret.
pub const NEWCOMER_USER: &str = "pluto-newcomer";
/// [`NEWCOMER_USER`]'s password.
pub const NEWCOMER_PASSWORD: &str = "pluto-newcomer";

/// One way to log in to a broker.
#[derive(Clone)]
pub enum Login {
    /// The signer's id as user name and a fresh signature over
    /// [`broker_login_message`] as password (the embedded broker), for the
    /// broker of the coordinator named (all zeros when the node does not
    /// know its key yet: trust on first use).
    Signed(Arc<dyn ChannelSigner>, NodeId),
    /// A user name and password the broker keeps.
    Password {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signed(s, c) => write!(f, "Signed({} for {})", s.id().short(), c.short()),
            Self::Password { user, .. } => write!(f, "Password({user})"),
        }
    }
}

/// What a channel signs to log in to a broker that checks keys: a
/// domain-separated message binding the connection's client id, the time
/// of the attempt (ms since the epoch) and the coordinator whose broker it
/// is for, so that a login seen once opens no other connection, on this
/// broker or another coordinator's, and lapses with the broker's window.
///
/// ```text
/// "pluto broker login v2\0" || time_ms (u64 LE) || coordinator key (32; zeros: any)
///                           || client id (UTF-8)
/// ```
pub fn broker_login_message(client_id: &str, time_ms: u64, coordinator: &NodeId) -> Vec<u8> {
    const CONTEXT: &[u8] = b"pluto broker login v2\0";
    let mut m = Vec::with_capacity(CONTEXT.len() + 8 + 32 + client_id.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(&time_ms.to_le_bytes());
    m.extend_from_slice(&coordinator.0);
    m.extend_from_slice(client_id.as_bytes());
    m
}

/// Settings of a channel.
#[derive(Clone)]
pub struct ChannelOptions {
    /// This end's role.
    pub role: ChannelRole,
    /// Largest payload sent or accepted.
    pub max_payload: usize,
    /// Logins to try, in order, until the broker takes one (the one that
    /// worked is tried first next time); none: connects without.
    pub logins: Vec<Login>,
}

impl std::fmt::Debug for ChannelOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelOptions")
            .field("role", &self.role)
            .field("max_payload", &self.max_payload)
            .field("logins", &self.logins)
            .finish()
    }
}

/// Something that happened on a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelEvent {
    /// (Re)connected, with subscriptions in place.
    Connected,
    /// The connection dropped; the channel reconnects by itself.
    Disconnected(String),
    /// A connection attempt was turned away at once: nothing listens at
    /// the address (refused), or the host or its network is unreachable.
    /// The channel keeps trying, as after [`Self::Disconnected`]; a caller
    /// waiting for its first connection need not wait for a timeout.
    Refused(String),
    /// The broker turned this end away for good: its login, or one of
    /// its subscriptions, was refused. Retrying does not help; the
    /// channel keeps trying anyway, in case the broker's rules change.
    Denied(String),
    /// A payload for this end. `from` is the sender the transport claims
    /// (not authenticated); `None` when it came from the coordinator.
    Message {
        /// Claimed sender.
        from: Option<NodeId>,
        /// The bytes.
        payload: Vec<u8>,
    },
    /// A newcomer's payload (coordinator end): only its `Hello` and `Auth`
    /// are for taking; answers go back with [`ControlChannel::welcome`].
    Newcomer {
        /// The node the topic names (not authenticated).
        node: NodeId,
        /// The bytes.
        payload: Vec<u8>,
    },
    /// A node's presence notice (its hello or its will), unauthenticated.
    Presence {
        /// The node the topic names.
        node: NodeId,
        /// The bytes.
        payload: Vec<u8>,
    },
}

/// One end of a coordinator channel.
#[async_trait::async_trait]
pub trait ControlChannel: Send + Sync {
    /// Sends `payload` to a node (`Some`) or to the coordinator (`None`).
    /// Delivery is at least once while connected; a message sent while
    /// disconnected may be lost (the protocol retries).
    async fn send(&self, to: Option<&NodeId>, payload: &[u8]) -> Result<(), ChannelError>;
    /// Sends an answer to a newcomer ([`ChannelEvent::Newcomer`]); by
    /// default, as to any node.
    async fn welcome(&self, to: &NodeId, payload: &[u8]) -> Result<(), ChannelError> {
        self.send(Some(to), payload).await
    }
    /// The next event; `None` once the channel is closed.
    async fn next_event(&self) -> Option<ChannelEvent>;
    /// Says goodbye (no will is published) and stops.
    async fn close(&self);
}

/// The future a [`ChannelDescriptor`] returns.
pub type ChannelFuture =
    Pin<Box<dyn Future<Output = Result<Box<dyn ControlChannel>, ChannelError>> + Send>>;

/// Announces a channel plugin.
#[derive(Debug)]
pub struct ChannelDescriptor {
    /// Its name, as config files spell it.
    pub name: &'static str,
    /// URL schemes it connects to (`mqtt` connects to `mqtt://HOST:PORT`).
    pub schemes: &'static [&'static str],
    /// Must equal [`crate::PLUGIN_ABI_VERSION`].
    pub abi_version: u32,
    /// Checks a URL's form without connecting (the same checks `connect`
    /// makes first).
    pub check: fn(&str) -> Result<(), ChannelError>,
    /// Connects (and keeps reconnecting) to the URL.
    pub connect: fn(&str, ChannelOptions) -> ChannelFuture,
}

inventory::collect!(ChannelDescriptor);

/// The linked channel plugin that handles the URL's scheme.
fn channel_plugin(url: &str) -> Result<&'static ChannelDescriptor, ChannelError> {
    crate::registry::pick(url, inventory::iter::<ChannelDescriptor>(), |d| {
        (d.schemes, d.abi_version)
    })
    .map_err(|known| ChannelError::UnknownScheme(url.to_string(), known))
}

/// Checks, without connecting, that a linked channel plugin handles the
/// URL and that the URL has the form that plugin expects.
pub fn check_channel_url(url: &str) -> Result<(), ChannelError> {
    (channel_plugin(url)?.check)(url)
}

/// Connects with whichever linked channel plugin handles the URL's scheme.
pub async fn connect_channel(
    url: &str,
    opts: ChannelOptions,
) -> Result<Box<dyn ControlChannel>, ChannelError> {
    (channel_plugin(url)?.connect)(url, opts).await
}
