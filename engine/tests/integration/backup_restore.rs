use std::fs;
use std::path::Path;

use pluto_engine::backup::BackupOptions;
use pluto_engine::home::ChunkerConfig;
use pluto_engine::Config;

use super::common::*;

#[test]
fn round_trip_keeps_content_and_metadata() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    let r = h.backup(&[&src]);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.summary.files_new, 6);
    let target = h.path("out");
    let rr = h.restore("latest", &target, &[]);
    assert!(rr.errors.is_empty(), "{:?}", rr.errors);
    assert_same_tree(&src, &restored(&target, &src));
    let c = h.check(true);
    assert!(c.ok(), "{:?}", c.errors);
}

#[test]
fn identical_content_is_stored_once() {
    let h = TestHome::new();
    let src = h.path("src");
    fs::write(src.join("a"), bytes(9, 2 << 20, false)).unwrap();
    fs::write(src.join("b"), bytes(9, 2 << 20, false)).unwrap();
    let r = h.backup(&[&src]);
    let raw = r.summary.bytes_added_raw;
    assert!(raw < 3 << 20, "two equal files stored once, added {raw}");
    // The same content in another backup adds no data.
    let other = h.path("other");
    fs::write(other.join("c"), bytes(9, 2 << 20, false)).unwrap();
    let r2 = h.backup(&[&other]);
    assert!(r2.summary.bytes_read > 0);
    assert!(
        r2.summary.bytes_added_raw < 10_000,
        "only trees and the snapshot: {:?}",
        r2.summary
    );
}

#[test]
fn unchanged_files_are_not_read_again() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    let r = h.backup(&[&src]);
    assert_eq!(r.summary.bytes_read, 0, "{:?}", r.summary);
    assert_eq!(r.summary.files_unmodified, 6);
    // No data is new; at most the trees of the ancestors of the saved path
    // (/tmp's mtime changes whenever another test makes a directory there).
    assert!(
        r.summary.bytes_added_raw < 10_000 && r.summary.blobs_added <= 2,
        "only ancestor trees may be new: {:?}",
        r.summary
    );

    // Change one file: only it is read.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(src.join("docs/readme.txt"), b"changed").unwrap();
    let r = h.backup(&[&src]);
    assert_eq!(r.summary.files_changed, 1);
    assert_eq!(r.summary.files_unmodified, 5);
    assert_eq!(r.summary.bytes_read, 7);
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn inode_and_ctime_changes_are_noticed_unless_ignored() {
    let h = TestHome::new();
    let src = h.path("src");
    fs::write(src.join("f"), b"same bytes").unwrap();
    h.backup(&[&src]);
    // chmod changes ctime but not size or mtime.
    let chmod = |mode| {
        fs::set_permissions(
            src.join("f"),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap()
    };
    let opts = |ignore_inode| BackupOptions {
        paths: vec![src.clone()],
        ignore_inode,
        ..Default::default()
    };
    chmod(0o600);
    let r = h.backup_with(opts(false));
    assert_eq!(r.summary.files_changed, 1, "{:?}", r.summary);
    chmod(0o640);
    let r = h.backup_with(opts(true));
    assert_eq!(r.summary.files_unmodified, 1, "{:?}", r.summary);
}

#[test]
fn excludes_leave_out_names_and_paths() {
    let h = TestHome::new();
    let src = h.path("src");
    fs::create_dir_all(src.join("target/debug")).unwrap();
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::write(src.join("target/debug/x"), b"x").unwrap();
    fs::write(src.join("keep/a.o"), b"o").unwrap();
    fs::write(src.join("keep/a.c"), b"c").unwrap();
    let r = h.backup_with(BackupOptions {
        paths: vec![src.clone()],
        excludes: vec!["*.o".into(), format!("{}/target", src.display())],
        ..Default::default()
    });
    assert_eq!(r.summary.files_new, 1);
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    let out = restored(&target, &src);
    assert!(out.join("keep/a.c").exists());
    assert!(!out.join("keep/a.o").exists());
    assert!(!out.join("target").exists());
}

#[test]
fn the_home_is_never_backed_up_into_itself() {
    let h = TestHome::new();
    let top = h.dir.path().to_path_buf();
    fs::write(top.join("file"), b"data").unwrap();
    let r = h.backup(&[&top]);
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    let out = restored(&target, &top);
    assert!(out.join("file").exists());
    assert!(!out.join("home").exists(), "{:?}", r.summary);
}

#[test]
fn include_restores_only_part() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    let target = h.path("out");
    let only = src.join("docs");
    let rr = h.restore("latest", &target, &[&only]);
    assert!(rr.errors.is_empty());
    assert_same_tree(&only, &restored(&target, &only));
    assert!(!restored(&target, &src).join("bin").exists());
}

#[test]
fn several_paths_and_a_single_file() {
    let h = TestHome::new();
    let a = h.path("a");
    let b = h.path("b");
    fs::write(a.join("1"), b"one").unwrap();
    fs::write(b.join("2"), b"two").unwrap();
    let lone = h.dir.path().join("lone.txt");
    fs::write(&lone, b"lone").unwrap();
    h.backup(&[&a, &b, &lone]);
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    assert_same_tree(&a, &restored(&target, &a));
    assert_same_tree(&b, &restored(&target, &b));
    assert_eq!(fs::read(restored(&target, &lone)).unwrap(), b"lone");
}

