//! pluto's coordinator channel over MQTT.
//!
//! Registered as the `mqtt` channel plugin: `mqtt://HOST:PORT[/PREFIX]`
//! (default port 1883, default prefix `pluto`). Topics:
//!
//! ```text
//! PREFIX/v1/to-coordinator/<node id>   a node's messages to the coordinator
//! PREFIX/v1/to-node/<node id>          the coordinator's messages to one node
//! PREFIX/v1/presence/<node id>         a node's hello after each connection, and its last will
//! PREFIX/v1/newcomer/<node id>         a node without a broker account: its Hello and Auth
//! PREFIX/v1/welcome/<node id>          the coordinator's answers to those
//! ```
//!
//! Coordinator replicas subscribe through an MQTT shared subscription
//! (`$share/GROUP/...`), so each message reaches one replica. Everything is
//! QoS 1. The connection is kept by a task that reconnects with exponential
//! backoff (100 ms to 5 s) and resubscribes after every connection; events
//! report each connection and disconnection.
//!
//! The channel logs in on every connection with the first of
//! [`ChannelOptions::logins`] the broker takes, trying the others in turn
//! when one is refused. [`Login::Signed`]: user name the signer's id in
//! hex, password `TIME_MS.SIGNATURE` (hex) over [`broker_login_message`]
//! for this connection's client id, fresh for each attempt; the embedded
//! broker checks it and confines each node to its own topics, a broker
//! that does not check ignores it. [`Login::Password`]: an account the
//! broker keeps (Mosquitto's dynamic security plugin; see [`dynsec`]). A
//! login refused in every form, or a refused subscription, is reported as
//! [`ChannelEvent::Denied`], and the channel is not "connected" until every
//! subscription was granted. Either way the control protocol (signed,
//! addressed, replay-checked, sealed envelopes) stays the real guard.
//!
//! With the `broker` feature, [`broker::EmbeddedBroker`] runs a small MQTT
//! 3.1.1 broker of this crate's own inside the process, which is how the
//! coordinator runs on one command.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pluto_plugins_api::{
    async_trait, broker_login_message, ChannelDescriptor, ChannelError, ChannelEvent,
    ChannelFuture, ChannelOptions, ChannelRole, ChannelSigner, ControlChannel, Login, NodeId,
    NEWCOMER_PASSWORD, NEWCOMER_USER, PLUGIN_ABI_VERSION,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, Mutex};

#[cfg(feature = "broker")]
pub mod broker;
pub mod dynsec;

const KEEP_ALIVE: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where a URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttUrl {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix.
    pub prefix: String,
}

impl MqttUrl {
    /// Parses `mqtt://HOST[:PORT][/PREFIX]`.
    pub fn parse(url: &str) -> Result<Self, ChannelError> {
        let bad = |why: &str| ChannelError::BadUrl(url.to_string(), why.to_string());
        let rest = url
            .strip_prefix("mqtt://")
            .ok_or_else(|| bad("expected mqtt://HOST:PORT"))?;
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => (authority, 1883),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() { "pluto" } else { prefix };
        if prefix.contains(['+', '#']) || prefix.starts_with('$') {
            return Err(bad(
                "the topic prefix may not hold wildcards or start with $",
            ));
        }
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            prefix: prefix.to_string(),
        })
    }
}

/// The topics of one prefix.
#[derive(Clone, Debug)]
struct Topics {
    prefix: String,
}

impl Topics {
    fn to_coordinator(&self, node: &NodeId) -> String {
        format!("{}/v1/to-coordinator/{}", self.prefix, node.to_hex())
    }
    fn to_node(&self, node: &NodeId) -> String {
        format!("{}/v1/to-node/{}", self.prefix, node.to_hex())
    }
    fn presence(&self, node: &NodeId) -> String {
        format!("{}/v1/presence/{}", self.prefix, node.to_hex())
    }
    fn newcomer(&self, node: &NodeId) -> String {
        format!("{}/v1/newcomer/{}", self.prefix, node.to_hex())
    }
    fn welcome(&self, node: &NodeId) -> String {
        format!("{}/v1/welcome/{}", self.prefix, node.to_hex())
    }
    fn all(&self, kind: &str) -> String {
        format!("{}/v1/{kind}/+", self.prefix)
    }
    /// Classifies an incoming topic: (kind, node).
    fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, NodeId)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/v1/")?;
        let (kind, node) = rest.split_once('/')?;
        Some((kind, node.parse().ok()?))
    }
}

