//! Audits: challenges through the coordinator, checked against the root
//! both ends signed, and what they do to a storer's standing.

use super::*;
use ed25519_dalek::Signer;
use pluto_protocol::{delete_message, proof, AuditOutcome, ProofAnswer, RepairReason};

/// What a storer does with a challenge: the challenge, answered.
type Answerer<'a> = &'a dyn Fn(&Challenge) -> Option<ProofAnswer>;

/// A challenge as the storer received it.
#[derive(Debug)]
struct Challenge {
    id: [u8; 32],
    owner: NodeId,
    pack: PackId,
    root: [u8; 32],
    offset: u64,
    len: u64,
}

/// Opens a challenge the coordinator sent to `storer`.
fn challenge_of(out: &pluto_coordinator::Outgoing, storer: &Node) -> Challenge {
    assert_eq!(out.to, storer.id());
    let env = Envelope::verify(&out.bytes).unwrap();
    assert!(env.is_private(), "challenges are sealed to the storer");
    match env.open_private(&storer.exchange).unwrap() {
        Message::Prove {
            challenge,
            owner,
            pack,
            root,
            offset,
            len,
            ..
        } => Challenge {
            id: challenge,
            owner,
            pack,
            root,
            offset,
            len,
        },
        other => panic!("{other:?}"),
    }
}

/// The honest answer from the bytes the storer keeps.
fn honest(blob: &[u8]) -> impl Fn(&Challenge) -> Option<ProofAnswer> + '_ {
    move |c| {
        Some(ProofAnswer::Held(
            proof::prove(blob, c.offset, c.len).unwrap(),
        ))
    }
}

/// Places `blob` as `owner`'s pack `[pack; 32]` on `storer` (matched and
/// recorded with the storer's receipt); returns its root.
async fn place(
    net: &Net,
    owner: &Node,
    storer: &Node,
    pack: u8,
    blob: &[u8],
    now: u64,
) -> [u8; 32] {
    let req = Message::MatchRequest {
        pack: PackId([pack; 32]),
        size: blob.len() as u64,
        copies: 1,
        friends: vec![storer.id()],
        friend_copies: 1,
        exclude: vec![],
    };
    let Message::MatchReply { storers, .. } = ask(net, owner, now, &req).await else {
        panic!("no match")
    };
    assert_eq!(storers, vec![storer.id()]);
    let root = *blake3::hash(blob).as_bytes();
    let rec = record(owner, storer, pack, blob.len() as u64, root);
    assert_eq!(ask(net, owner, now, &rec).await, Message::Ok);
    root
}

