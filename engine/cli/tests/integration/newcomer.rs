//! What a new user meets first: the recovery phrase copied as `init` shows
//! it, restore's `--include` and `--target` mistakes, the counts in the
//! summaries, and special files that backup leaves out.

use std::fs;
use std::path::Path;

use super::common::*;

/// The numbered grid of words exactly as `init` printed it.
fn grid(init_stdout: &str) -> String {
    init_stdout
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.ends_with('.') && t[..t.len() - 1].parse::<u32>().is_ok())
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn recover(home: &Path, words: &Path) -> Run {
    run(pluto(home)
        .args(["--json", "init", "--mnemonic-file"])
        .arg(words))
}

#[test]
fn the_recovery_phrase_is_taken_as_init_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = ok(pluto(&dir.path().join("home")).args(["init"]));
    let node = r.stdout.split_whitespace().nth(2).unwrap().to_string();
    let shown = grid(&r.stdout);
    assert_eq!(shown.lines().count(), 4, "{}", r.stdout);
    let words: Vec<&str> = shown
        .split_whitespace()
        .filter(|t| !t.ends_with('.'))
        .collect();
    assert_eq!(words.len(), 24);

    let f = dir.path().join("words.txt");
    let numbered = |f: &dyn Fn(usize, &str) -> String, sep: &str| {
        words
            .iter()
            .enumerate()
            .map(|(i, w)| f(i + 1, w))
            .collect::<Vec<_>>()
            .join(sep)
    };
    let forms = [
        shown.clone(),
        numbered(&|i, w| format!("{i}) {w}"), "\n"),
        numbered(&|i, w| format!("{i:02}\t{w}"), "\n"),
        numbered(&|i, w| format!("{i}. {w}"), "\t"),
        words.join("\n"),
    ];
    for (i, form) in forms.iter().enumerate() {
        fs::write(&f, form).unwrap();
        let home = dir.path().join(format!("again{i}"));
        let r = recover(&home, &f);
        assert_eq!(r.code, 0, "{form:?}: {}", r.stderr);
        assert_eq!(json(&r)["node_id"], node.as_str(), "{form:?}");
    }

    // Still refused, clearly, and nothing is left: a word that is not one,
    fs::write(&f, shown.replacen(words[4], "plutonium", 1)).unwrap();
    let home = dir.path().join("refused");
    let r = fails(
        pluto(&home).args(["init", "--mnemonic-file"]).arg(&f),
        "word 5 (\"plutonium\")",
    );
    assert!(
        r.stderr.contains("not a BIP39 English word"),
        "{}",
        r.stderr
    );
    assert!(!home.exists());
    // a checksum that does not match,
    let bad: String = (1..=24).map(|i| format!("{i:>2}. abandon\n")).collect();
    fs::write(&f, bad).unwrap();
    fails(
        pluto(&home).args(["init", "--mnemonic-file"]).arg(&f),
        "checksum does not match",
    );
    assert!(!home.exists());
    // and a word missing.
    let short: String = shown.lines().take(3).map(|l| format!("{l}\n")).collect();
    fs::write(&f, short).unwrap();
    fails(
        pluto(&home).args(["init", "--mnemonic-file"]).arg(&f),
        "has 18 words",
    );
    assert!(!home.exists());
}

/// A home with one snapshot of `src`: `src/{top, sub/a, sub/deep/b, other/c}`.
fn backed_up(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let home = dir.join("home");
    ok(pluto(&home).arg("init"));
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub/deep")).unwrap();
    fs::create_dir_all(src.join("other")).unwrap();
    fs::write(src.join("top"), b"top").unwrap();
    fs::write(src.join("sub/a"), b"a").unwrap();
    fs::write(src.join("sub/deep/b"), b"b").unwrap();
    fs::write(src.join("other/c"), b"c").unwrap();
    ok(pluto(&home).arg("-q").arg("backup").arg(&src));
    (home, src)
}