/// One end of the MQTT channel.
pub struct MqttChannel {
    client: AsyncClient,
    events: Mutex<mpsc::Receiver<ChannelEvent>>,
    topics: Topics,
    node: Option<NodeId>,
    newcomer: bool,
    max_payload: usize,
    closing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MqttChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MqttChannel({:?}, {:?})", self.topics.prefix, self.node)
    }
}

impl Drop for MqttChannel {
    fn drop(&mut self) {
        // Without a goodbye: the broker publishes the will, as after a crash.
        self.task.abort();
    }
}

impl MqttChannel {
    /// Connects to `url` and keeps the connection up until closed.
    pub async fn connect(url: &str, opts: ChannelOptions) -> Result<Self, ChannelError> {
        let u = MqttUrl::parse(url)?;
        let topics = Topics { prefix: u.prefix };
        let (client_id, node) = match &opts.role {
            // A random part: a node may hold several connections at once
            // (its daemon and a command), and a client id that others can
            // guess would let anyone on the broker push the node off (MQTT
            // drops the older of two connections with the same id).
            ChannelRole::Node { id, .. } => (
                format!(
                    "pluto-n-{}-{:016x}",
                    &id.to_hex()[..12],
                    rand::random::<u64>()
                ),
                Some(*id),
            ),
            ChannelRole::Newcomer { id } => (
                format!(
                    "pluto-w-{}-{:016x}",
                    &id.to_hex()[..12],
                    rand::random::<u64>()
                ),
                Some(*id),
            ),
            ChannelRole::Coordinator { .. } => {
                (format!("pluto-c-{:016x}", rand::random::<u64>()), None)
            }
        };
        let newcomer = matches!(opts.role, ChannelRole::Newcomer { .. });
        let logins = if newcomer {
            vec![Login::Password {
                user: NEWCOMER_USER.to_string(),
                password: NEWCOMER_PASSWORD.to_string(),
            }]
        } else {
            opts.logins.clone()
        };
        let mut mo = MqttOptions::new(client_id, u.host, u.port);
        // Room for the payload and the topic and header around it.
        let packet = opts.max_payload + 1024;
        mo.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(packet, packet);
        if let ChannelRole::Node { id, will, .. } = &opts.role {
            if will.is_empty() {
                // No presence for this connection.
            } else {
                mo.set_last_will(LastWill::new(
                    topics.presence(id),
                    will.clone(),
                    QoS::AtLeastOnce,
                    false,
                ));
            }
        }
        let (client, eventloop) = AsyncClient::new(mo, 256);
        let (tx, rx) = mpsc::channel(1024);
        let closing = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            client.clone(),
            eventloop,
            tx,
            topics.clone(),
            opts.role.clone(),
            logins,
            closing.clone(),
        ));
        Ok(Self {
            client,
            events: Mutex::new(rx),
            topics,
            node,
            newcomer,
            max_payload: opts.max_payload,
            closing,
            task,
        })
    }
}

fn subscriptions(topics: &Topics, role: &ChannelRole) -> Vec<String> {
    match role {
        ChannelRole::Node { id, .. } => vec![topics.to_node(id)],
        ChannelRole::Newcomer { id } => vec![topics.welcome(id)],
        ChannelRole::Coordinator { group } => {
            let share = |t: String| match group {
                Some(g) => format!("$share/{g}/{t}"),
                None => t,
            };
            vec![
                share(topics.all("to-coordinator")),
                share(topics.all("presence")),
                share(topics.all("newcomer")),
            ]
        }
    }
}

/// Sets the login for the next connection attempt.
fn log_in(options: &mut MqttOptions, login: &Login) {
    match login {
        Login::Signed(signer, coordinator) => sign_in(options, &**signer, coordinator),
        Login::Password { user, password } => {
            options.set_credentials(user.clone(), password.clone());
        }
    }
}

