//! Packs to peers and back, from the command line: a coordinator, storers
//! running `pluto daemon`, an owner that backs up, loses its packs, its
//! whole home, and the coordinator its books, and restores every time from
//! the peers alone. Each transport is forced once, and QUIC is made
//! unreachable so that the relay takes over.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::common::*;
use super::network::{free_port, Coordinator, Proc};

/// A small network: a coordinator and storers with daemons running.
struct Net {
    dir: tempfile::TempDir,
    url: String,
    coordinator: Coordinator,
    running: Proc,
    storers: Vec<(PathBuf, Proc)>,
}

fn set(home: &Path, key: &str, value: &str) {
    let path = home.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    let mut done = false;
    for line in text.lines() {
        if !done && line.starts_with(&format!("{key} =")) {
            out.push_str(&format!("{key} = {value}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(done, "{key} not in config");
    std::fs::write(&path, out).unwrap();
}

fn daemon(home: &Path) -> Proc {
    let p = Proc::spawn(
        pluto(home).arg("daemon").env("PLUTO_LOG", "info"),
        &home.with_extension("daemon.log"),
    );
    p.wait_for("holding ", Duration::from_secs(30));
    p
}

impl Net {
    fn start(storers: usize, storer_config: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let url = format!("mqtt://127.0.0.1:{port}");
        let config = dir.path().join("coordinator.toml");
        std::fs::write(&config, "heartbeat_ms = 1000\nsweep_ms = 500\n").unwrap();
        let coordinator = Coordinator {
            home: dir.path().join("coordinator"),
            args: vec![
                "--config".into(),
                config.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ],
        };
        let (running, _) = coordinator.start();
        let mut list = Vec::new();
        for i in 0..storers {
            let home = dir.path().join(format!("storer{i}"));
            ok(pluto(&home)
                .args(["init", "--offer", "256M", "--coordinator"])
                .arg(&url));
            for (k, v) in storer_config {
                set(&home, k, v);
            }
            let d = daemon(&home);
            list.push((home, d));
        }
        Self {
            dir,
            url,
            coordinator,
            running,
            storers: list,
        }
    }

    /// A new owner node; returns its home and its 24 words.
    fn owner(&self, name: &str) -> (PathBuf, String) {
        let home = self.dir.path().join(name);
        let r = json(&ok(pluto(&home)
            .args(["--json", "init", "--offer", "256M", "--coordinator"])
            .arg(&self.url)));
        // Small packs, so a backup makes several.
        set(&home, "pack_size", "262144");
        (home, r["mnemonic"].as_str().unwrap().to_string())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("big.bin"), noise(1, 1_500_000)).unwrap();
    std::fs::write(dir.join("sub/medium.bin"), noise(2, 300_000)).unwrap();
    std::fs::write(dir.join("sub/deeper/small.txt"), b"hello, peers\n").unwrap();
    for i in 0..20 {
        std::fs::write(dir.join(format!("sub/f{i}.txt")), format!("file {i}\n")).unwrap();
    }
}

/// Backs up `data` from `home` and expects every pack to reach its copies.
fn backup_placed(home: &Path, data: &Path) -> serde_json::Value {
    let r = json(&ok(pluto(home).args(["--json", "backup"]).arg(data)));
    let up = &r["upload"];
    assert!(up["packs"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(up["short"], 0, "{r}");
    assert_eq!(up["complete"], up["packs"], "{r}");
    r
}

/// Restores the latest snapshot into a fresh directory and compares.
fn restore_same(home: &Path, data: &Path, target: &Path) {
    ok(pluto(home)
        .args(["restore", "latest", "--target"])
        .arg(target));
    same_content(data, &restored(target, data));
}

fn drop_local_packs(home: &Path) {
    std::fs::remove_dir_all(home.join("packs")).unwrap();
}

#[test]
fn backup_to_peers_restore_recover_with_books_wiped() {
    let mut net = Net::start(3, &[]);
    let (home, words) = net.owner("owner");
    let data = net.path("data");
    corpus(&data);

    let r = backup_placed(&home, &data);
    assert!(r["upload"]["replicas_sent"].as_u64().unwrap() >= 6, "{r}");
    // Two copies of every pack, each at another storer.
    let peers = json(&ok(pluto(&home).args(["--json", "peers"])));
    let holding: Vec<_> = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["replicas_held"].as_u64().unwrap() > 0)
        .collect();
    assert!(holding.len() >= 2, "{peers}");
    assert!(holding.iter().all(|p| p["transport"] == "quic"), "{peers}");

    let st = json(&ok(pluto(&home).args(["--json", "status"])));
    assert_eq!(st["packs_placed"], st["packs"], "{st}");

    // A second backup of the same data sends only its new snapshot.
    let again = json(&ok(pluto(&home).args(["--json", "backup"]).arg(&data)));
    assert!(
        again["upload"]["replicas_sent"].as_u64().unwrap() <= 2,
        "{again}"
    );
    assert!(
        again["upload"]["bytes_sent"].as_u64().unwrap() < 10_000,
        "{again}"
    );

    // The local packs are gone: the restore fetches from the peers.
    drop_local_packs(&home);
    restore_same(&home, &data, &net.path("restore1"));
    ok(pluto(&home).args(["check", "--read-data"]));

    // The machine is gone: a new home from the words alone.
    let words_file = net.path("words");
    std::fs::write(&words_file, &words).unwrap();
    let home2 = net.path("owner-recovered");
    ok(pluto(&home2)
        .args(["init", "--coordinator"])
        .arg(&net.url)
        .arg("--mnemonic-file")
        .arg(&words_file));
    restore_same(&home2, &data, &net.path("restore2"));

    // The coordinator loses its books: it comes back empty, the storers
    // report what they hold again, and the words still bring it all back.
    for (_, d) in &net.storers {
        d.drain();
    }
    net.running.kill();
    for f in std::fs::read_dir(&net.coordinator.home).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().to_string();
        if name.starts_with("books") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    let (running, _) = net.coordinator.start();
    net.running = running;
    // Each daemon notices, connects again and reports what it holds (a
    // storer the matches passed over holds nothing to report).
    for (_, d) in &net.storers {
        d.wait_for("holding ", Duration::from_secs(60));
    }
    let home3 = net.path("owner-recovered-again");
    ok(pluto(&home3)
        .args(["init", "--coordinator"])
        .arg(&net.url)
        .arg("--mnemonic-file")
        .arg(&words_file));
    restore_same(&home3, &data, &net.path("restore3"));
    // The books know the replicas again.
    let peers = json(&ok(pluto(&home3).args(["--json", "peers"])));
    let held: u64 = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["replicas_held"].as_u64().unwrap())
        .sum();
    assert!(held >= 6, "{peers}");
}

/// Backup and restore with only `transports`, storers announcing
/// `announce` (a dead QUIC address makes the relay take over).
fn through(transports: &str, announce: Option<&str>, want: &str) {
    let extra: Vec<(&str, &str)> = announce.map(|a| ("announce", a)).into_iter().collect();
    let net = Net::start(2, &extra);
    let (home, _) = net.owner("owner");
    set(&home, "transports", transports);
    let data = net.path("data");
    corpus(&data);
    backup_placed(&home, &data);
    let peers = json(&ok(pluto(&home).args(["--json", "peers"])));
    for p in peers["peers"].as_array().unwrap() {
        if p["replicas_held"].as_u64().unwrap() > 0 {
            assert_eq!(p["transport"], want, "{peers}");
        }
    }
    drop_local_packs(&home);
    restore_same(&home, &data, &net.path("restore"));
}

#[test]
fn only_quic() {
    through(r#"["quic"]"#, None, "quic");
}

#[test]
fn only_relay() {
    through(r#"["relay"]"#, None, "relay");
}

#[test]
fn quic_unreachable_falls_back_to_relay() {
    through(
        r#"["quic", "relay"]"#,
        Some(r#"["quic:127.0.0.1:9"]"#),
        "relay",
    );
}

#[test]
fn a_storer_gone_mid_upload_is_replaced() {
    let mut net = Net::start(3, &[]);
    let (home, _) = net.owner("owner");
    // Big enough that the upload takes a moment.
    let data = net.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..8 {
        std::fs::write(data.join(format!("f{i}")), noise(10 + i, 2_000_000)).unwrap();
    }
    let mut backup = Command::new(env!("CARGO_BIN_EXE_pluto"));
    backup
        .arg("--home")
        .arg(&home)
        .args(["--json", "backup"])
        .arg(&data);
    let child = backup
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // One storer dies while packs are on their way.
    std::thread::sleep(Duration::from_millis(700));
    net.storers[0].1.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Two storers are left for two copies: everything is placed.
    assert_eq!(out.status.code(), Some(0), "{r} {stderr}");
    assert_eq!(r["upload"]["short"], 0, "{r}");
    drop_local_packs(&home);
    restore_same(&home, &data, &net.path("restore"));
}

#[test]
fn too_few_storers_exit_4_and_the_daemon_finishes() {
    let mut net = Net::start(1, &[]);
    let (home, _) = net.owner("owner");
    let data = net.path("data");
    corpus(&data);
    let r = run(pluto(&home).args(["--json", "backup"]).arg(&data));
    assert_eq!(r.code, 4, "{} {}", r.stdout, r.stderr);
    let v = json(&r);
    assert!(v["upload"]["short"].as_u64().unwrap() > 0, "{v}");
    assert!(r.stderr.contains("lack copies"), "{}", r.stderr);
    // A second storer joins; the owner's daemon places the rest.
    let home2 = net.path("late-storer");
    ok(pluto(&home2)
        .args(["init", "--offer", "256M", "--coordinator"])
        .arg(&net.url));
    net.storers.push((home2.clone(), daemon(&home2)));
    let d = daemon(&home);
    d.wait_for("packs placed", Duration::from_secs(60));
    let placed = json(&ok(pluto(&home).args(["--json", "backup"]).arg(&data)));
    assert_eq!(placed["upload"]["short"], 0, "{placed}");
}
