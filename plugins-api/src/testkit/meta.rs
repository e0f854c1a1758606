//! The tests every [`MetaStore`] must pass.

use std::future::Future;

use crate::{
    open_meta_store, BlobId, BlobKind, BlobLocation, MetaStore, PackId, PackRecord, SnapshotId,
    SnapshotRecord,
};

async fn open(url: &str) -> Box<dyn MetaStore> {
    open_meta_store(url)
        .await
        .unwrap_or_else(|e| panic!("opening {url}: {e}"))
}

/// Runs the tests every [`MetaStore`] must pass, each on a fresh, empty
/// catalog whose URL `fresh_url` gives; panics with a message naming what
/// broke. A catalog plugin calls it from one of its tests:
///
/// ```ignore
/// #[tokio::test]
/// async fn meta_store_conformance() {
///     let dir = tempfile::tempdir().unwrap();
///     let n = std::sync::atomic::AtomicUsize::new(0);
///     pluto_plugins_api::testkit::meta_store_conformance(|| {
///         let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         let url = format!("mydb:{}", dir.path().join(format!("c{i}.db")).display());
///         async move { url }
///     })
///     .await;
/// }
/// ```
///
/// Catalogs are opened through the plugin registry
/// ([`open_meta_store`](crate::open_meta_store)), so the plugin's
/// descriptor is tested too, and reopened by the same URL to check that
/// what was recorded outlives [`close`](MetaStore::close).
pub async fn meta_store_conformance<F, Fut>(mut fresh_url: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = String>,
{
    packs_and_blobs_are_recorded_and_listed(&*open(&fresh_url().await).await).await;
    removing_a_pack_forgets_its_blobs_only(&*open(&fresh_url().await).await).await;
    snapshots_round_trip_oldest_first(&*open(&fresh_url().await).await).await;
    values_are_kept_and_replaced(&*open(&fresh_url().await).await).await;
    clear_forgets_all_but_values(&*open(&fresh_url().await).await).await;
    everything_outlives_close(&fresh_url().await).await;
}

fn blob(kind: BlobKind, id: u8, pack: u8, offset: u64, length: u32) -> BlobLocation {
    BlobLocation {
        kind,
        id: BlobId([id; 32]),
        pack: PackId([pack; 32]),
        offset,
        length,
        raw_length: length.saturating_sub(28).wrapping_mul(3),
    }
}

fn pack(id: u8, size: u64, blobs: Vec<BlobLocation>) -> PackRecord {
    PackRecord {
        id: PackId([id; 32]),
        size,
        blobs,
    }
}

fn snapshot(id: u8, time_ns: i64) -> SnapshotRecord {
    SnapshotRecord {
        id: SnapshotId([id; 32]),
        time_ns,
        host: format!("host-{id}"),
        paths: vec![format!("/home/{id}"), "/etc".into()],
        tags: vec![],
        parent: None,
        tree: BlobId([id ^ 0xaa; 32]),
    }
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// A blob location as something to sort by: kind, id, pack, offset,
/// length, raw length.
type Key = (u8, [u8; 32], [u8; 32], u64, u32, u32);

fn key(b: &BlobLocation) -> Key {
    (
        b.kind as u8,
        b.id.0,
        b.pack.0,
        b.offset,
        b.length,
        b.raw_length,
    )
}

async fn blobs_of(s: &dyn MetaStore) -> Vec<Key> {
    sorted(s.blobs().await.unwrap().iter().map(key).collect())
}

fn keys(packs: &[&PackRecord]) -> Vec<Key> {
    sorted(packs.iter().flat_map(|p| p.blobs.iter().map(key)).collect())
}

async fn packs_and_blobs_are_recorded_and_listed(s: &dyn MetaStore) {
    assert!(
        s.packs().await.unwrap().is_empty(),
        "a new catalog is empty"
    );
    assert!(
        s.blobs().await.unwrap().is_empty(),
        "a new catalog is empty"
    );
    // Every kind, and values at the ends of their ranges.
    let p1 = pack(
        1,
        u64::MAX,
        vec![
            blob(BlobKind::Data, 1, 1, 0, 50),
            blob(BlobKind::Tree, 2, 1, 50, 1),
            blob(BlobKind::Snapshot, 3, 1, u64::MAX - 1, u32::MAX),
            blob(BlobKind::Index, 4, 1, 1 << 40, 0),
        ],
    );
    s.add_pack(&p1).await.unwrap();
    assert_eq!(s.packs().await.unwrap(), vec![(p1.id, u64::MAX)]);
    assert_eq!(blobs_of(s).await, keys(&[&p1]), "blobs round-trip");
    s.add_pack(&p1)
        .await
        .expect("recording a pack again succeeds");
    assert_eq!(
        s.packs().await.unwrap().len(),
        1,
        "a pack recorded twice is listed once"
    );
    assert_eq!(blobs_of(s).await, keys(&[&p1]), "and its blobs once");

    // Several at once, one of them empty; the same blob kept in two packs
    // has two locations.
    let p2 = pack(2, 0, vec![]);
    let p3 = pack(
        3,
        4096,
        vec![
            blob(BlobKind::Data, 1, 3, 100, 60),
            blob(BlobKind::Data, 5, 3, 160, 70),
        ],
    );
    s.add_packs(&[p2.clone(), p3.clone()]).await.unwrap();
    s.add_packs(&[]).await.unwrap();
    assert_eq!(
        sorted(s.packs().await.unwrap()),
        sorted(vec![(p1.id, u64::MAX), (p2.id, 0), (p3.id, 4096)])
    );
    assert_eq!(blobs_of(s).await, keys(&[&p1, &p3]));

    // Many blobs in one pack (more than a statement's worth of parameters).
    let many = pack(
        4,
        1 << 30,
        (0..5_000u32)
            .map(|i| BlobLocation {
                kind: BlobKind::Data,
                id: BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
                pack: PackId([4; 32]),
                offset: u64::from(i) * 1000,
                length: 1000,
                raw_length: i,
            })
            .collect(),
    );
    s.add_pack(&many).await.unwrap();
    assert_eq!(blobs_of(s).await, keys(&[&p1, &p3, &many]));
}

async fn removing_a_pack_forgets_its_blobs_only(s: &dyn MetaStore) {
    let p1 = pack(1, 10, vec![blob(BlobKind::Data, 1, 1, 0, 10)]);
    let p2 = pack(
        2,
        20,
        vec![
            blob(BlobKind::Data, 1, 2, 0, 10),
            blob(BlobKind::Tree, 2, 2, 10, 10),
        ],
    );
    s.add_packs(&[p1.clone(), p2.clone()]).await.unwrap();
    s.add_snapshot(&snapshot(1, 1)).await.unwrap();
    s.remove_pack(&p1.id).await.unwrap();
    assert_eq!(s.packs().await.unwrap(), vec![(p2.id, 20)]);
    assert_eq!(
        blobs_of(s).await,
        keys(&[&p2]),
        "the pack's blobs go with it, the same blob in another pack stays"
    );
    s.remove_pack(&p1.id)
        .await
        .expect("removing an absent pack succeeds");
    s.remove_pack(&PackId([9; 32])).await.unwrap();
    assert_eq!(s.snapshots().await.unwrap().len(), 1, "snapshots stay");
    // A removed pack can be recorded again.
    s.add_pack(&p1).await.unwrap();
    assert_eq!(blobs_of(s).await, keys(&[&p1, &p2]));
    s.remove_pack(&p2.id).await.unwrap();
    s.remove_pack(&p1.id).await.unwrap();
    assert!(s.packs().await.unwrap().is_empty());
    assert!(s.blobs().await.unwrap().is_empty());
}

async fn snapshots_round_trip_oldest_first(s: &dyn MetaStore) {
    assert!(s.snapshots().await.unwrap().is_empty());
    let first = SnapshotRecord {
        time_ns: i64::MIN + 1,
        host: String::new(),
        paths: vec![],
        ..snapshot(1, 0)
    };
    let second = SnapshotRecord {
        host: "hôte ünïcode 🦀".into(),
        paths: vec![
            "/a path/with spaces".into(),
            "C:\\windows\\style".into(),
            "\"quoted\", [bracketed]".into(),
        ],
        tags: vec!["daily".into(), "".into(), "a,b".into()],
        parent: Some(first.id),
        ..snapshot(2, 1_700_000_000_123_456_789)
    };
    let third = SnapshotRecord {
        parent: Some(second.id),
        ..snapshot(3, i64::MAX)
    };
    // Recorded out of order, listed oldest first.
    for snap in [&third, &first, &second] {
        s.add_snapshot(snap).await.unwrap();
    }
    assert_eq!(
        s.snapshots().await.unwrap(),
        vec![first.clone(), second.clone(), third.clone()],
        "snapshots round-trip, oldest first"
    );
    s.add_snapshot(&second)
        .await
        .expect("recording a snapshot again succeeds");
    assert_eq!(
        s.snapshots().await.unwrap().len(),
        3,
        "a snapshot recorded twice is listed once"
    );
    s.remove_snapshot(&second.id).await.unwrap();
    s.remove_snapshot(&second.id)
        .await
        .expect("removing an absent snapshot succeeds");
    assert_eq!(
        s.snapshots().await.unwrap(),
        vec![first.clone(), third.clone()],
        "a removed snapshot is forgotten, the others stay"
    );
}

async fn values_are_kept_and_replaced(s: &dyn MetaStore) {
    assert_eq!(s.get_value("absent").await.unwrap(), None);
    s.set_value("k", b"v1").await.unwrap();
    s.set_value("other", b"").await.unwrap();
    assert_eq!(s.get_value("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    s.set_value("k", &[0, 255, 0, 1]).await.unwrap();
    assert_eq!(
        s.get_value("k").await.unwrap().as_deref(),
        Some(&[0, 255, 0, 1][..]),
        "setting a value replaces it, any bytes"
    );
    assert_eq!(
        s.get_value("other").await.unwrap().as_deref(),
        Some(&b""[..]),
        "an empty value is not an absent one"
    );
    assert_eq!(s.get_value("K").await.unwrap(), None, "keys are exact");
    let big = vec![7u8; 64 * 1024];
    s.set_value("ключ/with:odd chars", &big).await.unwrap();
    assert_eq!(s.get_value("ключ/with:odd chars").await.unwrap(), Some(big));
}

async fn clear_forgets_all_but_values(s: &dyn MetaStore) {
    let p = pack(1, 10, vec![blob(BlobKind::Data, 1, 1, 0, 10)]);
    s.add_pack(&p).await.unwrap();
    s.add_snapshot(&snapshot(1, 1)).await.unwrap();
    s.set_value("k", b"v").await.unwrap();
    s.clear().await.unwrap();
    assert!(s.packs().await.unwrap().is_empty(), "clear forgets packs");
    assert!(s.blobs().await.unwrap().is_empty(), "clear forgets blobs");
    assert!(
        s.snapshots().await.unwrap().is_empty(),
        "clear forgets snapshots"
    );
    assert_eq!(
        s.get_value("k").await.unwrap().as_deref(),
        Some(&b"v"[..]),
        "values outlive a clear"
    );
    // A cleared catalog is rebuilt from the packs.
    s.add_pack(&p).await.unwrap();
    assert_eq!(blobs_of(s).await, keys(&[&p]));
}

async fn everything_outlives_close(url: &str) {
    let p = pack(1, 10, vec![blob(BlobKind::Tree, 1, 1, 0, 10)]);
    let snap = snapshot(1, 1);
    {
        let s = open(url).await;
        s.add_pack(&p).await.unwrap();
        s.add_snapshot(&snap).await.unwrap();
        s.set_value("k", b"v").await.unwrap();
        s.close().await;
    }
    let s = open(url).await;
    assert_eq!(
        s.packs().await.unwrap(),
        vec![(p.id, 10)],
        "packs outlive close"
    );
    assert_eq!(blobs_of(&*s).await, keys(&[&p]), "blobs outlive close");
    assert_eq!(s.snapshots().await.unwrap(), vec![snap]);
    assert_eq!(s.get_value("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    s.close().await;
}
