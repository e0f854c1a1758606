//! The storer over real QUIC links: what it takes, what it refuses, and
//! that nothing it holds is harmed by a hostile peer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use pluto_engine::exchange::{delete_message, PeerError, PeerMsg, MAX_FRAME};
use pluto_engine::held::Held;
use pluto_engine::keys::{Keys, MasterKey};
use pluto_plugins_api::{open_transport, Link, NodeId, PackId, Transport, TransportOptions};
use pluto_protocol::{proof, ProofAnswer, ReplicaStatement, Ticket};
use pluto_store_fs::FsBlobStore;
// Linked for its plugin registration.
use pluto_transport_quic as _;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn quic(keys: &Keys) -> Arc<dyn Transport> {
    open_transport(
        "quic",
        TransportOptions {
            identity_seed: keys.identity.to_bytes(),
            listen: Some("127.0.0.1:0".into()),
            max_frame: MAX_FRAME,
            relay: None,
        },
    )
    .await
    .unwrap()
    .into()
}

struct World {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    coordinator: SigningKey,
    storer: Keys,
    storer_addrs: Vec<String>,
    held: Arc<Held>,
}

impl World {
    async fn new(capacity: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let coordinator = SigningKey::from_bytes(&[7; 32]);
        let storer = MasterKey::generate().keys();
        let held = Arc::new(open_held(&path, &storer, &coordinator, capacity));
        let t = quic(&storer).await;
        let storer_addrs = t.addresses();
        let h = held.clone();
        tokio::spawn(async move {
            while let Some(link) = t.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let _ = h.serve(link).await;
                });
            }
        });
        Self {
            _dir: dir,
            dir: path,
            coordinator,
            storer,
            storer_addrs,
            held,
        }
    }

    fn ticket(&self, owner: &Keys, pack: PackId, size: u64, expires_ms: u64) -> Vec<u8> {
        Ticket {
            owner: owner.node_id(),
            storer: self.storer.node_id(),
            size,
            expires_ms,
            pack,
        }
        .sign(&self.coordinator)
    }

    async fn link(&self, from: &Keys) -> Box<dyn Link> {
        quic(from)
            .await
            .connect(&self.storer.node_id(), &self.storer_addrs)
            .await
            .unwrap()
    }
}

fn open_held(dir: &std::path::Path, storer: &Keys, c: &SigningKey, capacity: u64) -> Held {
    Held::open(
        storer.identity.clone(),
        NodeId(c.verifying_key().to_bytes()),
        Arc::new(FsBlobStore::open(dir.join("held")).unwrap()),
        *storer.obfuscation,
        dir.join("manifests"),
        capacity,
    )
    .unwrap()
}

async fn recv(link: &mut Box<dyn Link>) -> PeerMsg {
    let f = tokio::time::timeout(Duration::from_secs(10), link.recv())
        .await
        .unwrap()
        .unwrap()
        .expect("an answer");
    PeerMsg::decode(&f).unwrap()
}

fn refused(m: PeerMsg, want: PeerError) {
    match m {
        PeerMsg::Error { code, .. } => assert_eq!(code, want),
        other => panic!("{other:?}, expected {want:?}"),
    }
}

/// Put with `frames` as the bytes; the storer's answers.
async fn put(
    w: &World,
    owner: &Keys,
    ticket: Vec<u8>,
    pack: PackId,
    root: [u8; 32],
    size: u64,
    frames: &[&[u8]],
) -> PeerMsg {
    let attest = statement(w, owner, pack, size, root).sign(&owner.identity);
    put_attested(w, owner, ticket, pack, root, size, attest, frames).await
}

/// What owner and storer sign about a replica.
fn statement(w: &World, owner: &Keys, pack: PackId, size: u64, root: [u8; 32]) -> ReplicaStatement {
    ReplicaStatement {
        owner: owner.node_id(),
        storer: w.storer.node_id(),
        pack,
        size,
        root,
    }
}

