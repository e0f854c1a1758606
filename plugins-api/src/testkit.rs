//! The tests every plugin must pass, for plugins, pluto's own and third
//! parties', to run against themselves in their own test suites (feature
//! `testkit`), and helpers for tests of what runs over the plugins.
//!
//! | plugin kind | suite | what the plugin supplies |
//! |---|---|---|
//! | [`Transport`](crate::Transport) | [`transport_conformance`] | `async fn(seed, max_frame) -> (NodeId, Box<dyn Transport>)`, nodes that can all reach each other |
//! | [`MetaStore`](crate::MetaStore) | [`meta_store_conformance`] | `async fn() -> String`, the URL of a fresh, empty catalog |
//! | [`BooksStore`] | [`books_conformance`] | `async fn() -> String`, the URL of fresh, empty books |
//! | [`BlobStore`](crate::BlobStore) | [`blob_store_conformance`] | a fresh, empty store |
//!
//! A plugin crate enables the feature for its tests only,
//!
//! ```toml
//! [dev-dependencies]
//! pluto-plugins-api = { version = "...", features = ["testkit"] }
//! ```
//!
//! and calls each suite that fits it from one test; stores are opened by URL
//! through the plugin registry, so the plugin's descriptor is tested too:
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn conformance() {
//!     pluto_plugins_api::testkit::books_conformance(|| async { fresh_url().await }).await;
//! }
//! ```
//!
//! Each suite panics with a message naming what broke. Each suite's own
//! doc shows a call in full: the transport suite's says how nodes that go
//! through something shared (the relay's coordinator) are made.
//!
//! Also here: [`memory_link_pair`] (a link without a network),
//! [`CountingStore`] (a blob store that counts what is read from it) and
//! [`service_url`] (an external service's URL from the environment, or one
//! clear line saying which variable to set).

#![allow(clippy::unwrap_used)] // a test kit: a failure is a panic naming what broke

mod blob;
mod link;
mod meta;
mod service;
mod transport;
pub use blob::{blob_store_conformance, CountingStore};
pub use link::memory_link_pair;
pub use meta::meta_store_conformance;
pub use service::{service_login, service_url};
pub use transport::transport_conformance;

use std::future::Future;

use std::collections::HashSet;

use crate::{
    open_books_store, Beta, BooksStore, NodeId, OwnerLimits, PackId, Recorded, ReplicaMarks,
    ReplicaRecord, Standing,
};

fn node(i: u8) -> NodeId {
    NodeId([i; 32])
}

/// Ids spread over the key space as public keys are (for 1..=42), so that a
/// store sampling from a random point of its id index sees them all.
fn spread(i: u8) -> NodeId {
    NodeId([i.wrapping_mul(6); 32])
}

fn replica(owner: u8, pack: u8, storer: u8, size: u64) -> ReplicaRecord {
    ReplicaRecord {
        owner: node(owner),
        pack: PackId([pack; 32]),
        storer: node(storer),
        size,
        root: [pack ^ 0x55; 32],
    }
}

async fn open(url: &str) -> Box<dyn BooksStore> {
    open_books_store(url)
        .await
        .unwrap_or_else(|e| panic!("opening {url}: {e}"))
}

/// Runs every check, each on a store from `fresh_url`.
pub async fn books_conformance<F, Fut>(mut fresh_url: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = String>,
{
    offers_and_registration(&*open(&fresh_url().await).await).await;
    reservations_become_replicas_or_expire(&*open(&fresh_url().await).await).await;
    presence_keeps_changes_only(&*open(&fresh_url().await).await).await;
    candidates_are_online_with_room(&*open(&fresh_url().await).await).await;
    manifests_only_move_forward(&*open(&fresh_url().await).await).await;
    addresses_and_restored_replicas(&*open(&fresh_url().await).await).await;
    replicas_take_the_best_fitting_reservation(&*open(&fresh_url().await).await).await;
    standings_round_trip_and_outlive_registration(&*open(&fresh_url().await).await).await;
    candidates_are_eligible_only(&*open(&fresh_url().await).await).await;
    replicas_are_found_lost_and_dropped(&*open(&fresh_url().await).await).await;
    quotas_are_the_grant_plus_what_was_proven(&*open(&fresh_url().await).await).await;
    concurrent_reservations_never_over_commit(&fresh_url().await).await;
}

async fn offers_and_registration(b: &dyn BooksStore) {
    let (a, s) = (node(1), node(2));
    assert!(b.node(&a).await.unwrap().is_none());
    b.register(&a, &[9; 32], 100, 1).await.unwrap();
    b.register(&s, &[8; 32], 50, 1).await.unwrap();
    let an = b.node(&a).await.unwrap().unwrap();
    assert_eq!(
        (
            an.offer,
            an.held,
            an.placed,
            an.exchange_key,
            an.registered_ms
        ),
        (100, 0, 0, [9; 32], 1)
    );
    assert!(
        !b.reserve(&a, &a, 1, 10, OwnerLimits::NONE).await.unwrap(),
        "never on oneself"
    );
    assert!(b.reserve(&a, &s, 30, 10, OwnerLimits::NONE).await.unwrap());
    assert!(
        !b.reserve(&a, &s, 30, 10, OwnerLimits::NONE).await.unwrap(),
        "storer would be over-committed"
    );
    assert!(b.reserve(&a, &s, 20, 10, OwnerLimits::NONE).await.unwrap());
    let sn = b.node(&s).await.unwrap().unwrap();
    assert_eq!((sn.offer, sn.held, sn.free()), (50, 50, 0));
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 50);
    assert!(
        !b.set_offer(&s, 10).await.unwrap(),
        "cannot offer less than held"
    );
    assert!(
        !b.set_offer(&a, 10).await.unwrap(),
        "cannot offer less than placed"
    );
    assert!(b.set_offer(&s, 60).await.unwrap());
    assert!(!b.set_offer(&node(77), 60).await.unwrap(), "unknown node");
    // Re-registering keeps usage and never lowers the offer below it.
    b.register(&s, &[7; 32], 5, 2).await.unwrap();
    let sn = b.node(&s).await.unwrap().unwrap();
    assert_eq!(
        (sn.offer, sn.held, sn.exchange_key, sn.registered_ms),
        (50, 50, [7; 32], 1)
    );
    // The owner's quota is its offer: with 100 offered and 50 placed, a
    // third node with room still cannot take more than 50.
    b.register(&node(3), &[0; 32], 1000, 1).await.unwrap();
    assert!(
        !b.reserve(&a, &node(3), 51, 10, OwnerLimits::NONE)
            .await
            .unwrap(),
        "over quota"
    );
    assert!(b
        .reserve(&a, &node(3), 50, 10, OwnerLimits::NONE)
        .await
        .unwrap());
    assert!(
        !b.reserve(&a, &node(3), u64::MAX, 10, OwnerLimits::NONE)
            .await
            .unwrap(),
        "huge sizes never wrap"
    );
    let mut all: Vec<NodeId> = b.nodes().await.unwrap().iter().map(|n| n.id).collect();
    all.sort();
    assert_eq!(all, vec![a, s, node(3)]);
}

async fn reservations_become_replicas_or_expire(b: &dyn BooksStore) {
    let (a, s, t) = (node(1), node(2), node(3));
    for n in [a, s, t] {
        b.register(&n, &[0; 32], 1000, 0).await.unwrap();
    }
    assert!(b
        .reserve(&a, &s, 100, 1_000, OwnerLimits::NONE)
        .await
        .unwrap());
    assert!(b
        .reserve(&a, &t, 100, 1_000, OwnerLimits::NONE)
        .await
        .unwrap());
    assert!(b
        .reserve(&a, &s, 200, 5_000, OwnerLimits::NONE)
        .await
        .unwrap());

    let r1 = replica(1, 1, 2, 90);
    assert_eq!(b.record_replica(&r1, 100).await.unwrap(), Recorded::New);
    // 10 of the 100 reserved came back.
    assert_eq!(b.node(&s).await.unwrap().unwrap().held, 290);
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 390);
    assert_eq!(
        b.record_replica(&r1, 100).await.unwrap(),
        Recorded::Again,
        "recording twice is harmless"
    );
    assert_eq!(b.node(&s).await.unwrap().unwrap().held, 290);
    let changed = ReplicaRecord {
        root: [0; 32],
        ..r1.clone()
    };
    assert_eq!(
        b.record_replica(&changed, 100).await.unwrap(),
        Recorded::Conflict
    );
    assert_eq!(
        b.record_replica(&replica(1, 2, 2, 300), 100).await.unwrap(),
        Recorded::NoReservation,
        "bigger than any reservation"
    );
    assert_eq!(
        b.record_replica(&replica(3, 2, 2, 10), 100).await.unwrap(),
        Recorded::NoReservation,
        "another owner's reservation is not this one's"
    );
    assert_eq!(b.replicas_of(&a).await.unwrap(), vec![r1.clone()]);
    assert_eq!(b.replicas_held_by(&s).await.unwrap(), vec![r1.clone()]);
    assert!(b.replicas_held_by(&t).await.unwrap().is_empty());

    // The reservations on t (100, until 1,000) lapse; s's (200, until 5,000) stays.
    assert_eq!(b.release_expired(999).await.unwrap(), 0);
    assert_eq!(b.release_expired(1_000).await.unwrap(), 1);
    assert_eq!(b.release_expired(1_000).await.unwrap(), 0, "only once");
    assert_eq!(b.node(&t).await.unwrap().unwrap().held, 0);
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 290);
    assert_eq!(
        b.record_replica(&replica(1, 3, 3, 50), 100).await.unwrap(),
        Recorded::NoReservation,
        "a lapsed reservation cannot be used"
    );
    assert_eq!(
        b.record_replica(&replica(1, 3, 2, 200), 100).await.unwrap(),
        Recorded::New
    );
    assert_eq!(b.release_expired(u64::MAX / 2).await.unwrap(), 0);
    assert_eq!(b.node(&s).await.unwrap().unwrap().held, 290);
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 290);
}

