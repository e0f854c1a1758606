//! One client connection: a reader task that handles what the client sends,
//! and a writer task that drains the connection's [`Outbox`] to the socket.
//!
//! ```text
//!            packets                       routes publishes
//! client ──────────────► reader ──────────────────────────► router ──► other outboxes
//!   ▲                      │ acks (CONNACK, PUBACK, SUBACK…)    │
//!   │                      ▼                                    ▼ deliveries
//!   └──────────── writer ◄──────────────── outbox ◄──────────────┘
//! ```
//!
//! The outbox is bounded in bytes: a delivery that would take a
//! connection's queue past its bound (or every connection's queues past
//! the broker's) is dropped for that subscriber, so a slow subscriber
//! costs only itself. Acknowledgements get some room beyond the bound; a
//! client that does not even read those is disconnected. The writer sends
//! at most `max_inflight` QoS 1 deliveries that the client has not
//! acknowledged, and ends a connection whose socket takes no data (or
//! whose client acknowledges nothing) for `write_stall`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::{
    ConnAck, ConnectReturnCode, LastWill, Packet, PubAck, Publish, QoS, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout, Instant};

use super::auth::{verify, BrokerAuth, Logins, Role};
use super::router::{valid_topic, ConnId, Router};

/// How much the read buffer grows by at a time.
const READ_CHUNK: usize = 16 << 10;
/// The writer sends when it has this much ready.
const WRITE_BATCH: usize = 64 << 10;
/// Room for acknowledgements beyond a connection's queue bound.
const CONTROL_ROOM: usize = 256 << 10;
/// Queue bookkeeping per message, on top of its topic and payload.
const FRAME_OVERHEAD: usize = 16;
/// What one publish costs a paced client beyond its topic and payload:
/// the broker's work per packet, so floods of tiny publishes are paced too.
const PUBLISH_OVERHEAD: usize = 1024;

/// The broker's bounds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most open client sockets.
    pub(crate) max_connections: usize,
    /// Largest packet accepted (its remaining length).
    pub(crate) max_packet: usize,
    /// Bytes of deliveries queued for one connection.
    pub(crate) queue_per_connection: usize,
    /// Bytes of deliveries queued for all connections together.
    pub(crate) queue_total: usize,
    /// How long a client has to send CONNECT.
    pub(crate) connect_timeout: Duration,
    /// How long a socket may take no data before its connection ends.
    pub(crate) write_stall: Duration,
    /// QoS 1 deliveries sent and not acknowledged, per connection.
    pub(crate) max_inflight: usize,
    /// Most open sockets from one address.
    pub(crate) max_per_address: usize,
    /// Most connections logged in with one node's key: a key may not
    /// multiply its own subscriptions (and the deliveries they queue).
    pub(crate) max_per_key: usize,
    /// The longest keep-alive granted: a client asking for none (0) or
    /// more gets this, and is dropped after 1.5 times it in silence.
    pub(crate) max_keep_alive: Duration,
    /// Bytes of deliveries queued for the coordinator's connection, which
    /// is kept apart from every other queue: nobody else's backlog can
    /// starve it.
    pub(crate) queue_coordinator: usize,
    /// Bytes per second one client other than the coordinator may publish
    /// (0: no limit); beyond it the broker reads from that client more
    /// slowly, so it is held back by TCP rather than dropped.
    pub(crate) publish_rate: u64,
}

impl Limits {
    /// The bounds for `max_connections` clients and payloads up to
    /// `max_payload` bytes.
    pub(crate) fn new(max_connections: usize, max_payload: usize) -> Self {
        // Room for the topic and header around the payload, as the client
        // (lib.rs) allows.
        let max_packet = max_payload.saturating_add(1024);
        let queue_per_connection = (1 << 20).max(max_packet.saturating_mul(2));
        Self {
            max_connections,
            max_packet,
            queue_per_connection,
            queue_total: (256 << 20).max(queue_per_connection.saturating_mul(4)),
            connect_timeout: Duration::from_secs(5),
            write_stall: Duration::from_secs(30),
            max_inflight: 256,
            max_per_address: 256,
            max_per_key: 16,
            max_keep_alive: Duration::from_secs(120),
            queue_coordinator: (64 << 20).max(max_packet.saturating_mul(16)),
            publish_rate: 64 << 20,
        }
    }
}

