//! Joining a coordinator, and the mistakes made on the way: caught at once,
//! one line that says what to do, nothing left behind; while a coordinator
//! that is merely down is still waited for.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::common::*;
use super::network::{free_port, Coordinator, Proc};

/// A coordinator with its embedded broker on a port of its own.
fn coordinator(dir: &Path) -> (Proc, String, String) {
    let port = free_port();
    let (p, id) = Coordinator {
        home: dir.join(format!("coordinator-{port}")),
        args: vec!["--listen".into(), format!("127.0.0.1:{port}")],
    }
    .start();
    (p, id, format!("mqtt://127.0.0.1:{port}"))
}

/// Runs, expects failure with `want` in its one line, within `within`.
fn fails_fast(cmd: &mut Command, want: &str, within: Duration) -> Run {
    let t = Instant::now();
    let r = fails(cmd, want);
    assert!(t.elapsed() < within, "took {:?}: {}", t.elapsed(), r.stderr);
    r
}

fn config(home: &Path) -> String {
    std::fs::read_to_string(home.join("config.toml")).unwrap()
}

const QUICK: Duration = Duration::from_secs(5);

#[test]
fn init_refuses_a_coordinator_url_at_once_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    let nobody = format!("mqtt://127.0.0.1:{}", free_port());
    let nobody_keyed = format!("{nobody}#{}", "22".repeat(32));
    for (url, want) in [
        ("mqt://127.0.0.1:1883", "no channel plugin handles"),
        ("http://127.0.0.1:1883", "no channel plugin handles"),
        ("127.0.0.1:1883", "no channel plugin handles"),
        ("mqtt://127.0.0.1:port", "bad port"),
        // Nothing listens there: refused at once, not after a timeout.
        (nobody_keyed.as_str(), "cannot connect"),
        // No key, and trust on first use not asked for.
        (nobody.as_str(), "carries no coordinator key"),
        // A key that is not one.
        ("mqtt://127.0.0.1:1883#beef", "must be 64 hex digits"),
    ] {
        let r = fails_fast(
            pluto(&home).args(["init", "--coordinator", url]),
            want,
            QUICK,
        );
        assert!(
            r.stderr.contains("mqtt://HOST:PORT")
                || r.stderr.contains("nothing was created")
                || r.stderr.contains("hex digits")
                || r.stderr.contains("--coordinator-key KEY"),
            "{}",
            r.stderr
        );
        assert!(!home.exists(), "{url}: a home was left behind");
    }
    // Offline: the form is still checked, the coordinator is not contacted.
    fails(
        pluto(&home).args(["init", "--offline", "--coordinator", "mqt://x"]),
        "no channel plugin handles",
    );
    assert!(!home.exists());
    ok(pluto(&home).args([
        "init",
        "-q",
        "--offline",
        "--coordinator",
        &nobody,
        "--trust-first-use",
    ]));
    let c = config(&home);
    assert!(c.contains(&nobody), "{c}");
    assert!(!c.contains("coordinator_key"), "nothing pinned yet: {c}");
    // Offline with the key in the URL: pinned, and the URL kept without it.
    let keyed = dir.path().join("keyed");
    ok(pluto(&keyed).args(["init", "-q", "--offline", "--coordinator", &nobody_keyed]));
    let c = config(&keyed);
    assert!(c.contains(&format!("coordinator = \"{nobody}\"")), "{c}");
    assert!(c.contains(&"22".repeat(32)), "{c}");
}