async fn presence_keeps_changes_only(b: &dyn BooksStore) {
    let (a, c) = (node(1), node(2));
    b.register(&a, &[0; 32], 0, 1_000).await.unwrap();
    b.register(&c, &[0; 32], 0, 1_000).await.unwrap();
    b.presence(&a, true, 1_000).await.unwrap();
    for t in [1_100, 1_200, 1_300] {
        b.presence(&a, true, t).await.unwrap();
    }
    b.presence(&a, false, 2_000).await.unwrap();
    b.presence(&a, false, 2_100).await.unwrap();
    assert_eq!(
        b.node(&a).await.unwrap().unwrap().last_seen_ms,
        1_300,
        "a goodbye does not count as being heard from"
    );
    b.presence(&a, true, 3_000).await.unwrap();
    assert_eq!(
        b.presence_log(&a, 0).await.unwrap(),
        vec![(1_000, true), (2_000, false), (3_000, true)],
        "heartbeats and repeated goodbyes are not changes"
    );
    assert_eq!(
        b.presence_log(&a, 2_500).await.unwrap(),
        vec![(2_000, false), (3_000, true)],
        "the change before the window comes first"
    );
    let an = b.node(&a).await.unwrap().unwrap();
    assert!(an.online);
    assert_eq!(
        (an.online_ms, an.online_since_ms, an.last_seen_ms),
        (1_000, 3_000, 3_000)
    );
    assert!((an.lifetime_uptime(4_000) - 2_000.0 / 3_000.0).abs() < 1e-9);

    // c came online and fell silent; a keeps talking.
    b.presence(&c, true, 1_500).await.unwrap();
    b.presence(&a, true, 9_000).await.unwrap();
    let silent = b.mark_silent_offline(5_000, 10_000).await.unwrap();
    assert_eq!(silent, vec![c]);
    let cn = b.node(&c).await.unwrap().unwrap();
    assert!(!cn.online);
    assert_eq!(cn.online_ms, 0, "a silent node left when last heard from");
    assert_eq!(
        b.presence_log(&c, 0).await.unwrap(),
        vec![(1_500, true), (1_500, false)]
    );
    assert!(b
        .mark_silent_offline(5_000, 10_000)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(b.prune_presence(2_500).await.unwrap(), 2);
    assert_eq!(
        b.presence_log(&a, 0).await.unwrap(),
        vec![(2_000, false), (3_000, true)]
    );
    // Presence of an unknown node changes nothing.
    b.presence(&node(99), true, 1).await.unwrap();
    assert!(b.node(&node(99)).await.unwrap().is_none());
}

async fn candidates_are_online_with_room(b: &dyn BooksStore) {
    for i in 1..=40u8 {
        b.register(&spread(i), &[0; 32], u64::from(i) * 10, 0)
            .await
            .unwrap();
        if i % 2 == 0 {
            b.presence(&spread(i), true, 1).await.unwrap();
        }
    }
    let c = b.candidates(200, 100).await.unwrap();
    assert_eq!(
        c.len(),
        11,
        "the online ones of nodes 20..=40 have room for 200"
    );
    assert!(c.iter().all(|n| n.free() >= 200 && n.online));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let c = b.candidates(10, 5).await.unwrap();
        assert_eq!(c.len(), 5);
        seen.extend(c.into_iter().map(|n| n.id));
    }
    assert!(seen.len() > 5, "samples vary, so load spreads");
    assert!(b.candidates(1_000, 10).await.unwrap().is_empty());
}

