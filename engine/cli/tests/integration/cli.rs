use std::fs;

use super::common::*;

fn words_from_init(stdout: &str) -> Vec<String> {
    // "  1. fiber      2. library ..." lines.
    let mut words = Vec::new();
    for line in stdout.lines() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        if toks
            .first()
            .is_some_and(|t| t.ends_with('.') && t[..t.len() - 1].parse::<u32>().is_ok())
        {
            for pair in toks.chunks(2) {
                words.push(pair[1].to_string());
            }
        }
    }
    words
}

#[test]
fn init_shows_24_words_once_and_they_recover_everything() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let r = ok(pluto(&home).arg("init"));
    let words = words_from_init(&r.stdout);
    assert_eq!(words.len(), 24, "{}", r.stdout);
    let node = r.stdout.split_whitespace().nth(2).unwrap().to_string();
    let secrets = fs::metadata(home.join("secrets")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&secrets.permissions()) & 0o777,
        0o600
    );
    // The words are never shown again.
    fails(pluto(&home).arg("init"), "already holds a pluto home");

    let src = dir.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/file"), noise(1, 100_000)).unwrap();
    ok(pluto(&home).arg("backup").arg(&src));

    // A new machine: the words and the packs bring everything back.
    let words_file = dir.path().join("words.txt");
    fs::write(&words_file, words.join(" ") + "\n").unwrap();
    let home2 = dir.path().join("home2");
    let r = json(&ok(pluto(&home2)
        .args(["--json", "init", "--mnemonic-file"])
        .arg(&words_file)));
    assert_eq!(r["node_id"], node);
    assert!(
        r.get("mnemonic").is_none(),
        "a recovery does not print the words"
    );
    let copy = Command::new("cp")
        .arg("-a")
        .arg(home.join("packs"))
        .arg(&home2)
        .status()
        .unwrap();
    assert!(copy.success());
    ok(pluto(&home2).arg("rebuild-catalog"));
    let target = dir.path().join("out");
    ok(pluto(&home2)
        .args(["restore", "latest", "--target"])
        .arg(&target));
    same_content(&src, &restored(&target, &src));

    // --json init of a new identity carries the words, once.
    let r = json(&ok(
        pluto(&dir.path().join("home3")).args(["--json", "init"])
    ));
    assert_eq!(r["mnemonic"].as_str().unwrap().split(' ').count(), 24);
}

use std::process::Command;

#[test]
fn bad_recovery_phrases_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w");
    let cases = [
        ("abandon ".repeat(23) + "abandon", "checksum"),
        (
            "abandon ".repeat(23) + "plutonium",
            "not a BIP39 English word",
        ),
        ("abandon ".repeat(11) + "about", "exactly 24"),
    ];
    for (i, (phrase, want)) in cases.iter().enumerate() {
        fs::write(&f, phrase).unwrap();
        let home = dir.path().join(format!("h{i}"));
        fails(
            pluto(&home).arg("init").arg("--mnemonic-file").arg(&f),
            want,
        );
        assert!(!home.join("secrets").exists());
    }
}

#[test]
fn commands_report_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    ok(pluto(&home).arg("init"));
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/a"), b"a").unwrap();
    std::os::unix::fs::symlink("sub/a", src.join("link")).unwrap();

    let b = json(&ok(pluto(&home)
        .args(["--json", "backup", "--tag", "first"])
        .arg(&src)));
    assert_eq!(b["summary"]["files_new"], 1);
    let id = b["snapshot"].as_str().unwrap().to_string();

    let s = json(&ok(pluto(&home).args(["--json", "snapshots"])));
    assert_eq!(s[0]["id"], id);
    assert_eq!(s[0]["tags"][0], "first");
    assert_eq!(s[0]["paths"][0], src.display().to_string());

    let l = json(&ok(pluto(&home).args(["--json", "ls", &id[..8]]).arg(&src)));
    let paths: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    let p = |s: &str| src.join(s).display().to_string();
    assert!(paths.contains(&p("sub/a").as_str()), "{paths:?}");
    let link = l
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "symlink")
        .unwrap();
    assert_eq!(link["target"], "sub/a");
    let all = json(&ok(pluto(&home).args(["--json", "ls", "latest"])));
    assert!(
        all.as_array().unwrap().len() > 4,
        "ls without a path lists everything"
    );

    let c = json(&ok(pluto(&home).args(["--json", "check", "--read-data"])));
    assert_eq!(c["errors"].as_array().unwrap().len(), 0);

    let target = dir.path().join("out");
    let r = json(&ok(pluto(&home)
        .args(["--json", "restore", "latest", "--target"])
        .arg(&target)));
    assert_eq!(r["files_restored"], 1);
    assert_eq!(r["symlinks"], 1);

    // Plain ls lists paths in order, parents first.
    let plain = ok(pluto(&home).args(["ls", "latest"]).arg(&src)).stdout;
    let lines: Vec<&str> = plain.lines().collect();
    let want = [
        src.display().to_string(),
        p("link") + " -> sub/a",
        p("sub"),
        p("sub/a"),
    ];
    assert_eq!(lines, want);
}

#[test]
fn mistakes_get_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    fails(pluto(&home).arg("snapshots"), "pluto init");
    ok(pluto(&home).arg("init"));
    fails(
        pluto(&home).args(["restore", "nosuch", "--target", "/tmp/x"]),
        "no snapshot matches",
    );
    fails(
        pluto(&home).arg("backup").arg(dir.path().join("missing")),
        "cannot back up",
    );
    fs::write(home.join("config.toml"), "pack_size = \"big\"\n").unwrap();
    fails(pluto(&home).arg("snapshots"), "config");
    let r = run(pluto(&home).arg("frobnicate"));
    assert_eq!(r.code, 2, "usage errors exit 2");
}

/// Runs with standard output already closed by its reader.
fn into_closed_pipe(cmd: &mut std::process::Command) -> Run {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    r
}

#[test]
fn a_reader_that_goes_away_is_no_panic_and_no_unseen_words() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    // Nobody saw the words: nothing is left behind, init can run again.
    let r = into_closed_pipe(pluto(&home).arg("init"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("run init again"), "{}", r.stderr);
    assert!(!home.exists(), "no identity whose words nobody saw");
    ok(pluto(&home).arg("init"));
    // `pluto snapshots | head`: stops quietly, as if by SIGPIPE.
    let r = into_closed_pipe(pluto(&home).args(["--json", "snapshots"]));
    assert_eq!(r.code, 141, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
}