#[test]
fn a_home_joins_a_coordinator_later_and_a_wrong_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, id, url) = coordinator(dir.path());
    let keyed = format!("{url}#{id}");
    let home = dir.path().join("node");
    ok(pluto(&home).args(["init", "-q"]));
    // Every hint names the way to join.
    fails(pluto(&home).arg("peers"), "pluto join URL");
    fails(pluto(&home).arg("daemon"), "pluto join URL");
    fails(
        pluto(&home).args(["init", "--coordinator", &keyed]),
        "pluto join URL",
    );
    // A key that is not the coordinator's: said so, with both keys, at once.
    let wrong = "11".repeat(32);
    let r = fails_fast(
        pluto(&home).args(["join", &url, "--coordinator-key", &wrong]),
        "not with the key given",
        QUICK,
    );
    assert!(
        r.stderr.contains(&id) && r.stderr.contains(&wrong),
        "{}",
        r.stderr
    );
    assert!(
        !config(&home).contains("coordinator"),
        "nothing was changed"
    );
    fails_fast(
        pluto(&home).args(["join", "mqt://x"]),
        "no channel plugin handles",
        QUICK,
    );
    // Without a key (and without --trust-first-use), or with two keys
    // that disagree: refused before anything is contacted.
    fails_fast(
        pluto(&home).args(["join", &url]),
        "carries no coordinator key",
        QUICK,
    );
    fails_fast(
        pluto(&home).args(["join", &keyed, "--coordinator-key", &wrong]),
        "give one of them",
        QUICK,
    );
    // The right URL (and key) joins at once, and pins the key.
    let t = Instant::now();
    ok(pluto(&home).args(["join", &url, "--coordinator-key", &id]));
    assert!(t.elapsed() < QUICK);
    let c = config(&home);
    assert!(c.contains(&url) && c.contains(&id), "{c}");
    let s = json(&ok(pluto(&home).args(["--json", "status"])));
    assert_eq!(s["coordinator"]["state"], "connected", "{s}");

    // Moving to another coordinator pins its key instead.
    let (_c2, id2, url2) = coordinator(dir.path());
    let r = json(&ok(pluto(&home).args([
        "--json",
        "join",
        &format!("{url2}#{id2}"),
    ])));
    assert_eq!(r["coordinator_key"], id2.as_str());
    assert_eq!(r["previous"], url.as_str());
    assert!(config(&home).contains(&id2));

    // A new home with a working URL: created at once, the key pinned.
    let home2 = dir.path().join("node2");
    let t = Instant::now();
    ok(pluto(&home2).args(["init", "-q", "--coordinator", &keyed]));
    assert!(t.elapsed() < QUICK);
    assert!(config(&home2).contains(&id));
    let wrong_home = dir.path().join("node3");
    fails_fast(
        pluto(&wrong_home).args(["init", "--coordinator", &url, "--coordinator-key", &wrong]),
        "not with the key given",
        QUICK,
    );
    assert!(!wrong_home.exists());
}

#[test]
fn the_daemon_stops_on_mistakes_and_waits_out_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    ok(pluto(&home).args([
        "init",
        "-q",
        "--offline",
        "--coordinator",
        "mqtt://x",
        "--trust-first-use",
    ]));
    super::exchange::set(&home, "coordinator", "\"mqt://127.0.0.1:1883\"");
    let r = fails_fast(pluto(&home).arg("daemon"), "pluto join URL", QUICK);
    assert_eq!(
        r.stderr.matches("no channel plugin handles").count(),
        1,
        "said once: {}",
        r.stderr
    );
    // The coordinator down: the daemon says so and tries again...
    super::exchange::set(&home, "coordinator", &format!("\"{url}\""));
    let d = Proc::spawn(pluto(&home).arg("daemon"), &dir.path().join("daemon.log"));
    d.wait_for("retrying", QUICK);
    // ...and connects once it is up.
    let (_c, id) = Coordinator {
        home: dir.path().join("coordinator"),
        args: vec!["--listen".into(), format!("127.0.0.1:{port}")],
    }
    .start();
    d.wait_for(
        &format!("connected to coordinator {}", &id[..8]),
        Duration::from_secs(20),
    );
}

#[test]
fn a_failed_upload_says_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    ok(pluto(&home).args([
        "init",
        "-q",
        "--offline",
        "--coordinator",
        "mqtt://x",
        "--trust-first-use",
    ]));
    super::exchange::set(&home, "coordinator", "\"mqt://127.0.0.1:1883\"");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), b"some data").unwrap();
    let r = run(pluto(&home).args(["-q", "backup"]).arg(&src));
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("no channel plugin handles").count(),
        1,
        "{}",
        r.stderr
    );
}
