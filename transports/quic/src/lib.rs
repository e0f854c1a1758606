//! The `quic` transport: direct links between nodes over QUIC (quinn), with
//! TLS 1.3 bound to each node's Ed25519 identity.
//!
//! There are no certificates and no certificate authorities: each end
//! presents its Ed25519 public key as a raw public key (RFC 7250) and signs
//! the handshake with it. The dialling end accepts the other only if that
//! key is the peer it meant to reach (the one the coordinator matched); the
//! listening end learns who dialled from the key that signed, and the engine
//! decides whether that node may do what it asks.
//!
//! ```text
//! connection = one QUIC connection per peer, reused
//! link       = one bidirectional stream
//! frame      = length (u32 LE) || bytes, at most max_frame
//! ```

mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pluto_plugins_api::{
    Link, NodeId, Transport, TransportDescriptor, TransportError, TransportFuture,
    TransportOptions, PLUGIN_ABI_VERSION,
};
use tokio::sync::mpsc;

/// Where the transport listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:0";
/// How long dialling one address may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may be silent before it is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Links waiting to be accepted at most.
const ACCEPT_QUEUE: usize = 256;
/// Bytes a connection may have written but not yet acknowledged. A send
/// returns once its frame is within this window, so it bounds how far the
/// sender runs ahead of the line: on a 2 Mbit/s uplink 2 MiB is 8 s of
/// it, so a send that waits means the line does not move, and an owner's
/// wait for a storer's answer after the last frame is short. 2 MiB in
/// flight still fill a line of 300 Mbit/s at 50 ms round trip.
const SEND_WINDOW: u64 = 2 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QUIC transport of one node.
pub struct QuicTransport {
    me: NodeId,
    endpoint: quinn::Endpoint,
    tls: tls::Identity,
    max_frame: usize,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Box<dyn Link>>>,
    connections: Mutex<HashMap<NodeId, quinn::Connection>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuicTransport({} at {:?})",
            self.me.short(),
            self.endpoint.local_addr()
        )
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok())
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3))
        // Room for a pack in flight on a fast link when receiving...
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        // ...but not when sending: what is written and not yet on its way
        // would count as progress while it waits for the line.
        .send_window(SEND_WINDOW);
    Arc::new(t)
}

impl QuicTransport {
    /// Binds to `opts.listen` (default [`DEFAULT_LISTEN`]) and starts accepting.
    pub fn open(opts: &TransportOptions) -> Result<Self, TransportError> {
        let listen = opts.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let addr: SocketAddr = listen
            .parse()
            .map_err(|e| TransportError::Config(format!("quic listen address {listen:?}: {e}")))?;
        let identity = tls::Identity::new(&opts.identity_seed)?;
        let mut server = quinn::ServerConfig::with_crypto(identity.server_config()?);
        server.transport_config(transport_config());
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|e| TransportError::Config(format!("binding {addr}: {e}")))?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), tx, opts.max_frame));
        Ok(Self {
            me: identity.node(),
            endpoint,
            tls: identity,
            max_frame: opts.max_frame,
            incoming: tokio::sync::Mutex::new(rx),
            connections: Mutex::new(HashMap::new()),
            acceptor,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Other(e.to_string()))
    }

    async fn dial(&self, peer: &NodeId, addr: &str) -> Result<quinn::Connection, DialError> {
        let addr: SocketAddr = addr.parse().map_err(|source| DialError::Address {
            addr: addr.to_string(),
            source,
        })?;
        let mut client = quinn::ClientConfig::new(self.tls.client_config(*peer)?);
        client.transport_config(transport_config());
        let connecting = self
            .endpoint
            .connect_with(client, addr, tls::SERVER_NAME)
            .map_err(|source| DialError::Connect { addr, source })?;
        let conn = tokio::time::timeout(DIAL_TIMEOUT, connecting)
            .await
            .map_err(|_| DialError::Timeout(addr))?
            .map_err(|source| DialError::Connection { addr, source })?;
        // The verifier already refused any other key; this is belt and braces.
        match tls::peer_of(&conn) {
            Some(p) if p == *peer => Ok(conn),
            other => {
                conn.close(quinn::VarInt::from_u32(1), b"wrong peer");
                Err(DialError::WrongPeer { addr, seen: other })
            }
        }
    }
}

