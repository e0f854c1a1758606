//! The `pluto-coordinator` process killed with SIGKILL and started again:
//! its identity and books survive, and connected nodes carry on by
//! themselves once their channel has reconnected.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pluto_engine::client::CoordinatorClient;
use pluto_engine::keys::MasterKey;
use pluto_protocol::Message;
use pluto_transport_mqtt as _;

fn start(home: &std::path::Path, port: u16) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pluto-coordinator"))
        .arg("--home")
        .arg(home)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let id = line
        .split_whitespace()
        .nth(1)
        .expect("the coordinator's first line")
        .to_string();
    (child, id)
}

/// Retries a request until the channel has reconnected.
async fn eventually(c: &CoordinatorClient, msg: &Message) -> Message {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.request(msg).await {
            Ok(m) => return m,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("never came back: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_survive_a_kill_and_nodes_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("coordinator");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let (mut child, id) = start(&home, port);

    let (a, b) = (MasterKey::generate().keys(), MasterKey::generate().keys());
    let ca = CoordinatorClient::connect(&url, &a, None, 1000, true)
        .await
        .unwrap();
    let cb = CoordinatorClient::connect(&url, &b, None, 1000, true)
        .await
        .unwrap();
    assert_eq!(ca.coordinator().to_hex(), id);
    // Online, as its daemon's heartbeats make it: only then is it matched.
    assert_eq!(cb.request(&Message::Heartbeat).await.unwrap(), Message::Ok);
    let req = Message::MatchRequest {
        pack: pluto_plugins_api::PackId([1; 32]),
        size: 100,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    match ca.request(&req).await.unwrap() {
        Message::MatchReply { storers, tickets } => {
            assert_eq!(storers, vec![b.node_id()]);
            assert_eq!(tickets.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    let manifest = Message::PutManifest {
        version: 1,
        blob: b"manifest".to_vec(),
    };
    assert_eq!(ca.request(&manifest).await.unwrap(), Message::Ok);

    child.kill().unwrap(); // SIGKILL: no chance to flush anything
    child.wait().unwrap();
    let (mut child, id_again) = start(&home, port);
    assert_eq!(id_again, id, "the identity lives in its own file");

    // The same sessions, over channels that reconnect by themselves.
    match eventually(&cb, &Message::GetStatus).await {
        Message::Status(s) => {
            assert_eq!((s.offered, s.held), (1000, 100), "the books survived")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        eventually(&ca, &Message::GetManifest).await,
        Message::Manifest {
            version: 1,
            blob: b"manifest".to_vec()
        }
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
