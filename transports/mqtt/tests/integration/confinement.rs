//! The embedded broker with logins ([`BrokerAuth`]), attacked as a broker
//! client would: no login, a forged or replayed one, a node reaching for
//! other nodes' topics, wildcards or the coordinator's share group, a will
//! on another's topic, a stolen client id, silence without keep-alive, a
//! crowd from one address, and clients that never read. Each attack fails
//! and honest clients keep being served.

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use pluto_plugins_api::{
    broker_login_message, connect_channel, ChannelEvent, ChannelOptions, ChannelRole,
    ChannelSigner, NodeId,
};
use pluto_transport_mqtt::broker::{BrokerAuth, BrokerSettings, EmbeddedBroker};
use rumqttc::{ConnAck, ConnectReturnCode, LastWill, Login, Packet, QoS, SubscribeReasonCode};

use super::broker::Raw;

const MAX: usize = 64 << 10;

fn key() -> SigningKey {
    SigningKey::from_bytes(&rand::random())
}

fn id(k: &SigningKey) -> String {
    hex::encode(k.verifying_key().to_bytes())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn login(k: &SigningKey, client_id: &str, time_ms: u64) -> Login {
    // For any coordinator (a first contact): every pluto broker takes it.
    let sig = k.sign(&broker_login_message(client_id, time_ms, &NodeId([0; 32])));
    Login::new(id(k), format!("{time_ms}.{}", hex::encode(sig.to_bytes())))
}

/// A broker that checks logins, for `coordinator`.
fn broker(coordinator: &SigningKey, tune: impl FnOnce(&mut BrokerSettings)) -> SocketAddr {
    let mut s = BrokerSettings::new(1000, MAX);
    s.auth = Some(BrokerAuth::new(NodeId(
        coordinator.verifying_key().to_bytes(),
    )));
    tune(&mut s);
    EmbeddedBroker::start_with("127.0.0.1:0".parse().unwrap(), s)
        .unwrap()
        .addr
}

/// Connects with `login` and returns the CONNACK code (and the client).
pub(super) async fn try_connect(
    addr: SocketAddr,
    client_id: &str,
    login: Option<Login>,
    will: Option<&str>,
    keep_alive: u16,
) -> (Option<ConnectReturnCode>, Raw) {
    connect_on(Raw::open(addr).await, client_id, login, will, keep_alive).await
}

pub(super) async fn connect_on(
    mut c: Raw,
    client_id: &str,
    login: Option<Login>,
    will: Option<&str>,
    keep_alive: u16,
) -> (Option<ConnectReturnCode>, Raw) {
    let mut connect = rumqttc::Connect::new(client_id);
    connect.keep_alive = keep_alive;
    connect.login = login;
    connect.last_will = will.map(|t| LastWill::new(t, "offline", QoS::AtLeastOnce, false));
    c.send(Packet::Connect(connect)).await;
    let code = match c.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::ConnAck(ConnAck { code, .. }))) => Some(code),
        _ => None,
    };
    (code, c)
}

/// Connects as `k` and expects to be let in.
async fn connect_as(addr: SocketAddr, k: &SigningKey, client_id: &str, will: Option<&str>) -> Raw {
    let (code, c) = try_connect(
        addr,
        client_id,
        Some(login(k, client_id, now_ms())),
        will,
        30,
    )
    .await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    c
}

