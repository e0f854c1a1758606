use std::fs;
use std::os::unix::fs::FileExt;

use pluto_engine::pack::PackWriter;
use pluto_engine::repo::snapshot_record;
use pluto_engine::restore::{restore, NoRestoreProgress, RestoreOptions};
use pluto_engine::snapshot::{Snapshot, Summary};
use pluto_engine::tree::{Node, NodeContent, Tree};
use pluto_plugins_api::{BlobKind, SnapshotId};

use super::common::*;

#[test]
fn a_flipped_byte_is_found_and_never_restored() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    assert!(h.check(true).ok());

    // Flip one byte inside the first blob of the biggest (data) pack.
    let (pack, _) = h
        .repo()
        .packs
        .list()
        .unwrap()
        .into_iter()
        .max_by_key(|p| p.1)
        .unwrap();
    let hex = pack.to_hex();
    let file = h.home().join("packs").join(&hex[..2]).join(&hex);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1000).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 1000).unwrap();
    drop(f);

    // The quick check only reads headers, which are intact.
    assert!(h.check(false).ok());
    let report = h.check(true);
    assert!(!report.ok());
    assert!(
        report.errors.iter().any(|e| e.contains(&hex)),
        "{:?}",
        report.errors
    );
    assert!(!report.damaged_files.is_empty());
    for d in &report.damaged_files {
        assert!(d.path.starts_with(&src.display().to_string()), "{d:?}");
    }
    let damaged: Vec<String> = report
        .damaged_files
        .iter()
        .map(|d| d.path.clone())
        .collect();

    // Restore: the damaged files fail, nothing wrong is written, the rest is intact.
    let target = h.path("out");
    let rr = h.restore("latest", &target, &[]);
    assert_eq!(
        rr.errors.len(),
        damaged.len(),
        "{:?} vs {damaged:?}",
        rr.errors
    );
    for path in &damaged {
        let out = target.join(path.trim_start_matches('/'));
        assert!(!out.exists(), "{} was written", out.display());
    }
    let out = restored(&target, &src);
    let mut intact = 0;
    for rel in [
        "docs/readme.txt",
        "docs/empty.txt",
        "bin/blob",
        "bin/big",
        "bin/copy-of-blob",
    ] {
        if damaged.iter().any(|d| d.ends_with(rel)) {
            continue;
        }
        assert_eq!(
            fs::read(out.join(rel)).unwrap(),
            fs::read(src.join(rel)).unwrap(),
            "{rel}"
        );
        intact += 1;
    }
    assert!(
        intact >= 1,
        "one flipped byte damaged everything: {damaged:?}"
    );
    // No temporary files are left behind.
    for e in fs::read_dir(out.join("bin")).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            !name.to_string_lossy().contains("pluto-restore"),
            "{name:?}"
        );
    }
}

/// Writes a snapshot whose root tree is `tree` as given, bypassing the
/// backup's own checks, as a hostile or buggy writer could.
fn plant_snapshot(h: &TestHome, tree: &Tree) -> SnapshotId {
    let repo = h.repo();
    let raw_tree = tree.encode();
    let (tree_id, sealed_tree) = repo.seal(BlobKind::Tree, &raw_tree);
    let snap = Snapshot {
        time_ns: 1,
        host: "h".into(),
        user: "u".into(),
        paths: vec![b"/x".to_vec()],
        tags: vec![],
        parent: None,
        tree: tree_id,
        excludes: vec![],
        summary: Summary::default(),
    };
    let raw_snap = snap.encode();
    let (snap_id, sealed_snap) = repo.seal(BlobKind::Snapshot, &raw_snap);
    let mut w = PackWriter::default();
    w.add(BlobKind::Tree, tree_id, &sealed_tree, raw_tree.len() as u32);
    w.add(
        BlobKind::Snapshot,
        snap_id,
        &sealed_snap,
        raw_snap.len() as u32,
    );
    let (rec, _) = repo.write_pack(w).unwrap();
    h.rt.block_on(repo.catalog.add_pack(&rec)).unwrap();
    let id = SnapshotId(snap_id.0);
    h.rt.block_on(repo.catalog.add_snapshot(&snapshot_record(id, &snap)))
        .unwrap();
    id
}

fn file_node(name: &[u8]) -> Node {
    Node {
        name: name.to_vec(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        inode: 0,
        device: 0,
        size: 0,
        content: NodeContent::File { chunks: vec![] },
    }
}

#[test]
fn a_hostile_tree_cannot_escape_the_target() {
    let h = TestHome::new();
    let outside = h.path("outside");
    let target = h.path("restore-here");
    for name in [&b".."[..], b"../outside/pwned", b"/etc/pwned", b"."] {
        let id = plant_snapshot(
            &h,
            &Tree {
                nodes: vec![file_node(name)],
            },
        );
        let repo = h.repo();
        let snap = h.rt.block_on(repo.find_snapshot(&id.to_hex())).unwrap();
        let index = h.rt.block_on(repo.load_index()).unwrap();
        let opts = RestoreOptions {
            target: target.clone(),
            ..Default::default()
        };
        let err = restore(repo, &index, &snap, &opts, &NoRestoreProgress).unwrap_err();
        assert!(err.to_string().contains("refusing entry name"), "{err}");
        // The damaged tree is also what check reports.
        assert!(!h.check(false).ok());
    }
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
    assert!(!std::path::Path::new("/etc/pwned").exists());
}

#[test]
fn links_already_in_the_target_are_not_followed() {
    let h = TestHome::new();
    let src = h.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/file"), b"data").unwrap();
    fs::write(src.join("plain"), b"plain").unwrap();
    h.backup(&[&src]);

    let outside = h.path("outside");
    let target = h.path("out");
    let out = restored(&target, &src);
    fs::create_dir_all(&out).unwrap();
    // A link where the snapshot has a directory, and one where it has a file.
    std::os::unix::fs::symlink(&outside, out.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), out.join("plain")).unwrap();
    fs::write(outside.join("victim"), b"untouched").unwrap();

    let rr = h.restore("latest", &target, &[]);
    assert!(rr.errors.is_empty(), "{:?}", rr.errors);
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert!(fs::symlink_metadata(out.join("sub")).unwrap().is_dir());
    assert_eq!(fs::read(out.join("sub/file")).unwrap(), b"data");
    assert!(fs::symlink_metadata(out.join("plain")).unwrap().is_file());
    assert_eq!(fs::read(out.join("plain")).unwrap(), b"plain");
}

#[test]
fn a_lost_pack_is_reported_with_the_files_it_held() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    let (pack, _) = h
        .repo()
        .packs
        .list()
        .unwrap()
        .into_iter()
        .max_by_key(|p| p.1)
        .unwrap();
    h.repo().packs.delete(&pack).unwrap();
    let report = h.check(false);
    assert!(
        report.errors.iter().any(|e| e.contains("missing")),
        "{:?}",
        report.errors
    );
    assert!(!report.damaged_files.is_empty());
}
