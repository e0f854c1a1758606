//! A running `pluto-coordinator` on its embedded broker, attacked by broker
//! clients as the control-plane issue lists them: an anonymous client, a
//! fresh key reaching for the coordinator's share group and for everyone's
//! topics, a fake "offline" for an honest storer. None gets anywhere; the
//! storer stays online and a newcomer still joins.

use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use pluto_plugins_api::{
    broker_login_message, connect_channel, ChannelEvent, ChannelOptions, ChannelRole,
};
use rumqttc::{ConnectionError, Event, MqttOptions, Packet, QoS};

use super::common::*;
use super::exchange::Net;

fn now_ms() -> u64 {
    super::network::now_ms()
}

/// A raw MQTT client, logged in as `key` when given; the first thing the
/// broker says back (its CONNACK, or a refusal).
async fn raw(
    host_port: &str,
    key: Option<&SigningKey>,
) -> (
    rumqttc::AsyncClient,
    rumqttc::EventLoop,
    Result<(), ConnectionError>,
) {
    let (host, port) = host_port.rsplit_once(':').unwrap();
    let client_id = format!(
        "attacker-{:x}",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    let mut o = MqttOptions::new(client_id.clone(), host, port.parse().unwrap());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some(k) = key {
        let time = now_ms();
        let sig = k.sign(&broker_login_message(&client_id, time));
        o.set_credentials(
            hex(&k.verifying_key().to_bytes()),
            format!("{time}.{}", hex(&sig.to_bytes())),
        );
    }
    let (client, mut events) = rumqttc::AsyncClient::new(o, 16);
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e),
            Err(_) => panic!("no answer from the broker"),
        }
    };
    (client, events, first)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn online(net: &Net, id: &str) -> bool {
    let home = net.coordinator.home.display().to_string();
    let r = json(&ok(std::process::Command::new(
        super::network::coordinator_bin(),
    )
    .args(["status", "--json", "--home", &home])));
    r.as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {r}"))["online"]
        == true
}

#[test]
fn broker_clients_cannot_silence_hijack_or_fake_presence() {
    let net = Net::start_with(1, &[], "");
    let storer = json(&ok(pluto(&net.storers[0].0).args(["--json", "status"])))["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (base, _key) = net.url.split_once('#').unwrap();
    let host_port = base.trim_start_matches("mqtt://").to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // No login: refused.
        let (_, _, first) = raw(&host_port, None).await;
        assert!(
            matches!(first, Err(ConnectionError::ConnectionRefused(_))),
            "{first:?}"
        );
        // A fresh key posing as a coordinator replica (the share group and
        // wildcards): its subscriptions are refused, and said so.
        let thief = SigningKey::generate(&mut rand_core::OsRng);
        let ch = connect_channel(
            &format!("{base}/pluto"),
            ChannelOptions {
                role: ChannelRole::Coordinator {
                    group: Some("steal".into()),
                },
                max_payload: pluto_protocol::MAX_ENVELOPE,
                signer: Some(std::sync::Arc::new(pluto_protocol::KeySigner(
                    thief.clone(),
                ))),
            },
        )
        .await
        .unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), ch.next_event())
            .await
            .unwrap();
        assert!(matches!(ev, Some(ChannelEvent::Denied(_))), "{ev:?}");
        ch.close().await;
        // The same key, logged in, says "offline" for the honest storer,
        // over and over: dropped by the broker.
        let (client, mut events, first) = raw(&host_port, Some(&thief)).await;
        first.unwrap();
        let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let topic = format!("pluto/v1/presence/{storer}");
        for _ in 0..30 {
            tokio::time::timeout(
                Duration::from_secs(5),
                client.publish(&topic, QoS::AtLeastOnce, false, b"offline".to_vec()),
            )
            .await
            .expect("the broker takes the publish")
            .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pump.abort();
    });
    assert!(
        online(&net, &storer),
        "a fake goodbye took the storer offline"
    );
    // And a newcomer still joins at once.
    let (home, _) = net.owner("newcomer");
    let s = json(&ok(pluto(&home).args(["--json", "status"])));
    assert_eq!(s["coordinator"]["state"], "connected", "{s}");
}
