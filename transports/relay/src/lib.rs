//! The `relay` transport: links between two nodes through the coordinator,
//! for when no direct path exists.
//!
//! The coordinator forwards opaque payloads between the nodes it serves (a
//! [`RelayCarrier`] the engine lends the transport). It is not trusted:
//! every link runs its own authenticated key exchange (ephemeral X25519,
//! both ends sign the transcript with their Ed25519 node keys) and then
//! AES-256-GCM with per-direction keys, so the coordinator can drop or delay
//! payloads (the link then fails) but not read, alter, inject, replay or
//! impersonate. On top, a small reliability layer (sequence numbers,
//! cumulative and selective acks, retransmission, a send window and a
//! receive window) turns the lossy carrier into ordered, reliable links, and
//! frames are cut into carrier-sized segments.
//!
//! ```text
//! carrier.recv() ── demux task ──(session id)──▶ one session task per link ──▶ carrier.send()
//!                       │ HELLO for a new id: verify, answer, spawn a responder session
//!                       ▼
//!                 accept() ◀── responder sessions, once the initiator proved its keys
//! ```
//!
//! ```no_run
//! # async fn demo(carrier: std::sync::Arc<dyn pluto_plugins_api::RelayCarrier>,
//! #               peer: pluto_plugins_api::NodeId) -> Result<(), pluto_plugins_api::TransportError> {
//! use pluto_plugins_api::{open_transport, TransportOptions};
//! use pluto_transport_relay as _; // links the plugin
//! let relay = open_transport("relay", TransportOptions {
//!     identity_seed: [7; 32],
//!     listen: None,
//!     max_frame: 1 << 20,
//!     relay: Some(carrier),
//! }).await?;
//! let mut link = relay.connect(&peer, &[]).await?; // no address needed
//! link.send(b"hello").await?;
//! link.finish().await?;
//! # Ok(()) }
//! ```
//!
//! The wire format and the security argument are in `docs/relay.md`.

#![warn(missing_docs)]

mod conn;
mod crypto;
mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{
    Link, NodeId, Reach, RelayCarrier, Transport, TransportDescriptor, TransportError,
    TransportFuture, TransportOptions, PLUGIN_ABI_VERSION,
};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use x25519_dalek::StaticSecret;

use conn::{Conn, Params, Refused, INITIAL_MAX_DATA};
use session::{new_session, Pending, PendingGuard, Slot};
use wire::{Hello, Kind, SessionId, Welcome};

/// The transport's name, as config files spell it.
pub const NAME: &str = "relay";

/// Smallest carrier payload the transport works with.
const MIN_PAYLOAD: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Timers, windows and limits of the relay transport. The defaults suit a
/// coordinator on the internet; tests shorten the timers.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// How long `connect` waits for a valid answer before it fails.
    pub handshake_timeout: Duration,
    /// How often `connect` repeats its opening while waiting.
    pub hello_interval: Duration,
    /// A link whose peer sent nothing, or acknowledged nothing sent, for
    /// this long fails.
    pub dead_peer_timeout: Duration,
    /// An idle link sends a keepalive this often.
    pub keepalive_interval: Duration,
    /// Retransmission timeout before the first round-trip measurement.
    pub initial_rto: Duration,
    /// Lower bound of the retransmission timeout.
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout (after backoff).
    pub max_rto: Duration,
    /// Bytes in flight (sent, not yet acknowledged) per link at most.
    pub send_window: usize,
    /// Segments in flight per link at most (and segments buffered out of
    /// order).
    pub max_in_flight: usize,
    /// Bytes a peer may make this node hold beyond what the application read
    /// (raised to at least `max_frame` plus two segments).
    pub recv_window: usize,
    /// Sessions (links and handshakes) at most.
    pub max_sessions: usize,
    /// Sessions with one peer at most.
    pub max_sessions_per_peer: usize,
    /// Incoming links not yet accepted (handshakes included) at most.
    pub max_pending_accepts: usize,
    /// Bytes of received payloads waiting for their sessions, all sessions
    /// together, at most.
    pub max_queued_bytes: usize,
    /// How long a finished link keeps answering a peer that missed its close.
    pub linger: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            hello_interval: Duration::from_secs(1),
            dead_peer_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            initial_rto: Duration::from_secs(1),
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(5),
            send_window: 2 << 20,
            max_in_flight: 1024,
            recv_window: 16 << 20,
            max_sessions: 1024,
            max_sessions_per_peer: 64,
            max_pending_accepts: 64,
            max_queued_bytes: 256 << 20,
            linger: Duration::from_secs(2),
        }
    }
}