/// What all connections share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) router: Mutex<Router>,
    pub(crate) limits: Limits,
    /// Who may log in (None: anyone, and anyone may do anything).
    pub(crate) auth: Option<BrokerAuth>,
    logins: Mutex<Logins>,
    /// Bytes queued in all outboxes.
    queued: Arc<AtomicUsize>,
    /// Open client sockets.
    pub(crate) connections: AtomicUsize,
    /// Open client sockets per address.
    pub(crate) per_address: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Connections per node key.
    per_key: Mutex<std::collections::HashMap<String, usize>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these; if something did, the tables
    // are still consistent enough to go on serving.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The state of a broker with these bounds and logins.
    pub(crate) fn new(limits: Limits, auth: Option<BrokerAuth>) -> Self {
        Self {
            router: Mutex::new(Router::new(1024)),
            limits,
            auth,
            logins: Mutex::new(Logins::default()),
            queued: Arc::new(AtomicUsize::new(0)),
            connections: AtomicUsize::new(0),
            per_address: Mutex::new(std::collections::HashMap::new()),
            per_key: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Takes a place for a connection of node `key`; None when the key
    /// has its share. The place is given back when the slot drops.
    fn admit_key(&self, key: &str) -> Option<KeySlot<'_>> {
        let mut m = locked(&self.per_key);
        let n = m.entry(key.to_string()).or_default();
        if *n >= self.limits.max_per_key {
            return None;
        }
        *n += 1;
        Some(KeySlot(self, key.to_string()))
    }

    fn router(&self) -> MutexGuard<'_, Router> {
        locked(&self.router)
    }

    /// Takes a place for a socket from `ip`; false when it has its share.
    pub(crate) fn admit(&self, ip: std::net::IpAddr) -> bool {
        let mut m = locked(&self.per_address);
        let n = m.entry(ip).or_default();
        if *n >= self.limits.max_per_address {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back the place [`Shared::admit`] took.
    pub(crate) fn release(&self, ip: std::net::IpAddr) {
        let mut m = locked(&self.per_address);
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// A node key's place among its connections.
struct KeySlot<'a>(&'a Shared, String);

impl Drop for KeySlot<'_> {
    fn drop(&mut self) {
        let mut m = locked(&self.0.per_key);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What the reader and the writer of one connection share.
#[derive(Debug, Default)]
struct ConnState {
    /// Bytes queued in the outbox.
    queued: AtomicUsize,
    /// Ends the connection (takeover, or the writer failed).
    end: Notify,
    /// Packet ids of QoS 1 deliveries not acknowledged yet.
    inflight: Mutex<Inflight>,
    /// An acknowledgement freed room in `inflight`.
    acked: Notify,
}

#[derive(Debug, Default)]
struct Inflight {
    ids: std::collections::HashSet<u16>,
    next: u16,
}

impl ConnState {
    fn inflight(&self) -> MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A free packet id, when fewer than `max` deliveries are in flight.
    fn try_alloc(&self, max: usize) -> Option<u16> {
        let mut f = self.inflight();
        if f.ids.len() >= max.min(u16::MAX as usize - 1) {
            return None;
        }
        loop {
            f.next = f.next.wrapping_add(1);
            let id = f.next;
            if id != 0 && f.ids.insert(id) {
                return Some(id);
            }
        }
    }

    async fn alloc(&self, max: usize) -> u16 {
        loop {
            let acked = self.acked.notified();
            if let Some(id) = self.try_alloc(max) {
                return id;
            }
            acked.await;
        }
    }

    fn ack(&self, id: u16) {
        if self.inflight().ids.remove(&id) {
            self.acked.notify_one();
        }
    }
}

/// Takes its bytes off the queue counts when the frame is written or dropped.
#[derive(Debug)]
struct Ticket {
    cost: usize,
    conn: Arc<ConnState>,
    global: Option<Arc<AtomicUsize>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.conn.queued.fetch_sub(self.cost, Ordering::Relaxed);
        if let Some(g) = &self.global {
            g.fetch_sub(self.cost, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
enum Frame {
    Publish {
        topic: Arc<str>,
        payload: Bytes,
        qos: QoS,
        ticket: Ticket,
    },
    Control(Packet, Ticket),
}

/// Takes `cost` from a counter's room under `limit`.
fn reserve(counter: &AtomicUsize, cost: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
            q.checked_add(cost).filter(|n| *n <= limit)
        })
        .is_ok()
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued.
    Taken,
    /// Dropped: this connection's queue is full.
    Full,
    /// Dropped: all queues together are full.
    Pressure,
    /// Dropped: the connection is gone.
    Gone,
}

/// Where packets for one connection wait for its writer.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Frame>,
    state: Arc<ConnState>,
    /// The bytes queued for all connections, unless this one is kept
    /// apart (the coordinator's).
    global: Option<Arc<AtomicUsize>>,
    /// Bytes queued for this connection at most.
    queue_limit: usize,
    limits: Limits,
}

impl Outbox {
    /// Queues a delivery; says whether it was taken, or why not.
    pub(crate) fn deliver(&self, topic: &Arc<str>, payload: &Bytes, qos: QoS) -> Delivery {
        let cost = topic.len() + payload.len() + FRAME_OVERHEAD;
        if !reserve(&self.state.queued, cost, self.queue_limit) {
            return Delivery::Full;
        }
        if let Some(global) = &self.global {
            if !reserve(global, cost, self.limits.queue_total) {
                self.state.queued.fetch_sub(cost, Ordering::Relaxed);
                return Delivery::Pressure;
            }
        }
        let ticket = Ticket {
            cost,
            conn: self.state.clone(),
            global: self.global.clone(),
        };
        match self.tx.send(Frame::Publish {
            topic: topic.clone(),
            payload: payload.clone(),
            qos,
            ticket,
        }) {
            Ok(()) => Delivery::Taken,
            Err(_) => Delivery::Gone,
        }
    }

    /// Whether this connection lets its queue grow: it holds more than
    /// half its bound (and is not kept apart from the others).
    pub(crate) fn backlogged(&self) -> bool {
        self.global.is_some() && self.state.queued.load(Ordering::Relaxed) > self.queue_limit / 2
    }

    /// Queues an acknowledgement; false when the client has left too many
    /// unread (or the connection is gone).
    fn control(&self, packet: Packet) -> bool {
        let cost = packet.size() + FRAME_OVERHEAD;
        let limit = self.queue_limit + CONTROL_ROOM;
        if !reserve(&self.state.queued, cost, limit) {
            return false;
        }
        let ticket = Ticket {
            cost,
            conn: self.state.clone(),
            global: None,
        };
        self.tx.send(Frame::Control(packet, ticket)).is_ok()
    }

    /// Ends the connection (its will is published).
    pub(crate) fn end(&self) {
        self.state.end.notify_one();
    }
}

/// Why a connection could not go on.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("closed by the client")]
    Closed,
    #[error("malformed or oversized packet: {0}")]
    Malformed(rumqttc::Error),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
}

/// The next whole packet in `buf`, if there is one.
fn parse(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, Refused> {
    match Packet::read(buf, max_packet) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(Refused::Malformed(e)),
    }
}

/// The first byte of a CONNECT packet.
const CONNECT_BYTE: u8 = 0x10;

/// Reads the next packet (a CONNECT when `first`, or an error as soon as
/// the first byte says otherwise). Cancel-safe: what was read stays in `buf`.
async fn read_packet(
    r: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    max_packet: usize,
    first: bool,
) -> Result<Packet, Refused> {
    loop {
        if first && buf.first().is_some_and(|b| *b != CONNECT_BYTE) {
            return Err(Refused::NotConnect);
        }
        if let Some(p) = parse(buf, max_packet)? {
            return Ok(p);
        }
        if buf.is_empty() && buf.capacity() > 4 * READ_CHUNK {
            // Give back what a large packet took.
            *buf = BytesMut::with_capacity(READ_CHUNK);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(Refused::Closed);
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// With DISCONNECT: no will.
    Goodbye,
    /// Any other way: the will is published.
    Lost(String),
}

/// Serves one client until it leaves.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let limits = shared.limits;
    let (mut r, mut w) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let connect = match timeout(
        limits.connect_timeout,
        read_packet(&mut r, &mut buf, limits.max_packet, true),
    )
    .await
    {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            tracing::debug!("mqtt broker: {peer} sent {other:?} before CONNECT");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!("mqtt broker: {peer} before CONNECT: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("mqtt broker: {peer} sent no CONNECT in time");
            return;
        }
    };
    if connect.protocol != rumqttc::Protocol::V4 {
        // The code is v3.1.1's; a v5 client reads it as a refusal too.
        refuse(&mut w, ConnectReturnCode::RefusedProtocolVersion).await;
        return;
    }
    let role = match &shared.auth {
        None => Role::Open,
        Some(auth) => {
            // The signature is checked outside the lock; the lock only
            // guards the set of logins already used.
            let now = now_ms();
            let checked = verify(auth, &connect.client_id, connect.login.as_ref(), now)
                .and_then(|v| locked(&shared.logins).remember(&v, now).map(|()| v.role));
            match checked {
                Ok(role) => role,
                Err(e) => {
                    tracing::debug!("mqtt broker: {peer}: login refused: {e}");
                    refuse(&mut w, ConnectReturnCode::NotAuthorized).await;
                    return;
                }
            }
        }
    };
    // Past the limit, only the coordinator may use the places kept for it.
    if shared.auth.is_some()
        && !role.is_coordinator()
        && shared.connections.load(Ordering::Relaxed) > limits.max_connections
    {
        tracing::debug!("mqtt broker: {peer}: the broker is full");
        refuse(&mut w, ConnectReturnCode::ServiceUnavailable).await;
        return;
    }
    let _key_slot = match &role {
        Role::Node(key) => match shared.admit_key(key) {
            Some(slot) => Some(slot),
            None => {
                tracing::debug!("mqtt broker: {peer}: key {key} has its share of connections");
                refuse(&mut w, ConnectReturnCode::ServiceUnavailable).await;
                return;
            }
        },
        _ => None,
    };
    let will = match connect.last_will {
        Some(will) if !valid_topic(&will.topic) => {
            tracing::debug!("mqtt broker: {peer}: a will on an invalid topic");
            return;
        }
        Some(will) if !role.may_will(&will.topic) => {
            tracing::debug!("mqtt broker: {peer}: a will on another's topic");
            refuse(&mut w, ConnectReturnCode::NotAuthorized).await;
            return;
        }
        will => will,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(ConnState::default());
    let coordinator = role.is_coordinator();
    let outbox = Outbox {
        tx,
        state: state.clone(),
        global: (!coordinator).then(|| shared.queued.clone()),
        queue_limit: if coordinator {
            limits.queue_coordinator
        } else {
            limits.queue_per_connection
        },
        limits,
    };
    // Every session is clean: nothing is kept between connections.
    outbox.control(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )));
    let writer = tokio::spawn(write_loop(w, rx, state.clone(), limits));
    // A client id is its user's own: nobody takes over another's.
    let client_id = (!connect.client_id.is_empty()).then(|| role.client_key(&connect.client_id));
    let (id, old) = shared.router().connect(client_id, outbox.clone());
    if let Some(old) = old {
        old.end();
    }
    // No client stays forever in silence: none (0) or more than the
    // longest is the longest.
    let asked = Duration::from_secs(u64::from(connect.keep_alive));
    let keep_alive = if asked.is_zero() || asked > limits.max_keep_alive {
        limits.max_keep_alive
    } else {
        asked
    } * 3
        / 2;
    let end = read_loop(
        &mut r, &mut buf, &shared, &role, id, &outbox, &state, keep_alive,
    )
    .await;
    writer.abort();
    let mut router = shared.router();
    router.disconnect(id);
    match (&end, will) {
        (End::Lost(why), Some(will)) => {
            tracing::debug!("mqtt broker: {peer} lost ({why}): publishing its will");
            publish_will(&mut router, will);
        }
        (End::Lost(why), None) => tracing::debug!("mqtt broker: {peer} lost: {why}"),
        (End::Goodbye, _) => {}
    }
}

/// A token bucket of publish bytes: refilled at `rate` per second up to a
/// burst of one second's worth (and at least one packet).
#[derive(Debug)]
struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    fn new(rate: u64, max_packet: u64) -> Self {
        let burst = rate.max(max_packet) as f64;
        Self {
            rate: rate as f64,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes `n` bytes; how long to wait before handling them (zero when
    /// the bucket held them).
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Turns a client away with `code` in CONNACK.
async fn refuse(w: &mut OwnedWriteHalf, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut out, usize::MAX)
        .is_ok()
    {
        let _ = timeout(Duration::from_secs(1), w.write_all(&out)).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn publish_will(router: &mut Router, will: LastWill) {
    let qos = if will.qos == QoS::ExactlyOnce {
        QoS::AtLeastOnce
    } else {
        will.qos
    };
    router.publish(&will.topic, &Bytes::copy_from_slice(&will.message), qos);
}

/// Handles the client's packets until it leaves, is lost or is ended.
#[allow(clippy::too_many_arguments)]
async fn read_loop(
    r: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    shared: &Shared,
    role: &Role,
    id: ConnId,
    outbox: &Outbox,
    state: &ConnState,
    keep_alive: Duration,
) -> End {
    let idle = tokio::time::sleep(keep_alive);
    tokio::pin!(idle);
    let mut pace = (!role.is_coordinator() && shared.limits.publish_rate > 0)
        .then(|| Pace::new(shared.limits.publish_rate, shared.limits.max_packet as u64));
    loop {
        let packet = tokio::select! {
            p = read_packet(r, buf, shared.limits.max_packet, false) => match p {
                Ok(p) => p,
                Err(e) => return End::Lost(e.to_string()),
            },
            () = &mut idle => return End::Lost("keep-alive timeout".into()),
            () = state.end.notified() => return End::Lost("ended (taken over, or its socket failed)".into()),
        };
        idle.as_mut().reset(Instant::now() + keep_alive);
        let acked = match packet {
            Packet::Publish(p) => {
                if !valid_topic(&p.topic) {
                    return End::Lost(format!("publish to an invalid topic {:?}", p.topic));
                }
                if p.qos == QoS::ExactlyOnce {
                    return End::Lost("QoS 2 is not supported".into());
                }
                if let Some(pace) = &mut pace {
                    // Held back, not dropped: the socket is not read meanwhile.
                    // Each packet costs its overhead too, so empty
                    // publishes are not free.
                    let cost = p.payload.len() + p.topic.len() + PUBLISH_OVERHEAD;
                    tokio::time::sleep(pace.take(cost as u64)).await;
                }
                if role.may_publish(&p.topic) {
                    let payload = Bytes::copy_from_slice(&p.payload);
                    shared.router().publish(&p.topic, &payload, p.qos);
                } else {
                    tracing::debug!("mqtt broker: dropped a publish on {:?}", p.topic);
                }
                p.qos == QoS::AtMostOnce || outbox.control(Packet::PubAck(PubAck::new(p.pkid)))
            }
            Packet::PubAck(a) => {
                state.ack(a.pkid);
                true
            }
            Packet::Subscribe(s) => {
                let codes = {
                    let mut router = shared.router();
                    s.filters
                        .iter()
                        .map(|f| {
                            if !role.may_subscribe(&f.path) {
                                tracing::debug!(
                                    "mqtt broker: refused a subscription to {:?}",
                                    f.path
                                );
                                return SubscribeReasonCode::Failure;
                            }
                            match router.subscribe(id, &f.path, f.qos) {
                                Ok(q) => SubscribeReasonCode::Success(q),
                                Err(_) => SubscribeReasonCode::Failure,
                            }
                        })
                        .collect()
                };
                outbox.control(Packet::SubAck(SubAck::new(s.pkid, codes)))
            }
            Packet::Unsubscribe(u) => {
                {
                    let mut router = shared.router();
                    for t in &u.topics {
                        router.unsubscribe(id, t);
                    }
                }
                outbox.control(Packet::UnsubAck(UnsubAck::new(u.pkid)))
            }
            Packet::PingReq => outbox.control(Packet::PingResp),
            Packet::Disconnect => return End::Goodbye,
            other => return End::Lost(format!("unexpected {other:?}")),
        };
        if !acked {
            return End::Lost("reads nothing: too many acknowledgements queued".into());
        }
    }
}

/// Writes the outbox to the socket until either ends; then ends the reader.
async fn write_loop(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    state: Arc<ConnState>,
    limits: Limits,
) {
    if let Err(e) = write_frames(&mut w, &mut rx, &state, limits).await {
        tracing::debug!("mqtt broker: writing: {e}");
    }
    state.end.notify_one();
}

async fn write_frames(
    w: &mut OwnedWriteHalf,
    rx: &mut mpsc::UnboundedReceiver<Frame>,
    state: &ConnState,
    limits: Limits,
) -> Result<(), std::io::Error> {
    let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, "the client takes no data");
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut written: Vec<Ticket> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            let packet = match frame {
                Frame::Control(p, ticket) => {
                    written.push(ticket);
                    p
                }
                Frame::Publish {
                    topic,
                    payload,
                    qos,
                    ticket,
                } => {
                    written.push(ticket);
                    let pkid = if qos == QoS::AtMostOnce {
                        0
                    } else if let Some(id) = state.try_alloc(limits.max_inflight) {
                        id
                    } else {
                        // Let the client see (and acknowledge) what it has.
                        flush(w, &mut buf, &mut written, limits.write_stall).await?;
                        timeout(limits.write_stall, state.alloc(limits.max_inflight))
                            .await
                            .map_err(|_| stalled())?
                    };
                    let mut p = Publish::from_bytes(topic.as_ref(), qos, payload);
                    p.pkid = pkid;
                    Packet::Publish(p)
                }
            };
            packet
                .write(&mut buf, usize::MAX)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        flush(w, &mut buf, &mut written, limits.write_stall).await?;
        if buf.capacity() > 4 * WRITE_BATCH {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
    }
    Ok(())
}

async fn flush(
    w: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    written: &mut Vec<Ticket>,
    stall: Duration,
) -> Result<(), std::io::Error> {
    if !buf.is_empty() {
        timeout(stall, w.write_all(buf)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the client takes no data")
        })??;
        buf.clear();
    }
    written.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_are_bounded_and_reused() {
        let s = ConnState::default();
        let ids: Vec<u16> = (0..3).filter_map(|_| s.try_alloc(3)).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(s.try_alloc(3), None);
        s.ack(2);
        s.ack(2);
        assert_eq!(s.try_alloc(3), Some(4));
        assert_eq!(s.try_alloc(3), None);
    }

    #[test]
    fn ids_skip_zero_and_those_in_flight() {
        let s = ConnState::default();
        s.inflight().next = u16::MAX - 1;
        assert_eq!(s.try_alloc(10), Some(u16::MAX));
        assert_eq!(s.try_alloc(10), Some(1));
    }

    proptest::proptest! {
        /// Whatever arrives, parsing returns (a packet, "more bytes", or an
        /// error) and never panics, however the bytes are split.
        #[test]
        fn parsing_never_panics(
            kind in 0u8..16,
            flags in 0u8..16,
            len in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            split in 0usize..400,
        ) {
            let mut bytes = vec![kind << 4 | flags];
            bytes.extend(&len);
            bytes.extend(&body);
            let split = split.min(bytes.len());
            let mut buf = BytesMut::from(&bytes[..split]);
            let mut ok = true;
            while ok {
                match parse(&mut buf, 256) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => ok = false,
                }
            }
            if ok {
                buf.extend_from_slice(&bytes[split..]);
                while let Ok(Some(_)) = parse(&mut buf, 256) {}
            }
        }
    }

    #[test]
    fn publishes_are_paced_beyond_a_burst() {
        let mut p = Pace::new(1000, 500);
        assert_eq!(p.take(1000), Duration::ZERO, "a second's worth at once");
        let wait = p.take(500);
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }

    #[test]
    fn queues_are_bounded() {
        let c = AtomicUsize::new(0);
        assert!(reserve(&c, 60, 100));
        assert!(!reserve(&c, 60, 100));
        assert!(reserve(&c, 40, 100));
        assert!(!reserve(&c, usize::MAX, usize::MAX));
    }
}
