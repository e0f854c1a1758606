//! Transports: how two nodes exchange bytes directly (QUIC), through a TURN
//! server (WebRTC, later) or through the coordinator (relay).
//!
//! A transport hands out *links*: ordered, reliable streams of frames
//! between this node and one authenticated peer. Whatever the path, the
//! transport proves the peer's identity (its Ed25519 key, the [`NodeId`])
//! before a link exists; whether that peer may do what it asks (was it
//! matched with us by the coordinator?) is decided above, by the engine.
//!
//! ```text
//! connect(peer, addresses) --> Link (the far end proved it holds peer's key)
//! accept()                 --> Link (link.peer() proved its key)
//! link: send(frame) ... recv() -> Some(frame) ... finish() / recv() -> None
//! ```
//!
//! Frames are at most [`TransportOptions::max_frame`] bytes; a peer that
//! sends a bigger one gets its link closed with an error, never an
//! allocation of its choosing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::NodeId;

/// Why a transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer could not be reached at any of its addresses.
    #[error("cannot reach {0}: {1}")]
    Unreachable(NodeId, String),
    /// The far end did not prove the expected identity.
    #[error("the peer at that address is not {expected}: {why}")]
    WrongPeer {
        /// Who was expected.
        expected: NodeId,
        /// What went wrong.
        why: String,
    },
    /// A frame above the limit.
    #[error("a frame of {0} bytes is over the limit of {1}")]
    FrameTooLarge(usize, usize),
    /// The link or connection closed or broke.
    #[error("link closed: {0}")]
    Closed(String),
    /// A setting is unusable.
    #[error("transport setting: {0}")]
    Config(String),
    /// No linked plugin has this name.
    #[error("no transport plugin is named {0:?} (known: {1})")]
    Unknown(String, String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// What a transport is opened with.
#[derive(Clone)]
pub struct TransportOptions {
    /// The node's Ed25519 secret key (the 32-byte seed): transports prove
    /// the node's identity with it.
    pub identity_seed: [u8; 32],
    /// Where to listen, in the transport's own syntax (QUIC: `IP:PORT`);
    /// `None` for its default.
    pub listen: Option<String>,
    /// Largest frame sent or accepted.
    pub max_frame: usize,
    /// The node's session with its coordinator, for transports that go
    /// through it (relay); `None` when the node has no coordinator.
    pub relay: Option<Arc<dyn RelayCarrier>>,
}

impl std::fmt::Debug for TransportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportOptions")
            .field("identity_seed", &"<secret>")
            .field("listen", &self.listen)
            .field("max_frame", &self.max_frame)
            .field("relay", &self.relay.is_some())
            .finish()
    }
}

/// One way of reaching peers.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Its name, as config files spell it (`quic`, `relay`).
    fn name(&self) -> &'static str;
    /// What reaching a peer through it takes. The default suits a direct
    /// transport: announced addresses, and a few seconds to connect.
    fn reach(&self) -> Reach {
        Reach::default()
    }
    /// Where peers can reach this node through it, for the coordinator to
    /// pass on (QUIC: `IP:PORT` strings).
    fn addresses(&self) -> Vec<String>;
    /// A link to `peer`, tried at each of `addresses` in turn.
    async fn connect(
        &self,
        peer: &NodeId,
        addresses: &[String],
    ) -> Result<Box<dyn Link>, TransportError>;
    /// The next link a peer opened to this node; `None` once closed.
    async fn accept(&self) -> Option<Box<dyn Link>>;
    /// Stops listening and closes every link.
    async fn close(&self);
}

/// What a transport needs to reach a peer, so the engine can try each
/// without knowing it by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reach {
    /// Whether it needs the peer's announced addresses (a relay through the
    /// coordinator does not).
    pub addresses: bool,
    /// How long a connect may take before the next transport is tried.
    pub connect_timeout: std::time::Duration,
}

impl Reach {
    /// A transport that needs addresses and connects within `timeout`.
    pub fn direct(timeout: std::time::Duration) -> Self {
        Self {
            addresses: true,
            connect_timeout: timeout,
        }
    }

    /// A transport that finds peers by itself and connects within `timeout`.
    pub fn addressless(timeout: std::time::Duration) -> Self {
        Self {
            addresses: false,
            connect_timeout: timeout,
        }
    }
}

impl Default for Reach {
    fn default() -> Self {
        Self::direct(std::time::Duration::from_secs(5))
    }
}

/// An ordered, reliable stream of frames with one authenticated peer.
#[async_trait::async_trait]
pub trait Link: Send {
    /// Who is at the other end (proved by the transport).
    fn peer(&self) -> NodeId;
    /// Which transport carries it.
    fn transport(&self) -> &'static str;
    /// Sends one frame.
    async fn send(&mut self, frame: &[u8]) -> Result<(), TransportError>;
    /// The next frame; `None` once the peer has finished sending.
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError>;
    /// No more frames from this end (the peer's `recv` then gives `None`).
    async fn finish(&mut self) -> Result<(), TransportError>;
}

/// A path to other nodes through the coordinator, which the engine lends to
/// transports that need one (relay). The coordinator authenticates both
/// ends and forwards payloads as they are; it can read, drop, delay or
/// alter them, so whatever rides on it must be end-to-end protected.
#[async_trait::async_trait]
pub trait RelayCarrier: Send + Sync {
    /// Largest payload one [`send`](RelayCarrier::send) carries.
    fn max_payload(&self) -> usize;
    /// Sends `payload` to `to` through the coordinator. Delivery is not
    /// confirmed: payloads may be lost (rate limits, reconnections).
    async fn send(&self, to: &NodeId, payload: Vec<u8>) -> Result<(), TransportError>;
    /// The next payload relayed to this node, with the sender the
    /// coordinator names; `None` once the session is gone for good. Only
    /// one task reads it.
    async fn recv(&self) -> Option<(NodeId, Vec<u8>)>;
}

/// The future a [`TransportDescriptor`] returns.
pub type TransportFuture =
    Pin<Box<dyn Future<Output = Result<Box<dyn Transport>, TransportError>> + Send>>;

/// Announces a transport plugin.
#[derive(Debug)]
pub struct TransportDescriptor {
    /// Its name, as `transports = [...]` in config spells it.
    pub name: &'static str,
    /// Must equal [`crate::PLUGIN_ABI_VERSION`].
    pub abi_version: u32,
    /// Starts it (binds, listens).
    pub open: fn(TransportOptions) -> TransportFuture,
}

inventory::collect!(TransportDescriptor);

/// Starts the linked transport plugin called `name`.
pub async fn open_transport(
    name: &str,
    opts: TransportOptions,
) -> Result<Box<dyn Transport>, TransportError> {
    let mut known = Vec::new();
    for d in inventory::iter::<TransportDescriptor>() {
        if d.abi_version != crate::PLUGIN_ABI_VERSION {
            continue;
        }
        if d.name == name {
            return (d.open)(opts).await;
        }
        known.push(d.name);
    }
    known.sort_unstable();
    Err(TransportError::Unknown(name.to_string(), known.join(", ")))
}