/// The signer's id, and a signature over this attempt's time and the
/// client id.
fn sign_in(options: &mut MqttOptions, signer: &dyn ChannelSigner, coordinator: &NodeId) {
    let time_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let signature = signer.sign(&broker_login_message(
        &options.client_id(),
        time_ms,
        coordinator,
    ));
    options.set_credentials(
        signer.id().to_hex(),
        format!("{time_ms}.{}", hex::encode(signature)),
    );
}

/// Keeps the connection: polls, resubscribes after every connection,
/// forwards what arrives, and backs off between failed attempts.
async fn run(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    tx: mpsc::Sender<ChannelEvent>,
    topics: Topics,
    role: ChannelRole,
    logins: Vec<Login>,
    closing: Arc<AtomicBool>,
) {
    let mut backoff = BACKOFF_MIN;
    // The subscriptions asked for and not yet granted, in order.
    let mut pending: Vec<String> = Vec::new();
    // The login in use, the one that last worked, and how many of this
    // round were refused.
    let (mut login, mut worked, mut refused) = (0usize, 0usize, 0usize);
    if let Some(l) = logins.first() {
        log_in(&mut eventloop.mqtt_options, l);
    }
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                (worked, refused) = (login, 0);
                // try_*: never wait on the request queue from the task that drains it.
                pending = subscriptions(&topics, &role);
                for t in &pending {
                    if let Err(e) = client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                        tracing::warn!("mqtt: subscribing: {e}");
                    }
                }
                None
            }
            // A refused subscription: this end cannot work on this broker.
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if !pending.is_empty()
                    && ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
            {
                let topic = pending.remove(0);
                pending.clear();
                Some(ChannelEvent::Denied(format!(
                    "the broker refused the subscription to {topic}"
                )))
            }
            // Connected only once every subscription is in place, so nothing
            // sent in answer to what follows can be missed.
            Ok(Event::Incoming(Packet::SubAck(_))) if !pending.is_empty() => {
                pending.remove(0);
                if !pending.is_empty() {
                    None
                } else {
                    match &role {
                        ChannelRole::Node { id, hello, .. } if !hello.is_empty() => {
                            let _ = client.try_publish(
                                topics.presence(id),
                                QoS::AtLeastOnce,
                                false,
                                hello.clone(),
                            );
                        }
                        _ => {}
                    }
                    Some(ChannelEvent::Connected)
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match (topics.parse(&p.topic), &role) {
                (Some(("to-node", id)), ChannelRole::Node { id: me, .. })
                | (Some(("welcome", id)), ChannelRole::Newcomer { id: me })
                    if id == *me =>
                {
                    Some(ChannelEvent::Message {
                        from: None,
                        payload: p.payload.to_vec(),
                    })
                }
                (Some(("newcomer", id)), ChannelRole::Coordinator { .. }) => {
                    Some(ChannelEvent::Newcomer {
                        node: id,
                        payload: p.payload.to_vec(),
                    })
                }
                (Some(("to-coordinator", id)), ChannelRole::Coordinator { .. }) => {
                    Some(ChannelEvent::Message {
                        from: Some(id),
                        payload: p.payload.to_vec(),
                    })
                }
                (Some(("presence", id)), ChannelRole::Coordinator { .. }) => {
                    Some(ChannelEvent::Presence {
                        node: id,
                        payload: p.payload.to_vec(),
                    })
                }
                _ => {
                    tracing::debug!("mqtt: ignoring a message on {}", p.topic);
                    None
                }
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) if closing.load(Ordering::SeqCst) => return,
            Ok(_) => None,
            Err(e) => {
                if closing.load(Ordering::SeqCst) {
                    return;
                }
                // A refused login: the next one at once, until all were.
                if matches!(e, rumqttc::ConnectionError::ConnectionRefused(_))
                    && refused + 1 < logins.len()
                {
                    refused += 1;
                    login = (login + 1) % logins.len();
                    log_in(&mut eventloop.mqtt_options, &logins[login]);
                    continue;
                }
                let _ = tx.try_send(match &e {
                    rumqttc::ConnectionError::ConnectionRefused(code) => {
                        ChannelEvent::Denied(refusal(*code))
                    }
                    e if turned_away(e) => ChannelEvent::Refused(e.to_string()),
                    e => ChannelEvent::Disconnected(e.to_string()),
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                // A fresh login for the next attempt, starting with the one
                // that last worked.
                (login, refused) = (worked, 0);
                if let Some(l) = logins.get(login) {
                    log_in(&mut eventloop.mqtt_options, l);
                }
                None
            }
        };
        if let Some(ev) = event {
            if tx.send(ev).await.is_err() {
                return; // nobody listens any more
            }
        }
    }
}

/// A broker's refusal of a login, in words.
fn refusal(code: ConnectReturnCode) -> String {
    match code {
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
            "the broker refused this node's login (a key it does not let in, or a clock more than two minutes off)".to_string()
        }
        other => format!("the broker refused the connection ({other:?})"),
    }
}