/// What the transport refused so far: payloads dropped before or after
/// decryption. Dropping is silent on the wire; these counters are for logs
/// and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Not a relay payload, or for no known session.
    pub unroutable: u64,
    /// The carrier named another sender than the session's peer.
    pub wrong_sender: u64,
    /// Over a session's or the transport's queue limit.
    pub over_capacity: u64,
    /// Openings refused: bad signature, not for this node, over a limit.
    pub refused_handshakes: u64,
    /// Did not authenticate under the session keys.
    pub unauthenticated: u64,
    /// Packet numbers already seen.
    pub replayed: u64,
    /// Authentic segments outside the receive window.
    pub over_window: u64,
}

#[derive(Default)]
struct Stats {
    unroutable: AtomicU64,
    wrong_sender: AtomicU64,
    over_capacity: AtomicU64,
    refused_handshakes: AtomicU64,
    unauthenticated: AtomicU64,
    replayed: AtomicU64,
    over_window: AtomicU64,
}

impl Stats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn add(&self, r: Refused) {
        self.unauthenticated
            .fetch_add(r.unauthenticated, Ordering::Relaxed);
        self.replayed.fetch_add(r.replayed, Ordering::Relaxed);
        self.over_window.fetch_add(r.over_window, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RelayStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            unroutable: g(&self.unroutable),
            wrong_sender: g(&self.wrong_sender),
            over_capacity: g(&self.over_capacity),
            refused_handshakes: g(&self.refused_handshakes),
            unauthenticated: g(&self.unauthenticated),
            replayed: g(&self.replayed),
            over_window: g(&self.over_window),
        }
    }
}

/// A registered session, as the demultiplexer sees it.
struct Entry {
    peer: NodeId,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// Why a session could not be registered.
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error("session id in use")]
    InUse,
    #[error("{0} relay sessions open, the limit")]
    Sessions(usize),
    #[error("{count} relay sessions with {} open, the limit", .peer.short())]
    PeerSessions { count: usize, peer: NodeId },
}