/// The storer's answer when it kept a replica: its receipt.
fn kept(w: &World, owner: &Keys, pack: PackId, size: u64, root: [u8; 32]) -> PeerMsg {
    PeerMsg::Kept {
        receipt: statement(w, owner, pack, size, root).sign(&w.storer.identity),
    }
}

/// Put with the owner's signature `attest`.
#[allow(clippy::too_many_arguments)]
async fn put_attested(
    w: &World,
    owner: &Keys,
    ticket: Vec<u8>,
    pack: PackId,
    root: [u8; 32],
    size: u64,
    attest: [u8; 64],
    frames: &[&[u8]],
) -> PeerMsg {
    let mut l = w.link(owner).await;
    l.send(
        &PeerMsg::Put {
            ticket,
            pack,
            root,
            size,
            attest,
        }
        .encode(),
    )
    .await
    .unwrap();
    let first = recv(&mut l).await;
    if first != PeerMsg::Ready {
        return first;
    }
    for f in frames {
        if l.send(f).await.is_err() {
            break;
        }
    }
    let _ = l.finish().await;
    recv(&mut l).await
}

async fn get(
    w: &World,
    who: &Keys,
    root: [u8; 32],
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, PeerMsg> {
    let mut l = w.link(who).await;
    l.send(&PeerMsg::Get { root, offset, len }.encode())
        .await
        .unwrap();
    match recv(&mut l).await {
        PeerMsg::Sending { len: n } => {
            let mut out = Vec::new();
            while (out.len() as u64) < n {
                out.extend(l.recv().await.unwrap().unwrap());
            }
            Ok(out)
        }
        other => Err(other),
    }
}

fn root(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

#[tokio::test]
async fn stores_checks_serves_and_deletes_only_for_the_owner() {
    let w = World::new(10 << 20).await;
    let owner = MasterKey::generate().keys();
    let stranger = MasterKey::generate().keys();
    let replica: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = root(&replica);
    let pack = PackId([1; 32]);
    let later = now_ms() + 60_000;
    let t = w.ticket(&owner, pack, replica.len() as u64, later);
    let chunks: Vec<&[u8]> = replica.chunks(1 << 20).collect();

    // Bytes that do not match the root: refused, nothing kept.
    let mut bad = replica.clone();
    bad[12345] ^= 1;
    let bad_chunks: Vec<&[u8]> = bad.chunks(1 << 20).collect();
    refused(
        put(
            &w,
            &owner,
            t.clone(),
            pack,
            r,
            replica.len() as u64,
            &bad_chunks,
        )
        .await,
        PeerError::BadRoot,
    );
    // A truncated stream: refused.
    refused(
        put(
            &w,
            &owner,
            t.clone(),
            pack,
            r,
            replica.len() as u64,
            &chunks[..1],
        )
        .await,
        PeerError::Malformed,
    );
    // More bytes than announced: refused.
    refused(
        put(&w, &owner, t.clone(), pack, r, 1000, &chunks[..1]).await,
        PeerError::Malformed,
    );
    assert_eq!(w.held.usage(), (0, 0), "nothing kept from failed puts");

    // Tickets: someone else's shown by a stranger, lapsed, another pack,
    // bigger than allowed, not signed by the coordinator.
    refused(
        put(
            &w,
            &stranger,
            t.clone(),
            pack,
            r,
            replica.len() as u64,
            &chunks,
        )
        .await,
        PeerError::Ticket,
    );
    let lapsed = w.ticket(&owner, pack, replica.len() as u64, now_ms() - 1);
    refused(
        put(&w, &owner, lapsed, pack, r, replica.len() as u64, &chunks).await,
        PeerError::Ticket,
    );
    refused(
        put(
            &w,
            &owner,
            t.clone(),
            PackId([2; 32]),
            r,
            replica.len() as u64,
            &chunks,
        )
        .await,
        PeerError::Ticket,
    );
    let small = w.ticket(&owner, pack, 100, later);
    refused(
        put(&w, &owner, small, pack, r, replica.len() as u64, &chunks).await,
        PeerError::Ticket,
    );
    let mut forged = t.clone();
    forged[70] ^= 1;
    refused(
        put(&w, &owner, forged, pack, r, replica.len() as u64, &chunks).await,
        PeerError::Ticket,
    );

    // A statement the owner did not sign, or signed for other bytes.
    let bad_attest =
        statement(&w, &owner, pack, replica.len() as u64, [7; 32]).sign(&owner.identity);
    refused(
        put_attested(
            &w,
            &owner,
            t.clone(),
            pack,
            r,
            replica.len() as u64,
            bad_attest,
            &chunks,
        )
        .await,
        PeerError::Unauthorized,
    );
    let by_stranger = statement(&w, &owner, pack, replica.len() as u64, r).sign(&stranger.identity);
    refused(
        put_attested(
            &w,
            &owner,
            t.clone(),
            pack,
            r,
            replica.len() as u64,
            by_stranger,
            &chunks,
        )
        .await,
        PeerError::Unauthorized,
    );

    // The real thing.
    assert_eq!(
        put(
            &w,
            &owner,
            t.clone(),
            pack,
            r,
            replica.len() as u64,
            &chunks
        )
        .await,
        kept(&w, &owner, pack, replica.len() as u64, r)
    );
    assert_eq!(w.held.usage(), (replica.len() as u64, 1));
    // Again: already held, nothing sent.
    assert_eq!(
        put(&w, &owner, t.clone(), pack, r, replica.len() as u64, &[]).await,
        PeerMsg::Have {
            size: replica.len() as u64,
            receipt: statement(&w, &owner, pack, replica.len() as u64, r).sign(&w.storer.identity),
        }
    );
    // The same ticket for other bytes: used already.
    let other = vec![9u8; 1000];
    refused(
        put(&w, &owner, t.clone(), pack, root(&other), 1000, &[&other]).await,
        PeerError::Ticket,
    );

    // On disk the bytes are not the replica's.
    let on_disk = std::fs::read(w.dir.join("held").join(&hex(&r)[..2]).join(hex(&r))).unwrap();
    assert!(!on_disk.windows(64).any(|win| win == &replica[1000..1064]));

    // Reads: whole, a range, past the end; the stranger learns nothing.
    assert_eq!(
        get(&w, &owner, r, 0, replica.len() as u64).await.unwrap(),
        replica
    );
    assert_eq!(
        get(&w, &owner, r, 1_048_570, 20).await.unwrap(),
        replica[1_048_570..1_048_590]
    );
    refused(
        get(&w, &owner, r, replica.len() as u64 - 1, 2)
            .await
            .unwrap_err(),
        PeerError::Malformed,
    );
    refused(
        get(&w, &stranger, r, 0, 10).await.unwrap_err(),
        PeerError::NotFound,
    );

    // Deletes: the stranger's, a badly signed one, a stale one are refused.
    let del = |k: &Keys, at: u64| PeerMsg::Delete {
        root: r,
        at_ms: at,
        signature: k
            .identity
            .sign(&delete_message(&w.storer.node_id(), &r, at))
            .to_bytes(),
    };
    for (who, msg, want) in [
        (&stranger, del(&stranger, now_ms()), PeerError::NotFound),
        (&owner, del(&stranger, now_ms()), PeerError::Unauthorized),
        (
            &owner,
            del(&owner, now_ms() - 3_600_000),
            PeerError::Unauthorized,
        ),
    ] {
        let mut l = w.link(who).await;
        l.send(&msg.encode()).await.unwrap();
        refused(recv(&mut l).await, want);
    }
    assert_eq!(w.held.usage().1, 1, "still held");

    // Across a restart the ledger comes back from the objects.
    let reopened = open_held(&w.dir, &w.storer, &w.coordinator, 10 << 20);
    assert_eq!(reopened.entries(), w.held.entries());
    assert_eq!(reopened.reports().len(), 1);

    // Audits: a proof over the replica's bytes for any range; nothing for
    // a replica named with another owner, pack or size.
    let size = replica.len() as u64;
    for (offset, len) in [
        (0, 1024),
        (1 << 20, 16 << 10),
        (size - size % 1024, size % 1024),
    ] {
        let ProofAnswer::Held(p) = w
            .held
            .prove(&owner.node_id(), &pack, r, size, offset, len)
            .await
        else {
            panic!("no proof for {offset}+{len}")
        };
        let got = proof::verify(&r, size, offset, len, &p).unwrap();
        assert_eq!(got, &replica[offset as usize..(offset + len) as usize]);
    }
    for (who, p, z) in [
        (stranger.node_id(), pack, size),
        (owner.node_id(), PackId([2; 32]), size),
        (owner.node_id(), pack, size - 1),
    ] {
        assert_eq!(
            w.held.prove(&who, &p, r, z, 0, 1024).await,
            ProofAnswer::NotHeld
        );
    }

    // The owner's delete.
    let mut l = w.link(&owner).await;
    let asked = now_ms();
    l.send(&del(&owner, asked).encode()).await.unwrap();
    assert_eq!(recv(&mut l).await, PeerMsg::Ok);
    assert_eq!(w.held.usage(), (0, 0));
    refused(
        get(&w, &owner, r, 0, 10).await.unwrap_err(),
        PeerError::NotFound,
    );
    // An audit of it now gets the owner's own signed request, which the
    // coordinator checks; to anyone else's name it is simply not held.
    match w
        .held
        .prove(&owner.node_id(), &pack, r, size, 0, 1024)
        .await
    {
        ProofAnswer::Deleted { at_ms, signature } => {
            assert_eq!(at_ms, asked);
            assert!(pluto_protocol::verify(
                &owner.node_id(),
                &delete_message(&w.storer.node_id(), &r, at_ms),
                &signature
            ));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        w.held
            .prove(&stranger.node_id(), &pack, r, size, 0, 1024)
            .await,
        ProofAnswer::NotHeld
    );
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn over_quota_floods_and_garbage_are_refused() {
    let w = World::new(1 << 20).await;
    let owner = MasterKey::generate().keys();
    let later = now_ms() + 60_000;
    // More than the storer offers.
    let big = vec![3u8; 2 << 20];
    let pack = PackId([4; 32]);
    let t = w.ticket(&owner, pack, big.len() as u64, later);
    refused(
        put(
            &w,
            &owner,
            t,
            pack,
            root(&big),
            big.len() as u64,
            &[&big[..1 << 20], &big[1 << 20..]],
        )
        .await,
        PeerError::Full,
    );
    // Garbage and an answer where a request belongs.
    for junk in [vec![0xff; 10], PeerMsg::Ok.encode(), vec![]] {
        let mut l = w.link(&owner).await;
        l.send(&junk).await.unwrap();
        refused(recv(&mut l).await, PeerError::Malformed);
    }
    // A flood of links that say nothing: beyond the per-peer limit, Busy.
    let mut idle = Vec::new();
    let mut busy = 0;
    for _ in 0..24 {
        let mut l = w.link(&owner).await;
        l.send(&PeerMsg::GetManifest.encode()).await.unwrap();
        idle.push(l);
    }
    for l in idle.iter_mut() {
        if let PeerMsg::Error {
            code: PeerError::Busy,
            ..
        } = recv(l).await
        {
            busy += 1;
        }
    }
    // Each one is answered (NotFound or Busy); none hangs, none crashes.
    assert!(busy <= 24);
    // Still serving: a good small replica goes in.
    let small = vec![5u8; 1000];
    let p2 = PackId([5; 32]);
    let t2 = w.ticket(&owner, p2, 1000, later);
    assert_eq!(
        put(&w, &owner, t2, p2, root(&small), 1000, &[&small]).await,
        kept(&w, &owner, p2, 1000, root(&small))
    );
}