fn to_coordinator(k: &SigningKey) -> String {
    format!("p/v1/to-coordinator/{}", id(k))
}
fn to_node(k: &SigningKey) -> String {
    format!("p/v1/to-node/{}", id(k))
}
fn presence(k: &SigningKey) -> String {
    format!("p/v1/presence/{}", id(k))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_keys_that_prove_themselves_get_in() {
    let c = key();
    let addr = broker(&c, |_| {});
    let n = key();
    let refused = Some(ConnectReturnCode::NotAuthorized);
    // No login; a login for another client id; stamped too long ago; signed
    // by another key than the one named.
    assert_eq!(try_connect(addr, "x", None, None, 30).await.0, refused);
    let other = login(&n, "other", now_ms());
    assert_eq!(
        try_connect(addr, "x", Some(other), None, 30).await.0,
        refused
    );
    let old = login(&n, "x", now_ms() - 10 * 60_000);
    assert_eq!(try_connect(addr, "x", Some(old), None, 30).await.0, refused);
    let mut forged = login(&key(), "x", now_ms());
    forged.username = id(&c);
    assert_eq!(
        try_connect(addr, "x", Some(forged), None, 30).await.0,
        refused
    );
    // A login seen on the wire opens one connection, not two.
    let good = login(&n, "x", now_ms());
    let (code, mut first) = try_connect(addr, "x", Some(good.clone()), None, 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert_eq!(
        try_connect(addr, "x", Some(good), None, 30).await.0,
        refused
    );
    first.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_its_own_topics_and_nothing_else() {
    let c = key();
    let addr = broker(&c, |_| {});
    let mut coordinator = connect_as(addr, &c, "coordinator", None).await;
    let codes = coordinator
        .subscribe(&[
            ("$share/g/p/v1/to-coordinator/+", QoS::AtLeastOnce),
            ("p/v1/presence/+", QoS::AtLeastOnce),
        ])
        .await;
    assert!(codes
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
    let (a, b) = (key(), key());
    let mut na = connect_as(addr, &a, "a", Some(&presence(&a))).await;
    let mut nb = connect_as(addr, &b, "b", None).await;
    // Its own to-node topic only: no wildcard, no share group, not B's.
    assert!(matches!(
        na.subscribe(&[(&to_node(&a), QoS::AtLeastOnce)]).await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    for f in [
        "#".to_string(),
        "p/v1/to-coordinator/+".to_string(),
        "$share/g/p/v1/to-coordinator/+".to_string(),
        to_node(&b),
        to_coordinator(&b),
    ] {
        assert_eq!(
            na.subscribe(&[(&f, QoS::AtLeastOnce)]).await,
            [SubscribeReasonCode::Failure],
            "{f}"
        );
    }
    // Publishing as B, or to B: dropped. As itself: delivered.
    nb.subscribe(&[(&to_node(&b), QoS::AtLeastOnce)]).await;
    na.publish(&to_coordinator(&b), b"spoof", QoS::AtLeastOnce, 1)
        .await;
    na.publish(&presence(&b), b"offline", QoS::AtLeastOnce, 2)
        .await;
    na.publish(&to_node(&b), b"hijack", QoS::AtLeastOnce, 3)
        .await;
    na.publish(&to_coordinator(&a), b"mine", QoS::AtLeastOnce, 4)
        .await;
    let p = coordinator.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (to_coordinator(&a).as_str(), &b"mine"[..])
    );
    coordinator.quiet(Duration::from_millis(300)).await;
    nb.quiet(Duration::from_millis(100)).await;
    // The coordinator reaches B.
    coordinator
        .publish(&to_node(&b), b"hello", QoS::AtLeastOnce, 9)
        .await;
    assert_eq!(nb.next_publish().await.payload, &b"hello"[..]);
    // A's will, on its own presence topic, reaches the coordinator.
    drop(na);
    let p = coordinator.next_publish().await;
    assert_eq!(p.topic, presence(&a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_will_on_anothers_topic_and_no_stolen_client_id() {
    let c = key();
    let addr = broker(&c, |_| {});
    let (a, b) = (key(), key());
    let (code, _) = try_connect(
        addr,
        "b",
        Some(login(&b, "b", now_ms())),
        Some(&presence(&a)),
        30,
    )
    .await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    // B takes A's client id: A stays connected (ids are per key).
    let mut na = connect_as(addr, &a, "same", None).await;
    let _nb = connect_as(addr, &b, "same", None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    na.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_and_crowds_are_bounded() {
    let c = key();
    let addr = broker(&c, |s| {
        s.max_keep_alive = Duration::from_secs(1);
        s.max_per_address = 4;
        s.max_per_key = 2;
    });
    // One key, two connections at most: it cannot multiply its own
    // subscriptions and the deliveries they queue.
    let k = key();
    let _one = connect_as(addr, &k, "one", None).await;
    let _two = connect_as(addr, &k, "two", None).await;
    let (code, _) = try_connect(addr, "three", Some(login(&k, "three", now_ms())), None, 30).await;
    assert_eq!(code, Some(ConnectReturnCode::ServiceUnavailable));
    drop((_one, _two));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Keep-alive 0 ("never") is the longest granted: 1 s, so 1.5 s of
    // silence ends it.
    let n = key();
    let (code, mut silent) = try_connect(addr, "s", Some(login(&n, "s", now_ms())), None, 0).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    silent.closed_within(Duration::from_secs(3)).await;
    // Four sockets from one address; the fifth is closed at once.
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(Raw::open(addr).await);
        let _ = i;
    }
    let mut fifth = Raw::open(addr).await;
    fifth.closed_within(Duration::from_secs(2)).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect_as(addr, &n, "again", None).await;
    again.ping().await;
}

/// A node's key, logging in through the channel.
pub(super) struct KeySigner(pub(super) SigningKey);

impl ChannelSigner for KeySigner {
    fn id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }
    fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_logs_in_and_says_when_it_is_turned_away() {
    let c = key();
    let addr = broker(&c, |_| {});
    let url = format!("mqtt://{addr}/p");
    let n = key();
    let nid = NodeId(n.verifying_key().to_bytes());
    let opts = |role: ChannelRole, signer: Option<SigningKey>| ChannelOptions {
        role,
        max_payload: MAX,
        logins: signer
            .map(|k| {
                pluto_plugins_api::Login::Signed(std::sync::Arc::new(KeySigner(k)), NodeId([0; 32]))
            })
            .into_iter()
            .collect(),
    };
    let node_role = ChannelRole::Node {
        id: nid,
        will: b"offline".to_vec(),
        hello: b"online".to_vec(),
    };
    // Logged in: connected, subscriptions granted.
    let ch = connect_channel(&url, opts(node_role.clone(), Some(n.clone())))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), ch.next_event()).await;
    assert_eq!(first.unwrap(), Some(ChannelEvent::Connected));
    ch.close().await;
    // Without a login: denied, said so.
    let ch = connect_channel(&url, opts(node_role, None)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), ch.next_event()).await;
    assert!(matches!(ev.unwrap(), Some(ChannelEvent::Denied(_))));
    ch.close().await;
    // A node's key posing as a coordinator (wildcard subscriptions): its
    // subscriptions are refused, and the channel says so rather than
    // claiming to be connected.
    let ch = connect_channel(
        &url,
        opts(ChannelRole::Coordinator { group: None }, Some(n)),
    )
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), ch.next_event()).await;
    match ev.unwrap() {
        Some(ChannelEvent::Denied(why)) => assert!(why.contains("subscription"), "{why}"),
        other => panic!("{other:?}"),
    }
    ch.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_cannot_starve_the_others() {
    let c = key();
    // A small total, so a few hoarders fill it.
    let addr = broker(&c, |s| {
        s.max_payload = 256 << 10;
        s.max_queued_bytes = 8 << 20;
    });
    let mut coordinator = connect_as(addr, &c, "coordinator", None).await;
    coordinator
        .subscribe(&[("p/v1/to-coordinator/+", QoS::AtLeastOnce)])
        .await;
    // Twelve nodes that ask and never read their answers.
    let mut hoarders = Vec::new();
    for i in 0..12 {
        let k = key();
        let client = format!("h{i}");
        let (code, mut h) = connect_on(
            Raw::open_tight(addr).await,
            &client,
            Some(login(&k, &client, now_ms())),
            None,
            60,
        )
        .await;
        assert_eq!(code, Some(ConnectReturnCode::Success));
        h.subscribe(&[(&to_node(&k), QoS::AtMostOnce)]).await;
        hoarders.push((k, h));
    }
    let honest = key();
    let mut good = connect_as(addr, &honest, "honest", None).await;
    good.subscribe(&[(&to_node(&honest), QoS::AtLeastOnce)])
        .await;
    // The coordinator answers the hoarders, 6 MiB each (more than their
    // sockets and queues hold, and all queues together hold 8 MiB), and
    // the honest node, a 200 KiB answer now and then: those still arrive.
    let small = vec![7u8; 60 << 10];
    let answer = vec![9u8; 200 << 10];
    let mut honest_got = 0;
    for round in 0..100u16 {
        for (k, _) in &hoarders {
            coordinator
                .publish(&to_node(k), &small, QoS::AtMostOnce, 0)
                .await;
        }
        if round % 5 == 4 {
            coordinator
                .publish(&to_node(&honest), &answer, QoS::AtLeastOnce, round + 1)
                .await;
            if let Ok(Some(Packet::Publish(p))) = good.recv_within(Duration::from_secs(2)).await {
                assert_eq!(p.payload.len(), answer.len());
                good.send(Packet::PubAck(rumqttc::PubAck::new(p.pkid)))
                    .await;
                honest_got += 1;
            }
        }
    }
    assert!(
        honest_got >= 18,
        "the honest node got {honest_got} of 20 answers"
    );
    // And a node's publish still reaches the coordinator at once.
    good.publish(&to_coordinator(&honest), b"heartbeat", QoS::AtLeastOnce, 99)
        .await;
    let p = coordinator.next_publish().await;
    assert_eq!(&p.payload[..], b"heartbeat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_floods_is_read_more_slowly_and_others_are_not() {
    let c = key();
    let addr = broker(&c, |s| {
        s.max_payload = 1 << 20;
        s.max_publish_rate = 4 << 20;
    });
    let mut coordinator = connect_as(addr, &c, "coordinator", None).await;
    coordinator
        .subscribe(&[("p/v1/to-coordinator/+", QoS::AtMostOnce)])
        .await;
    let (flooder, honest) = (key(), key());
    let mut f = connect_as(addr, &flooder, "f", None).await;
    let mut h = connect_as(addr, &honest, "h", None).await;
    // 12 MiB at 4 MiB/s, one second's worth at once: about 2 s.
    let chunk = vec![1u8; 1 << 20];
    let topic = to_coordinator(&flooder);
    let flood = tokio::spawn(async move {
        let started = std::time::Instant::now();
        for i in 0..12u16 {
            f.publish(&topic, &chunk, QoS::AtLeastOnce, i + 1).await;
        }
        started.elapsed()
    });
    // Meanwhile an honest node's message goes straight through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = std::time::Instant::now();
    h.publish(&to_coordinator(&honest), b"heartbeat", QoS::AtLeastOnce, 1)
        .await;
    let mut got_honest = None;
    let mut flood_msgs = 0;
    while got_honest.is_none() || flood_msgs < 12 {
        let p = coordinator.next_publish().await;
        if p.payload.as_ref() == b"heartbeat" {
            got_honest = Some(sent.elapsed());
        } else {
            flood_msgs += 1;
        }
    }
    let took = flood.await.unwrap();
    assert!(
        took >= Duration::from_millis(1_800),
        "the flood took {took:?}"
    );
    assert!(
        got_honest.unwrap() < Duration::from_millis(500),
        "the honest message waited {:?}",
        got_honest
    );
    // The coordinator itself is not paced.
    let started = std::time::Instant::now();
    let big = vec![2u8; 1 << 20];
    for i in 0..12u16 {
        coordinator
            .publish(&to_node(&honest), &big, QoS::AtMostOnce, i)
            .await;
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_broker_still_lets_the_coordinator_in() {
    let c = key();
    let addr = broker(&c, |s| s.max_connections = 3);
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(connect_as(addr, &key(), &format!("n{i}"), None).await);
    }
    let (code, _) = try_connect(
        addr,
        "late",
        Some(login(&key(), "late", now_ms())),
        None,
        30,
    )
    .await;
    assert_eq!(code, Some(ConnectReturnCode::ServiceUnavailable));
    let mut coordinator = connect_as(addr, &c, "coordinator", None).await;
    coordinator.ping().await;
}