#[test]
fn interrupted_restore_completes_on_a_second_run() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    let out = restored(&target, &src);
    // What an interrupted run leaves: a missing file, a temporary file, a
    // truncated file whose mtime is not the snapshot's. The second run
    // completes the first and removes its temporary files.
    fs::remove_file(out.join("bin/big")).unwrap();
    fs::write(
        out.join("bin/.blob.pluto-restore-0000000000000001"),
        b"partial",
    )
    .unwrap();
    fs::write(out.join("docs/readme.txt"), b"trunc").unwrap();
    let rr = h.restore("latest", &target, &[]);
    assert!(rr.errors.is_empty(), "{:?}", rr.errors);
    assert_eq!(rr.files_restored, 2, "{rr:?}");
    assert_eq!(rr.files_already_there, 4);
    assert_same_tree(&src, &out);
}

#[test]
fn catalog_is_rebuilt_from_packs_alone() {
    let mut h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    let first = h.backup(&[&src]).snapshot;
    fs::write(src.join("new"), b"new").unwrap();
    let second = h.backup(&[&src]).snapshot;
    h.repo = None;
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = fs::remove_file(h.home().join(f));
    }
    h.reopen();
    let repo = h.repo();
    assert!(h.rt.block_on(repo.snapshots()).unwrap().is_empty());
    let snaps = h.rt.block_on(repo.rebuild_catalog()).unwrap().snapshots;
    assert_eq!(snaps, 2);
    let ids: Vec<_> =
        h.rt.block_on(repo.snapshots())
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
    assert_eq!(ids, vec![first, second]);
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    assert_same_tree(&src, &restored(&target, &src));
    assert!(h.check(true).ok());
}

#[test]
fn small_packs_and_chunks_round_trip() {
    // Many packs and many chunks per file exercise pack rotation and the
    // parallel sealing of large files.
    let h = TestHome::with_config(Config {
        pack_size: 1 << 16,
        chunker: ChunkerConfig {
            min: 1 << 12,
            avg: 1 << 13,
            max: 1 << 14,
        },
        ..Config::default()
    });
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    let packs = h.repo().packs.list().unwrap().len();
    assert!(packs > 50, "{packs} packs");
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    assert_same_tree(&src, &restored(&target, &src));
    assert!(h.check(true).ok());
}

#[test]
fn snapshot_lookup_by_prefix() {
    let h = TestHome::new();
    let src = h.path("src");
    fs::write(src.join("f"), b"1").unwrap();
    let id = h.backup(&[&src]).snapshot;
    let repo = h.repo();
    let found =
        h.rt.block_on(repo.find_snapshot(&id.to_hex()[..6]))
            .unwrap();
    assert_eq!(found.id, id);
    assert!(
        h.rt.block_on(repo.find_snapshot("ffffffffffff0000"))
            .is_err()
            || id.to_hex().starts_with("ffffffffffff0000")
    );
    assert!(h.rt.block_on(repo.find_snapshot("")).is_err());
    let _ = Path::new("/");
}

#[test]
fn paths_inside_the_home_are_refused() {
    let h = TestHome::new();
    let inside = h.home().join("packs");
    let err = pluto_engine::backup::backup(
        h.repo(),
        h.rt.handle().clone(),
        &BackupOptions {
            paths: vec![inside],
            ..Default::default()
        },
        &pluto_engine::backup::NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("inside pluto's own"), "{err}");
}

#[test]
fn a_snapshot_written_but_not_listed_is_found_again() {
    // What a backup killed between writing its last pack and listing its
    // snapshot leaves behind.
    let h = TestHome::new();
    let src = h.path("src");
    fs::write(src.join("f"), b"data").unwrap();
    let id = h.backup(&[&src]).snapshot;
    h.rt.block_on(h.repo().catalog.remove_snapshot(&id))
        .unwrap();
    assert!(h.rt.block_on(h.repo().snapshots()).unwrap().is_empty());
    let next = h.backup(&[&src]);
    let ids: Vec<_> =
        h.rt.block_on(h.repo().snapshots())
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
    assert!(ids.contains(&id) && ids.contains(&next.snapshot), "{ids:?}");
}

#[test]
fn rebuild_skips_a_damaged_pack_and_says_so() {
    let h = TestHome::new();
    let src = h.path("src");
    sample_tree(&src);
    h.backup(&[&src]);
    let junk = b"not a pack at all".to_vec();
    let junk_id = pluto_plugins_api::PackId::of(&junk);
    h.repo().packs.put(&junk_id, &junk).unwrap();
    let report = h.rt.block_on(h.repo().rebuild_catalog()).unwrap();
    assert_eq!(report.snapshots, 1);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains(&junk_id.to_hex()));
    let target = h.path("out");
    h.restore("latest", &target, &[]);
    assert_same_tree(&src, &restored(&target, &src));
}