/// `owner` asks for an audit of its pack at `storer`, which answers with
/// `answer` (None: not at all); the outcome the owner hears, if it heard.
async fn audit(
    net: &Net,
    owner: &Node,
    storer: &Node,
    pack: u8,
    now: u64,
    answer: Answerer<'_>,
) -> Result<AuditOutcome, ErrorCode> {
    let msg = Message::Audit {
        pack: PackId([pack; 32]),
        storer: storer.id(),
    };
    let (bytes, nonce) = owner.envelope(net, net.c.id(), now, &msg);
    let out = net
        .c
        .handle(Some(owner.id()), &bytes, now, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    if out.to == owner.id() {
        return audited(&out, owner, nonce);
    }
    let c = challenge_of(&out, storer);
    assert_eq!((c.owner, c.pack), (owner.id(), PackId([pack; 32])));
    let Some(answer) = answer(&c) else {
        return Err(ErrorCode::Busy);
    };
    let (bytes, _) = storer.envelope(
        net,
        net.c.id(),
        now,
        &Message::Proof {
            challenge: c.id,
            answer,
        },
    );
    let out = net
        .c
        .handle(Some(storer.id()), &bytes, now, &mut OsRng)
        .await
        .unwrap()
        .expect("the owner hears");
    audited(&out, owner, nonce)
}

/// The outcome in an answer to `owner`'s audit request `nonce`.
fn audited(
    out: &pluto_coordinator::Outgoing,
    owner: &Node,
    nonce: [u8; 16],
) -> Result<AuditOutcome, ErrorCode> {
    assert_eq!(out.to, owner.id());
    let env = Envelope::verify(&out.bytes).unwrap();
    assert_eq!(env.reply_to, Some(nonce));
    match env.message().unwrap() {
        Message::Audited { outcome } => Ok(outcome),
        Message::Error { code, .. } => Err(code),
        other => panic!("{other:?}"),
    }
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn standing(net: &Net, n: &Node) -> pluto_plugins_api::Standing {
    net.books.node(&n.id()).await.unwrap().unwrap().standing
}

#[tokio::test]
async fn an_honest_storer_passes_a_thousand_audits_in_a_row() {
    let net = net().await;
    let (owner, storer) = (Node::new(), Node::new());
    authenticate(&net, &owner, 10 << 20, T).await;
    authenticate(&net, &storer, 10 << 20, T).await;
    // Sizes around BLAKE3's chunk and subtree edges.
    let blobs: Vec<Vec<u8>> = [1, 1024, 5_000, 70_001, 1 << 20]
        .iter()
        .enumerate()
        .map(|(i, n)| blob(*n, i as u8))
        .collect();
    for (i, b) in blobs.iter().enumerate() {
        place(&net, &owner, &storer, i as u8, b, T).await;
    }
    for i in 0..1000u64 {
        let k = (i % blobs.len() as u64) as usize;
        let outcome = audit(&net, &owner, &storer, k as u8, T + i, &honest(&blobs[k])).await;
        assert_eq!(outcome, Ok(AuditOutcome::Proven), "audit {i}");
    }
    let st = standing(&net, &storer).await;
    assert_eq!((st.passed, st.failed, st.timed_out), (1000, 0, 0));
    assert!(st.audit.score() > 0.999 && st.eligible());
    let Message::Repairs(list) = ask(&net, &owner, T + 2000, &Message::GetRepairs).await else {
        panic!()
    };
    assert!(list.is_empty());
}

#[tokio::test]
async fn storers_without_the_bytes_fail_and_are_excluded() {
    let net = net().await;
    let owner = Node::new();
    let (a, b, c, d) = (Node::new(), Node::new(), Node::new(), Node::new());
    for n in [&owner, &a, &b, &c, &d] {
        authenticate(&net, n, 10 << 20, T).await;
    }
    // One pack, one replica on each storer; replicas differ (each is the
    // pack under its own key), here simply other bytes.
    let replicas: Vec<Vec<u8>> = (0..4).map(|i| blob(300_000, 10 + i)).collect();
    for (s, r) in [&a, &b, &c, &d].iter().zip(&replicas) {
        place(&net, &owner, s, 1, r, T).await;
        // A clean record first: well past vetting.
        for i in 0..20 {
            assert_eq!(
                audit(&net, &owner, s, 1, T + i, &honest(r)).await,
                Ok(AuditOutcome::Proven)
            );
        }
    }
    // a kept only the hashes: the chaining values are right, the bytes
    // are not there (zeros in their place).
    let hashes_only = |ch: &Challenge| {
        let mut p = proof::prove(&replicas[0], ch.offset, ch.len).unwrap();
        let data = p.len() - ch.len as usize;
        p[data..].fill(0);
        Some(ProofAnswer::Held(p))
    };
    // b answers with c's replica of the same pack.
    let borrowed = |ch: &Challenge| {
        Some(ProofAnswer::Held(
            proof::prove(&replicas[2], ch.offset, ch.len).unwrap(),
        ))
    };
    // c says it does not have it; d claims the owner deleted it, with a
    // signature of its own making.
    let not_held = |_: &Challenge| Some(ProofAnswer::NotHeld);
    let forged_delete = |ch: &Challenge| {
        Some(ProofAnswer::Deleted {
            at_ms: T,
            signature: d.key.sign(&delete_message(&d.id(), &ch.root, T)).to_bytes(),
        })
    };
    let cheats: [(&Node, Answerer<'_>); 4] = [
        (&a, &hashes_only),
        (&b, &borrowed),
        (&c, &not_held),
        (&d, &forged_delete),
    ];
    for (s, cheat) in cheats {
        for i in 0..2 {
            assert_eq!(
                audit(&net, &owner, s, 1, T + 100 + i, cheat).await,
                Ok(AuditOutcome::Failed)
            );
        }
        let st = standing(&net, s).await;
        assert_eq!(
            (st.passed, st.failed),
            (20, 1),
            "a lost replica counts once"
        );
        assert!(st.excluded_ms != 0, "a short record and a loss: excluded");
        assert!(!st.eligible());
    }
    // Excluded storers get nothing new.
    let req = Message::MatchRequest {
        pack: PackId([2; 32]),
        size: 10,
        copies: 1,
        friends: vec![a.id()],
        friend_copies: 1,
        exclude: vec![],
    };
    assert_eq!(
        code(&ask(&net, &owner, T + 200, &req).await),
        ErrorCode::NoCapacity
    );
    // The owner is told to place all four elsewhere.
    let Message::Repairs(list) = ask(&net, &owner, T + 200, &Message::GetRepairs).await else {
        panic!()
    };
    assert_eq!(list.len(), 4);
    assert!(list.iter().all(|r| r.reason == RepairReason::Lost));
    // Once it has, it drops them, and the storers' claims are released.
    for s in [&a, &b, &c, &d] {
        let drop = Message::DropReplica {
            pack: PackId([1; 32]),
            storer: s.id(),
        };
        assert_eq!(ask(&net, &owner, T + 300, &drop).await, Message::Ok);
        assert_eq!(net.books.node(&s.id()).await.unwrap().unwrap().held, 0);
    }
    assert_eq!(
        net.books.node(&owner.id()).await.unwrap().unwrap().placed,
        0
    );
    let Message::Repairs(list) = ask(&net, &owner, T + 300, &Message::GetRepairs).await else {
        panic!()
    };
    assert!(list.is_empty());
}

#[tokio::test]
async fn one_loss_in_a_long_clean_record_is_forgiven_once() {
    let net = net().await;
    let (owner, s) = (Node::new(), Node::new());
    authenticate(&net, &owner, 10 << 20, T).await;
    authenticate(&net, &s, 10 << 20, T).await;
    let kept = blob(10_000, 1);
    place(&net, &owner, &s, 1, &kept, T).await;
    place(&net, &owner, &s, 2, &blob(10_000, 2), T).await;
    for i in 0..300 {
        audit(&net, &owner, &s, 1, T + i, &honest(&kept))
            .await
            .unwrap();
    }
    let not_held = |_: &Challenge| Some(ProofAnswer::NotHeld);
    assert_eq!(
        audit(&net, &owner, &s, 2, T + 400, &not_held).await,
        Ok(AuditOutcome::Failed)
    );
    let st = standing(&net, &s).await;
    assert_eq!(st.excluded_ms, 0, "{:.3}", st.audit.score());
    // Audited again before its owner moved it: the same loss, not a new one.
    for i in 0..5 {
        assert_eq!(
            audit(&net, &owner, &s, 2, T + 401 + i, &not_held).await,
            Ok(AuditOutcome::Failed)
        );
    }
    let again = standing(&net, &s).await;
    assert_eq!((again.failed, again.excluded_ms), (1, 0));
    // The lost replica is to be placed elsewhere, the rest stays.
    let Message::Repairs(list) = ask(&net, &owner, T + 400, &Message::GetRepairs).await else {
        panic!()
    };
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].pack, list[0].reason),
        (PackId([2; 32]), RepairReason::Lost)
    );
}

