//! Mosquitto with its dynamic security plugin (`PLUTO_TEST_DYNSEC_URL`,
//! `mqtt://ADMIN:PASSWORD@HOST:PORT`, as `.ci/run` starts it), with the
//! accounts [`Dynsec`] makes, attacked as on the embedded broker
//! (`confinement.rs`): no login, a wrong password, a node reaching for
//! others' topics, wildcards or the coordinator's share group, a will or a
//! goodbye on another's presence topic, a newcomer reaching beyond its
//! handshake. Each attack fails; honest clients keep being served.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pluto_plugins_api::{
    connect_channel, ChannelEvent, ChannelOptions, ChannelRole, Login as ChannelLogin, NodeId,
    NEWCOMER_PASSWORD, NEWCOMER_USER,
};
use pluto_transport_mqtt::dynsec::Dynsec;
use rumqttc::{ConnectReturnCode, Login, QoS, SubscribeReasonCode};

use super::broker::Raw;
use super::confinement::{try_connect, KeySigner};

/// The broker, and its administrator's user name and password.
pub(crate) fn dynsec() -> (SocketAddr, String, String) {
    let (host_port, user, password) = pluto_plugins_api::testkit::service_login(
        "PLUTO_TEST_DYNSEC_URL",
        "mqtt://pluto-admin@127.0.0.1:1884",
    );
    let addr = host_port.to_socket_addrs().unwrap().next().unwrap();
    (addr, user, password)
}

fn node() -> NodeId {
    NodeId(rand::random())
}

/// One test at a time: making a prefix's roles gives the newcomers'
/// account one more role, which ends every newcomer's connection (another
/// test's too).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A prefix of this test's own, its channel URL, and the plugin's
/// administrator there with the coordinator's and newcomers' accounts made.
async fn prepared(group: Option<&str>) -> (SocketAddr, String, Dynsec, (String, String)) {
    let (addr, user, password) = dynsec();
    let prefix = format!("t{:016x}", rand::random::<u64>());
    let url = format!("mqtt://{addr}/{prefix}");
    let d = Dynsec::connect(&url, &user, &password).await.unwrap();
    let coordinator = (
        format!("pluto-coordinator-test-{:08x}", rand::random::<u32>()),
        format!("{:032x}", rand::random::<u128>()),
    );
    d.prepare(&coordinator.0, &coordinator.1, group)
        .await
        .unwrap();
    (addr, prefix, d, coordinator)
}

fn login(user: &str, password: &str) -> Option<Login> {
    Some(Login::new(user, password))
}

async fn connect(addr: SocketAddr, user: &str, password: &str, will: Option<&str>) -> Raw {
    let id = format!("t-{:016x}", rand::random::<u64>());
    let (code, c) = try_connect(addr, &id, login(user, password), will, 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success), "{user}");
    c
}