/// Two packs of different sizes matched with one storer and recorded in
/// either order: each finds its reservation.
async fn replicas_take_the_best_fitting_reservation(b: &dyn BooksStore) {
    let (owner, storer) = (node(1), node(2));
    b.register(&owner, &[1; 32], 1_000, 0).await.unwrap();
    b.register(&storer, &[2; 32], 1_000, 0).await.unwrap();
    assert!(b
        .reserve(&owner, &storer, 100, 1_000, OwnerLimits::NONE)
        .await
        .unwrap());
    assert!(b
        .reserve(&owner, &storer, 30, 2_000, OwnerLimits::NONE)
        .await
        .unwrap());
    assert_eq!(
        b.record_replica(&replica(1, 7, 2, 30), 100).await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        b.record_replica(&replica(1, 8, 2, 100), 100).await.unwrap(),
        Recorded::New
    );
    let s = b.node(&storer).await.unwrap().unwrap();
    assert_eq!(s.held, 130);
}

async fn addresses_and_restored_replicas(b: &dyn BooksStore) {
    let (owner, storer) = (node(1), node(2));
    b.register(&storer, &[8; 32], 1_000, 1).await.unwrap();
    b.presence(&storer, true, 2).await.unwrap();
    let addrs = vec!["quic:10.0.0.1:7000".to_string(), "quic:[::1]:7000".into()];
    b.set_addresses(&storer, &addrs).await.unwrap();
    let found = b.addresses(&[storer, owner]).await.unwrap();
    assert_eq!(
        found,
        vec![(storer, true, addrs)],
        "unknown nodes are left out"
    );
    b.set_addresses(&storer, &[]).await.unwrap();
    assert_eq!(
        b.addresses(&[storer]).await.unwrap(),
        vec![(storer, true, vec![])]
    );

    // Books that lost everything about the owner take the storer's report.
    let r = replica(1, 5, 2, 300);
    assert!(b.restore_replica(&r, 10).await.unwrap());
    assert!(!b.restore_replica(&r, 11).await.unwrap(), "once only");
    // Never beyond the storer's offer (1,000): 300 held, 800 more is too much.
    assert!(!b.restore_replica(&replica(1, 6, 2, 800), 12).await.unwrap());
    assert_eq!(
        b.replica(&owner, &PackId([6; 32]), &storer).await.unwrap(),
        None
    );
    assert_eq!(b.replicas_of(&owner).await.unwrap(), vec![r.clone()]);
    let o = b.node(&owner).await.unwrap().unwrap();
    assert_eq!((o.offer, o.placed, o.exchange_key), (0, 300, [0; 32]));
    assert_eq!(b.node(&storer).await.unwrap().unwrap().held, 300);
    // When the owner authenticates, its key and offer come back; its
    // offer is never below what it placed.
    b.register(&owner, &[7; 32], 100, 20).await.unwrap();
    let o = b.node(&owner).await.unwrap().unwrap();
    assert_eq!((o.offer, o.placed, o.exchange_key), (300, 300, [7; 32]));
}

