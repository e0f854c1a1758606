use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::common::*;

fn is_root() -> bool {
    // The owner of a file this process creates.
    let f = tempfile::NamedTempFile::new().unwrap();
    std::os::unix::fs::MetadataExt::uid(&f.as_file().metadata().unwrap()) == 0
}

/// Root reads every file, so as root the command runs as `nobody`.
fn as_unprivileged(cmd: &mut Command) -> &mut Command {
    if is_root() {
        cmd.uid(65534).gid(65534);
    }
    cmd
}

#[test]
fn unreadable_files_make_a_partial_snapshot_and_say_which() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    let shared = dir.path().join("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let home = if is_root() { shared.join("home") } else { home };
    ok(as_unprivileged(&mut pluto(&home)).arg("init"));

    let src = dir.path().join("src");
    fs::create_dir_all(src.join("locked-dir")).unwrap();
    fs::write(src.join("readable"), b"fine").unwrap();
    fs::write(src.join("secret"), b"no").unwrap();
    fs::write(src.join("locked-dir/inside"), b"no").unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("readable"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o000)).unwrap();

    let r = run(as_unprivileged(&mut pluto(&home)).arg("backup").arg(&src));
    assert_eq!(r.code, 3, "partial exit code: {} {}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{}: cannot read", src.join("secret").display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("locked-dir: cannot list"), "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("secret: cannot read").count(),
        1,
        "said once: {}",
        r.stderr
    );
    assert!(r.stderr.contains("partial"), "{}", r.stderr);

    let target = shared.join("out");
    ok(as_unprivileged(&mut pluto(&home))
        .args(["restore", "latest", "--target"])
        .arg(&target));
    let out = restored(&target, &src);
    assert_eq!(fs::read(out.join("readable")).unwrap(), b"fine");
    assert!(!out.join("secret").exists());
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o755)).unwrap();
}

fn pack_count(home: &Path) -> usize {
    let Ok(top) = fs::read_dir(home.join("packs")) else {
        return 0;
    };
    top.flatten()
        .filter(|e| e.file_name().len() == 2)
        .map(|e| fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0))
        .sum()
}

#[test]
fn a_backup_killed_midway_is_completed_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    ok(pluto(&home).arg("init"));
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let total = 40 * (8 << 20);
    for i in 0..40u64 {
        fs::write(src.join(format!("f{i:02}")), noise(i, 8 << 20)).unwrap();
    }

    let mut child = pluto(&home)
        .arg("-q")
        .arg("backup")
        .arg(&src)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while pack_count(&home) < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no packs appeared"
        );
        if child.try_wait().unwrap().is_some() {
            panic!("the backup finished before it could be killed; use more data");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let killed = child.wait().unwrap();
    assert_eq!(killed.code(), None, "it ended on its own: {killed:?}");
    let written = pack_count(&home);
    // It was cut off midway: packs on disk, no snapshot saved.
    assert!(written >= 4, "{written} packs");
    let none = json(&ok(pluto(&home).args(["--json", "snapshots"])));
    assert_eq!(none, serde_json::json!([]), "the first backup finished");

    let r = json(&ok(pluto(&home).args(["--json", "backup"]).arg(&src)));
    let added = r["summary"]["bytes_added_raw"].as_u64().unwrap();
    assert!(
        added + (written as u64 - 1) * (15 << 20) <= total as u64,
        "the second backup re-stored what the first wrote: {added} of {total} bytes, {written} packs"
    );
    ok(pluto(&home).args(["check", "--read-data"]));
    let target = dir.path().join("out");
    ok(pluto(&home)
        .args(["restore", "latest", "--target"])
        .arg(&target));
    same_content(&src, &restored(&target, &src));
}
