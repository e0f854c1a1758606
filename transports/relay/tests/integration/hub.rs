//! An in-memory coordinator: a [`RelayCarrier`] per node, joined by channels,
//! with a hook that can drop, alter, hold back, duplicate, redirect or
//! misattribute any payload, to play a lossy or hostile coordinator.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pluto_plugins_api::{NodeId, RelayCarrier, TransportError, TransportOptions};
use pluto_transport_relay::{RelayConfig, RelayTransport};
use tokio::sync::mpsc;

/// One payload the hub is asked to forward: who sent it (as the hub will
/// claim), to whom, the bytes.
pub struct Relayed {
    pub from: NodeId,
    pub to: NodeId,
    pub payload: Vec<u8>,
}

/// Decides what the hub forwards for each payload it is given.
pub type Hook = Box<dyn FnMut(Relayed) -> Vec<Relayed> + Send>;

/// Where a node's payloads are queued: (sender as the hub names it, payload).
type Queue = mpsc::Sender<(NodeId, Vec<u8>)>;

pub struct Hub {
    nodes: Mutex<HashMap<NodeId, Queue>>,
    hook: Mutex<Option<Hook>>,
    max_payload: usize,
}

impl Hub {
    pub fn new(max_payload: usize) -> Arc<Self> {
        Arc::new(Self {
            nodes: Mutex::new(HashMap::new()),
            hook: Mutex::new(None),
            max_payload,
        })
    }

    /// Replaces the hook (`None`: forward everything as it is).
    pub fn set_hook(&self, hook: Option<Hook>) {
        *self.hook.lock().unwrap() = hook;
    }

    /// The carrier of node `me`.
    pub fn port(self: &Arc<Self>, me: NodeId) -> Arc<Port> {
        let (tx, rx) = mpsc::channel(256);
        self.nodes.lock().unwrap().insert(me, tx);
        Arc::new(Port {
            me,
            hub: self.clone(),
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// Delivers `payload` to `to` as if `from` sent it, bypassing the hook.
    pub async fn inject(&self, from: NodeId, to: NodeId, payload: Vec<u8>) {
        let tx = self.nodes.lock().unwrap().get(&to).cloned();
        if let Some(tx) = tx {
            let _ = tx.send((from, payload)).await;
        }
    }
}

pub struct Port {
    me: NodeId,
    hub: Arc<Hub>,
    rx: tokio::sync::Mutex<mpsc::Receiver<(NodeId, Vec<u8>)>>,
}

#[pluto_plugins_api::async_trait]
impl RelayCarrier for Port {
    fn max_payload(&self) -> usize {
        self.hub.max_payload
    }

    async fn send(&self, to: &NodeId, payload: Vec<u8>) -> Result<(), TransportError> {
        assert!(
            payload.len() <= self.hub.max_payload,
            "payload over the carrier limit"
        );
        let relayed = Relayed {
            from: self.me,
            to: *to,
            payload,
        };
        let out = match self.hub.hook.lock().unwrap().as_mut() {
            Some(hook) => hook(relayed),
            None => vec![relayed],
        };
        for r in out {
            self.hub.inject(r.from, r.to, r.payload).await;
        }
        Ok(())
    }

    async fn recv(&self) -> Option<(NodeId, Vec<u8>)> {
        self.rx.lock().await.recv().await
    }
}

/// A small deterministic PRNG for hooks.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn seed(b: u8) -> [u8; 32] {
    [b; 32]
}

pub fn id_of(seed: &[u8; 32]) -> NodeId {
    NodeId(
        ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes(),
    )
}

/// Timers short enough for tests.
pub fn fast() -> RelayConfig {
    RelayConfig {
        handshake_timeout: std::time::Duration::from_millis(1500),
        hello_interval: std::time::Duration::from_millis(200),
        dead_peer_timeout: std::time::Duration::from_millis(1500),
        keepalive_interval: std::time::Duration::from_millis(300),
        initial_rto: std::time::Duration::from_millis(100),
        min_rto: std::time::Duration::from_millis(30),
        max_rto: std::time::Duration::from_millis(300),
        linger: std::time::Duration::from_millis(200),
        ..RelayConfig::default()
    }
}

pub fn options(hub: &Arc<Hub>, s: [u8; 32], max_frame: usize) -> TransportOptions {
    TransportOptions {
        identity_seed: s,
        listen: None,
        max_frame,
        relay: Some(hub.port(id_of(&s)) as Arc<dyn RelayCarrier>),
    }
}

/// A relay node on `hub`.
pub fn node(hub: &Arc<Hub>, s: [u8; 32], max_frame: usize, cfg: RelayConfig) -> RelayTransport {
    RelayTransport::with_config(options(hub, s, max_frame), cfg).unwrap()
}

/// A frame whose bytes depend on `i` and position, to check what arrives.
pub fn frame(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i * 7 + j * 13 + (j >> 9)) as u8)
        .collect()
}