async fn manifests_only_move_forward(b: &dyn BooksStore) {
    let a = node(1);
    assert!(b.manifest(&a).await.unwrap().is_none());
    assert!(b.put_manifest(&a, 2, b"v2").await.unwrap());
    assert!(
        !b.put_manifest(&a, 2, b"again").await.unwrap(),
        "same version refused"
    );
    assert!(
        !b.put_manifest(&a, 1, b"old").await.unwrap(),
        "older version refused"
    );
    assert!(b.put_manifest(&a, u64::MAX, b"max").await.unwrap());
    let m = b.manifest(&a).await.unwrap().unwrap();
    assert_eq!((m.version, m.blob.as_slice()), (u64::MAX, &b"max"[..]));
    assert!(b.manifest(&node(2)).await.unwrap().is_none());
}

async fn standings_round_trip_and_outlive_registration(b: &dyn BooksStore) {
    let a = node(1);
    b.register(&a, &[1; 32], 100, 1).await.unwrap();
    assert_eq!(
        b.node(&a).await.unwrap().unwrap().standing,
        Standing::default(),
        "a new node starts from the prior"
    );
    // Floats that no decimal rounding keeps, and counters beyond 32 bits.
    let s = Standing {
        audit: Beta {
            alpha: 0.1 + 0.2,
            beta: 1.0 / 3.0,
        },
        timeout: Beta {
            alpha: 12.345_678_901_234_567,
            beta: f64::MIN_POSITIVE,
        },
        uptime: Beta {
            alpha: 1e-300,
            beta: 98.765_432_1e200,
        },
        passed: 7,
        failed: 1 << 40,
        timed_out: 3,
        speed_bps: 1_250_000,
        speed_at_ms: 1_700_000_000_123,
        excluded_ms: 0,
        held_back: true,
    };
    assert!(b.set_standing(&a, &s).await.unwrap());
    assert_eq!(b.node(&a).await.unwrap().unwrap().standing, s);
    let all = b.nodes().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].standing, s, "nodes() carries the standing too");
    // Registering again (a new key, a new offer) keeps the standing.
    b.register(&a, &[2; 32], 200, 5).await.unwrap();
    let an = b.node(&a).await.unwrap().unwrap();
    assert_eq!((an.offer, an.exchange_key), (200, [2; 32]));
    assert_eq!(an.standing, s, "re-registering keeps the standing");
    let excluded = Standing {
        excluded_ms: 42,
        held_back: false,
        passed: i64::MAX as u64,
        ..s.clone()
    };
    assert!(b.set_standing(&a, &excluded).await.unwrap());
    assert_eq!(b.node(&a).await.unwrap().unwrap().standing, excluded);
    assert!(
        !b.set_standing(&node(9), &s).await.unwrap(),
        "an unknown node has no standing to set"
    );
    assert!(
        b.node(&node(9)).await.unwrap().is_none(),
        "setting a standing registers nobody"
    );
}