fn granted(codes: &[SubscribeReasonCode]) -> bool {
    codes
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_accounts_confine_each_node_to_its_own_topics() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (addr, p, d, (cu, cp)) = prepared(Some("g")).await;
    let t = |kind: &str, n: &NodeId| format!("{p}/v1/{kind}/{}", n.to_hex());
    let (a, b) = (node(), node());
    d.provision(&a, "password-of-a").await.unwrap();
    d.provision(&b, "password-of-b").await.unwrap();
    // No login, a wrong password, B's password for A: refused.
    for l in [
        None,
        login(&a.to_hex(), "guess"),
        login(&a.to_hex(), "password-of-b"),
    ] {
        let (code, _) = try_connect(addr, "x", l, None, 30).await;
        assert_ne!(code, Some(ConnectReturnCode::Success));
    }
    let mut coordinator = connect(addr, &cu, &cp, None).await;
    assert!(granted(
        &coordinator
            .subscribe(&[
                (
                    &format!("$share/g/{p}/v1/to-coordinator/+"),
                    QoS::AtLeastOnce
                ),
                (&format!("{p}/v1/presence/+"), QoS::AtLeastOnce),
                (&format!("{p}/v1/newcomer/+"), QoS::AtLeastOnce),
            ])
            .await
    ));
    let mut na = connect(addr, &a.to_hex(), "password-of-a", Some(&t("presence", &a))).await;
    // B leaves a will on A's presence topic: never delivered.
    let mut nb = connect(addr, &b.to_hex(), "password-of-b", Some(&t("presence", &a))).await;
    assert!(granted(
        &na.subscribe(&[(&t("to-node", &a), QoS::AtLeastOnce)]).await
    ));
    for f in [
        "#".to_string(),
        format!("{p}/#"),
        format!("{p}/v1/to-coordinator/+"),
        format!("$share/g/{p}/v1/to-coordinator/+"),
        format!("{p}/v1/welcome/+"),
        t("to-node", &b),
        t("to-coordinator", &b),
    ] {
        assert_eq!(
            na.subscribe(&[(&f, QoS::AtLeastOnce)]).await,
            [SubscribeReasonCode::Failure],
            "{f}"
        );
    }
    // Publishing as B, or to B: dropped. As itself: delivered.
    assert!(granted(
        &nb.subscribe(&[(&t("to-node", &b), QoS::AtLeastOnce)]).await
    ));
    na.publish(&t("to-coordinator", &b), b"spoof", QoS::AtLeastOnce, 1)
        .await;
    na.publish(&t("presence", &b), b"offline", QoS::AtLeastOnce, 2)
        .await;
    na.publish(&t("to-node", &b), b"hijack", QoS::AtLeastOnce, 3)
        .await;
    na.publish(&t("to-coordinator", &a), b"mine", QoS::AtLeastOnce, 4)
        .await;
    let got = coordinator.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (t("to-coordinator", &a).as_str(), &b"mine"[..])
    );
    coordinator.quiet(Duration::from_millis(300)).await;
    nb.quiet(Duration::from_millis(100)).await;
    // The coordinator reaches B.
    coordinator
        .publish(&t("to-node", &b), b"hello", QoS::AtLeastOnce, 9)
        .await;
    assert_eq!(nb.next_publish().await.payload, &b"hello"[..]);
    // B's will (on A's topic) is dropped; A's own will reaches the
    // coordinator.
    drop(nb);
    coordinator.quiet(Duration::from_millis(500)).await;
    drop(na);
    let got = coordinator.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (t("presence", &a).as_str(), &b"offline"[..])
    );
    // A restored or moved node sets a new password: the old one is refused.
    d.provision(&a, "new-password-of-a").await.unwrap();
    let (code, _) = try_connect(addr, "y", login(&a.to_hex(), "password-of-a"), None, 30).await;
    assert_ne!(code, Some(ConnectReturnCode::Success));
    connect(addr, &a.to_hex(), "new-password-of-a", None)
        .await
        .ping()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_reaches_its_handshake_and_nothing_else() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (addr, p, _d, (cu, cp)) = prepared(None).await;
    let t = |kind: &str, n: &NodeId| format!("{p}/v1/{kind}/{}", n.to_hex());
    let (a, honest) = (node(), node());
    let mut coordinator = connect(addr, &cu, &cp, None).await;
    assert!(granted(
        &coordinator
            .subscribe(&[
                (&format!("{p}/v1/to-coordinator/+"), QoS::AtLeastOnce),
                (&format!("{p}/v1/presence/+"), QoS::AtLeastOnce),
                (&format!("{p}/v1/newcomer/+"), QoS::AtLeastOnce),
            ])
            .await
    ));
    let mut n = connect(
        addr,
        NEWCOMER_USER,
        NEWCOMER_PASSWORD,
        Some(&t("presence", &honest)),
    )
    .await;
    assert!(granted(
        &n.subscribe(&[(&t("welcome", &a), QoS::AtLeastOnce)]).await
    ));
    // Not every newcomer's answers at once, nor any node's traffic.
    for f in [
        format!("{p}/v1/welcome/+"),
        format!("{p}/v1/welcome/#"),
        format!("{p}/#"),
        t("to-node", &honest),
        format!("{p}/v1/newcomer/+"),
    ] {
        assert_eq!(
            n.subscribe(&[(&f, QoS::AtLeastOnce)]).await,
            [SubscribeReasonCode::Failure],
            "{f}"
        );
    }
    // A goodbye for an honest node, a request in its name, a fake answer:
    // dropped. A handshake on its own newcomer topic: delivered.
    n.publish(&t("presence", &honest), b"offline", QoS::AtLeastOnce, 1)
        .await;
    n.publish(&t("to-coordinator", &honest), b"x", QoS::AtLeastOnce, 2)
        .await;
    n.publish(&t("welcome", &a), b"fake", QoS::AtLeastOnce, 3)
        .await;
    n.publish(&t("newcomer", &a), b"hello", QoS::AtLeastOnce, 4)
        .await;
    let got = coordinator.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (t("newcomer", &a).as_str(), &b"hello"[..])
    );
    coordinator.quiet(Duration::from_millis(300)).await;
    // Its will on the honest node's presence topic is dropped too.
    drop(n);
    coordinator.quiet(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_falls_back_from_a_signature_to_the_account_and_says_when_it_has_none() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (addr, p, d, (cu, cp)) = prepared(None).await;
    let url = format!("mqtt://{addr}/{p}");
    let a = node();
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let opts = |role: ChannelRole, logins: Vec<ChannelLogin>| ChannelOptions {
        role,
        max_payload: 64 << 10,
        logins,
    };
    let node_logins = || {
        vec![
            ChannelLogin::Signed(std::sync::Arc::new(KeySigner(key.clone())), NodeId([0; 32])),
            ChannelLogin::Password {
                user: a.to_hex(),
                password: "pw-a".into(),
            },
        ]
    };
    let role = ChannelRole::Node {
        id: a,
        will: Vec::new(),
        hello: Vec::new(),
    };
    let first = |ch: Box<dyn pluto_plugins_api::ControlChannel>| async move {
        let ev = tokio::time::timeout(Duration::from_secs(10), ch.next_event())
            .await
            .unwrap();
        ch.close().await;
        ev
    };
    // No account yet: refused in every form, said so.
    let ch = connect_channel(&url, opts(role.clone(), node_logins()))
        .await
        .unwrap();
    assert!(matches!(first(ch).await, Some(ChannelEvent::Denied(_))));
    // The newcomer gets in; the coordinator hears it on the newcomer topic
    // and answers on its welcome topic.
    let coordinator = connect_channel(
        &url,
        opts(
            ChannelRole::Coordinator { group: None },
            vec![ChannelLogin::Password {
                user: cu,
                password: cp,
            }],
        ),
    )
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), coordinator.next_event()).await;
    assert_eq!(ev.unwrap(), Some(ChannelEvent::Connected));
    let newcomer = connect_channel(&url, opts(ChannelRole::Newcomer { id: a }, Vec::new()))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), newcomer.next_event()).await;
    assert_eq!(ev.unwrap(), Some(ChannelEvent::Connected));
    newcomer.send(None, b"hello").await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), coordinator.next_event()).await;
    assert_eq!(
        ev.unwrap(),
        Some(ChannelEvent::Newcomer {
            node: a,
            payload: b"hello".to_vec()
        })
    );
    coordinator.welcome(&a, b"welcome").await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), newcomer.next_event()).await;
    assert_eq!(
        ev.unwrap(),
        Some(ChannelEvent::Message {
            from: None,
            payload: b"welcome".to_vec()
        })
    );
    newcomer.close().await;
    // With its account, the node's channel gets in (the signature refused
    // first, the password taken).
    d.provision(&a, "pw-a").await.unwrap();
    let ch = connect_channel(&url, opts(role, node_logins()))
        .await
        .unwrap();
    assert_eq!(first(ch).await, Some(ChannelEvent::Connected));
    coordinator.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_never_read_cannot_starve_the_others_on_mosquitto() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (addr, p, d, (cu, cp)) = prepared(None).await;
    let t = |kind: &str, n: &NodeId| format!("{p}/v1/{kind}/{}", n.to_hex());
    let mut coordinator = connect(addr, &cu, &cp, None).await;
    assert!(granted(
        &coordinator
            .subscribe(&[(&format!("{p}/v1/to-coordinator/+"), QoS::AtLeastOnce)])
            .await
    ));
    // What the coordinator sends goes out on a connection of its own, so
    // its acknowledgements are never mixed with what it receives.
    let mut sender = connect(addr, &cu, &cp, None).await;
    // Twelve nodes that ask and never read their answers (at QoS 0 too,
    // which Mosquitto does not count against the queue bounds).
    let mut hoarders = Vec::new();
    for i in 0..12 {
        let n = node();
        d.provision(&n, "hoarder").await.unwrap();
        let id = format!("h{i}-{:08x}", rand::random::<u32>());
        let (code, mut h) = super::confinement::connect_on(
            Raw::open_tight(addr).await,
            &id,
            login(&n.to_hex(), "hoarder"),
            None,
            60,
        )
        .await;
        assert_eq!(code, Some(ConnectReturnCode::Success));
        let qos = if i % 2 == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        assert!(granted(&h.subscribe(&[(&t("to-node", &n), qos)]).await));
        hoarders.push((n, h));
    }
    let honest = node();
    d.provision(&honest, "honest").await.unwrap();
    let mut good = connect(addr, &honest.to_hex(), "honest", None).await;
    assert!(granted(
        &good
            .subscribe(&[(&t("to-node", &honest), QoS::AtLeastOnce)])
            .await
    ));
    // 6 MiB for each hoarder (more than their sockets and Mosquitto's
    // per-client bounds hold), a 200 KiB answer for the honest node now and
    // then: those still arrive.
    let small = vec![7u8; 60 << 10];
    let answer = vec![9u8; 200 << 10];
    let mut honest_got = 0;
    let mut pkid = 0u16;
    for round in 0..100u16 {
        for (n, _) in &hoarders {
            pkid = pkid % 60_000 + 1;
            sender
                .publish(&t("to-node", n), &small, QoS::AtLeastOnce, pkid)
                .await;
        }
        if round % 5 == 4 {
            pkid = pkid % 60_000 + 1;
            sender
                .publish(&t("to-node", &honest), &answer, QoS::AtLeastOnce, pkid)
                .await;
            if let Ok(Some(rumqttc::Packet::Publish(got))) =
                good.recv_within(Duration::from_secs(2)).await
            {
                assert_eq!(got.payload.len(), answer.len());
                good.send(rumqttc::Packet::PubAck(rumqttc::PubAck::new(got.pkid)))
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
    good.publish(
        &t("to-coordinator", &honest),
        b"heartbeat",
        QoS::AtLeastOnce,
        99,
    )
    .await;
    let got = coordinator.next_publish().await;
    assert_eq!(&got.payload[..], b"heartbeat");
}
