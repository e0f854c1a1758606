//! The coordinator's message handling against the real SQLite books.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "integration/audits.rs"]
mod audits;
#[path = "integration/exchange.rs"]
mod exchange;
#[path = "integration/hardening.rs"]
mod hardening;
#[path = "integration/serve.rs"]
mod serve;

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use pluto_coordinator::{Coordinator, CoordinatorConfig, Rejected};
use pluto_plugins_api::{BooksStore, NodeId, PackId};
use pluto_protocol::{
    exchange_public, Envelope, ErrorCode, Message, ReplicaStatement, Ticket, MAX_ENVELOPE,
};
use rand_core::{OsRng, RngCore};
use x25519_dalek::StaticSecret;

struct Node {
    key: SigningKey,
    exchange: StaticSecret,
}

impl Node {
    fn new() -> Self {
        Self {
            key: SigningKey::generate(&mut OsRng),
            exchange: StaticSecret::random_from_rng(OsRng),
        }
    }
    fn id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }
    /// `msg` to `to`, signed, and sealed to `net`'s coordinator as a node
    /// seals everything but its Hello.
    fn envelope(&self, net: &Net, to: NodeId, now: u64, msg: &Message) -> (Vec<u8>, [u8; 16]) {
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let env = match msg {
            Message::Hello => Envelope::new(&self.key, to, now, nonce, None, msg),
            _ => Envelope::new_private(
                &self.key,
                to,
                &net.c.exchange_key(),
                now,
                nonce,
                None,
                msg,
                &mut OsRng,
            )
            .unwrap(),
        };
        (env.sign(&self.key).unwrap(), nonce)
    }
}

/// `owner`'s record of its replica of `pack` at `storer`, with the
/// storer's receipt.
fn record(owner: &Node, storer: &Node, pack: u8, size: u64, root: [u8; 32]) -> Message {
    let receipt = ReplicaStatement {
        owner: owner.id(),
        storer: storer.id(),
        pack: PackId([pack; 32]),
        size,
        root,
    }
    .sign(&storer.key);
    Message::RecordReplica {
        pack: PackId([pack; 32]),
        storer: storer.id(),
        size,
        root,
        receipt,
        micros: 0,
    }
}

struct Net {
    _dir: tempfile::TempDir,
    books: Arc<dyn BooksStore>,
    c: Coordinator,
}

async fn net() -> Net {
    net_with(CoordinatorConfig::default()).await
}

/// A coordinator with `config` on fresh SQLite books.
async fn net_with(config: CoordinatorConfig) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("books.db").display());
    let books: Arc<dyn BooksStore> = pluto_store_sqlite::SqliteBooks::open(&url)
        .await
        .map(Arc::new)
        .unwrap();
    let c = Coordinator::new(
        SigningKey::generate(&mut OsRng),
        StaticSecret::random_from_rng(OsRng),
        books.clone(),
        config,
    );
    Net {
        _dir: dir,
        books,
        c,
    }
}

/// Sends `msg` from `node` and returns the coordinator's reply, checked:
/// signed by the coordinator, addressed to the node, answering the request,
/// and opened when private.
async fn ask(net: &Net, node: &Node, now: u64, msg: &Message) -> Message {
    let (bytes, nonce) = node.envelope(net, net.c.id(), now, msg);
    let out = net
        .c
        .handle(Some(node.id()), &bytes, now, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.to, node.id());
    let env = Envelope::verify(&out.bytes).unwrap();
    assert_eq!(env.from, net.c.id());
    assert_eq!(env.to, node.id());
    assert_eq!(env.reply_to, Some(nonce));
    if env.is_private() {
        env.open_private(&node.exchange).unwrap()
    } else {
        env.message().unwrap()
    }
}

/// Authenticates and heartbeats at once, as a daemon does.
async fn authenticate(net: &Net, node: &Node, offer: u64, now: u64) {
    register(net, node, offer, now).await;
    assert_eq!(ask(net, node, now, &Message::Heartbeat).await, Message::Ok);
}

/// Authenticates only, as a command does.
async fn register(net: &Net, node: &Node, offer: u64, now: u64) {
    let Message::Challenge { challenge, .. } = ask(net, node, now, &Message::Hello).await else {
        panic!("no challenge")
    };
    let auth = Message::Auth {
        challenge,
        exchange_key: exchange_public(&node.exchange),
        offer,
        broker_password: None,
    };
    match ask(net, node, now, &auth).await {
        Message::Welcome { exchange_key, .. } => assert_eq!(exchange_key, net.c.exchange_key()),
        other => panic!("{other:?}"),
    }
}