async fn candidates_are_eligible_only(b: &dyn BooksStore) {
    for i in 1..=6u8 {
        b.register(&spread(i), &[0; 32], 1_000, 0).await.unwrap();
        b.presence(&spread(i), true, 1).await.unwrap();
    }
    let (excluded, held) = (spread(2), spread(3));
    let ids = |c: &[crate::NodeRecord]| c.iter().map(|n| n.id).collect::<HashSet<_>>();
    let everyone: HashSet<NodeId> = (1..=6).map(spread).collect();
    assert_eq!(ids(&b.candidates(10, 100).await.unwrap()), everyone);
    let out = Standing {
        excluded_ms: 5,
        ..Standing::default()
    };
    assert!(b.set_standing(&excluded, &out).await.unwrap());
    let back = Standing {
        held_back: true,
        passed: 3,
        ..Standing::default()
    };
    assert!(b.set_standing(&held, &back).await.unwrap());
    for _ in 0..5 {
        let c = b.candidates(10, 100).await.unwrap();
        let mut want = everyone.clone();
        want.remove(&excluded);
        want.remove(&held);
        assert_eq!(
            ids(&c),
            want,
            "excluded and held-back nodes get no new data"
        );
        assert!(c.iter().all(|n| n.standing.eligible()));
    }
    // Recovered: the held-back node is a candidate again, standing and all.
    let recovered = Standing {
        held_back: false,
        ..back
    };
    assert!(b.set_standing(&held, &recovered).await.unwrap());
    let c = b.candidates(10, 100).await.unwrap();
    let mut want = everyone.clone();
    want.remove(&excluded);
    assert_eq!(ids(&c), want, "a node no longer held back is back");
    let h = c.iter().find(|n| n.id == held).unwrap();
    assert_eq!(h.standing, recovered, "candidates carry the standing");
}

