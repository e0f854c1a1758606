//! An MQTT broker inside the process (rumqttd), so the coordinator runs on
//! one command with no external service.
//!
//! rumqttd runs its router and listener on threads of their own and has no
//! shutdown: the broker lives as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, Strategy};

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
}

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts a broker on `listen` (port 0 picks a free port) for up to
    /// `max_connections` clients and payloads up to `max_payload` bytes,
    /// and waits until it accepts connections.
    pub fn start(
        listen: SocketAddr,
        max_connections: usize,
        max_payload: usize,
    ) -> Result<Self, BrokerError> {
        // rumqttd only logs a failed bind, so bind once here to report it
        // (and to learn the port when 0 was asked for).
        let addr = TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .map_err(|e| BrokerError::Bind(listen, e))?;
        let connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: max_payload + 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let mut v4 = HashMap::new();
        v4.insert(
            "pluto".to_string(),
            ServerSettings {
                name: "pluto".into(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections,
            },
        );
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections,
                max_outgoing_packet_count: 200,
                max_segment_size: 1 << 20,
                max_segment_count: 4,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Strategy::RoundRobin,
            },
            v4: Some(v4),
            ..Default::default()
        };
        let mut broker = Broker::new(config);
        std::thread::Builder::new()
            .name("pluto-mqtt-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded MQTT broker stopped: {e}");
                }
            })
            .map_err(|e| BrokerError::Bind(addr, e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Self { addr });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BrokerError::NotReady(addr))
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}