fn code(m: &Message) -> ErrorCode {
    match m {
        Message::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

const T: u64 = 1_800_000_000_000;

#[tokio::test]
async fn handshake_registers_the_node() {
    let net = net().await;
    let a = Node::new();
    register(&net, &a, 1000, T).await;
    let rec = net.books.node(&a.id()).await.unwrap().unwrap();
    assert_eq!(
        (rec.offer, rec.exchange_key, rec.online),
        (1000, exchange_public(&a.exchange), false),
        "registered, online only once it heartbeats"
    );
    assert_eq!(ask(&net, &a, T, &Message::Heartbeat).await, Message::Ok);
    assert!(net.books.node(&a.id()).await.unwrap().unwrap().online);
    match ask(&net, &a, T, &Message::GetStatus).await {
        Message::Status(s) => assert_eq!(s.offered, 1000),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn challenges_cannot_be_reused_stolen_or_skipped() {
    let net = net().await;
    let (a, b) = (Node::new(), Node::new());
    // Skipping the handshake.
    assert_eq!(
        code(&ask(&net, &a, T, &Message::GetStatus).await),
        ErrorCode::Unauthenticated
    );
    // A made-up challenge.
    let fake = Message::Auth {
        challenge: [1; 32],
        exchange_key: [2; 32],
        offer: 1,
        broker_password: None,
    };
    assert_eq!(
        code(&ask(&net, &a, T, &fake).await),
        ErrorCode::Unauthenticated
    );
    // B answering the challenge issued to A.
    let Message::Challenge { challenge, .. } = ask(&net, &a, T, &Message::Hello).await else {
        panic!()
    };
    let stolen = Message::Auth {
        challenge,
        exchange_key: [2; 32],
        offer: 1,
        broker_password: None,
    };
    assert_eq!(
        code(&ask(&net, &b, T, &stolen).await),
        ErrorCode::Unauthenticated
    );
    // ... which also used it up for A.
    let mine = Message::Auth {
        challenge,
        exchange_key: exchange_public(&a.exchange),
        offer: 1,
        broker_password: None,
    };
    assert_eq!(
        code(&ask(&net, &a, T, &mine).await),
        ErrorCode::Unauthenticated
    );
    // An expired challenge.
    let Message::Challenge { challenge, .. } = ask(&net, &a, T, &Message::Hello).await else {
        panic!()
    };
    let late = T + CoordinatorConfig::default().challenge_ttl_ms + 1;
    let auth = Message::Auth {
        challenge,
        exchange_key: exchange_public(&a.exchange),
        offer: 1,
        broker_password: None,
    };
    assert_eq!(
        code(&ask(&net, &a, late, &auth).await),
        ErrorCode::Unauthenticated
    );
    assert!(net.books.node(&a.id()).await.unwrap().is_none());
}

#[tokio::test]
async fn forged_replayed_and_misaddressed_envelopes_get_no_reply() {
    let net = net().await;
    let (a, b) = (Node::new(), Node::new());
    authenticate(&net, &a, 1000, T).await;
    let (bytes, nonce) = a.envelope(&net, net.c.id(), T, &Message::Heartbeat);
    let first = net
        .c
        .handle(Some(a.id()), &bytes, T, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    // The same bytes again (as a node re-sends a request whose answer it
    // missed, or as anyone on the broker could): the very same answer
    // again, nothing carried out twice.
    let again = net
        .c
        .handle(Some(a.id()), &bytes, T + 10, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, first);
    // The same nonce with other content: a replay.
    let other = Envelope::new(&a.key, net.c.id(), T, nonce, None, &Message::GetStatus)
        .sign(&a.key)
        .unwrap();
    let r = net.c.handle(Some(a.id()), &other, T + 10, &mut OsRng).await;
    assert!(matches!(r, Err(Rejected::NotFresh(..))), "{r:?}");
    // And the same bytes once the window has passed: stale.
    let r = net
        .c
        .handle(Some(a.id()), &bytes, T + 10 * 60_000, &mut OsRng)
        .await;
    assert!(matches!(r, Err(Rejected::NotFresh(..))), "{r:?}");
    // Stale and future-dated.
    let (old, _) = a.envelope(&net, net.c.id(), T - 10 * 60_000, &Message::Heartbeat);
    assert!(matches!(
        net.c.handle(Some(a.id()), &old, T, &mut OsRng).await,
        Err(Rejected::NotFresh(..))
    ));
    let (future, _) = a.envelope(&net, net.c.id(), T + 10 * 60_000, &Message::Heartbeat);
    assert!(matches!(
        net.c.handle(Some(a.id()), &future, T, &mut OsRng).await,
        Err(Rejected::NotFresh(..))
    ));
    // Signed by A, published on B's topic: one node speaking about another.
    let (bytes, _) = a.envelope(&net, net.c.id(), T, &Message::Heartbeat);
    assert!(matches!(
        net.c.handle(Some(b.id()), &bytes, T, &mut OsRng).await,
        Err(Rejected::SenderMismatch { .. })
    ));
    // A first Hello may go to "any coordinator"; nothing else may.
    let (hello, _) = a.envelope(&net, pluto_coordinator::ANY_COORDINATOR, T, &Message::Hello);
    assert!(net
        .c
        .handle(Some(a.id()), &hello, T, &mut OsRng)
        .await
        .unwrap()
        .is_some());
    let (hb, _) = a.envelope(
        &net,
        pluto_coordinator::ANY_COORDINATOR,
        T,
        &Message::Heartbeat,
    );
    assert!(matches!(
        net.c.handle(Some(a.id()), &hb, T, &mut OsRng).await,
        Err(Rejected::WrongRecipient(_))
    ));
    // Addressed to another coordinator.
    let (bytes, _) = a.envelope(&net, b.id(), T, &Message::Heartbeat);
    assert!(matches!(
        net.c.handle(Some(a.id()), &bytes, T, &mut OsRng).await,
        Err(Rejected::WrongRecipient(_))
    ));
    // A bad signature, garbage, an oversized payload.
    let (mut bytes, _) = a.envelope(&net, net.c.id(), T, &Message::Heartbeat);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert!(matches!(
        net.c.handle(Some(a.id()), &bytes, T, &mut OsRng).await,
        Err(Rejected::Envelope(_))
    ));
    assert!(matches!(
        net.c.handle(None, b"garbage", T, &mut OsRng).await,
        Err(Rejected::Envelope(_))
    ));
    let huge = vec![0u8; MAX_ENVELOPE + 1];
    assert!(matches!(
        net.c.handle(None, &huge, T, &mut OsRng).await,
        Err(Rejected::Envelope(_))
    ));
    // An authentic envelope with an unknown message kind gets an error reply.
    let mut env = Envelope::new(&a.key, net.c.id(), T, [9; 16], None, &Message::Heartbeat);
    env.kind = 77;
    env.body = vec![77];
    let out = net
        .c
        .handle(Some(a.id()), &env.sign(&a.key).unwrap(), T, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    let m = Envelope::verify(&out.bytes).unwrap().message().unwrap();
    assert_eq!(code(&m), ErrorCode::Malformed);
    // A node may not send the coordinator's messages.
    assert_eq!(
        code(&ask(&net, &a, T, &Message::Ok).await),
        ErrorCode::Malformed
    );
    // And the coordinator still serves everyone.
    assert_eq!(ask(&net, &a, T, &Message::Heartbeat).await, Message::Ok);
}

#[tokio::test]
async fn matching_picks_distinct_storers_with_room_and_respects_quotas() {
    let net = net().await;
    let nodes: Vec<Node> = (0..5).map(|_| Node::new()).collect();
    for n in &nodes {
        authenticate(&net, n, 100, T).await;
    }
    let asker = &nodes[0];
    let req = |copies| Message::MatchRequest {
        pack: PackId([1; 32]),
        size: 10,
        copies,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    let Message::MatchReply { storers, .. } = ask(&net, asker, T, &req(3)).await else {
        panic!()
    };
    assert_eq!(storers.len(), 3);
    let mut distinct = storers.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "distinct storers");
    assert!(!storers.contains(&asker.id()), "never the asker");
    // The asker may place (every replica counted) only what it offers: 100.
    let mut placed = 30;
    while let Message::MatchReply { storers, .. } = ask(&net, asker, T, &req(2)).await {
        placed += 10 * storers.len() as u64;
    }
    assert_eq!(placed, 100);
    assert_eq!(
        code(&ask(&net, asker, T, &req(1)).await),
        ErrorCode::NoCapacity
    );
    // Nobody is over-committed.
    for n in net.books.nodes().await.unwrap() {
        assert!(n.held <= n.offer && n.placed <= n.offer, "{n:?}");
    }
    // Out-of-range requests.
    assert_eq!(
        code(&ask(&net, &nodes[1], T, &req(0)).await),
        ErrorCode::Refused
    );
    assert_eq!(
        code(&ask(&net, &nodes[1], T, &req(200)).await),
        ErrorCode::Refused
    );
}

#[tokio::test]
async fn friends_get_their_share_of_copies() {
    let net = net().await;
    let nodes: Vec<Node> = (0..6).map(|_| Node::new()).collect();
    for n in &nodes {
        authenticate(&net, n, 1000, T).await;
    }
    let friend = nodes[5].id();
    for _ in 0..5 {
        let req = Message::MatchRequest {
            pack: PackId([1; 32]),
            size: 1,
            copies: 2,
            friends: vec![friend],
            friend_copies: 1,
            exclude: vec![nodes[1].id()],
        };
        let Message::MatchReply { storers, .. } = ask(&net, &nodes[0], T, &req).await else {
            panic!()
        };
        assert_eq!(storers.len(), 2);
        assert!(storers.contains(&friend), "one copy with the friend");
        assert!(!storers.contains(&nodes[1].id()), "excluded");
    }
}

#[tokio::test]
async fn match_replies_are_private_and_offers_cannot_drop_below_use() {
    let net = net().await;
    let (a, b) = (Node::new(), Node::new());
    authenticate(&net, &a, 100, T).await;
    authenticate(&net, &b, 100, T).await;
    let req = Message::MatchRequest {
        pack: PackId([1; 32]),
        size: 40,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    let (bytes, _) = a.envelope(&net, net.c.id(), T, &req);
    let out = net
        .c
        .handle(Some(a.id()), &bytes, T, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    let env = Envelope::verify(&out.bytes).unwrap();
    assert!(env.is_private());
    assert!(
        env.open_private(&b.exchange).is_err(),
        "only the asker reads it"
    );
    let Message::MatchReply { storers, tickets } = env.open_private(&a.exchange).unwrap() else {
        panic!("not a match reply")
    };
    assert_eq!(storers, vec![b.id()]);
    // The ticket a shows b: signed by the coordinator, a's, on b, for 40
    // bytes, until the reservation lapses; useless to anyone else.
    let t = Ticket::check(&tickets[0], &net.c.id(), &b.id(), &a.id(), T).unwrap();
    assert_eq!(t.size, 40);
    assert_eq!(t.expires_ms, T + net.c.config().reservation_ttl_ms);
    assert!(Ticket::check(&tickets[0], &net.c.id(), &a.id(), &a.id(), T).is_err());
    assert!(Ticket::check(&tickets[0], &net.c.id(), &b.id(), &b.id(), T).is_err());
    assert!(Ticket::check(&tickets[0], &net.c.id(), &b.id(), &a.id(), t.expires_ms).is_err());
    assert_eq!(
        code(&ask(&net, &b, T, &Message::SetOffer { bytes: 10 }).await),
        ErrorCode::Refused
    );
    assert_eq!(
        ask(&net, &b, T, &Message::SetOffer { bytes: 500 }).await,
        Message::Ok
    );
    // Recording the replica: only on another registered node, and only
    // with that storer's receipt for that very replica.
    let forged = record(&a, &b, 1, 40, [3; 32]);
    let Message::RecordReplica { receipt, .. } = forged else {
        panic!()
    };
    let mut wrong_root = record(&a, &b, 1, 40, [2; 32]);
    if let Message::RecordReplica { receipt: r, .. } = &mut wrong_root {
        *r = receipt;
    }
    assert_eq!(
        code(&ask(&net, &a, T, &wrong_root).await),
        ErrorCode::Refused,
        "a receipt for another root"
    );
    assert_eq!(
        ask(&net, &a, T, &record(&a, &b, 1, 40, [2; 32])).await,
        Message::Ok
    );
    assert_eq!(
        code(&ask(&net, &a, T, &record(&a, &a, 1, 40, [2; 32])).await),
        ErrorCode::Refused
    );
    let stranger = Node::new();
    assert_eq!(
        code(&ask(&net, &a, T, &record(&a, &stranger, 1, 40, [2; 32])).await),
        ErrorCode::Refused
    );
    assert_eq!(net.books.replicas_of(&a.id()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_repeated_match_request_reserves_once() {
    let net = net().await;
    let (a, b) = (Node::new(), Node::new());
    authenticate(&net, &a, 100, T).await;
    authenticate(&net, &b, 100, T).await;
    let req = Message::MatchRequest {
        pack: PackId([1; 32]),
        size: 40,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    let (bytes, _) = a.envelope(&net, net.c.id(), T, &req);
    let first = net.c.handle(Some(a.id()), &bytes, T, &mut OsRng).await;
    let second = net
        .c
        .handle(Some(a.id()), &bytes, T + 3_000, &mut OsRng)
        .await;
    assert_eq!(first.unwrap(), second.unwrap());
    let bn = net.books.node(&b.id()).await.unwrap().unwrap();
    assert_eq!(bn.held, 40, "reserved once, answered twice");
}

#[tokio::test]
async fn unused_reservations_lapse_and_silent_nodes_go_offline() {
    let net = net().await;
    let (a, b) = (Node::new(), Node::new());
    authenticate(&net, &a, 100, T).await;
    authenticate(&net, &b, 100, T).await;
    let req = Message::MatchRequest {
        pack: PackId([1; 32]),
        size: 60,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    assert!(matches!(
        ask(&net, &a, T, &req).await,
        Message::MatchReply { .. }
    ));
    assert_eq!(
        code(&ask(&net, &a, T, &req).await),
        ErrorCode::NoCapacity,
        "a's quota is taken by the reservation"
    );
    let config = net.c.config().clone();
    // b keeps sending heartbeats; a falls silent.
    let later = T + config.reservation_ttl_ms;
    assert_eq!(
        ask(&net, &b, later - 1000, &Message::Heartbeat).await,
        Message::Ok
    );
    let sweep = net.c.sweep(later).await.unwrap();
    assert_eq!(sweep.released, 1);
    assert_eq!(sweep.silent, vec![a.id()]);
    let (an, bn) = (
        net.books.node(&a.id()).await.unwrap().unwrap(),
        net.books.node(&b.id()).await.unwrap().unwrap(),
    );
    assert_eq!((an.placed, bn.held), (0, 0), "space and quota given back");
    assert!(!an.online && bn.online);
    // The lapsed reservation cannot be used; a fresh match can.
    let rec = record(&a, &b, 1, 60, [2; 32]);
    assert_eq!(code(&ask(&net, &a, later, &rec).await), ErrorCode::Refused);
    assert!(matches!(
        ask(&net, &a, later, &req).await,
        Message::MatchReply { .. }
    ));
    assert_eq!(ask(&net, &a, later, &rec).await, Message::Ok);
    assert_eq!(
        ask(&net, &a, later, &rec).await,
        Message::Ok,
        "recording again is harmless"
    );
    assert_eq!(
        net.c
            .sweep(later + config.reservation_ttl_ms)
            .await
            .unwrap()
            .released,
        0
    );
    assert_eq!(net.books.node(&b.id()).await.unwrap().unwrap().held, 60);
}

#[tokio::test]
async fn peers_are_listed_from_both_sides() {
    let net = net().await;
    let nodes: Vec<Node> = (0..3).map(|_| Node::new()).collect();
    for n in &nodes {
        authenticate(&net, n, 1000, T).await;
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // a stores two packs on b, b one on a; c is nobody's peer.
    for (owner, storer, pack) in [(a, b, 1u8), (a, b, 2), (b, a, 3)] {
        let req = Message::MatchRequest {
            pack: PackId([1; 32]),
            size: 10,
            copies: 1,
            friends: vec![storer.id()],
            friend_copies: 1,
            exclude: vec![c.id()],
        };
        let Message::MatchReply { storers, .. } = ask(&net, owner, T, &req).await else {
            panic!()
        };
        assert_eq!(storers, vec![storer.id()]);
        let rec = record(owner, storer, pack, 10, [pack; 32]);
        assert_eq!(ask(&net, owner, T, &rec).await, Message::Ok);
    }
    let Message::Peers(list) = ask(&net, a, T + 1000, &Message::ListPeers).await else {
        panic!()
    };
    assert_eq!(list.len(), 1);
    let p = list[0];
    assert_eq!(p.id, b.id());
    assert_eq!((p.replicas_held, p.bytes_held), (2, 20));
    assert_eq!((p.replicas_stored, p.bytes_stored), (1, 10));
    assert!(p.online);
    assert_eq!(p.uptime_permille, None, "too new to have a record");
    // Once its record spans a sample: online all its life.
    let later = T + net.c.config().uptime_sample_ms;
    let Message::Peers(list) = ask(&net, a, later, &Message::ListPeers).await else {
        panic!()
    };
    assert_eq!(list[0].uptime_permille, Some(1000), "online all its life");
    let Message::Peers(list) = ask(&net, c, T, &Message::ListPeers).await else {
        panic!()
    };
    assert!(list.is_empty());
    let Message::Status(s) = ask(&net, b, T, &Message::GetStatus).await else {
        panic!()
    };
    assert_eq!((s.held, s.placed, s.peers), (20, 10, 1));
}

#[tokio::test]
async fn manifests_only_move_forward() {
    let net = net().await;
    let a = Node::new();
    authenticate(&net, &a, 1, T).await;
    assert_eq!(
        code(&ask(&net, &a, T, &Message::GetManifest).await),
        ErrorCode::NotFound
    );
    let put = |version, blob: &[u8]| Message::PutManifest {
        version,
        blob: blob.to_vec(),
    };
    assert_eq!(ask(&net, &a, T, &put(1, b"one")).await, Message::Ok);
    assert_eq!(ask(&net, &a, T, &put(2, b"two")).await, Message::Ok);
    assert_eq!(
        code(&ask(&net, &a, T, &put(2, b"replayed")).await),
        ErrorCode::StaleVersion
    );
    assert_eq!(
        code(&ask(&net, &a, T, &put(1, b"rolled back")).await),
        ErrorCode::StaleVersion
    );
    assert_eq!(
        ask(&net, &a, T, &Message::GetManifest).await,
        Message::Manifest {
            version: 2,
            blob: b"two".to_vec()
        }
    );
}

/// Relayed payloads go to the recipient as they are, signed by the
/// coordinator; a sender over its rate, or an end that is not registered,
/// gets nothing through.
#[tokio::test]
async fn relay_passes_payloads_on_within_each_nodes_rate() {
    let net = net().await;
    let (a, b, stranger) = (Node::new(), Node::new(), Node::new());
    authenticate(&net, &a, 1000, T).await;
    authenticate(&net, &b, 1000, T).await;
    let relay = |from: &Node, to: NodeId, now: u64, n: usize| {
        from.envelope(
            &net,
            net.c.id(),
            now,
            &Message::Relay {
                to,
                payload: vec![7; n],
            },
        )
        .0
    };
    let bytes = relay(&a, b.id(), T, 1000);
    let out = net
        .c
        .handle(Some(a.id()), &bytes, T, &mut OsRng)
        .await
        .unwrap()
        .expect("passed on");
    assert_eq!(out.to, b.id());
    let env = Envelope::verify(&out.bytes).unwrap();
    assert_eq!((env.from, env.to), (net.c.id(), b.id()));
    assert_eq!(
        env.message().unwrap(),
        Message::Relayed {
            from: a.id(),
            payload: vec![7; 1000]
        }
    );
    // To or from nodes the books do not know: dropped.
    for (from, to) in [(&a, stranger.id()), (&stranger, b.id())] {
        let bytes = relay(from, to, T, 10);
        let r = net.c.handle(Some(from.id()), &bytes, T, &mut OsRng).await;
        assert!(matches!(r, Ok(None)), "{r:?}");
    }
    // The burst (16 MiB by default) is spent; the rate (64 MiB/s) refills it.
    let big = 3 << 20;
    let mut passed = 0;
    for _ in 0..10 {
        let bytes = relay(&a, b.id(), T, big);
        if net
            .c
            .handle(Some(a.id()), &bytes, T, &mut OsRng)
            .await
            .unwrap()
            .is_some()
        {
            passed += 1;
        }
    }
    assert_eq!(passed, 5, "16 MiB of burst holds five 3 MiB payloads");
    // b's own bucket is untouched; a's refills with time.
    let bytes = relay(&b, a.id(), T, big);
    assert!(net
        .c
        .handle(Some(b.id()), &bytes, T, &mut OsRng)
        .await
        .unwrap()
        .is_some());
    let bytes = relay(&a, b.id(), T + 1000, big);
    assert!(net
        .c
        .handle(Some(a.id()), &bytes, T + 1000, &mut OsRng)
        .await
        .unwrap()
        .is_some());
}
