//! Nodes and a coordinator from the command line: `pluto init --coordinator`,
//! `pluto status`, key pinning; on the embedded broker and on Mosquitto.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pluto_coordinator::{serve, Coordinator, CoordinatorConfig};
use pluto_plugins_api::{connect_channel, BooksStore, ChannelEvent, ChannelOptions, ChannelRole};
use pluto_transport_mqtt::broker::EmbeddedBroker;
use rand_core::OsRng;
use x25519_dalek::StaticSecret;

use super::common::*;

/// A coordinator running in this process on its own runtime; dropped, it stops.
struct TestCoordinator {
    id: String,
    rt: tokio::runtime::Runtime,
    books: Arc<dyn BooksStore>,
    _dir: tempfile::TempDir,
}

fn start(url: &str) -> TestCoordinator {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("books.db").display());
    let books: Arc<dyn BooksStore> = Arc::new(
        rt.block_on(pluto_store_sqlite::SqliteBooks::open(&db))
            .unwrap(),
    );
    let c = Arc::new(Coordinator::new(
        SigningKey::generate(&mut OsRng),
        StaticSecret::random_from_rng(OsRng),
        books.clone(),
        CoordinatorConfig::default(),
    ));
    let id = c.id().to_hex();
    let ch: Arc<dyn pluto_plugins_api::ControlChannel> = rt
        .block_on(connect_channel(
            url,
            ChannelOptions {
                role: ChannelRole::Coordinator { group: None },
                max_payload: pluto_protocol::MAX_ENVELOPE,
                logins: Vec::new(),
            },
        ))
        .unwrap()
        .into();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while ch.next_event().await != Some(ChannelEvent::Connected) {}
        })
        .await
        .expect("coordinator not connected")
    });
    rt.spawn(serve(c, ch, books.clone()));
    TestCoordinator {
        id,
        rt,
        books,
        _dir: dir,
    }
}

fn nodes_join_and_report(url: String) {
    let coordinator = start(&url);
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    // Without the coordinator's key and without asking for trust on first
    // use: refused, nothing created.
    let nokey = dir.path().join("nokey");
    fails(
        pluto(&nokey).args(["init", "--coordinator", &url]),
        "carries no coordinator key",
    );
    assert!(!nokey.exists());
    let with_key = format!("{url}#{}", coordinator.id);
    for i in 0..3 {
        let home = dir.path().join(format!("node{i}"));
        // Node 1 asks for trust on first use; the others have the URL the
        // coordinator prints, with its key.
        let mut cmd = pluto(&home);
        cmd.args(["--json", "init", "--offer", "1G", "--coordinator"]);
        if i == 1 {
            cmd.args([url.as_str(), "--trust-first-use"]);
        } else {
            cmd.arg(&with_key);
        }
        let r = json(&ok(&mut cmd));
        ids.push(r["node_id"].as_str().unwrap().to_string());
        let s = json(&ok(pluto(&home).args(["--json", "status"])));
        let c = &s["coordinator"];
        assert_eq!(c["state"], "connected", "{s}");
        assert_eq!(c["offered"], 1u64 << 30);
        assert_eq!(
            c["key"],
            coordinator.id.as_str(),
            "the key given, or learned on first contact when asked to"
        );
        let config = std::fs::read_to_string(home.join("config.toml")).unwrap();
        assert!(config.contains(&coordinator.id), "and pinned: {config}");
    }
    let registered = coordinator.rt.block_on(coordinator.books.nodes()).unwrap();
    for id in &ids {
        assert!(
            registered.iter().any(|n| &n.id.to_hex() == id),
            "{id} registered"
        );
    }

    // Another coordinator on the same channel (a new key) is not the one
    // pinned: it answers the node's Hello, and the node says the key does
    // not match rather than talking to it.
    drop(coordinator);
    let other = start(&url);
    let s = json(&ok(
        pluto(&dir.path().join("node0")).args(["--json", "status"])
    ));
    assert_eq!(s["coordinator"]["state"], "unreachable", "{s}");
    assert!(
        s["coordinator"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match")),
        "{s}"
    );
    let registered = other.rt.block_on(other.books.nodes()).unwrap();
    assert!(
        registered.is_empty(),
        "the node never authenticated to the other coordinator"
    );
}

#[test]
fn nodes_join_a_coordinator_on_the_embedded_broker() {
    let broker = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        100,
        pluto_protocol::MAX_ENVELOPE,
    )
    .unwrap();
    nodes_join_and_report(format!(
        "{}/t{:016x}",
        broker.url(),
        rand_core::RngCore::next_u64(&mut OsRng)
    ));
}

#[test]
fn nodes_join_a_coordinator_on_mosquitto() {
    let url =
        pluto_plugins_api::testkit::service_url("PLUTO_TEST_MQTT_URL", "mqtt://127.0.0.1:1883");
    nodes_join_and_report(format!(
        "{url}/t{:016x}",
        rand_core::RngCore::next_u64(&mut OsRng)
    ));
}