async fn replicas_are_found_lost_and_dropped(b: &dyn BooksStore) {
    let (a, s, t, o) = (node(1), node(2), node(3), node(4));
    b.register(&a, &[1; 32], 300, 0).await.unwrap();
    b.register(&s, &[2; 32], 200, 0).await.unwrap();
    b.register(&t, &[3; 32], 1_000, 0).await.unwrap();
    b.register(&o, &[4; 32], 1_000, 0).await.unwrap();
    let (p1, p2, p3) = (PackId([1; 32]), PackId([2; 32]), PackId([3; 32]));
    let r1 = replica(1, 1, 2, 150);
    let r2 = replica(1, 2, 3, 100);
    let r3 = replica(4, 3, 2, 50);
    for r in [&r1, &r2, &r3] {
        assert!(b
            .reserve(&r.owner, &r.storer, r.size, 1_000, OwnerLimits::NONE)
            .await
            .unwrap());
        assert_eq!(b.record_replica(r, 100).await.unwrap(), Recorded::New);
    }
    assert_eq!(b.replica(&a, &p1, &s).await.unwrap(), Some(r1.clone()));
    assert_eq!(b.replica(&o, &p3, &s).await.unwrap(), Some(r3.clone()));
    let marked = b.replica_marked(&a, &p1, &s).await.unwrap();
    let fresh = ReplicaMarks {
        recorded_ms: 100,
        lost_ms: 0,
    };
    assert_eq!(marked, Some((r1.clone(), fresh)));
    assert_eq!(b.replica_marked(&a, &p1, &t).await.unwrap(), None);
    assert_eq!(
        b.replica(&a, &p1, &t).await.unwrap(),
        None,
        "another storer"
    );
    assert_eq!(b.replica(&o, &p1, &s).await.unwrap(), None, "another owner");
    assert_eq!(b.replica(&a, &p3, &s).await.unwrap(), None, "another pack");
    let mut storers = b.storers().await.unwrap();
    storers.sort();
    assert_eq!(storers, vec![(s, 2), (t, 1)]);
    // s is full, and a placed 250 of its 300.
    assert!(!b
        .reserve(&a, &s, 100, 1_000, OwnerLimits::NONE)
        .await
        .unwrap());

    assert!(b.lost_replicas(&a).await.unwrap().is_empty());
    assert!(b.mark_lost(&a, &p1, &s, 500).await.unwrap());
    assert!(b.mark_lost(&a, &p1, &s, 600).await.unwrap(), "again");
    assert!(
        !b.mark_lost(&a, &p3, &s, 500).await.unwrap(),
        "not recorded"
    );
    assert!(b.mark_lost(&o, &p3, &s, 500).await.unwrap());
    assert_eq!(b.lost_replicas(&a).await.unwrap(), vec![(p1, s)]);
    assert_eq!(b.lost_replicas(&o).await.unwrap(), vec![(p3, s)]);
    assert!(b.lost_replicas(&t).await.unwrap().is_empty());
    assert!(b.is_lost(&a, &p1, &s).await.unwrap());
    assert!(b.is_lost(&o, &p3, &s).await.unwrap());
    let marks = |m: Option<(ReplicaRecord, ReplicaMarks)>| m.map(|(_, m)| m);
    assert_eq!(
        marks(b.replica_marked(&a, &p1, &s).await.unwrap()),
        Some(ReplicaMarks {
            recorded_ms: 100,
            lost_ms: 500
        }),
        "the first time it was found lost"
    );
    assert!(!b.is_lost(&a, &p3, &s).await.unwrap(), "not recorded");
    assert!(!b.is_lost(&o, &p1, &s).await.unwrap(), "another owner's");
    // A lost replica stays counted until its owner drops it.
    assert_eq!(b.replica(&a, &p1, &s).await.unwrap(), Some(r1.clone()));
    assert_eq!(b.replicas_of(&a).await.unwrap().len(), 2);
    assert_eq!(b.node(&s).await.unwrap().unwrap().held, 200);
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 250);

    assert!(b.drop_replica(&a, &p1, &s).await.unwrap());
    assert_eq!(b.node(&s).await.unwrap().unwrap().held, 50);
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 100);
    assert_eq!(b.replica(&a, &p1, &s).await.unwrap(), None);
    assert!(!b.is_lost(&a, &p1, &s).await.unwrap());
    assert!(
        b.lost_replicas(&a).await.unwrap().is_empty(),
        "a dropped replica is no longer lost"
    );
    assert_eq!(b.lost_replicas(&o).await.unwrap(), vec![(p3, s)]);
    assert!(
        !b.drop_replica(&a, &p1, &s).await.unwrap(),
        "dropped once only"
    );
    assert_eq!(b.node(&s).await.unwrap().unwrap().held, 50);
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 100);
    let mut storers = b.storers().await.unwrap();
    storers.sort();
    assert_eq!(storers, vec![(s, 1), (t, 1)]);
    // The space came back: a new replica there fits, and is not lost.
    assert!(b
        .reserve(&a, &s, 100, 1_000, OwnerLimits::NONE)
        .await
        .unwrap());
    let again = replica(1, 1, 2, 100);
    assert_eq!(b.record_replica(&again, 100).await.unwrap(), Recorded::New);
    assert!(
        b.lost_replicas(&a).await.unwrap().is_empty(),
        "a new replica is not lost"
    );

    assert!(b.drop_replica(&a, &p2, &t).await.unwrap());
    let mut storers = b.storers().await.unwrap();
    storers.sort();
    assert_eq!(storers, vec![(s, 2)], "t holds nothing any more");
    assert_eq!(b.node(&t).await.unwrap().unwrap().held, 0);
    assert!(
        !b.drop_replica(&o, &p2, &t).await.unwrap(),
        "another owner's pack is not there"
    );
}

