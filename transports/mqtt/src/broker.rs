//! An MQTT 3.1.1 broker inside the process, so the coordinator runs on one
//! command with no external service.
//!
//! It serves what pluto's own client uses and no more: clean sessions,
//! QoS 0 and 1, exact and wildcard filters, shared subscriptions
//! (`$share/GROUP/FILTER`, each publish to one member in turn), keep-alive,
//! last wills and client-id takeover. Routing a publish to an exact topic is
//! one map lookup, whatever the number of clients (rumqttd 0.20, used
//! before, matched the first publish on each new topic against every
//! filter, which made the join of N nodes quadratic).
//!
//! What it does not do, on purpose:
//! - no persistence and no sessions across connections: a CONNECT that asks
//!   to keep its session gets a clean one (CONNACK says "no session");
//! - no retained messages: the retain flag is ignored;
//! - no QoS 2: a QoS 2 publish ends the connection, a QoS 2 subscription or
//!   will is served at QoS 1.
//!
//! With [`BrokerAuth`] (how `pluto-coordinator` runs it) every client logs
//! in with its Ed25519 key, and a node may only publish on its own
//! to-coordinator and presence topics and subscribe to its own to-node
//! topic; only the coordinator's key may use wildcards and shared
//! subscriptions (`auth` says how). Without it (tests, a private broker)
//! anyone may do anything.
//!
//! Bounds ([`BrokerSettings`]): at most `max_connections` sockets, and
//! `max_per_address` from one address (an IPv6 /64 counts as one: that
//! is what one household or one server gets; more are closed on accept), and
//! `max_per_key` logged in with one node's key (16; more are refused, so a
//! key cannot multiply its subscriptions and the deliveries they queue);
//! packets
//! up to `max_payload` + 1 KiB (a larger one ends its connection); CONNECT
//! within 5 s of accepting; a keep-alive of at most `max_keep_alive` (a
//! client asking for none gets that), and 1.5 × it in silence ends the
//! connection (then the will is published); a byte bound on each
//! connection's queue of deliveries, beyond which deliveries to it are
//! *dropped* (a slow subscriber loses messages, the others are not held
//! up), and one on all queues together, which the coordinator's
//! connection is kept out of (its own, larger bound: nobody's backlog
//! starves it); `max_publish_rate` bytes per second published by any one
//! client but the coordinator (64 MiB/s, the coordinator's own relay
//! rate: a client that publishes faster is read more slowly); 64 filters
//! per connection and 1,024 distinct wildcard or shared filters in all.
//! Malformed input ends only its own connection.
//!
//! It runs on a tokio runtime of its own, on a thread of its own, so it
//! starts from async and plain code alike; it has no shutdown: the broker
//! lives as long as the process. `connection` draws a connection's tasks;
//! `router` holds subscriptions and sessions.

mod auth;
mod connection;
mod router;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use auth::BrokerAuth;
use connection::{Limits, Shared};
use tokio::net::{TcpListener, TcpSocket};

/// Places beyond `max_connections` kept for the coordinator's key.
pub(crate) const COORDINATOR_RESERVE: usize = 8;

/// How the embedded broker is bounded, and whom it lets in.
#[derive(Clone, Copy, Debug)]
pub struct BrokerSettings {
    /// Most open client sockets.
    pub max_connections: usize,
    /// Most open client sockets from one address.
    pub max_per_address: usize,
    /// Most connections logged in with one node's key (with logins).
    pub max_per_key: usize,
    /// Largest payload of a publish.
    pub max_payload: usize,
    /// The longest keep-alive granted (a client asking for none gets it).
    pub max_keep_alive: Duration,
    /// Bytes of deliveries queued for all clients together (beyond the
    /// coordinator's own queue); when full, clients that let theirs grow
    /// are ended.
    pub max_queued_bytes: usize,
    /// Bytes per second one client (not the coordinator) may publish, in
    /// bursts of one second's worth; beyond it the broker reads that
    /// client more slowly. 0: no limit.
    pub max_publish_rate: u64,
    /// Logins checked and clients confined (None: anyone, anything).
    pub auth: Option<BrokerAuth>,
}