#[tokio::test]
async fn a_lying_owner_changes_nothing() {
    let net = net().await;
    let (owner, other, s) = (Node::new(), Node::new(), Node::new());
    for n in [&owner, &other, &s] {
        authenticate(&net, n, 10 << 20, T).await;
    }
    let r = blob(50_000, 3);
    let root = place(&net, &owner, &s, 1, &r, T).await;
    // Audits of replicas it does not have at that storer.
    let never = |_: &Challenge| -> Option<ProofAnswer> { panic!("no challenge may be sent") };
    assert_eq!(
        audit(&net, &other, &s, 1, T, &never).await,
        Err(ErrorCode::NotFound)
    );
    assert_eq!(
        audit(&net, &owner, &s, 2, T, &never).await,
        Err(ErrorCode::NotFound)
    );
    assert_eq!(
        audit(&net, &owner, &other, 1, T, &never).await,
        Err(ErrorCode::NotFound)
    );
    // It answers a challenge in the storer's place: not taken; the storer's
    // own answer still counts.
    let (bytes, nonce) = owner.envelope(
        &net,
        net.c.id(),
        T + 1,
        &Message::Audit {
            pack: PackId([1; 32]),
            storer: s.id(),
        },
    );
    let out = net
        .c
        .handle(Some(owner.id()), &bytes, T + 1, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    let c = challenge_of(&out, &s);
    let (lie, _) = owner.envelope(
        &net,
        net.c.id(),
        T + 1,
        &Message::Proof {
            challenge: c.id,
            answer: ProofAnswer::NotHeld,
        },
    );
    assert!(net
        .c
        .handle(Some(owner.id()), &lie, T + 1, &mut OsRng)
        .await
        .unwrap()
        .is_none());
    let (truth, _) = s.envelope(
        &net,
        net.c.id(),
        T + 1,
        &Message::Proof {
            challenge: c.id,
            answer: honest(&r)(&c).unwrap(),
        },
    );
    let out = net
        .c
        .handle(Some(s.id()), &truth, T + 1, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(audited(&out, &owner, nonce), Ok(AuditOutcome::Proven));
    // It deletes its replica, then has it audited: the storer shows the
    // owner's own signed request; nothing is held against it.
    let at = T + 5;
    let deleted = |_: &Challenge| {
        Some(ProofAnswer::Deleted {
            at_ms: at,
            signature: owner
                .key
                .sign(&delete_message(&s.id(), &root, at))
                .to_bytes(),
        })
    };
    assert_eq!(
        audit(&net, &owner, &s, 1, T + 10, &deleted).await,
        Ok(AuditOutcome::Released)
    );
    let st = standing(&net, &s).await;
    assert_eq!((st.passed, st.failed, st.excluded_ms), (1, 0, 0));
    assert!(net
        .books
        .replica(&owner.id(), &PackId([1; 32]), &s.id())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        net.books.node(&s.id()).await.unwrap().unwrap().held,
        0,
        "its claim is released"
    );
}

#[tokio::test]
async fn audits_are_rate_limited_per_owner() {
    let net = net_with(CoordinatorConfig {
        owner_audits_per_s: 1,
        owner_audit_burst: 5,
        ..CoordinatorConfig::default()
    })
    .await;
    let (owner, s) = (Node::new(), Node::new());
    authenticate(&net, &owner, 1 << 20, T).await;
    authenticate(&net, &s, 1 << 20, T).await;
    let r = blob(2000, 1);
    place(&net, &owner, &s, 1, &r, T).await;
    for _ in 0..5 {
        assert_eq!(
            audit(&net, &owner, &s, 1, T, &honest(&r)).await,
            Ok(AuditOutcome::Proven)
        );
    }
    assert_eq!(
        audit(&net, &owner, &s, 1, T, &honest(&r)).await,
        Err(ErrorCode::Busy)
    );
    assert_eq!(
        audit(&net, &owner, &s, 1, T + 1000, &honest(&r)).await,
        Ok(AuditOutcome::Proven)
    );
}

#[tokio::test]
async fn replayed_misdirected_malformed_and_late_answers() {
    let net = net().await;
    let (owner, s, t) = (Node::new(), Node::new(), Node::new());
    for n in [&owner, &s, &t] {
        authenticate(&net, n, 10 << 20, T).await;
    }
    let r = blob(40_000, 4);
    place(&net, &owner, &s, 1, &r, T).await;
    place(&net, &owner, &s, 2, &r, T).await;
    let ask_audit = |now: u64, pack: u8| {
        owner.envelope(
            &net,
            net.c.id(),
            now,
            &Message::Audit {
                pack: PackId([pack; 32]),
                storer: s.id(),
            },
        )
    };
    // An answer to no challenge, and one from another storer: ignored.
    let (stray, _) = s.envelope(
        &net,
        net.c.id(),
        T,
        &Message::Proof {
            challenge: [9; 32],
            answer: ProofAnswer::NotHeld,
        },
    );
    assert!(net
        .c
        .handle(Some(s.id()), &stray, T, &mut OsRng)
        .await
        .unwrap()
        .is_none());
    let (bytes, nonce) = ask_audit(T, 1);
    let out = net
        .c
        .handle(Some(owner.id()), &bytes, T, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    let c = challenge_of(&out, &s);
    let good = honest(&r)(&c).unwrap();
    let (from_t, _) = t.envelope(
        &net,
        net.c.id(),
        T,
        &Message::Proof {
            challenge: c.id,
            answer: good.clone(),
        },
    );
    assert!(net
        .c
        .handle(Some(t.id()), &from_t, T, &mut OsRng)
        .await
        .unwrap()
        .is_none());
    // A proof of the wrong length is a wrong answer.
    let ProofAnswer::Held(mut short) = good.clone() else {
        panic!()
    };
    short.pop();
    let (bad, _) = s.envelope(
        &net,
        net.c.id(),
        T,
        &Message::Proof {
            challenge: c.id,
            answer: ProofAnswer::Held(short),
        },
    );
    let out = net
        .c
        .handle(Some(s.id()), &bad, T, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(audited(&out, &owner, nonce), Ok(AuditOutcome::Failed));
    // The same envelope again: a replay, refused.
    assert!(matches!(
        net.c.handle(Some(s.id()), &bad, T, &mut OsRng).await,
        Err(Rejected::NotFresh(..))
    ));
    // The right answer to the settled challenge: nothing changes.
    let (late_good, _) = s.envelope(
        &net,
        net.c.id(),
        T,
        &Message::Proof {
            challenge: c.id,
            answer: good,
        },
    );
    assert!(net
        .c
        .handle(Some(s.id()), &late_good, T, &mut OsRng)
        .await
        .unwrap()
        .is_none());
    // An answer after the deadline counts as none.
    let (bytes, nonce) = ask_audit(T + 1, 2);
    let out = net
        .c
        .handle(Some(owner.id()), &bytes, T + 1, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    let c = challenge_of(&out, &s);
    let late = T + 2 + net.c.config().proof_deadline_ms;
    let (slow, _) = s.envelope(
        &net,
        net.c.id(),
        late,
        &Message::Proof {
            challenge: c.id,
            answer: honest(&r)(&c).unwrap(),
        },
    );
    let out = net
        .c
        .handle(Some(s.id()), &slow, late, &mut OsRng)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(audited(&out, &owner, nonce), Ok(AuditOutcome::TimedOut));
    // An owner's audit that went unanswered tells the owner, and counts
    // nothing against the storer: only the schedule's own do.
    let st = standing(&net, &s).await;
    assert_eq!((st.passed, st.failed, st.timed_out), (0, 1, 0));
}

#[tokio::test]
async fn offline_storers_lose_on_uptime_and_silent_ones_on_time_not_on_audits() {
    let net = net().await;
    let (owner, s) = (Node::new(), Node::new());
    authenticate(&net, &owner, 10 << 20, T).await;
    authenticate(&net, &s, 10 << 20, T).await;
    let r = blob(10_000, 5);
    place(&net, &owner, &s, 1, &r, T).await;
    let config = net.c.config().clone();
    // Online but silent. An owner asking 30 times gets one audit (the rest
    // are told one is under way); it lapses, the owner hears so, and it
    // counts nothing against the storer: owners may ask many at once.
    let silent = |_: &Challenge| None;
    for i in 0..30 {
        assert_eq!(
            audit(&net, &owner, &s, 1, T + i, &silent).await,
            Err(ErrorCode::Busy)
        );
    }
    let mut now = T + 100 + config.proof_deadline_ms;
    let tick = net.c.audit_tick(now, &mut OsRng).await.unwrap();
    let outcomes: Vec<Message> = tick
        .outgoing
        .iter()
        .filter(|o| o.to == owner.id())
        .map(|o| Envelope::verify(&o.bytes).unwrap().message().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec![Message::Audited {
            outcome: AuditOutcome::TimedOut
        }]
    );
    assert_eq!(standing(&net, &s).await.timed_out, 0);
    // The schedule's own audits, unanswered hour after hour, do count.
    for _ in 0..30 {
        now += config.storer_audit_every_ms;
        net.c.audit_tick(now, &mut OsRng).await.unwrap();
        net.c
            .audit_tick(now + config.proof_deadline_ms + 1, &mut OsRng)
            .await
            .unwrap();
    }
    let st = standing(&net, &s).await;
    let timed_out = st.timed_out;
    assert!(timed_out >= 30, "{timed_out}");
    assert_eq!(
        (st.audit, st.excluded_ms),
        (Default::default(), 0),
        "the audit track is untouched"
    );
    assert!(st.held_back, "too many unanswered: no new data for now");
    // Offline: no challenge goes out at all, and nothing moves.
    let off = now + config.storer_audit_every_ms;
    // Heard from last just before it goes.
    assert_eq!(
        ask(&net, &s, off - 1, &Message::Heartbeat).await,
        Message::Ok
    );
    net.books.presence(&s.id(), false, off).await.unwrap();
    let never =
        |_: &Challenge| -> Option<ProofAnswer> { panic!("no challenge to an offline storer") };
    assert_eq!(
        audit(&net, &owner, &s, 1, off + 1, &never).await,
        Ok(AuditOutcome::Offline)
    );
    assert_eq!(standing(&net, &s).await.timed_out, timed_out);
    // Two days away: the uptime track falls; past the grace period its
    // replicas are to be placed elsewhere.
    let later = off + 2 * 24 * 3_600_000;
    net.c.refresh_standing(later).await.unwrap();
    let st = standing(&net, &s).await;
    assert!(
        st.uptime.score() < config.uptime_min,
        "{}",
        st.uptime.score()
    );
    assert_eq!((st.audit, st.excluded_ms), (Default::default(), 0));
    let Message::Repairs(list) = ask(&net, &owner, later, &Message::GetRepairs).await else {
        panic!()
    };
    assert!(list.is_empty(), "within the grace period");
    let gone = off + config.offline_grace_ms + 1;
    let Message::Repairs(list) = ask(&net, &owner, gone, &Message::GetRepairs).await else {
        panic!()
    };
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].reason, RepairReason::Offline);
    // Its peers see why.
    let Message::Peers(peers) = ask(&net, &owner, gone, &Message::ListPeers).await else {
        panic!()
    };
    assert!(peers[0].held_back && !peers[0].excluded && !peers[0].online);
    assert!(peers[0].uptime_score_permille < 500);
    assert_eq!(peers[0].audits_timed_out, timed_out);
}

#[tokio::test]
async fn the_schedule_audits_every_storer() {
    let net = net_with(CoordinatorConfig {
        audit_tick_ms: 1_000,
        audit_every_ms: 100_000,
        storer_audit_every_ms: 10_000,
        ..CoordinatorConfig::default()
    })
    .await;
    let owner = Node::new();
    let storers: Vec<Node> = (0..3).map(|_| Node::new()).collect();
    authenticate(&net, &owner, 10 << 20, T).await;
    for s in &storers {
        authenticate(&net, s, 10 << 20, T).await;
    }
    // 1, 5 and 40 replicas.
    let mut blobs = std::collections::HashMap::new();
    let mut pack = 0u8;
    for (s, n) in storers.iter().zip([1, 5, 40]) {
        for _ in 0..n {
            pack += 1;
            let b = blob(3000, pack);
            let root = place(&net, &owner, s, pack, &b, T).await;
            blobs.insert(root, b);
        }
    }
    let mut audits = std::collections::HashMap::<NodeId, usize>::new();
    for second in 0..100u64 {
        let now = T + second * 1000;
        let tick = net.c.audit_tick(now, &mut OsRng).await.unwrap();
        assert_eq!(tick.lapsed, 0);
        for out in tick.outgoing {
            let s = storers.iter().find(|s| s.id() == out.to).unwrap();
            let c = challenge_of(&out, s);
            *audits.entry(s.id()).or_default() += 1;
            let (bytes, _) = s.envelope(
                &net,
                net.c.id(),
                now,
                &Message::Proof {
                    challenge: c.id,
                    answer: honest(&blobs[&c.root])(&c).unwrap(),
                },
            );
            // Nobody asked: nobody is told.
            assert!(net
                .c
                .handle(Some(s.id()), &bytes, now, &mut OsRng)
                .await
                .unwrap()
                .is_none());
        }
    }
    let counts: Vec<usize> = storers
        .iter()
        .map(|s| audits.get(&s.id()).copied().unwrap_or(0))
        .collect();
    // Every storer at least once per 10 s; the one with 40 replicas at
    // 40 per 100 s.
    assert!((8..=11).contains(&counts[0]), "{counts:?}");
    assert!((8..=11).contains(&counts[1]), "{counts:?}");
    assert!((36..=42).contains(&counts[2]), "{counts:?}");
    for s in &storers {
        let st = standing(&net, s).await;
        assert_eq!(st.failed + st.timed_out, 0);
    }
}

/// The coordinator's clock steps back an hour (NTP, a VM restored): every
/// node now looks registered in the future and every schedule entry and
/// deadline lies far ahead. Nothing panics, audits carry on at their
/// cadence on the new clock, and an unanswered audit still lapses in time.
#[tokio::test]
async fn a_clock_that_steps_back_does_not_stop_audits() {
    use rand::SeedableRng;
    let net = net_with(CoordinatorConfig {
        audit_tick_ms: 1_000,
        audit_every_ms: 100_000,
        storer_audit_every_ms: 10_000,
        ..CoordinatorConfig::default()
    })
    .await;
    let owner = Node::new();
    let storers: Vec<Node> = (0..2).map(|_| Node::new()).collect();
    authenticate(&net, &owner, 10 << 20, T).await;
    let mut blobs = std::collections::HashMap::new();
    for (i, s) in storers.iter().enumerate() {
        authenticate(&net, s, 10 << 20, T).await;
        for k in 0..3u8 {
            let pack = 10 * i as u8 + k + 1;
            let b = blob(3000, pack);
            blobs.insert(place(&net, &owner, s, pack, &b, T).await, b);
        }
    }
    // Ticks over `span` seconds from `start`, answering every challenge
    // honestly (except those to `silent`); audits per storer.
    let run = |start: u64, span: u64, silent: Option<NodeId>| {
        let (net, storers, blobs) = (&net, &storers, &blobs);
        let mut rng = rand::rngs::StdRng::seed_from_u64(start);
        async move {
            let mut audits = std::collections::HashMap::<NodeId, usize>::new();
            let mut lapsed = 0;
            for second in 0..span {
                let now = start + second * 1000;
                let tick = net.c.audit_tick(now, &mut rng).await.unwrap();
                lapsed += tick.lapsed;
                for out in tick.outgoing {
                    let s = storers.iter().find(|s| s.id() == out.to).unwrap();
                    *audits.entry(s.id()).or_default() += 1;
                    if Some(s.id()) == silent {
                        continue;
                    }
                    let c = challenge_of(&out, s);
                    let (bytes, _) = s.envelope(
                        net,
                        net.c.id(),
                        now,
                        &Message::Proof {
                            challenge: c.id,
                            answer: honest(&blobs[&c.root])(&c).unwrap(),
                        },
                    );
                    net.c
                        .handle(Some(s.id()), &bytes, now, &mut rng)
                        .await
                        .unwrap();
                }
            }
            (audits, lapsed)
        }
    };
    let (before, _) = run(T, 30, None).await;
    assert!(before.values().all(|n| *n >= 3), "{before:?}");
    // One storer is challenged and stays silent just before the step.
    run(T + 30_000, 12, Some(storers[0].id())).await;

    // An hour back: registered_ms is now in the future for everyone.
    let back = T + 42_000 - 3_600_000;
    net.c.refresh_standing(back).await.unwrap();
    net.c.sweep(back).await.unwrap();
    for n in storers.iter().chain([&owner]) {
        assert_eq!(ask(&net, n, back, &Message::Heartbeat).await, Message::Ok);
    }
    let Message::Peers(peers) = ask(&net, &owner, back, &Message::ListPeers).await else {
        panic!("no peers")
    };
    assert_eq!(peers.len(), 2);
    let (after, lapsed) = run(back, 40, None).await;
    // At least once per 10 s on the new clock, as before the step.
    for s in &storers {
        let n = after.get(&s.id()).copied().unwrap_or(0);
        assert!((3..=5).contains(&n), "{after:?}");
    }
    assert!(
        lapsed >= 1,
        "the silent storer's audit lapsed on the new clock"
    );
    assert!(standing(&net, &storers[0]).await.timed_out >= 1);
}

#[tokio::test]
async fn new_nodes_are_vetted_with_little_data() {
    let net = net_with(CoordinatorConfig {
        vetting_audits: 3,
        vetting_bytes: 10_000,
        ..CoordinatorConfig::default()
    })
    .await;
    let (owner, s) = (Node::new(), Node::new());
    authenticate(&net, &owner, 10 << 20, T).await;
    authenticate(&net, &s, 10 << 20, T).await;
    let r = blob(8_000, 1);
    place(&net, &owner, &s, 1, &r, T).await;
    let req = Message::MatchRequest {
        pack: PackId([2; 32]),
        size: 5_000,
        copies: 1,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    assert_eq!(
        code(&ask(&net, &owner, T, &req).await),
        ErrorCode::NoCapacity,
        "still vetted"
    );
    for i in 0..3 {
        assert_eq!(
            audit(&net, &owner, &s, 1, T + i, &honest(&r)).await,
            Ok(AuditOutcome::Proven)
        );
    }
    assert!(matches!(
        ask(&net, &owner, T + 10, &req).await,
        Message::MatchReply { .. }
    ));
}

/// A key with a huge offer and nothing held for others reserves its grant
/// and no more, however it asks; honest owners still find room; and an
/// owner grows past the grant by holding for others what audits prove.
#[tokio::test]
async fn space_is_earned_and_a_huge_offer_gets_the_grant_only() {
    let net = net_with(CoordinatorConfig {
        grant_bytes: 100_000,
        ..CoordinatorConfig::default()
    })
    .await;
    let (sybil, a, b, c) = (Node::new(), Node::new(), Node::new(), Node::new());
    authenticate(&net, &sybil, 1 << 62, T).await;
    for n in [&a, &b, &c] {
        authenticate(&net, n, 1 << 20, T).await;
    }
    let req = |pack: u8, size: u64, copies: u8| Message::MatchRequest {
        pack: PackId([pack; 32]),
        size,
        copies,
        friends: vec![],
        friend_copies: 0,
        exclude: vec![],
    };
    let mut reserved = 0;
    for p in 0..20u8 {
        match ask(&net, &sybil, T, &req(100 + p, 40_000, 3)).await {
            Message::MatchReply { storers, .. } => reserved += 40_000 * storers.len() as u64,
            m => assert_eq!(code(&m), ErrorCode::NoCapacity),
        }
    }
    assert!(reserved <= 100_000, "{reserved}");
    let sybil_rec = net.books.node(&sybil.id()).await.unwrap().unwrap();
    assert_eq!(sybil_rec.placed, reserved);
    // An honest owner still matches; past its grant it is told why.
    let first = blob(60_000, 1);
    place(&net, &a, &b, 1, &first, T).await;
    let Message::Error { code, message } = ask(&net, &a, T, &req(2, 60_000, 1)).await else {
        panic!("past the grant")
    };
    assert_eq!(code, ErrorCode::NoCapacity);
    assert!(message.contains("quota"), "{message}");
    // a holds 80,000 bytes for b; once an audit proves it, a may place
    // that much more.
    let held = blob(80_000, 2);
    place(&net, &b, &a, 3, &held, T).await;
    let Message::Status(s) = ask(&net, &a, T, &Message::GetStatus).await else {
        panic!()
    };
    assert_eq!(s.quota.map(|q| (q.may_place, q.earned)), Some((100_000, 0)));
    assert_eq!(
        audit(&net, &b, &a, 3, T + 1, &honest(&held)).await,
        Ok(AuditOutcome::Proven)
    );
    let Message::Status(s) = ask(&net, &a, T + 2, &Message::GetStatus).await else {
        panic!()
    };
    assert_eq!(
        s.quota,
        Some(pluto_protocol::Quota {
            may_place: 180_000,
            earned: 80_000,
            grant: 100_000
        })
    );
    place(&net, &a, &c, 4, &blob(60_000, 4), T + 2).await;
    // Dropped, it no longer counts.
    assert_eq!(
        ask(
            &net,
            &b,
            T + 3,
            &Message::DropReplica {
                pack: PackId([3; 32]),
                storer: a.id(),
            }
        )
        .await,
        Message::Ok
    );
    let rec = net.books.node(&a.id()).await.unwrap().unwrap();
    assert_eq!((rec.earned, rec.may_place(100_000)), (0, 100_000));
}

/// An owner asking for thousands of audits of an honest storer's replicas
/// at once: one at a time per replica reaches the storer, and those that
/// go unanswered (a busy disk) count nothing against it.
#[tokio::test]
async fn an_owner_flooding_audits_does_not_move_an_honest_storers_standing() {
    let net = net().await;
    let (owner, s) = (Node::new(), Node::new());
    authenticate(&net, &owner, 10 << 20, T).await;
    authenticate(&net, &s, 10 << 20, T).await;
    let blobs: Vec<Vec<u8>> = (1..=3).map(|i| blob(20_000, i)).collect();
    for (i, b) in blobs.iter().enumerate() {
        place(&net, &owner, &s, i as u8 + 1, b, T).await;
    }
    let before = standing(&net, &s).await;
    let silent = |_: &Challenge| None;
    for i in 0..3_000u64 {
        let pack = (i % 3) as u8 + 1;
        assert_eq!(
            audit(&net, &owner, &s, pack, T + i, &silent).await,
            Err(ErrorCode::Busy)
        );
    }
    let config = net.c.config().clone();
    let tick = net
        .c
        .audit_tick(T + 3_000 + config.proof_deadline_ms, &mut OsRng)
        .await
        .unwrap();
    let asked = tick.outgoing.iter().filter(|o| o.to == owner.id()).count();
    assert!(
        asked <= 3,
        "one at a time per replica: {asked} reached the storer"
    );
    let after = standing(&net, &s).await;
    assert_eq!(
        (after.passed, after.failed, after.timed_out, after.held_back),
        (before.passed, before.failed, 0, false)
    );
    assert_eq!(
        after.timeout, before.timeout,
        "the timeout track is untouched"
    );
    // Answered, they pass as ever.
    assert_eq!(
        audit(&net, &owner, &s, 1, T + 100_000, &honest(&blobs[0])).await,
        Ok(AuditOutcome::Proven)
    );
}

/// A pack placed again on the same storer has the same replica bytes and
/// root: a delete the owner signed for the first placement must not
/// release the second.
#[tokio::test]
async fn a_stale_delete_cannot_release_a_new_placement() {
    let net = net().await;
    let (owner, s) = (Node::new(), Node::new());
    authenticate(&net, &owner, 10 << 20, T).await;
    authenticate(&net, &s, 10 << 20, T).await;
    let b = blob(30_000, 9);
    let root = place(&net, &owner, &s, 1, &b, T).await;
    // The owner deletes it (its signed request, kept by the storer), and
    // forgets it; later it places the same pack there again.
    let first_delete = owner.key.sign(&delete_message(&s.id(), &root, T + 10));
    let drop = Message::DropReplica {
        pack: PackId([1; 32]),
        storer: s.id(),
    };
    assert_eq!(ask(&net, &owner, T + 10, &drop).await, Message::Ok);
    let again = T + 10 * 60_000;
    assert_eq!(place(&net, &owner, &s, 1, &b, again).await, root);
    // The storer kept the old delete and drops the bytes: its answer is no
    // proof of anything now.
    let stale = |_: &Challenge| {
        Some(ProofAnswer::Deleted {
            at_ms: T + 10,
            signature: first_delete.to_bytes(),
        })
    };
    assert_eq!(
        audit(&net, &owner, &s, 1, again + 100, &stale).await,
        Ok(AuditOutcome::Failed)
    );
    assert!(net
        .books
        .is_lost(&owner.id(), &PackId([1; 32]), &s.id())
        .await
        .unwrap());
    // A delete the owner signs after placing does release it, even with
    // its clock a minute behind the coordinator's.
    let (owner2, s2) = (Node::new(), Node::new());
    authenticate(&net, &owner2, 10 << 20, T).await;
    authenticate(&net, &s2, 10 << 20, T).await;
    let root2 = place(&net, &owner2, &s2, 2, &b, T + 300).await;
    let fresh = owner2
        .key
        .sign(&delete_message(&s2.id(), &root2, T + 300 - 60_000));
    let deleted = |_: &Challenge| {
        Some(ProofAnswer::Deleted {
            at_ms: T + 300 - 60_000,
            signature: fresh.to_bytes(),
        })
    };
    assert_eq!(
        audit(&net, &owner2, &s2, 2, T + 500, &deleted).await,
        Ok(AuditOutcome::Released)
    );
}