fn grant(grant: u64) -> OwnerLimits {
    OwnerLimits {
        grant,
        max_reservations: u64::MAX,
    }
}

async fn quotas_are_the_grant_plus_what_was_proven(b: &dyn BooksStore) {
    let (a, s, t) = (node(1), node(2), node(3));
    // A huge offer earns nothing by itself: a places its grant, no more.
    b.register(&a, &[1; 32], u64::MAX / 2, 0).await.unwrap();
    b.register(&s, &[2; 32], 10_000, 0).await.unwrap();
    b.register(&t, &[3; 32], 10_000, 0).await.unwrap();
    assert!(b.reserve(&a, &s, 100, 1_000, grant(150)).await.unwrap());
    assert!(
        !b.reserve(&a, &t, 100, 1_000, grant(150)).await.unwrap(),
        "past the grant"
    );
    assert!(b.reserve(&a, &t, 50, 1_000, grant(150)).await.unwrap());
    assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 150);
    // t holds 400 for s; once an audit of it passes, t may place 400 more.
    let r = replica(2, 9, 3, 400);
    assert!(b.reserve(&s, &t, 400, 1_000, grant(1_000)).await.unwrap());
    assert_eq!(b.record_replica(&r, 100).await.unwrap(), Recorded::New);
    let tn = b.node(&t).await.unwrap().unwrap();
    assert_eq!((tn.earned, tn.may_place(100)), (0, 100), "not proven yet");
    assert!(b.mark_proven(&s, &r.pack, &t, 500).await.unwrap());
    assert!(b.mark_proven(&s, &r.pack, &t, 600).await.unwrap(), "again");
    let tn = b.node(&t).await.unwrap().unwrap();
    assert_eq!((tn.earned, tn.may_place(100)), (400, 500), "counted once");
    assert!(b.reserve(&t, &s, 500, 1_000, grant(100)).await.unwrap());
    assert!(!b.reserve(&t, &s, 1, 1_000, grant(100)).await.unwrap());
    assert!(
        !b.mark_proven(&s, &PackId([8; 32]), &t, 500).await.unwrap(),
        "not recorded"
    );
    // A replica found lost, or dropped, no longer counts.
    assert!(b.mark_lost(&s, &r.pack, &t, 700).await.unwrap());
    assert_eq!(b.node(&t).await.unwrap().unwrap().earned, 0);
    assert!(!b.mark_proven(&s, &r.pack, &t, 800).await.unwrap(), "lost");
    assert!(b.drop_replica(&s, &r.pack, &t).await.unwrap());
    assert_eq!(b.node(&t).await.unwrap().unwrap().earned, 0, "not twice");
    let r2 = replica(2, 10, 3, 300);
    // Reservations pending at once are capped; a recorded one no longer is.
    let two = OwnerLimits {
        grant: u64::MAX,
        max_reservations: 2,
    };
    assert!(b.reserve(&s, &t, 300, 1_000, two).await.unwrap());
    assert!(b.reserve(&s, &t, 1, 1_000, two).await.unwrap());
    assert!(
        !b.reserve(&s, &t, 1, 1_000, two).await.unwrap(),
        "two pending"
    );
    assert_eq!(b.record_replica(&r2, 100).await.unwrap(), Recorded::New);
    assert!(b.mark_proven(&s, &r2.pack, &t, 900).await.unwrap());
    assert_eq!(b.node(&t).await.unwrap().unwrap().earned, 300);
    assert!(
        b.reserve(&s, &t, 1, 1_000, two).await.unwrap(),
        "one pending"
    );
    assert!(b.drop_replica(&s, &r2.pack, &t).await.unwrap());
    assert_eq!(b.node(&t).await.unwrap().unwrap().earned, 0);
}

async fn concurrent_reservations_never_over_commit(url: &str) {
    let b = open(url).await;
    let storer = node(0xff);
    b.register(&storer, &[0; 32], 1000, 0).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            // Each asker on a connection of its own, as separate
            // coordinator replicas would be.
            let b = open(&url).await;
            let owner = node(i);
            b.register(&owner, &[0; 32], 1000, 0).await.unwrap();
            let mut got = 0u64;
            for _ in 0..10 {
                if b.reserve(&owner, &storer, 7, 100, OwnerLimits::NONE)
                    .await
                    .unwrap()
                {
                    got += 7;
                }
            }
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("an asker panicked");
    }
    let s = b.node(&storer).await.unwrap().unwrap();
    assert_eq!(s.held, total);
    assert!(s.held <= s.offer, "{} held of {}", s.held, s.offer);
    assert!(
        s.offer - s.held < 7,
        "all space that could be used was used"
    );
    assert_eq!(b.release_expired(100).await.unwrap(), total / 7);
    assert_eq!(b.node(&storer).await.unwrap().unwrap().held, 0);
}