impl BrokerSettings {
    /// An open broker for `max_connections` clients and payloads up to
    /// `max_payload` bytes, 256 sockets per address, keep-alive up to 2
    /// minutes.
    pub fn new(max_connections: usize, max_payload: usize) -> Self {
        Self {
            max_connections,
            max_per_address: 256,
            max_per_key: 16,
            max_payload,
            max_keep_alive: Duration::from_secs(120),
            max_queued_bytes: 256 << 20,
            max_publish_rate: 64 << 20,
            auth: None,
        }
    }
}

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The address cannot be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The broker did not start accepting connections.
    #[error("the embedded broker did not start on {0}")]
    NotReady(SocketAddr),
    /// Its thread or runtime could not be started.
    #[error("cannot start the embedded broker: {0}")]
    Runtime(std::io::Error),
}

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts an open broker on `listen` (port 0 picks a free port) for up
    /// to `max_connections` clients and payloads up to `max_payload` bytes,
    /// and returns once it accepts connections.
    pub fn start(
        listen: SocketAddr,
        max_connections: usize,
        max_payload: usize,
    ) -> Result<Self, BrokerError> {
        Self::start_with(listen, BrokerSettings::new(max_connections, max_payload))
    }

    /// Starts a broker on `listen` with `settings`, and returns once it
    /// accepts connections.
    pub fn start_with(listen: SocketAddr, settings: BrokerSettings) -> Result<Self, BrokerError> {
        let mut limits = Limits::new(settings.max_connections, settings.max_payload);
        limits.max_per_address = settings.max_per_address.max(1);
        limits.max_per_key = settings.max_per_key.max(1);
        limits.max_keep_alive = settings.max_keep_alive.max(Duration::from_secs(1));
        limits.publish_rate = settings.max_publish_rate;
        limits.queue_total = settings
            .max_queued_bytes
            .max(limits.queue_per_connection.saturating_mul(4));
        let auth = settings.auth;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let workers = std::thread::available_parallelism()
            .map(|n| n.get().clamp(1, 4))
            .unwrap_or(2);
        std::thread::Builder::new()
            .name("pluto-mqtt-broker".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .thread_name("pluto-mqtt-broker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BrokerError::Runtime(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let bound = bind(listen).and_then(|l| Ok((l.local_addr()?, l)));
                    match bound {
                        Ok((addr, listener)) => {
                            let _ = ready_tx.send(Ok(addr));
                            accept(listener, Arc::new(Shared::new(limits, auth))).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(BrokerError::Bind(listen, e)));
                        }
                    }
                });
            })
            .map_err(BrokerError::Runtime)?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(addr)) => Ok(Self { addr }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BrokerError::NotReady(listen)),
        }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

/// A listener with a backlog deep enough for thousands of clients
/// connecting at once.
fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(4096)
}

/// Accepts clients for ever, each on a task of its own.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to
                // be freed rather than spin.
                tracing::warn!("mqtt broker: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // With logins, a few places beyond the limit are kept for the
        // coordinator's own connections (taken only once its login is
        // seen): a full broker never locks the coordinator out.
        let reserve = if shared.auth.is_some() {
            COORDINATOR_RESERVE
        } else {
            0
        };
        let open = shared.connections.fetch_add(1, Ordering::Relaxed);
        if open >= shared.limits.max_connections.saturating_add(reserve) {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!("mqtt broker: refusing a client: {open} connections open");
            drop(stream);
            continue;
        }
        let ip = counted_as(from.ip());
        if !shared.admit(ip) {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!("mqtt broker: refusing a client: {ip} has its share of connections");
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let slot = Slot(&shared, ip);
            connection::serve(stream, shared.clone()).await;
            drop(slot);
        });
    }
}

/// Frees a connection's places when its task ends, however it ends.
struct Slot<'a>(&'a Shared, std::net::IpAddr);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.release(self.1);
    }
}

/// The address a client is counted under for `max_per_address`: an IPv4
/// address (also when written as IPv6), or the /64 of an IPv6 one, since one
/// host or household gets a whole /64 and could otherwise take a place per
/// address in it.
fn counted_as(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::counted_as;

    #[test]
    fn an_ipv6_64_counts_as_one_address() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(counted_as(ip("2001:db8:1:2::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            counted_as(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(counted_as(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(counted_as(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(counted_as(ip("192.0.2.7")), ip("192.0.2.7"));
    }
}
