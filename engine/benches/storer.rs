//! The storer from its disk: peak memory while receiving many replicas at
//! once, and audits answered per second with the bytes each reads, from
//! the outboard and (as before outboards) from the whole replica.
//!
//! ```text
//! cargo bench -p pluto-engine --bench storer -- [REPLICAS] [MIB EACH] [AUDITS]
//! ```
//!
//! Defaults: 16 replicas of 64 MiB, 2,000 audits. The held store lives in
//! `PLUTO_BENCH_DIR` (default: a temporary folder under /var/tmp, on disk).
//! As root the page cache is dropped before each audit run, so the audits
//! read from the disk; otherwise the run says it was warm.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use pluto_engine::exchange::PeerMsg;
use pluto_engine::held::{Held, HEADER_LEN};
use pluto_engine::keys::MasterKey;
use pluto_engine::keystream::StreamKey;
use pluto_plugins_api::testkit::{memory_link_pair, CountingStore};
use pluto_plugins_api::{BlobStore, NodeId, PackId};
use pluto_protocol::{proof, ProofAnswer, ReplicaStatement, Ticket};
use pluto_store_fs::FsBlobStore;
use rand_core::RngCore;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn frame(i: u32, n: u64) -> Vec<u8> {
    let mut b = vec![0; 1 << 20];
    StreamKey::obfuscation(
        &[i as u8; 32],
        &i.to_le_bytes().repeat(8).try_into().unwrap(),
    )
    .apply(n << 20, &mut b);
    b
}

fn peak_rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kb >> 10
}

fn drop_caches() -> bool {
    // Write dirty pages out, then ask the kernel to forget clean ones.
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let replicas = args.first().copied().unwrap_or(16) as u32;
    let mib = args.get(1).copied().unwrap_or(64);
    let audits = args.get(2).copied().unwrap_or(2000);
    let base = std::env::var("PLUTO_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base).unwrap();
    let coordinator = SigningKey::from_bytes(&[7; 32]);
    let storer = MasterKey::generate().keys();
    let owner = Arc::new(MasterKey::generate().keys());
    let store = Arc::new(CountingStore::new(
        FsBlobStore::open(dir.path().join("held")).unwrap(),
    ));
    let held = Arc::new(
        Held::open(
            storer.identity.clone(),
            NodeId(coordinator.verifying_key().to_bytes()),
            store.clone(),
            *storer.obfuscation,
            dir.path().join("manifests"),
            u64::MAX,
        )
        .unwrap(),
    );
    let size = mib << 20;

    // Receiving: every replica at once, each made as it is sent.
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..replicas {
        let (held, owner, storer_id) = (held.clone(), owner.clone(), storer.node_id());
        let coordinator = coordinator.clone();
        sends.spawn(async move {
            let root = tokio::task::spawn_blocking(move || {
                let mut h = blake3::Hasher::new();
                for n in 0..mib {
                    h.update(&frame(i, n));
                }
                *h.finalize().as_bytes()
            })
            .await
            .unwrap();
            let pack = PackId::of(&i.to_le_bytes());
            let ticket = Ticket {
                owner: owner.node_id(),
                storer: storer_id,
                size,
                expires_ms: now_ms() + 3_600_000,
                pack,
            }
            .sign(&coordinator);
            let attest = ReplicaStatement {
                owner: owner.node_id(),
                storer: storer_id,
                pack,
                size,
                root,
            }
            .sign(&owner.identity);
            let (mut mine, theirs) = memory_link_pair(owner.node_id(), storer_id);
            let serving = tokio::spawn(async move { held.serve(theirs).await });
            let put = PeerMsg::Put {
                ticket,
                pack,
                root,
                size,
                attest,
                resume: false,
            };
            mine.send(&put.encode()).await.unwrap();
            let ready = mine.recv().await.unwrap().unwrap();
            assert_eq!(PeerMsg::decode(&ready).unwrap(), PeerMsg::Ready);
            for n in 0..mib {
                mine.send(&frame(i, n)).await.unwrap();
            }
            let kept = PeerMsg::decode(&mine.recv().await.unwrap().unwrap()).unwrap();
            assert!(matches!(kept, PeerMsg::Kept { .. }), "{kept:?}");
            serving.await.unwrap().unwrap();
            (pack, root)
        });
    }
    let mut held_list = Vec::new();
    while let Some(r) = sends.join_next().await {
        held_list.push(r.unwrap());
    }
    let took = started.elapsed();
    println!(
        "received {replicas} replicas of {mib} MiB at once in {took:.1?} ({:.0} MB/s); \
         peak RSS {} MiB (before receiving {rss_before} MiB)",
        (u64::from(replicas) * size) as f64 / took.as_secs_f64() / 1e6,
        peak_rss_mib()
    );

    // Audits from the outboard, several at once as the daemon answers them.
    let cold = drop_caches();
    store.take();
    let mut rng = rand_core::OsRng;
    let picks: Vec<(PackId, [u8; 32], u64)> = (0..audits)
        .map(|_| {
            let (p, r) = held_list[(rng.next_u32() as usize) % held_list.len()];
            let (offset, _) = proof::pick_range(size, 1024, &mut rng);
            (p, r, offset)
        })
        .collect();
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut running = tokio::task::JoinSet::new();
    for (pack, root, offset) in picks.clone() {
        let (held, owner, sem) = (held.clone(), owner.node_id(), sem.clone());
        running.spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let a = held.prove(&owner, &pack, root, size, offset, 1024).await;
            let ProofAnswer::Held(p) = a else {
                panic!("{a:?}")
            };
            proof::verify(&root, size, offset, 1024, &p).unwrap();
        });
    }
    while let Some(r) = running.join_next().await {
        r.unwrap();
    }
    let t = started.elapsed();
    let read = store.take();
    println!(
        "outboard: {audits} audits of 1 KiB in {t:.2?}: {:.0} audits/s, {:.1} KiB read per audit ({})",
        audits as f64 / t.as_secs_f64(),
        read as f64 / audits as f64 / 1024.0,
        if cold { "page cache dropped first" } else { "page cache warm" }
    );

    // As before outboards: read the whole replica, undo the obfuscation,
    // hash it all (a tenth as many, it is slow).
    let whole = (audits / 10).max(4);
    let cold = drop_caches();
    let started = Instant::now();
    let obfuscation = *storer.obfuscation;
    for (_, root, offset) in picks.iter().take(whole as usize).copied() {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut bytes = store
                .get_range(&PackId(root), HEADER_LEN as u64, size)
                .unwrap();
            StreamKey::obfuscation(&obfuscation, &root).apply(0, &mut bytes);
            proof::prove(&bytes, offset, 1024).unwrap()
        })
        .await
        .unwrap();
    }
    let t = started.elapsed();
    let read = store.take();
    println!(
        "whole replica (before outboards): {whole} audits in {t:.2?}: {:.1} audits/s, {:.1} MiB read per audit ({})",
        whole as f64 / t.as_secs_f64(),
        read as f64 / whole as f64 / (1 << 20) as f64,
        if cold { "page cache dropped first" } else { "page cache warm" }
    );
}
