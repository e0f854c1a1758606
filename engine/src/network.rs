//! The node's reach to its peers: the transports named in its config, in
//! their order, over one coordinator session.
//!
//! ```text
//! connect(peer): the transports in config order, each with the addresses
//!                the peer announced for it (asked of the coordinator),
//!                within its connect timeout; what worked, and why the ones
//!                before it did not, is remembered (HOME/peers.json). For
//!                RETRY_PREFERRED after that, the one that worked goes
//!                first; then the config's order is tried again, so one
//!                failure (a peer not announced yet, a dropped packet) does
//!                not leave a peer on the relay for good.
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
    remembered: Mutex<HashMap<NodeId, Route>>,
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

/// How long the transport that reached a peer is tried first before the
/// config's order (preferred transports first) is tried again.
pub const RETRY_PREFERRED: Duration = Duration::from_secs(600);

/// How a peer was reached last, and why the transports before it did not.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The transport that worked.
    pub via: String,
    /// Transports tried before it that failed: name and why.
    #[serde(default)]
    pub passed_over: Vec<(String, String)>,
    /// When the config's order was last tried, ms since the epoch (0: not
    /// known, from an older file).
    #[serde(default)]
    pub at_ms: u64,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.via)?;
        for (t, why) in &self.passed_over {
            write!(f, " ({t}: {why})")?;
        }
        Ok(())
    }
}

/// What `HOME/peers.json` holds per peer: a route, or (files written
/// before routes) the name of the transport alone.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stored {
    Route(Route),
    Name(String),
}

/// How each peer was reached last, from `HOME/peers.json`.
pub fn remembered_transports(home: &Home) -> HashMap<NodeId, Route> {
    let Ok(text) = std::fs::read_to_string(home.peers_path()) else {
        return HashMap::new();
    };
    let raw: HashMap<String, Stored> = serde_json::from_str(&text).unwrap_or_default();
    raw.into_iter()
        .filter_map(|(k, v)| {
            let route = match v {
                Stored::Route(r) => r,
                Stored::Name(via) => Route {
                    via,
                    ..Route::default()
                },
            };
            Some((k.parse().ok()?, route))
        })
        .collect()
}

/// The order to try the transports named `names` (the config's order) in
/// for a peer last reached by `route`, as indices: the config's, with the
/// one that worked first while it is recent.
fn order(names: &[&str], route: Option<&Route>, now_ms: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..names.len()).collect();
    let recent =
        route.filter(|r| now_ms.saturating_sub(r.at_ms) < RETRY_PREFERRED.as_millis() as u64);
    if let Some(r) = recent {
        order.sort_by_key(|i| names[*i] != r.via.as_str());
    }
    order
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
        let route = lock(&self.remembered).get(peer).cloned();
        let now = crate::client::now_ms();
        let names: Vec<&str> = self.transports.iter().map(|t| t.name()).collect();
        let order = order(&names, route.as_ref(), now);
        let in_config_order = order.iter().copied().eq(0..names.len());
        let mut why = Vec::new();
        let mut failed = Vec::new();
        let mut fresh = false;
        for t in order.into_iter().map(|i| &self.transports[i]) {
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
                failed.push((t.name().to_string(), "no address announced".to_string()));
                continue;
            }
            let limit = reach.connect_timeout;
            let mut attempt = tokio::time::timeout(limit, t.connect(peer, &addrs)).await;
            if !matches!(attempt, Ok(Ok(_))) && !fresh && reach.addresses {
                // The addresses may be stale (the peer restarted on another
                // port): asked again, and tried again when they changed.
                fresh = true;
                let now_known = wanted(self.addresses_of(peer, true).await);
                if !now_known.is_empty() && now_known != addrs {
                    attempt = tokio::time::timeout(limit, t.connect(peer, &now_known)).await;
                }
            }
            match attempt {
                Ok(Ok(link)) => {
                    // A route tried in the config's order replaces the one
                    // remembered; the remembered one working again keeps
                    // its time, so the preferred ones are retried in time.
                    let new = Route {
                        via: t.name().to_string(),
                        passed_over: std::mem::take(&mut failed),
                        at_ms: now,
                    };
                    let changed = route.as_ref().is_none_or(|r| {
                        r.via != new.via
                            || r.passed_over != new.passed_over
                            || now.saturating_sub(r.at_ms) >= RETRY_PREFERRED.as_millis() as u64
                    });
                    if changed
                        && (in_config_order || route.as_ref().is_none_or(|r| r.via != new.via))
                    {
                        for (name, e) in &new.passed_over {
                            tracing::info!(
                                "{} not reached by {name} ({e}); {} worked",
                                peer.short(),
                                new.via
                            );
                        }
                        self.remember(peer, new);
                    }
                    return Ok(link);
                }
                Ok(Err(e)) => failed.push((t.name().to_string(), e.to_string())),
                Err(_) => failed.push((t.name().to_string(), format!("no answer in {limit:?}"))),
            }
        }
        for (name, e) in failed {
            why.push(format!("{name}: {e}"));
        }
        Err(NetError::Unreachable {
            peer: *peer,
            why: why.join("; "),
        })
    }

    fn remember(&self, peer: &NodeId, route: Route) {
        let snapshot = {
            let mut r = lock(&self.remembered);
            if r.get(peer) == Some(&route) {
                return;
            }
            r.insert(*peer, route);
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

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 2] = ["quic", "relay"];

    fn via(name: &str, at_ms: u64) -> Route {
        Route {
            via: name.into(),
            passed_over: vec![("quic".into(), "no address announced".into())],
            at_ms,
        }
    }

    #[test]
    fn the_relay_is_first_only_for_a_while_then_quic_is_tried_again() {
        let r = via("relay", 1_000);
        assert_eq!(order(&NAMES, None, 0), [0, 1]);
        assert_eq!(order(&NAMES, Some(&r), 1_000), [1, 0]);
        let later = 1_000 + RETRY_PREFERRED.as_millis() as u64;
        assert_eq!(order(&NAMES, Some(&r), later), [0, 1], "quic again");
        assert_eq!(r.to_string(), "relay (quic: no address announced)");
    }

    #[test]
    fn peers_files_of_both_forms_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().to_path_buf());
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let text = format!(
            r#"{{"{}": "relay", "{}": {{"via": "quic", "passed_over": [], "at_ms": 5}}}}"#,
            a.to_hex(),
            b.to_hex()
        );
        std::fs::write(home.peers_path(), text).unwrap();
        let r = remembered_transports(&home);
        assert_eq!(r[&a].via, "relay");
        assert_eq!(r[&a].at_ms, 0, "an old entry is stale: quic is tried first");
        assert_eq!(r[&b], via("quic", 5).with_no_failures());
    }

    impl Route {
        fn with_no_failures(mut self) -> Self {
            self.passed_over.clear();
            self
        }
    }
}