/// Why dialling one address of a peer failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("address {addr:?}: {source}")]
    Address {
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error(transparent)]
    Tls(#[from] TransportError),
    #[error("{addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("{0}: no answer within {DIAL_TIMEOUT:?}")]
    Timeout(SocketAddr),
    #[error("{addr}: {source}")]
    Connection {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("{addr} answered as {seen:?}")]
    WrongPeer {
        addr: SocketAddr,
        seen: Option<NodeId>,
    },
}

async fn accept_loop(endpoint: quinn::Endpoint, tx: mpsc::Sender<Box<dyn Link>>, max_frame: usize) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("quic: a handshake failed: {e}");
                    return;
                }
            };
            let Some(peer) = tls::peer_of(&conn) else {
                conn.close(quinn::VarInt::from_u32(1), b"no identity");
                return;
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let link = QuicLink {
                    peer,
                    send,
                    recv,
                    max_frame,
                };
                if tx.send(Box::new(link)).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[async_trait::async_trait]
impl Transport for QuicTransport {
    fn name(&self) -> &'static str {
        "quic"
    }

    fn addresses(&self) -> Vec<String> {
        self.local_addr()
            .map(|a| vec![a.to_string()])
            .unwrap_or_default()
    }

    async fn connect(
        &self,
        peer: &NodeId,
        addresses: &[String],
    ) -> Result<Box<dyn Link>, TransportError> {
        let cached = lock(&self.connections).get(peer).cloned();
        let mut why = Vec::new();
        let conn = match cached.filter(|c| c.close_reason().is_none()) {
            Some(c) => c,
            None => {
                let mut found = None;
                for a in addresses {
                    match self.dial(peer, a).await {
                        Ok(c) => {
                            found = Some(c);
                            break;
                        }
                        Err(e) => why.push(e.to_string()),
                    }
                }
                let Some(c) = found else {
                    if why.is_empty() {
                        why.push("no address".into());
                    }
                    return Err(TransportError::Unreachable(*peer, why.join("; ")));
                };
                lock(&self.connections).insert(*peer, c.clone());
                c
            }
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))?;
        Ok(Box::new(QuicLink {
            peer: *peer,
            send,
            recv,
            max_frame: self.max_frame,
        }))
    }

    async fn accept(&self) -> Option<Box<dyn Link>> {
        self.incoming.lock().await.recv().await
    }

    async fn close(&self) {
        self.acceptor.abort();
        self.endpoint.close(quinn::VarInt::from_u32(0), b"bye");
        lock(&self.connections).clear();
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// One bidirectional QUIC stream.
struct QuicLink {
    peer: NodeId,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    max_frame: usize,
}

#[async_trait::async_trait]
impl Link for QuicLink {
    fn peer(&self) -> NodeId {
        self.peer
    }

    fn transport(&self) -> &'static str {
        "quic"
    }

    async fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if frame.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge(frame.len(), self.max_frame));
        }
        let len = u32::try_from(frame.len())
            .map_err(|_| TransportError::FrameTooLarge(frame.len(), self.max_frame))?;
        self.send
            .write_all(&len.to_le_bytes())
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))?;
        self.send
            .write_all(frame)
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        let mut len = [0u8; 4];
        match self.recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(TransportError::Closed(format!(
                    "the stream ended {n} bytes into a frame header"
                )))
            }
            Err(e) => return Err(TransportError::Closed(e.to_string())),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max_frame {
            let _ = self.recv.stop(quinn::VarInt::from_u32(2));
            return Err(TransportError::FrameTooLarge(len, self.max_frame));
        }
        let mut buf = vec![0u8; len];
        self.recv.read_exact(&mut buf).await.map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(n) => {
                TransportError::Closed(format!("the stream ended {n} bytes into a frame of {len}"))
            }
            e => TransportError::Closed(e.to_string()),
        })?;
        Ok(Some(buf))
    }

    async fn finish(&mut self) -> Result<(), TransportError> {
        self.send
            .finish()
            .map_err(|e| TransportError::Closed(e.to_string()))
    }
}

fn open_boxed(opts: TransportOptions) -> TransportFuture {
    Box::pin(async move { Ok(Box::new(QuicTransport::open(&opts)?) as Box<dyn Transport>) })
}

pluto_plugins_api::inventory::submit! {
    TransportDescriptor {
        name: "quic",
        abi_version: PLUGIN_ABI_VERSION,
        open: open_boxed,
    }
}