/// Whether a failed attempt was turned away at once (nothing listens
/// there, or no route to it), rather than lost or left without an answer.
fn turned_away(e: &rumqttc::ConnectionError) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, HostUnreachable, NetworkUnreachable};
    matches!(e, rumqttc::ConnectionError::Io(io)
        if matches!(io.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable))
}

#[async_trait]
impl ControlChannel for MqttChannel {
    async fn send(&self, to: Option<&NodeId>, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > self.max_payload {
            return Err(ChannelError::TooLarge(payload.len(), self.max_payload));
        }
        let topic = match (to, &self.node) {
            (Some(node), _) => self.topics.to_node(node),
            (None, Some(me)) if self.newcomer => self.topics.newcomer(me),
            (None, Some(me)) => self.topics.to_coordinator(me),
            (None, None) => {
                return Err(ChannelError::Plugin(
                    "a coordinator sends to nodes, not to itself".into(),
                ))
            }
        };
        if self.closing.load(Ordering::SeqCst) {
            return Err(ChannelError::Closed);
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .map_err(|e| ChannelError::Plugin(Box::new(e)))
    }

    async fn welcome(&self, to: &NodeId, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > self.max_payload {
            return Err(ChannelError::TooLarge(payload.len(), self.max_payload));
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err(ChannelError::Closed);
        }
        self.client
            .publish(
                self.topics.welcome(to),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await
            .map_err(|e| ChannelError::Plugin(Box::new(e)))
    }

    async fn next_event(&self) -> Option<ChannelEvent> {
        self.events.lock().await.recv().await
    }

    async fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if self.client.try_disconnect().is_ok() {
            // Let the task send the goodbye, then stop it regardless.
            for _ in 0..50 {
                if self.task.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.task.abort();
    }
}

fn connect_url(url: &str, opts: ChannelOptions) -> ChannelFuture {
    let url = url.to_string();
    Box::pin(async move {
        Ok(Box::new(MqttChannel::connect(&url, opts).await?) as Box<dyn ControlChannel>)
    })
}

pluto_plugins_api::inventory::submit! {
    ChannelDescriptor {
        name: "mqtt",
        schemes: &["mqtt"],
        abi_version: PLUGIN_ABI_VERSION,
        check: |url| MqttUrl::parse(url).map(|_| ()),
        connect: connect_url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = MqttUrl::parse("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 1883, "pluto")
        );
        let u = MqttUrl::parse("mqtt://broker/family/net").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("broker", 1883, "family/net")
        );
        for bad in [
            "nats://x",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://h/#",
            "mqtt://h/$sys",
        ] {
            assert!(MqttUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topics_round_trip() {
        let t = Topics {
            prefix: "p/q".into(),
        };
        let id = NodeId([7; 32]);
        assert_eq!(t.parse(&t.to_node(&id)), Some(("to-node", id)));
        assert_eq!(t.parse(&t.presence(&id)), Some(("presence", id)));
        assert_eq!(t.parse("p/q/v1/to-node/zz"), None);
        assert_eq!(t.parse("other/v1/to-node/00"), None);
    }
}
