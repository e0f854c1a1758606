//! A running `pluto-coordinator`, on its embedded broker and on Mosquitto
//! with the accounts it makes there, attacked by broker clients as the
//! control-plane issue lists them: an anonymous client, a fresh key (or a
//! newcomer) reaching for the coordinator's share group and for everyone's
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

/// How a raw client logs in.
enum As<'a> {
    Nobody,
    Key(&'a SigningKey),
    Account(&'a str, &'a str),
}

/// A raw MQTT client, logged in as said; the first thing the broker says
/// back (its CONNACK, or a refusal).
async fn raw(
    host_port: &str,
    who: As<'_>,
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
    if let As::Account(user, password) = who {
        o.set_credentials(user, password);
    }
    if let As::Key(k) = who {
        let time = now_ms();
        let sig = k.sign(&broker_login_message(
            &client_id,
            time,
            &pluto_plugins_api::NodeId([0; 32]),
        ));
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

/// Connects to `url` as a coordinator replica in a share group of its own,
/// logged in with `login`, and expects to be turned away and told so.
async fn posing_as_a_replica_is_denied(url: &str, login: pluto_plugins_api::Login) {
    let ch = connect_channel(
        url,
        ChannelOptions {
            role: ChannelRole::Coordinator {
                group: Some("steal".into()),
            },
            max_payload: pluto_protocol::MAX_ENVELOPE,
            logins: vec![login.clone()],
        },
    )
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), ch.next_event())
        .await
        .unwrap();
    assert!(
        matches!(ev, Some(ChannelEvent::Denied(_))),
        "{login:?}: {ev:?}"
    );
    ch.close().await;
}

/// After the attacks: the honest storer is still online, and a newcomer
/// still joins at once.
fn still_served(net: &Net, storer: &str) {
    assert!(
        online(net, storer),
        "a fake goodbye took the storer offline"
    );
    let (home, _) = net.owner("newcomer");
    let s = json(&ok(pluto(&home).args(["--json", "status"])));
    assert_eq!(s["coordinator"]["state"], "connected", "{s}");
}

/// Publishes "offline" on `topic` 30 times, 100 ms apart.
async fn say_goodbye_for(
    client: rumqttc::AsyncClient,
    mut events: rumqttc::EventLoop,
    topic: &str,
) {
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    for _ in 0..30 {
        tokio::time::timeout(
            Duration::from_secs(5),
            client.publish(topic, QoS::AtLeastOnce, false, b"offline".to_vec()),
        )
        .await
        .expect("the broker takes the publish")
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pump.abort();
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
        let (_, _, first) = raw(&host_port, As::Nobody).await;
        assert!(
            matches!(first, Err(ConnectionError::ConnectionRefused(_))),
            "{first:?}"
        );
        // A fresh key posing as a coordinator replica (the share group and
        // wildcards): its subscriptions are refused, and said so.
        let thief = SigningKey::generate(&mut rand_core::OsRng);
        posing_as_a_replica_is_denied(
            &format!("{base}/pluto"),
            pluto_plugins_api::Login::Signed(
                std::sync::Arc::new(pluto_protocol::KeySigner(thief.clone())),
                pluto_plugins_api::NodeId([0; 32]),
            ),
        )
        .await;
        // The same key, logged in, says "offline" for the honest storer,
        // over and over: dropped by the broker.
        let (client, events, first) = raw(&host_port, As::Key(&thief)).await;
        first.unwrap();
        say_goodbye_for(client, events, &format!("pluto/v1/presence/{storer}")).await;
    });
    still_served(&net, &storer);
}

/// Mosquitto with its dynamic security plugin (`PLUTO_TEST_DYNSEC_URL`):
/// the coordinator makes its own account, the newcomers', and each node's
/// as it registers; a node logs in with its own from then on.
#[test]
fn on_mosquitto_with_accounts_broker_clients_get_nowhere_either() {
    let (host_port, user, password) = pluto_plugins_api::testkit::service_login(
        "PLUTO_TEST_DYNSEC_URL",
        "mqtt://pluto-admin@127.0.0.1:1884",
    );
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("admin-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let prefix = format!(
        "t{:016x}",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    let url = format!("mqtt://{host_port}/{prefix}");
    let net = Net::start_on(
        &url,
        vec![
            "--channel".into(),
            url.clone(),
            "--dynsec-admin".into(),
            user,
            "--dynsec-password-file".into(),
            password_file.display().to_string(),
        ],
        1,
        &[],
        "",
    );
    let storer = json(&ok(pluto(&net.storers[0].0).args(["--json", "status"])))["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(online(&net, &storer));
    // A node of its own, registered: its account's password follows from
    // its words.
    let (_thief_home, words) = net.owner("thief");
    let keys = pluto_engine::keys::MasterKey::from_mnemonic(&words)
        .unwrap()
        .keys();
    let thief_user = keys.node_id().to_hex();
    let thief_password = hex(&*keys.broker_password());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // No login, the storer's name with a guess, a signature (what the
        // embedded broker takes): refused.
        for who in [
            As::Nobody,
            As::Account(&storer, "guess"),
            As::Key(&SigningKey::generate(&mut rand_core::OsRng)),
        ] {
            let (_, _, first) = raw(&host_port, who).await;
            assert!(
                matches!(first, Err(ConnectionError::ConnectionRefused(_))),
                "{first:?}"
            );
        }
        // The newcomers' account, and a registered node's own, posing as a
        // coordinator replica: refused, and said so.
        let accounts = [
            (
                pluto_plugins_api::NEWCOMER_USER,
                pluto_plugins_api::NEWCOMER_PASSWORD,
            ),
            (thief_user.as_str(), thief_password.as_str()),
        ];
        for (u, p) in accounts {
            posing_as_a_replica_is_denied(
                &url,
                pluto_plugins_api::Login::Password {
                    user: u.into(),
                    password: p.into(),
                },
            )
            .await;
        }
        // Both say "offline" for the honest storer, over and over: dropped
        // by the broker (and here the coordinator believes presence).
        let topic = format!("{prefix}/v1/presence/{storer}");
        for (u, p) in accounts {
            let (client, events, first) = raw(&host_port, As::Account(u, p)).await;
            first.unwrap();
            say_goodbye_for(client, events, &topic).await;
        }
    });
    // (On Mosquitto the newcomer then logs in with its own account.)
    still_served(&net, &storer);
    // A wrong key is named as such, here too.
    let wrong = format!("{url}#{}", "22".repeat(32));
    fails(
        pluto(&net.path("wrong-key")).args(["init", "--coordinator", &wrong]),
        "not with the key given",
    );
}
