//! The storer over real QUIC links: what it takes, what it refuses, and
//! that nothing it holds is harmed by a hostile peer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use pluto_engine::exchange::{delete_message, PeerError, PeerMsg, MAX_FRAME};
use pluto_engine::held::Held;
use pluto_engine::keys::{Keys, MasterKey};
use pluto_plugins_api::{
    open_transport, BlobStore, Link, NodeId, PackId, Transport, TransportOptions,
};
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
        Self::with_store(capacity, |dir| {
            Arc::new(FsBlobStore::open(dir.join("held")).unwrap())
        })
        .await
    }

    /// A storer whose held replicas live in the store `open` makes in its
    /// folder.
    async fn with_store(
        capacity: u64,
        open: impl FnOnce(&std::path::Path) -> Arc<dyn BlobStore>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let coordinator = SigningKey::from_bytes(&[7; 32]);
        let storer = MasterKey::generate().keys();
        let held = Arc::new(open_held_in(
            open(&path),
            &path,
            &storer,
            &coordinator,
            capacity,
        ));
        let t = quic(&storer).await;
        let storer_addrs = t.addresses();
        let h = held.clone();
        tokio::spawn(async move {
            while let Some(link) = t.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    if let Err(e) = h.serve(link).await {
                        eprintln!("storer: {e}");
                    }
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
    let store = Arc::new(FsBlobStore::open(dir.join("held")).unwrap());
    open_held_in(store, dir, storer, c, capacity)
}

fn open_held_in(
    store: Arc<dyn BlobStore>,
    dir: &std::path::Path,
    storer: &Keys,
    c: &SigningKey,
    capacity: u64,
) -> Held {
    Held::open(
        storer.identity.clone(),
        NodeId(c.verifying_key().to_bytes()),
        store,
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
            resume: false,
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

type Counting = pluto_plugins_api::testkit::CountingStore<FsBlobStore>;

/// Bytes that look random, quickly: a keystream.
fn noise(n: usize, seed: u8) -> Vec<u8> {
    let mut b = vec![0; n];
    pluto_engine::keystream::StreamKey::obfuscation(&[seed; 32], &[seed; 32]).apply(0, &mut b);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_reads_kilobytes_and_a_missing_or_damaged_outboard_is_rebuilt() {
    let counting = Arc::new(std::sync::OnceLock::<Arc<Counting>>::new());
    let slot = counting.clone();
    let w = World::with_store(64 << 20, move |dir| {
        let c = Arc::new(Counting::new(FsBlobStore::open(dir.join("held")).unwrap()));
        let _ = slot.set(c.clone());
        c
    })
    .await;
    let store = counting.get().unwrap().clone();
    let owner = MasterKey::generate().keys();
    let replica = noise(16 << 20, 1);
    let (pack, r, size) = (PackId([9; 32]), root(&replica), replica.len() as u64);
    let t = w.ticket(&owner, pack, size, now_ms() + 60_000);
    let frames: Vec<&[u8]> = replica.chunks(1 << 20).collect();
    assert_eq!(
        put(&w, &owner, t, pack, r, size, &frames).await,
        kept(&w, &owner, pack, size, r)
    );
    let ob = pluto_engine::held::outboard_id(&r);
    assert!(store.size(&ob).unwrap().is_some(), "the outboard is kept");

    let audit = |offset: u64| {
        let (w, owner, replica) = (&w, &owner, &replica);
        async move {
            let ProofAnswer::Held(p) = w
                .held
                .prove(&owner.node_id(), &pack, r, size, offset, 1024)
                .await
            else {
                panic!("no proof at {offset}")
            };
            let got = proof::verify(&r, size, offset, 1024, &p).unwrap();
            assert_eq!(got, &replica[offset as usize..offset as usize + 1024]);
        }
    };
    store.take();
    let mut most = 0;
    for i in 0..64u64 {
        let offset = (i * 7_919 * 1024 + (i % 3) * 15 * 1024) % size;
        audit(offset - offset % 1024).await;
        most = most.max(store.take());
    }
    assert!(most <= 64 << 10, "an audit read {most} bytes");

    // An object written before outboards, or a crash between the two
    // writes: the first audit rebuilds the outboard (reading the replica
    // once), the next reads kilobytes again.
    store.delete(&ob).unwrap();
    audit(5 << 20).await;
    assert!(store.take() >= size, "the rebuild read the replica");
    assert!(store.size(&ob).unwrap().is_some(), "the outboard is back");
    audit(9 << 20).await;
    assert!(store.take() <= 64 << 10);

    // A damaged outboard gives a proof that does not hold: the storer
    // notices before answering, rebuilds and answers right.
    let mut damaged = store.get(&ob).unwrap();
    for b in &mut damaged[48..] {
        *b ^= 0xa5;
    }
    store.delete(&ob).unwrap();
    store.put(&ob, &damaged).unwrap();
    audit(3 << 20).await;
    assert_ne!(store.get(&ob).unwrap(), damaged, "the outboard was rebuilt");
    store.take();
    audit(12 << 20).await;
    assert!(store.take() <= 64 << 10);

    // Across a restart the outboard is kept, and the ledger ignores it.
    let reopened = open_held(&w.dir, &w.storer, &w.coordinator, 64 << 20);
    assert_eq!(reopened.usage(), (size, 1));
    assert!(store.size(&ob).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_match_its_root_or_stops_short_leaves_nothing() {
    let w = World::new(64 << 20).await;
    let owner = MasterKey::generate().keys();
    let replica = noise(3 << 20, 2);
    let (pack, r, size) = (PackId([8; 32]), root(&replica), replica.len() as u64);
    let later = now_ms() + 60_000;
    // The bytes of another replica under this root.
    let other = noise(3 << 20, 3);
    let frames: Vec<&[u8]> = other.chunks(1 << 20).collect();
    let t = w.ticket(&owner, pack, size, later);
    refused(
        put(&w, &owner, t, pack, r, size, &frames).await,
        PeerError::BadRoot,
    );
    // Two of three frames, then the link closes.
    let frames: Vec<&[u8]> = replica.chunks(1 << 20).take(2).collect();
    let t = w.ticket(&owner, pack, size, later);
    let mut l = w.link(&owner).await;
    let attest = statement(&w, &owner, pack, size, r).sign(&owner.identity);
    l.send(
        &PeerMsg::Put {
            ticket: t,
            pack,
            root: r,
            size,
            attest,
            resume: false,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert_eq!(recv(&mut l).await, PeerMsg::Ready);
    for f in frames {
        l.send(f).await.unwrap();
    }
    let _ = l.finish().await;
    refused(recv(&mut l).await, PeerError::Malformed);
    drop(l);
    // Nothing is held or left in the store's temporary files once the
    // storer has given up on the link; what came is kept under another
    // name, for resuming, and never taken for the replica.
    let store = FsBlobStore::open(w.dir.join("held")).unwrap();
    wait_for("the broken transfer to be kept", || {
        w.held.kept_transfers() == (2 << 20, 1)
    })
    .await;
    assert_eq!(
        std::fs::read_dir(w.dir.join("held/tmp")).unwrap().count(),
        0
    );
    assert_eq!(w.held.usage(), (0, 0));
    assert_eq!(store.size(&PackId(r)).unwrap(), None);
    let reopened = open_held(&w.dir, &w.storer, &w.coordinator, 64 << 20);
    assert_eq!(
        reopened.usage(),
        (0, 0),
        "nothing half-written is held after a restart"
    );
    assert_eq!(reopened.kept_transfers(), (2 << 20, 1));
    // The whole replica still goes in afterwards, started over by an owner
    // that does not resume; what was kept goes.
    let frames: Vec<&[u8]> = replica.chunks(1 << 20).collect();
    let t = w.ticket(&owner, pack, size, later);
    assert_eq!(
        put(&w, &owner, t, pack, r, size, &frames).await,
        kept(&w, &owner, pack, size, r)
    );
    assert_eq!(w.held.kept_transfers(), (0, 0));
    assert_eq!(
        store.list().unwrap().len(),
        2,
        "the replica and its outboard"
    );
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Puts with `resume`, sends `frames` after the storer's answer (all of
/// them, or only what follows the offset it kept when `skip_kept`), and
/// closes the link after `stop_after` frames when set. The storer's
/// first answer and its last.
#[allow(clippy::too_many_arguments)]
async fn put_resuming(
    w: &World,
    owner: &Keys,
    ticket: Vec<u8>,
    pack: PackId,
    replica: &[u8],
    stop_after: Option<usize>,
) -> (PeerMsg, Option<PeerMsg>) {
    let (r, size) = (root(replica), replica.len() as u64);
    let attest = statement(w, owner, pack, size, r).sign(&owner.identity);
    let mut l = w.link(owner).await;
    let put = PeerMsg::Put {
        ticket,
        pack,
        root: r,
        size,
        attest,
        resume: true,
    };
    l.send(&put.encode()).await.unwrap();
    let first = recv(&mut l).await;
    let from = match first {
        PeerMsg::Ready => 0,
        PeerMsg::ReadyFrom { offset } => offset as usize,
        _ => return (first, None),
    };
    for (i, f) in replica[from..].chunks(1 << 20).enumerate() {
        if stop_after == Some(i) {
            // The storer's answer is awaited: a connection dropped at once
            // may lose the frames still in flight.
            let _ = l.finish().await;
            refused(recv(&mut l).await, PeerError::Malformed);
            return (first, None);
        }
        l.send(f).await.unwrap();
    }
    let _ = l.finish().await;
    (first, Some(recv(&mut l).await))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_transfer_is_resumed_and_only_the_rest_is_sent() {
    let w = World::new(64 << 20).await;
    let owner = MasterKey::generate().keys();
    let replica = noise((5 << 20) + 1234, 4);
    let (pack, r, size) = (PackId([9; 32]), root(&replica), replica.len() as u64);
    let later = now_ms() + 60_000;
    let t = w.ticket(&owner, pack, size, later);
    // Three MiB, then the link breaks.
    let (first, _) = put_resuming(&w, &owner, t.clone(), pack, &replica, Some(3)).await;
    assert_eq!(first, PeerMsg::Ready);
    wait_for("the broken transfer to be kept", || {
        w.held.kept_transfers() == (3 << 20, 1)
    })
    .await;
    assert_eq!(w.held.usage(), (0, 0));
    // Someone else who knew the root cannot resume it: they start from
    // nothing, and what was kept for the owner is dropped.
    let stranger = MasterKey::generate().keys();
    let ts = w.ticket(&stranger, pack, size, later);
    let (first, _) = put_resuming(&w, &stranger, ts, pack, &replica, Some(0)).await;
    assert_eq!(first, PeerMsg::Ready, "a stranger starts from nothing");
    wait_for("the stranger's transfer to end", || {
        w.held.kept_transfers() == (0, 0)
    })
    .await;
    // The owner again: a transfer of 2 MiB breaks, then resumes with the
    // same ticket after a restart of the storer's books.
    let (first, _) = put_resuming(&w, &owner, t.clone(), pack, &replica, Some(2)).await;
    assert_eq!(first, PeerMsg::Ready);
    wait_for("the second broken transfer to be kept", || {
        w.held.kept_transfers() == (2 << 20, 1)
    })
    .await;
    let reopened = open_held(&w.dir, &w.storer, &w.coordinator, 64 << 20);
    assert_eq!(reopened.kept_transfers(), (2 << 20, 1));
    drop(reopened);
    let (first, last) = put_resuming(&w, &owner, t.clone(), pack, &replica, Some(1)).await;
    assert_eq!(first, PeerMsg::ReadyFrom { offset: 2 << 20 });
    assert_eq!(last, None);
    wait_for("the resumed transfer to be kept", || {
        w.held.kept_transfers() == (3 << 20, 1)
    })
    .await;
    let (first, last) = put_resuming(&w, &owner, t, pack, &replica, None).await;
    assert_eq!(first, PeerMsg::ReadyFrom { offset: 3 << 20 });
    assert_eq!(last, Some(kept(&w, &owner, pack, size, r)));
    assert_eq!(w.held.usage(), (size, 1));
    assert_eq!(w.held.kept_transfers(), (0, 0));
    assert_eq!(get(&w, &owner, r, 0, size).await.unwrap(), replica);
    let store = FsBlobStore::open(w.dir.join("held")).unwrap();
    assert_eq!(
        store.list().unwrap().len(),
        2,
        "the replica and its outboard"
    );
    assert!(
        !std::fs::read_dir(w.dir.join("manifests"))
            .unwrap()
            .any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("partial-")),
        "the transfer's index entry is gone"
    );
    let reopened = open_held(&w.dir, &w.storer, &w.coordinator, 64 << 20);
    assert_eq!(reopened.usage(), (size, 1));
    let answer = reopened
        .prove(&owner.node_id(), &pack, r, size, 4 << 20, 1024)
        .await;
    assert!(matches!(answer, ProofAnswer::Held(_)), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_bytes_damaged_on_disk_fail_the_root_and_are_dropped() {
    let w = World::new(64 << 20).await;
    let owner = MasterKey::generate().keys();
    let replica = noise(4 << 20, 5);
    let (pack, r, size) = (PackId([10; 32]), root(&replica), replica.len() as u64);
    let t = w.ticket(&owner, pack, size, now_ms() + 60_000);
    put_resuming(&w, &owner, t.clone(), pack, &replica, Some(2)).await;
    wait_for("the broken transfer to be kept", || {
        w.held.kept_transfers() == (2 << 20, 1)
    })
    .await;
    // One bit of the kept bytes flips on the storer's disk.
    let store = FsBlobStore::open(w.dir.join("held")).unwrap();
    let (id, _) = store.list().unwrap()[0];
    let hex = id.to_hex();
    let path = w.dir.join("held").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let (first, last) = put_resuming(&w, &owner, t.clone(), pack, &replica, None).await;
    assert_eq!(first, PeerMsg::ReadyFrom { offset: 2 << 20 });
    refused(last.unwrap(), PeerError::BadRoot);
    assert_eq!(w.held.kept_transfers(), (0, 0));
    assert_eq!((w.held.usage(), store.list().unwrap().len()), ((0, 0), 0));
    // Sent whole again, it is kept.
    let (first, last) = put_resuming(&w, &owner, t, pack, &replica, None).await;
    assert_eq!(first, PeerMsg::Ready);
    assert_eq!(last, Some(kept(&w, &owner, pack, size, r)));
}

/// Replica size for the memory test, MiB (`PLUTO_TEST_RSS_REPLICA_MIB`).
fn rss_replica_mib() -> u64 {
    std::env::var("PLUTO_TEST_RSS_REPLICA_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// This process's peak resident memory, bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// The frames of replica `i`, made as they are sent: nothing holds a
/// whole replica in memory, on either side.
fn replica_frame(i: u8, frame: u64) -> Vec<u8> {
    let mut b = vec![0; 1 << 20];
    pluto_engine::keystream::StreamKey::obfuscation(&[i; 32], &[i; 32]).apply(frame << 20, &mut b);
    b
}

/// Replicas sent at once in the memory test.
const AT_ONCE: u8 = 16;

/// The storer of the memory test, in a process of its own so that its
/// peak memory is its alone: it says who and where it is, holds what comes
/// and, once it holds every replica, says its peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a process of its own by receiving_sixteen_large_replicas_at_once_stays_small"]
async fn sixteen_large_replicas_storer() {
    let size = rss_replica_mib() << 20;
    let w = World::new(u64::from(AT_ONCE) * size + (1 << 20)).await;
    println!(
        "STORER {} {}",
        w.storer.node_id().to_hex(),
        w.storer_addrs.join(" ")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while w.held.usage().1 < usize::from(AT_ONCE) {
        assert!(
            std::time::Instant::now() < deadline,
            "the replicas never came"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("PEAK {}", peak_rss());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiving_sixteen_large_replicas_at_once_stays_small() {
    use std::io::BufRead;
    let frames = rss_replica_mib();
    let size = frames << 20;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "integration::storer::sixteen_large_replicas_storer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    // However this test ends, the storer process ends with it.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = loop {
        let l = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .unwrap()
            .expect("the storer says where it is");
        // The harness may have begun the line with the test's name.
        if let Some(at) = l.find("STORER ") {
            break l[at..].to_string();
        }
    };
    let mut words = line.split_whitespace().skip(1);
    let storer: NodeId = words.next().unwrap().parse().unwrap();
    let addrs: Vec<String> = words.map(str::to_string).collect();
    let coordinator = SigningKey::from_bytes(&[7; 32]);
    let owner = Arc::new(MasterKey::generate().keys());
    let started = std::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..AT_ONCE {
        let (owner, addrs, coordinator) = (owner.clone(), addrs.clone(), coordinator.clone());
        sends.spawn(async move {
            let root = tokio::task::spawn_blocking(move || {
                let mut h = blake3::Hasher::new();
                for f in 0..frames {
                    h.update(&replica_frame(i, f));
                }
                *h.finalize().as_bytes()
            })
            .await
            .unwrap();
            let pack = PackId([i; 32]);
            let ticket = Ticket {
                owner: owner.node_id(),
                storer,
                size,
                expires_ms: now_ms() + 600_000,
                pack,
            }
            .sign(&coordinator);
            let statement = ReplicaStatement {
                owner: owner.node_id(),
                storer,
                pack,
                size,
                root,
            };
            let mut l = quic(&owner).await.connect(&storer, &addrs).await.unwrap();
            let put = PeerMsg::Put {
                ticket,
                pack,
                root,
                size,
                attest: statement.sign(&owner.identity),
                resume: false,
            };
            l.send(&put.encode()).await.unwrap();
            assert_eq!(recv(&mut l).await, PeerMsg::Ready);
            for f in 0..frames {
                l.send(&replica_frame(i, f)).await.unwrap();
            }
            let answer = tokio::time::timeout(Duration::from_secs(300), l.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            match PeerMsg::decode(&answer).unwrap() {
                PeerMsg::Kept { receipt } => assert!(statement.signed_by(&storer, &receipt)),
                other => panic!("{other:?}"),
            }
        });
    }
    while let Some(r) = sends.join_next().await {
        r.unwrap();
    }
    let peak: u64 = loop {
        let l = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .unwrap()
            .expect("the storer says its peak");
        if let Some(at) = l.find("PEAK ") {
            break l[at + 5..].trim().parse().unwrap();
        }
    };
    assert!(child.0.wait().unwrap().success());
    println!(
        "the storer received {AT_ONCE} replicas of {frames} MiB at once in {:.1?}; its peak RSS {} MiB",
        started.elapsed(),
        peak >> 20
    );
    assert!(
        peak < 200 << 20,
        "the storer's peak RSS is {} MiB",
        peak >> 20
    );
}
