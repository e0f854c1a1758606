//! The control plane against an attacker on the broker: what one key (or
//! many fresh ones) can take of the coordinator's shared tables, what a
//! copied request can make it send, what a faked goodbye can hide; tried
//! as an attacker would, with honest nodes served throughout.

use super::*;
use pluto_protocol::Refused;

/// Sends raw envelope bytes as `from`'s topic would carry them.
async fn send(net: &Net, from: &Node, bytes: &[u8]) -> Result<Option<Vec<u8>>, Rejected> {
    net.c
        .handle(Some(from.id()), bytes, T, &mut OsRng)
        .await
        .map(|o| o.map(|o| o.bytes))
}

#[tokio::test]
async fn a_copied_request_is_answered_again_once_not_a_hundred_times() {
    let net = net().await;
    let a = Node::new();
    authenticate(&net, &a, 1000, T).await;
    let (bytes, _) = a.envelope(&net, net.c.id(), T, &Message::ListPeers);
    let first = send(&net, &a, &bytes).await.unwrap().unwrap();
    // Its answer was lost: the same request gets the same answer, once.
    assert_eq!(send(&net, &a, &bytes).await.unwrap(), Some(first));
    // Anyone on the broker re-publishing it a hundred times gets nothing.
    let mut pushed = 0;
    for _ in 0..100 {
        if let Ok(Some(b)) = send(&net, &a, &bytes).await {
            pushed += b.len();
        }
    }
    assert_eq!(pushed, 0, "amplified {pushed} bytes");
    assert_eq!(ask(&net, &a, T, &Message::Heartbeat).await, Message::Ok);
}

#[tokio::test]
async fn one_key_asking_for_challenges_keeps_no_new_node_out() {
    let net = net_with(CoordinatorConfig {
        max_challenges: 100,
        ..CoordinatorConfig::default()
    })
    .await;
    let attacker = Node::new();
    for _ in 0..2_000 {
        let (hello, _) = attacker.envelope(&net, net.c.id(), T, &Message::Hello);
        let _ = send(&net, &attacker, &hello).await;
    }
    // A hundred newcomers still get in.
    for _ in 0..99 {
        register(&net, &Node::new(), 1000, T).await;
    }
}

#[tokio::test]
async fn fresh_keys_and_one_busy_node_cannot_fill_the_replay_guard() {
    let net = net_with(CoordinatorConfig {
        replay_capacity: 100,
        replay_per_sender: 10,
        ..CoordinatorConfig::default()
    })
    .await;
    let (a, b) = (Node::new(), Node::new());
    authenticate(&net, &a, 1000, T).await;
    authenticate(&net, &b, 1000, T).await;
    // Keys nobody registered: told to authenticate, nothing remembered.
    for _ in 0..500 {
        let stranger = Node::new();
        let (bytes, _) = stranger.envelope(&net, net.c.id(), T, &Message::GetStatus);
        let out = send(&net, &stranger, &bytes).await.unwrap().unwrap();
        let m = Envelope::verify(&out).unwrap().message().unwrap();
        assert_eq!(code(&m), ErrorCode::Unauthenticated);
    }
    // One registered node sending fast uses up its own share only.
    let mut refused = 0;
    for _ in 0..50 {
        let (bytes, _) = a.envelope(&net, net.c.id(), T, &Message::Heartbeat);
        match send(&net, &a, &bytes).await {
            Ok(Some(_)) => {}
            Err(Rejected::NotFresh(_, Refused::SenderBusy)) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(refused >= 40, "{refused} refused");
    // Everyone else is served.
    for _ in 0..5 {
        assert_eq!(ask(&net, &b, T, &Message::Heartbeat).await, Message::Ok);
    }
    register(&net, &Node::new(), 1000, T).await;
}

#[tokio::test]
async fn faked_goodbyes_cannot_keep_a_vanished_storer_from_repair() {
    let net = net().await;
    let (owner, storer) = (Node::new(), Node::new());
    authenticate(&net, &owner, 1000, T).await;
    authenticate(&net, &storer, 1000, T).await;
    let req = Message::MatchRequest {
        pack: PackId([1; 32]),
        size: 10,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    let Message::MatchReply { storers, .. } = ask(&net, &owner, T, &req).await else {
        panic!()
    };
    assert_eq!(storers, vec![storer.id()]);
    assert_eq!(
        ask(&net, &owner, T, &record(&owner, &storer, 1, 10, [1; 32])).await,
        Message::Ok
    );
    // The storer vanishes; someone keeps publishing "offline" for it, as
    // the channel hands such notices to the books.
    let grace = net.c.config().offline_grace_ms;
    let mut t = T;
    while t < T + grace + 60_000 {
        t += grace / 10;
        net.books.presence(&storer.id(), false, t).await.unwrap();
    }
    let n = net.books.node(&storer.id()).await.unwrap().unwrap();
    assert_eq!(n.last_seen_ms, T, "last seen when it last spoke");
    let Message::Repairs(list) = ask(&net, &owner, t, &Message::GetRepairs).await else {
        panic!()
    };
    assert_eq!(list.len(), 1, "listed for repair on time: {list:?}");
    assert_eq!(list[0].storer, storer.id());
}

#[tokio::test]
async fn requests_are_sealed_and_a_request_in_the_clear_is_refused() {
    let net = net().await;
    let a = Node::new();
    // The challenge names the key to seal to, under the coordinator's
    // signature.
    let (hello, _) = a.envelope(&net, net.c.id(), T, &Message::Hello);
    let out = send(&net, &a, &hello).await.unwrap().unwrap();
    let env = Envelope::verify(&out).unwrap();
    assert_eq!(env.from, net.c.id());
    let Message::Challenge { exchange_key, .. } = env.message().unwrap() else {
        panic!()
    };
    assert_eq!(exchange_key, Some(net.c.exchange_key()));
    authenticate(&net, &a, 1000, T).await;
    // What a broker client sees of a request: the header, not the body.
    let req = Message::MatchRequest {
        pack: PackId([7; 32]),
        size: 12_345,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    let (bytes, _) = a.envelope(&net, net.c.id(), T, &req);
    let seen = Envelope::verify(&bytes).unwrap();
    assert!(seen.is_private());
    assert!(
        seen.message().is_err(),
        "the body does not decode in the clear"
    );
    assert!(
        !bytes.windows(32).any(|w| w == [7; 32]),
        "the pack id shows"
    );
    // A request in the clear: refused, nothing done.
    let clear = Envelope::new(&a.key, net.c.id(), T, [5; 16], None, &Message::GetStatus)
        .sign(&a.key)
        .unwrap();
    let out = send(&net, &a, &clear).await.unwrap().unwrap();
    let m = Envelope::verify(&out).unwrap().message().unwrap();
    assert_eq!(code(&m), ErrorCode::Malformed);
}