#[test]
fn restore_include_must_name_something_in_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (home, src) = backed_up(dir.path());
    let target = dir.path().join("out");

    // Absent from the snapshot: an error naming it, and nothing written.
    let missing = src.join("nosuch");
    let r = fails(
        pluto(&home)
            .args(["restore", "latest", "--target"])
            .arg(&target)
            .arg("--include")
            .arg(&missing),
        "is not in snapshot",
    );
    assert!(
        r.stderr.contains(&missing.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(!target.exists(), "nothing half-restored");
    // One of two includes missing: the same, before anything is written.
    fails(
        pluto(&home)
            .args(["restore", "latest", "--target"])
            .arg(&target)
            .arg("--include")
            .arg(src.join("sub"))
            .arg("--include")
            .arg(&missing),
        "nosuch is not in snapshot",
    );
    assert!(!target.exists());

    // Relative: taken from the current directory, as backup does.
    let r = fails(
        pluto(&home)
            .current_dir(&src)
            .args(["restore", "latest", "--target"])
            .arg(&target)
            .args(["--include", "nosuch"]),
        "is not in snapshot",
    );
    assert!(
        r.stderr.contains(&missing.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(!target.exists());
    let r = json(&ok(pluto(&home)
        .current_dir(dir.path())
        .args(["--json", "restore", "latest", "--target"])
        .arg(&target)
        .args(["--include", "src/sub/../sub"])));
    assert_eq!(r["files_restored"], 2);
    let out = restored(&target, &src);
    assert_eq!(fs::read(out.join("sub/deep/b")).unwrap(), b"b");
    assert!(!out.join("top").exists() && !out.join("other").exists());

    // An absolute include, and one naming a file, still restore.
    let target2 = dir.path().join("out2");
    let r = json(&ok(pluto(&home)
        .args(["--json", "restore", "latest", "--target"])
        .arg(&target2)
        .arg("--include")
        .arg(src.join("other"))
        .arg("--include")
        .arg(src.join("top"))));
    assert_eq!(r["files_restored"], 2);
    let out = restored(&target2, &src);
    assert_eq!(fs::read(out.join("other/c")).unwrap(), b"c");
    assert!(!out.join("sub").exists());
}

#[test]
fn restore_into_a_file_says_it_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _src) = backed_up(dir.path());
    let file = dir.path().join("a-file");
    fs::write(&file, b"keep me").unwrap();
    for target in [file.clone(), file.join("below")] {
        let r = fails(
            pluto(&home)
                .args(["restore", "latest", "--target"])
                .arg(&target),
            "is not a directory",
        );
        assert!(
            r.stderr.contains(&file.display().to_string()),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("os error"), "{}", r.stderr);
    }
    assert_eq!(fs::read(&file).unwrap(), b"keep me");
    // An existing directory is fine.
    let target = dir.path().join("there");
    fs::create_dir(&target).unwrap();
    ok(pluto(&home)
        .args(["-q", "restore", "latest", "--target"])
        .arg(&target));
}

#[test]
fn backup_and_restore_count_the_same_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let (home, src) = backed_up(dir.path());
    // src, sub, sub/deep, other: the parents leading to src are not counted.
    let b = ok(pluto(&home).arg("backup").arg(&src));
    assert!(b.stdout.contains(", 4 dirs"), "{}", b.stdout);
    let b = json(&ok(pluto(&home).args(["--json", "backup"]).arg(&src)));
    assert_eq!(b["summary"]["dirs"], 4);

    let r = ok(pluto(&home)
        .args(["restore", "latest", "--target"])
        .arg(dir.path().join("out")));
    assert!(r.stdout.contains(", 4 dirs"), "{}", r.stdout);
    let r = json(&ok(pluto(&home)
        .args(["--json", "restore", "latest", "--target"])
        .arg(dir.path().join("out2"))));
    assert_eq!(r["dirs"], 4);
    // With --include, what was chosen: sub and sub/deep.
    let r = json(&ok(pluto(&home)
        .args(["--json", "restore", "latest", "--target"])
        .arg(dir.path().join("out3"))
        .arg("--include")
        .arg(src.join("sub"))));
    assert_eq!(r["dirs"], 2);
}

#[test]
fn special_files_are_skipped_with_one_warning_each() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    ok(pluto(&home).arg("init"));
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("plain"), b"plain").unwrap();
    let fifo = src.join("pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let sock = src.join("sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());

    // Not partial: the snapshot holds everything backup saves.
    let r = ok(pluto(&home).arg("backup").arg(&src));
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{}", r.stderr);
    let pipe_line = format!("{}: skipped: a named pipe (FIFO)", fifo.display());
    let sock_line = format!("{}: skipped: a socket", sock.display());
    assert_eq!(r.stderr.matches(&pipe_line).count(), 1, "{}", r.stderr);
    assert_eq!(r.stderr.matches(&sock_line).count(), 1, "{}", r.stderr);
    assert!(r.stdout.contains("2 special files skipped"), "{}", r.stdout);

    let b = json(&ok(pluto(&home).args(["--json", "backup"]).arg(&src)));
    let skipped = b["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{b}");
    assert_eq!(skipped[0]["path"], fifo.display().to_string());
    assert_eq!(skipped[0]["kind"], "fifo");
    assert_eq!(skipped[1]["kind"], "socket");
    assert_eq!(b["warnings"].as_array().unwrap().len(), 0);

    // Without special files: no warning, nothing said about skipping.
    fs::remove_file(&fifo).unwrap();
    fs::remove_file(&sock).unwrap();
    let r = ok(pluto(&home).arg("backup").arg(&src));
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert!(!r.stdout.contains("skipped"), "{}", r.stdout);
}