/// Why an opening (a HELLO) from a peer was refused.
#[derive(Debug, thiserror::Error)]
enum HelloRefused {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("it is for another node")]
    OtherResponder,
    #[error("it names another initiator than the coordinator does")]
    OtherInitiator,
    #[error("the transport is closed")]
    Closed,
    #[error("too many links waiting to be accepted")]
    TooManyPending,
    #[error(transparent)]
    Handshake(#[from] crypto::HandshakeError),
    #[error(transparent)]
    Register(#[from] RegisterError),
}

/// What the transport's tasks share.
pub(crate) struct Inner {
    me: NodeId,
    key: SigningKey,
    carrier: Arc<dyn RelayCarrier>,
    cfg: RelayConfig,
    params: Params,
    session_queue_cap: usize,
    sessions: Mutex<HashMap<SessionId, Entry>>,
    pending_accepts: AtomicUsize,
    queued_total: AtomicUsize,
    accept_tx: mpsc::Sender<Box<dyn Link>>,
    shutdown: watch::Sender<bool>,
    stats: Stats,
}

impl Inner {
    fn closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Registers `sid` for `peer` within the session limits.
    fn register(self: &Arc<Self>, sid: SessionId, peer: NodeId) -> Result<Slot, RegisterError> {
        let mut sessions = lock(&self.sessions);
        if sessions.contains_key(&sid) {
            return Err(RegisterError::InUse);
        }
        if sessions.len() >= self.cfg.max_sessions {
            return Err(RegisterError::Sessions(sessions.len()));
        }
        let with_peer = sessions.values().filter(|e| e.peer == peer).count();
        if with_peer >= self.cfg.max_sessions_per_peer {
            return Err(RegisterError::PeerSessions {
                count: with_peer,
                peer,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        sessions.insert(
            sid,
            Entry {
                peer,
                tx,
                queued: queued.clone(),
            },
        );
        Ok(Slot {
            inner: self.clone(),
            sid,
            rx,
            queued,
        })
    }

    /// Hands one payload from the carrier to its session.
    fn route(self: &Arc<Self>, from: NodeId, payload: Vec<u8>) {
        let Ok(h) = wire::header(&payload) else {
            Stats::bump(&self.stats.unroutable);
            return;
        };
        {
            let sessions = lock(&self.sessions);
            if let Some(e) = sessions.get(&h.sid) {
                if e.peer != from {
                    tracing::trace!(
                        "relay: dropped a payload the coordinator says is from {}",
                        from.short()
                    );
                    Stats::bump(&self.stats.wrong_sender);
                    return;
                }
                let len = payload.len();
                if e.queued.load(Ordering::Relaxed) + len > self.session_queue_cap
                    || self.queued_total.load(Ordering::Relaxed) + len > self.cfg.max_queued_bytes
                {
                    Stats::bump(&self.stats.over_capacity);
                    return;
                }
                e.queued.fetch_add(len, Ordering::Relaxed);
                self.queued_total.fetch_add(len, Ordering::Relaxed);
                if e.tx.send(payload).is_err() {
                    e.queued.fetch_sub(len, Ordering::Relaxed);
                    self.queued_total.fetch_sub(len, Ordering::Relaxed);
                }
                return;
            }
        }
        if h.kind == Kind::Hello {
            if let Err(why) = self.on_hello(from, &payload) {
                tracing::debug!("relay: refused an opening from {}: {why}", from.short());
                Stats::bump(&self.stats.refused_handshakes);
            }
        } else {
            Stats::bump(&self.stats.unroutable);
        }
    }

    /// A HELLO for a new session: check it, answer, start a responder session.
    fn on_hello(self: &Arc<Self>, from: NodeId, payload: &[u8]) -> Result<(), HelloRefused> {
        let hello = Hello::decode(payload)?;
        if hello.responder != self.me.0 {
            return Err(HelloRefused::OtherResponder);
        }
        if hello.initiator != from.0 {
            return Err(HelloRefused::OtherInitiator);
        }
        if self.closed() {
            return Err(HelloRefused::Closed);
        }
        if self.pending_accepts.load(Ordering::Relaxed) >= self.cfg.max_pending_accepts {
            return Err(HelloRefused::TooManyPending);
        }
        crypto::verify_hello(&hello)?;
        let eph = StaticSecret::random_from_rng(OsRng);
        let (welcome, keys) = crypto::respond(&self.key, &hello, &eph)?;
        let slot = self.register(hello.sid, from)?;
        self.pending_accepts.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard(self.clone());
        let now = Instant::now();
        let conn = Conn::new(self.params.clone(), keys, false, now);
        let (session, link) = new_session(self.clone(), from, slot, conn);
        let session = session.with_pending(Pending {
            link: Box::new(link),
            hello: payload.to_vec(),
            welcome: welcome.encode(),
            deadline: now + self.cfg.handshake_timeout,
            _guard: guard,
        });
        tokio::spawn(session.run());
        Ok(())
    }
}

async fn demux(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            next = inner.carrier.recv() => next,
        };
        match next {
            Some((from, payload)) => inner.route(from, payload),
            None => {
                tracing::debug!("relay: the coordinator session is gone; closing relay links");
                inner.shutdown.send_replace(true);
                return;
            }
        }
    }
}

/// The relay transport of one node.
pub struct RelayTransport {
    inner: Arc<Inner>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Box<dyn Link>>>,
    demux: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for RelayTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayTransport({})", self.inner.me.short())
    }
}

impl RelayTransport {
    /// Starts the transport with the default [`RelayConfig`].
    pub async fn open(opts: TransportOptions) -> Result<Self, TransportError> {
        Self::with_config(opts, RelayConfig::default())
    }

    /// Starts the transport: takes over `opts.relay` (which must be set) and
    /// starts reading it. Must be called within a Tokio runtime.
    pub fn with_config(opts: TransportOptions, cfg: RelayConfig) -> Result<Self, TransportError> {
        let carrier = opts.relay.ok_or_else(|| {
            TransportError::Config(
                "the relay transport needs a coordinator session to carry it".into(),
            )
        })?;
        let max_payload = carrier.max_payload();
        if max_payload < MIN_PAYLOAD {
            return Err(TransportError::Config(format!(
                "the coordinator carries payloads of {max_payload} bytes; relay needs {MIN_PAYLOAD}"
            )));
        }
        if opts.max_frame == 0 {
            return Err(TransportError::Config("max_frame is 0".into()));
        }
        if cfg.send_window == 0 || cfg.max_in_flight == 0 || cfg.max_sessions == 0 {
            return Err(TransportError::Config(
                "relay windows and limits must not be 0".into(),
            ));
        }
        let seg_max = max_payload - wire::DATA_OVERHEAD;
        let recv_window = cfg
            .recv_window
            .max(opts.max_frame.saturating_add(2 * seg_max))
            .max(INITIAL_MAX_DATA as usize);
        let params = Params {
            max_frame: opts.max_frame,
            seg_max,
            send_window: cfg.send_window,
            max_in_flight: cfg.max_in_flight,
            recv_window,
            max_ooo: cfg.max_in_flight as u64,
            initial_rto: cfg.initial_rto,
            min_rto: cfg.min_rto,
            max_rto: cfg.max_rto.max(cfg.min_rto),
            keepalive: cfg.keepalive_interval,
            dead_after: cfg.dead_peer_timeout,
        };
        let key = SigningKey::from_bytes(&opts.identity_seed);
        let (accept_tx, accept_rx) = mpsc::channel(cfg.max_pending_accepts.max(1));
        let inner = Arc::new(Inner {
            me: NodeId(key.verifying_key().to_bytes()),
            key,
            carrier,
            session_queue_cap: recv_window
                .saturating_add(cfg.send_window)
                .saturating_add(4 * max_payload),
            cfg,
            params,
            sessions: Mutex::new(HashMap::new()),
            pending_accepts: AtomicUsize::new(0),
            queued_total: AtomicUsize::new(0),
            accept_tx,
            shutdown: watch::channel(false).0,
            stats: Stats::default(),
        });
        let demux = tokio::spawn(demux(inner.clone()));
        Ok(Self {
            inner,
            incoming: tokio::sync::Mutex::new(accept_rx),
            demux,
        })
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.inner.me
    }

    /// What was refused so far.
    pub fn stats(&self) -> RelayStats {
        self.inner.stats.snapshot()
    }

    /// Sessions registered now (links, handshakes, lingering closes).
    pub fn sessions(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    async fn handshake(&self, peer: &NodeId) -> Result<Box<dyn Link>, TransportError> {
        let inner = &self.inner;
        let mut sid = [0u8; 16];
        OsRng.fill_bytes(&mut sid);
        let eph = StaticSecret::random_from_rng(OsRng);
        let hello = crypto::hello(&inner.key, peer, sid, &eph);
        let hello_bytes = hello.encode();
        let mut slot = inner
            .register(sid, *peer)
            .map_err(|why| TransportError::Unreachable(*peer, why.to_string()))?;
        let deadline = Instant::now() + inner.cfg.handshake_timeout;
        let mut refused = 0usize;
        let mut carrier_error = None;
        let keys = 'handshake: loop {
            let now = Instant::now();
            if now >= deadline {
                let waited = inner.cfg.handshake_timeout;
                return Err(if refused > 0 {
                    TransportError::WrongPeer {
                        expected: *peer,
                        why: format!(
                            "{refused} answers through the coordinator did not prove its key"
                        ),
                    }
                } else {
                    let extra = carrier_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default();
                    TransportError::Unreachable(
                        *peer,
                        format!("no answer through the coordinator within {waited:?}{extra}"),
                    )
                });
            }
            if let Err(e) = inner.carrier.send(peer, hello_bytes.clone()).await {
                carrier_error = Some(e.to_string());
            }
            let resend = (now + inner.cfg.hello_interval).min(deadline);
            loop {
                let p = match tokio::time::timeout_at(resend, slot.recv()).await {
                    Err(_) => break,
                    Ok(None) => {
                        return Err(TransportError::Closed("the relay transport closed".into()))
                    }
                    Ok(Some(p)) => p,
                };
                let Ok(w) = Welcome::decode(&p) else {
                    continue;
                };
                match crypto::complete(&hello, &eph, &w, peer) {
                    Ok(keys) => break 'handshake keys,
                    Err(e) => {
                        refused += 1;
                        Stats::bump(&inner.stats.refused_handshakes);
                        tracing::debug!("relay: an answer for {} was refused: {e}", peer.short());
                    }
                }
            }
        };
        let conn = Conn::new(inner.params.clone(), keys, true, Instant::now());
        let (session, link) = new_session(inner.clone(), *peer, slot, conn);
        tokio::spawn(session.run());
        Ok(Box::new(link))
    }
}

#[async_trait::async_trait]
impl Transport for RelayTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Through the coordinator: no addresses, and longer to connect, as
    /// its round trips are longer under load (the relay's own handshake
    /// gives up after 10 s).
    fn reach(&self) -> Reach {
        Reach::addressless(std::time::Duration::from_secs(15))
    }

    fn addresses(&self) -> Vec<String> {
        Vec::new()
    }

    async fn connect(
        &self,
        peer: &NodeId,
        _addresses: &[String],
    ) -> Result<Box<dyn Link>, TransportError> {
        if self.inner.closed() {
            return Err(TransportError::Closed(
                "the relay transport is closed".into(),
            ));
        }
        if *peer == self.inner.me {
            return Err(TransportError::Unreachable(
                *peer,
                "a node does not relay to itself".into(),
            ));
        }
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::select! {
            r = self.handshake(peer) => r,
            _ = shutdown.wait_for(|s| *s) => {
                Err(TransportError::Closed("the relay transport closed".into()))
            }
        }
    }

    async fn accept(&self) -> Option<Box<dyn Link>> {
        let mut shutdown = self.inner.shutdown.subscribe();
        if *shutdown.borrow() {
            return None;
        }
        let mut incoming = self.incoming.lock().await;
        tokio::select! {
            link = incoming.recv() => link,
            _ = shutdown.wait_for(|s| *s) => None,
        }
    }

    async fn close(&self) {
        self.inner.shutdown.send_replace(true);
        self.demux.abort();
    }
}

impl Drop for RelayTransport {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
        self.demux.abort();
    }
}

fn open_boxed(opts: TransportOptions) -> TransportFuture {
    Box::pin(async move { Ok(Box::new(RelayTransport::open(opts).await?) as Box<dyn Transport>) })
}

pluto_plugins_api::inventory::submit! {
    TransportDescriptor {
        name: NAME,
        abi_version: PLUGIN_ABI_VERSION,
        open: open_boxed,
    }
}
