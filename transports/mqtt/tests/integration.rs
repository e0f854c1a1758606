//! The MQTT channel against real brokers: the embedded one and the
//! machine's Mosquitto (`PLUTO_TEST_MQTT_URL`, default
//! `mqtt://127.0.0.1:1883`; the test fails when it is not reachable); and
//! the embedded broker on its own, against raw (and hostile) clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod integration {
    mod broker;
    mod confinement;
    mod mosquitto_accounts;
}

use std::time::Duration;

use pluto_plugins_api::{
    connect_channel, ChannelError, ChannelEvent, ChannelOptions, ChannelRole, ControlChannel,
    NodeId,
};
use pluto_transport_mqtt::broker::EmbeddedBroker;
use tokio::time::timeout;

const MAX: usize = 64 << 10;

fn mosquitto() -> String {
    pluto_plugins_api::testkit::service_url("PLUTO_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
}

fn embedded() -> String {
    EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), 1000, MAX)
        .unwrap()
        .url()
}

/// A topic prefix of this test's own, so tests sharing a broker never see
/// each other's messages.
fn isolated(url: &str) -> String {
    format!("{url}/test-{:016x}", rand::random::<u64>())
}

async fn node(url: &str, id: NodeId) -> Box<dyn ControlChannel> {
    let opts = ChannelOptions {
        role: ChannelRole::Node {
            id,
            will: b"gone".to_vec(),
            hello: b"here".to_vec(),
        },
        max_payload: MAX,
        logins: Vec::new(),
    };
    connect_channel(url, opts).await.unwrap()
}

async fn coordinator(url: &str) -> Box<dyn ControlChannel> {
    let opts = ChannelOptions {
        role: ChannelRole::Coordinator { group: None },
        max_payload: MAX,
        logins: Vec::new(),
    };
    connect_channel(url, opts).await.unwrap()
}

/// The next event that is not a (re)connection notice.
async fn next(ch: &dyn ControlChannel) -> ChannelEvent {
    loop {
        let ev = timeout(Duration::from_secs(10), ch.next_event())
            .await
            .expect("no event within 10 s")
            .expect("channel closed");
        if !matches!(ev, ChannelEvent::Connected | ChannelEvent::Disconnected(_)) {
            return ev;
        }
    }
}

async fn connected(ch: &dyn ControlChannel) {
    loop {
        let ev = timeout(Duration::from_secs(10), ch.next_event())
            .await
            .expect("not connected");
        if ev == Some(ChannelEvent::Connected) {
            return;
        }
    }
}

async fn exchange_and_presence(url: String) {
    let url = isolated(&url);
    let c = coordinator(&url).await;
    connected(&*c).await;
    let a = NodeId([1; 32]);
    let b = NodeId([2; 32]);
    let na = node(&url, a).await;
    connected(&*na).await;
    assert_eq!(
        next(&*c).await,
        ChannelEvent::Presence {
            node: a,
            payload: b"here".to_vec()
        }
    );
    let nb = node(&url, b).await;
    connected(&*nb).await;
    assert_eq!(
        next(&*c).await,
        ChannelEvent::Presence {
            node: b,
            payload: b"here".to_vec()
        }
    );

    // Node to coordinator: the topic names the (claimed) sender.
    na.send(None, b"request from a").await.unwrap();
    assert_eq!(
        next(&*c).await,
        ChannelEvent::Message {
            from: Some(a),
            payload: b"request from a".to_vec()
        }
    );
    // Coordinator to one node: only that node gets it.
    c.send(Some(&b), b"for b").await.unwrap();
    assert_eq!(
        next(&*nb).await,
        ChannelEvent::Message {
            from: None,
            payload: b"for b".to_vec()
        }
    );
    c.send(Some(&a), b"for a").await.unwrap();
    assert_eq!(
        next(&*na).await,
        ChannelEvent::Message {
            from: None,
            payload: b"for a".to_vec()
        }
    );

    // Too large is refused before it reaches the broker.
    assert!(matches!(
        na.send(None, &vec![0; MAX + 1]).await,
        Err(ChannelError::TooLarge(..))
    ));
    // A payload at the limit goes through.
    na.send(None, &vec![7; MAX]).await.unwrap();
    match next(&*c).await {
        ChannelEvent::Message { payload, .. } => assert_eq!(payload.len(), MAX),
        other => panic!("{other:?}"),
    }

    // A goodbye publishes no will; a lost connection does.
    nb.close().await;
    drop(na);
    assert_eq!(
        next(&*c).await,
        ChannelEvent::Presence {
            node: a,
            payload: b"gone".to_vec()
        }
    );
    assert!(
        timeout(Duration::from_millis(500), next(&*c))
            .await
            .is_err(),
        "b said goodbye: no will"
    );
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_and_presence_on_the_embedded_broker() {
    exchange_and_presence(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_and_presence_on_mosquitto() {
    exchange_and_presence(mosquitto()).await;
}

/// Shared subscriptions: each message reaches one replica of the group.
async fn coordinator_replicas_share_the_load(url: String) {
    let url = isolated(&url);
    let group = |g: &str| ChannelOptions {
        role: ChannelRole::Coordinator {
            group: Some(g.into()),
        },
        max_payload: MAX,
        logins: Vec::new(),
    };
    let c1 = connect_channel(&url, group("coord")).await.unwrap();
    let c2 = connect_channel(&url, group("coord")).await.unwrap();
    connected(&*c1).await;
    connected(&*c2).await;
    let n = node(&url, NodeId([3; 32])).await;
    connected(&*n).await;
    for i in 0..20u8 {
        n.send(None, &[i]).await.unwrap();
    }
    let mut got = Vec::new();
    let mut per_replica = Vec::new();
    for ch in [&c1, &c2] {
        let mut mine = 0;
        while let Ok(Some(ev)) = timeout(Duration::from_millis(700), ch.next_event()).await {
            if let ChannelEvent::Message { payload, .. } = ev {
                got.push(payload[0]);
                mine += 1;
            }
        }
        per_replica.push(mine);
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (0..20).collect::<Vec<u8>>(),
        "{url}: each message exactly once"
    );
    assert!(
        per_replica.iter().all(|n| *n > 0),
        "{url}: both replicas take a share: {per_replica:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_replicas_share_the_load_on_the_embedded_broker() {
    coordinator_replicas_share_the_load(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_replicas_share_the_load_on_mosquitto() {
    coordinator_replicas_share_the_load(mosquitto()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reconnects_after_the_broker_comes_back() {
    // A broker that refuses at first (nothing listens), then appears.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("mqtt://127.0.0.1:{port}/reconnect");
    let n = node(&url, NodeId([4; 32])).await;
    match timeout(Duration::from_secs(10), n.next_event())
        .await
        .unwrap()
    {
        // Nothing listens there yet: turned away at once, and said so.
        Some(ChannelEvent::Refused(_)) => {}
        other => panic!("expected a refused attempt first, got {other:?}"),
    }
    let broker = EmbeddedBroker::start(format!("127.0.0.1:{port}").parse().unwrap(), 100, MAX);
    broker.unwrap();
    connected(&*n).await;
}

#[tokio::test]
async fn unknown_schemes_and_bad_urls_are_refused() {
    let opts = || ChannelOptions {
        role: ChannelRole::Coordinator { group: None },
        max_payload: MAX,
        logins: Vec::new(),
    };
    assert!(matches!(
        connect_channel("carrier-pigeon://x", opts()).await,
        Err(ChannelError::UnknownScheme(..))
    ));
    assert!(matches!(
        connect_channel("mqtt://host:notaport", opts()).await,
        Err(ChannelError::BadUrl(..))
    ));
}
