//! The node's reach to its peers: the transports named in its config, in
//! their order, over one coordinator session.
//!
//! ```text
//! connect(peer): the transport that worked last for this peer first, then
//!                the others in config order; each with the addresses the
//!                peer announced for it (asked of the coordinator), within
//!                CONNECT_TIMEOUT; what worked is remembered (HOME/peers.json)
//! serve(held):   every transport's incoming links, each served on a task
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pluto_plugins_api::{
    open_transport, Link, NodeId, Transport, TransportError, TransportOptions,
};
use pluto_protocol::{Message, MAX_ADDRESSES};
use tracing::Instrument;

use crate::client::{ClientError, CoordinatorClient};
use crate::exchange::MAX_FRAME;
use crate::held::Held;
use crate::home::{Config, Home};
use crate::keys::Keys;
use crate::repo::lock;

/// Why a peer could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Every transport failed; each one's reason.
    #[error("cannot reach {peer}: {why}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// What each transport said.
        why: String,
    },
    /// The coordinator failed.
    #[error(transparent)]
    Coordinator(#[from] ClientError),
    /// A transport could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Transports, the coordinator session, and what was learnt about peers.
pub struct Net {
    me: NodeId,
    client: Arc<CoordinatorClient>,
    transports: Vec<Arc<dyn Transport>>,
    announce: Vec<String>,
    addresses: Mutex<HashMap<NodeId, Vec<String>>>,
    remembered: Mutex<HashMap<NodeId, String>>,
    peers_path: PathBuf,
    pacer: Option<Pacer>,
    /// Upload speed as last measured, bytes a second (0: not yet).
    upload_rate: std::sync::atomic::AtomicU64,
}

/// Spreads sends so that together they average at most `rate` bytes a
/// second: each send books the next stretch of the line and waits for it.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    /// At most `rate` (> 0) bytes a second.
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn wait(&self, bytes: usize) {
        let start = {
            let mut next = self.next.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.transports.iter().map(|t| t.name()).collect();
        write!(f, "Net({names:?})")
    }
}

/// Which transport reached each peer last, from `HOME/peers.json`.
pub fn remembered_transports(home: &Home) -> HashMap<NodeId, String> {
    let Ok(text) = std::fs::read_to_string(home.peers_path()) else {
        return HashMap::new();
    };
    let raw: HashMap<String, String> = serde_json::from_str(&text).unwrap_or_default();
    raw.into_iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
        .collect()
}

impl Net {
    /// Opens the configured transports over `client`'s session.
    pub async fn open(
        keys: &Keys,
        config: &Config,
        home: &Home,
        client: Arc<CoordinatorClient>,
    ) -> Result<Self, NetError> {
        let relay = client.relay_carrier();
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        for name in &config.transports {
            let t = open_transport(
                name,
                TransportOptions {
                    identity_seed: keys.identity.to_bytes(),
                    listen: Some(config.listen.clone()),
                    max_frame: MAX_FRAME,
                    relay: Some(relay.clone()),
                },
            )
            .await?;
            transports.push(t.into());
        }
        Ok(Self {
            me: keys.node_id(),
            client,
            transports,
            announce: config.announce.clone(),
            addresses: Mutex::new(HashMap::new()),
            remembered: Mutex::new(remembered_transports(home)),
            peers_path: home.peers_path(),
            pacer: config.upload_limit.map(Pacer::new),
            upload_rate: 0.into(),
        })
    }

    /// The pace uploads keep to (`upload_limit`), if any.
    pub fn pacer(&self) -> Option<&Pacer> {
        self.pacer.as_ref()
    }

    /// Notes that `bytes` went to a peer in `micros`: the upload speed
    /// becomes a moving average that follows the line.
    pub fn note_upload(&self, bytes: u64, micros: u64) {
        use std::sync::atomic::Ordering;
        let now = bytes.saturating_mul(1_000_000) / micros.max(1);
        let old = self.upload_rate.load(Ordering::Relaxed);
        let new = if old == 0 { now } else { (old * 3 + now) / 4 };
        self.upload_rate.store(new.max(1), Ordering::Relaxed);
    }

    /// The upload speed last measured, bytes a second (0: not yet).
    pub fn upload_rate(&self) -> u64 {
        self.upload_rate.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The coordinator session.
    pub fn client(&self) -> &CoordinatorClient {
        &self.client
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// What this node announces: the configured list, or each transport's
    /// addresses (`name:address`), with a wildcard IP replaced by the
    /// machine's own addresses.
    pub fn own_addresses(&self) -> Vec<String> {
        if !self.announce.is_empty() {
            return self.announce.clone();
        }
        let mut out = Vec::new();
        for t in &self.transports {
            for a in t.addresses() {
                match a.parse::<SocketAddr>() {
                    Ok(sa) if sa.ip().is_unspecified() => {
                        for ip in local_ips()
                            .into_iter()
                            .filter(|ip| ip.is_ipv4() == sa.is_ipv4())
                        {
                            out.push(format!("{}:{}", t.name(), SocketAddr::new(ip, sa.port())));
                        }
                    }
                    _ => out.push(format!("{}:{a}", t.name())),
                }
            }
        }
        out.truncate(MAX_ADDRESSES);
        out
    }

    /// Tells the coordinator where this node is.
    pub async fn announce(&self) -> Result<(), ClientError> {
        self.client
            .request(&Message::Announce {
                addresses: self.own_addresses(),
            })
            .await
            .map(|_| ())
    }

    async fn addresses_of(&self, peer: &NodeId, fresh: bool) -> Vec<String> {
        if !fresh {
            if let Some(a) = lock(&self.addresses).get(peer) {
                return a.clone();
            }
        }
        match self
            .client
            .request(&Message::Locate { nodes: vec![*peer] })
            .await
        {
            Ok(Message::Located(list)) => {
                let found = list
                    .into_iter()
                    .find(|n| n.id == *peer)
                    .map(|n| n.addresses)
                    .unwrap_or_default();
                lock(&self.addresses).insert(*peer, found.clone());
                found
            }
            Ok(_) | Err(_) => Vec::new(),
        }
    }

    /// A link to `peer` through the first transport that works.
    pub async fn connect(&self, peer: &NodeId) -> Result<Box<dyn Link>, NetError> {
        let first = lock(&self.remembered).get(peer).cloned();
        let mut order: Vec<&Arc<dyn Transport>> = self.transports.iter().collect();
        if let Some(name) = &first {
            order.sort_by_key(|t| t.name() != name.as_str());
        }
        let mut why = Vec::new();
        let mut fresh = false;
        for t in order {
            let prefix = format!("{}:", t.name());
            let wanted = |all: Vec<String>| -> Vec<String> {
                all.iter()
                    .filter_map(|a| a.strip_prefix(&prefix).map(str::to_string))
                    .collect()
            };
            let mut addrs = wanted(self.addresses_of(peer, fresh).await);
            if addrs.is_empty() && !fresh {
                // Perhaps it moved since it was last looked up.
                fresh = true;
                addrs = wanted(self.addresses_of(peer, true).await);
            }
            let reach = t.reach();
            if addrs.is_empty() && reach.addresses {
                why.push(format!("{}: no address announced", t.name()));
                continue;
            }
            let limit = reach.connect_timeout;
            match tokio::time::timeout(limit, t.connect(peer, &addrs)).await {
                Ok(Ok(link)) => {
                    self.remember(peer, t.name());
                    return Ok(link);
                }
                Ok(Err(e)) => why.push(format!("{}: {e}", t.name())),
                Err(_) => why.push(format!("{}: no answer in {limit:?}", t.name())),
            }
        }
        Err(NetError::Unreachable {
            peer: *peer,
            why: why.join("; "),
        })
    }

    fn remember(&self, peer: &NodeId, transport: &str) {
        let snapshot = {
            let mut r = lock(&self.remembered);
            if r.get(peer).map(String::as_str) == Some(transport) {
                return;
            }
            r.insert(*peer, transport.to_string());
            r.iter()
                .map(|(k, v)| (k.to_hex(), v.clone()))
                .collect::<HashMap<_, _>>()
        };
        if let Ok(text) = serde_json::to_string_pretty(&snapshot) {
            // Written here, not on a worker thread: it happens once per peer
            // and transport, the file is small, and it must be on disk, in
            // order, before a command exits (two writes racing on worker
            // threads lost a peer's entry).
            if let Err(e) = crate::home::write_atomic(&self.peers_path, text.as_bytes()) {
                tracing::debug!("remembering transports: {e}");
            }
        }
    }

    /// Serves every transport's incoming links with `held` until the
    /// transports close or `stop` is cancelled. Each link runs on a task of
    /// its own; on `stop` no new link is taken, and those being served get
    /// `grace` to finish (a replica being received is then written whole,
    /// or dropped and never seen) before they are cut.
    pub async fn serve(
        &self,
        held: Arc<Held>,
        stop: tokio_util::sync::CancellationToken,
        grace: Duration,
    ) {
        let mut accepting = tokio::task::JoinSet::new();
        let (tx, mut incoming) = tokio::sync::mpsc::channel(16);
        for t in &self.transports {
            let (t, tx) = (t.clone(), tx.clone());
            accepting.spawn(async move {
                while let Some(link) = t.accept().await {
                    if tx.send(link).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut links = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                link = incoming.recv() => {
                    let Some(link) = link else { break };
                    let held = held.clone();
                    let peer = link.peer();
                    let span = tracing::info_span!("link", peer = %peer.short());
                    links.spawn(
                        async move {
                            if let Err(e) = held.serve(link).await {
                                tracing::info!("a request of {}: {e}", peer.short());
                            }
                        }
                        .instrument(span),
                    );
                }
                Some(_) = links.join_next(), if !links.is_empty() => {}
            }
        }
        accepting.abort_all();
        let finished =
            tokio::time::timeout(grace, async { while links.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::info!("cutting {} links still open after {grace:?}", links.len());
            links.abort_all();
            while links.join_next().await.is_some() {}
        }
    }

    /// Closes every transport.
    pub async fn close(&self) {
        for t in &self.transports {
            t.close().await;
        }
    }
}

/// This machine's addresses as others would see them: the source address
/// of a route out (no packet is sent), and loopback for nodes on the same
/// machine.
fn local_ips() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for probe in ["192.0.2.1:9", "[2001:db8::1]:9"] {
        let bind = if probe.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        if let Ok(s) = UdpSocket::bind(bind) {
            if s.connect(probe).is_ok() {
                if let Ok(a) = s.local_addr() {
                    if !a.ip().is_unspecified() && !ips.contains(&a.ip()) {
                        ips.push(a.ip());
                    }
                }
            }
        }
    }
    ips.push(IpAddr::from([127, 0, 0, 1]));
    ips
}
