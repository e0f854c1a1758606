//! Packs to peers and back, from the command line: a coordinator, storers
//! running `pluto daemon`, an owner that backs up, loses its packs, its
//! whole home, and the coordinator its books, and restores every time from
//! the peers alone. Each transport is forced once, and QUIC is made
//! unreachable so that the relay takes over.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::common::*;
use super::network::{coordinator_bin, free_port, now_ms, Coordinator, Proc};

/// A small network: a coordinator and storers with daemons running.
pub(super) struct Net {
    dir: tempfile::TempDir,
    pub(super) url: String,
    pub(super) coordinator: Coordinator,
    running: Proc,
    pub(super) storers: Vec<(PathBuf, Proc)>,
}

pub(super) fn set(home: &Path, key: &str, value: &str) {
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
        Self::start_with(storers, storer_config, "")
    }

    /// With more coordinator settings (TOML lines).
    pub(super) fn start_with(
        storers: usize,
        storer_config: &[(&str, &str)],
        coordinator: &str,
    ) -> Self {
        Self::start_at("127.0.0.1", storers, storer_config, coordinator)
    }

    /// With the coordinator listening on `host` (an IPv4 address of this
    /// machine).
    pub(super) fn start_at(
        host: &str,
        storers: usize,
        storer_config: &[(&str, &str)],
        coordinator: &str,
    ) -> Self {
        let port = free_port();
        Self::start_on(
            &format!("mqtt://{host}:{port}"),
            vec!["--listen".into(), format!("{host}:{port}")],
            storers,
            storer_config,
            coordinator,
        )
    }

    /// With the coordinator on `url`, started with `args` besides its
    /// settings.
    pub(super) fn start_on(
        url: &str,
        args: Vec<String>,
        storers: usize,
        storer_config: &[(&str, &str)],
        coordinator: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("coordinator.toml");
        std::fs::write(
            &config,
            format!("heartbeat_ms = 1000\nsweep_ms = 500\n{coordinator}"),
        )
        .unwrap();
        let coordinator = Coordinator {
            home: dir.path().join("coordinator"),
            args: ["--config".into(), config.display().to_string()]
                .into_iter()
                .chain(args)
                .collect(),
        };
        let (running, id) = coordinator.start();
        // As the coordinator prints it: with its key.
        let url = format!("{url}#{id}");
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
    pub(super) fn owner(&self, name: &str) -> (PathBuf, String) {
        let home = self.dir.path().join(name);
        let r = json(&ok(pluto(&home)
            .args(["--json", "init", "--offer", "256M", "--coordinator"])
            .arg(&self.url)));
        // Small packs, so a backup makes several.
        set(&home, "pack_size", "262144");
        (home, r["mnemonic"].as_str().unwrap().to_string())
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The coordinator is killed, loses its database and starts again
    /// empty (its key, a file of its own, stays). Returns when it was
    /// restarted (ms since the epoch).
    fn lose_books(&mut self) -> u64 {
        self.running.kill();
        let mut lost = Vec::new();
        for f in std::fs::read_dir(&self.coordinator.home).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.starts_with("books") {
                std::fs::remove_file(f.path()).unwrap();
                lost.push(name);
            }
        }
        assert!(
            lost.iter().any(|n| n == "books.db"),
            "no books to lose: {lost:?}"
        );
        let restarted_at = now_ms();
        let (running, _) = self.coordinator.start();
        self.running = running;
        restarted_at
    }

    /// The nodes in the coordinator's books, read beside it.
    fn books_nodes(&self) -> Vec<pluto_plugins_api::NodeRecord> {
        use pluto_plugins_api::BooksStore;
        let db = format!(
            "sqlite:{}",
            self.coordinator.home.join("books.db").display()
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let books = pluto_store_sqlite::SqliteBooks::open(&db).await.unwrap();
                books.nodes().await.unwrap()
            })
    }

    /// `pluto init --coordinator URL --mnemonic-file WORDS` into `home`.
    fn recovery(&self, home: &Path, words: &Path) -> Command {
        let mut c = pluto(home);
        c.args(["init", "--coordinator"])
            .arg(&self.url)
            .arg("--mnemonic-file")
            .arg(words);
        c
    }

    /// Kills every storer's daemon.
    fn stop_storers(&mut self) {
        for (_, d) in &mut self.storers {
            d.kill();
        }
    }

    /// Starts every storer's daemon again; each has reported what it holds.
    fn start_storers(&mut self) {
        for (home, d) in &mut self.storers {
            *d = daemon(home);
        }
    }
}

pub(super) fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("big.bin"), noise(1, 1_500_000)).unwrap();
    std::fs::write(dir.join("sub/medium.bin"), noise(2, 300_000)).unwrap();
    std::fs::write(dir.join("sub/deeper/small.txt"), b"hello, peers\n").unwrap();
    for i in 0..20 {
        std::fs::write(dir.join(format!("sub/f{i}.txt")), format!("file {i}\n")).unwrap();
    }
}

/// Backs up `data` from `home` and expects every pack to reach its copies.
pub(super) fn backup_placed(home: &Path, data: &Path) -> serde_json::Value {
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

/// Regular files below `dir` (0 when it does not exist).
fn files_under(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
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
    let rec = json(&ok(pluto(&home2)
        .args(["--json", "init", "--coordinator"])
        .arg(&net.url)
        .arg("--mnemonic-file")
        .arg(&words_file)));
    // Only the headers and the snapshots came: no pack is kept, and far
    // less than the 1.8 MB of data was fetched.
    assert_eq!(files_under(&home2.join("packs")), 0, "{rec}");
    assert!(rec["bytes_fetched"].as_u64().unwrap() < 600_000, "{rec}");
    restore_same(&home2, &data, &net.path("restore2"));
    assert!(
        files_under(&home2.join("packs")) >= 3,
        "the restore fetched the packs"
    );

    // The coordinator loses its books: it comes back empty, the storers
    // report what they hold again, and the words still bring it all back.
    let ids: Vec<String> = net.storers.iter().map(|(h, _)| node_id(h)).collect();
    for (_, d) in &net.storers {
        d.drain();
    }
    let restarted_at = net.lose_books();
    // Each daemon notices, connects again and reports what it holds (a
    // storer the matches passed over holds nothing to report).
    for (_, d) in &net.storers {
        d.wait_for("holding ", Duration::from_secs(60));
    }
    // The books are new ones: every storer registered again.
    let nodes = net.books_nodes();
    for id in &ids {
        let n = nodes.iter().find(|n| n.id.to_hex() == *id).unwrap();
        assert!(
            n.registered_ms >= restarted_at,
            "{id} kept its registration"
        );
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

/// Waits for `p` to end; its exit code.
fn exit_code(p: &mut Proc, within: Duration) -> i32 {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An owner's backup placed at the storers, its words in a file, and then
/// the coordinator's books lost while every storer is down: nobody holds
/// anything for anyone in the new books.
fn books_lost_storers_down(storers: usize) -> (Net, PathBuf, PathBuf) {
    let mut net = Net::start(storers, &[]);
    let (home, words) = net.owner("owner");
    let data = net.path("data");
    corpus(&data);
    backup_placed(&home, &data);
    let words_file = net.path("words");
    std::fs::write(&words_file, &words).unwrap();
    net.stop_storers();
    net.lose_books();
    assert!(
        standings(&net).iter().all(|n| n["held"] == 0),
        "{:?}",
        standings(&net)
    );
    (net, data, words_file)
}

#[test]
fn a_recovery_before_the_storers_are_back_waits_for_them() {
    let (mut net, data, words) = books_lost_storers_down(3);
    let home = net.path("owner-recovered");
    let log = net.path("recovery.log");
    let mut rec = Proc::spawn(&mut net.recovery(&home, &words), &log);
    // It finds nothing yet, says it waits, and goes on waiting.
    wait_until(
        "the recovery saying it waits",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("waiting for the storers to come back online")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(rec.child.try_wait().unwrap().is_none(), "it gave up early");
    assert!(home.join("recovering").exists());
    // The storers come back one by one, as their daemons reconnect.
    net.start_storers();
    assert_eq!(exit_code(&mut rec, Duration::from_secs(120)), 0, "{}", {
        std::fs::read_to_string(&log).unwrap()
    });
    rec.wait_for("recovered node", Duration::from_secs(1));
    let said = rec.wait_for("catalog rebuilt with", Duration::from_secs(1));
    assert!(said.contains("with 1 snapshots"), "{said}");
    assert!(!home.join("recovering").exists());
    restore_same(&home, &data, &net.path("restore"));
}

#[test]
fn a_recovery_that_finds_nothing_fails_and_leaves_no_home() {
    let (mut net, data, words) = books_lost_storers_down(2);
    let home = net.path("owner-recovered");

    // No storer at all: a short wait, then one line that says what to do,
    // exit 1, and nothing left behind.
    let r = fails(
        net.recovery(&home, &words).args(["-q", "--wait", "2"]),
        "no manifest of this node",
    );
    for want in [
        "after waiting 2s",
        "the coordinator the node used",
        "storers are online",
        "run init --mnemonic-file again",
        "nothing was kept",
    ] {
        assert!(r.stderr.contains(want), "{want:?}: {}", r.stderr);
    }
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(!home.exists());
    // Into a directory that was there: only what the recovery made goes.
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("mine"), b"x").unwrap();
    let r = run(net.recovery(&home, &words).args(["--json", "--wait", "0"]));
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.is_empty(),
        "--json has nothing to report: {}",
        r.stdout
    );
    let left: Vec<_> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["mine"]);
    std::fs::remove_dir_all(&home).unwrap();

    // Interrupted while it waits: nothing is kept either.
    let log = net.path("recovery-interrupted.log");
    let mut rec = Proc::spawn(&mut net.recovery(&home, &words), &log);
    wait_until("the recovery waiting", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).unwrap().contains("waiting")
    });
    ok(Command::new("kill")
        .arg("-INT")
        .arg(rec.child.id().to_string()));
    assert_eq!(exit_code(&mut rec, Duration::from_secs(30)), 1);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("interrupted by SIGINT"), "{said}");
    assert!(!home.exists());

    // Killed outright while it waits: the home stays marked, other commands
    // refuse it, and the next recovery takes it over.
    let log = net.path("recovery-killed.log");
    let mut rec = Proc::spawn(&mut net.recovery(&home, &words), &log);
    wait_until("the recovery waiting", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).unwrap().contains("waiting")
    });
    rec.kill();
    assert!(home.join("recovering").exists());
    fails(pluto(&home).arg("snapshots"), "did not finish");

    // With the storers back, running it again recovers everything.
    net.start_storers();
    let r = json(&ok(net.recovery(&home, &words).arg("--json")));
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["catalog"]["snapshots"], 1, "{r}");
    assert_eq!(r["packs_away"], 0, "{r}");
    assert!(!home.join("recovering").exists());
    restore_same(&home, &data, &net.path("restore"));
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

/// Bytes waiting unread in the UDP sockets of process `pid` (its QUIC
/// endpoint): what peers sent that it did not take.
fn udp_unread(pid: u32) -> u64 {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().to_string();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
                inodes.insert(n.to_string());
            }
        }
    }
    let mut unread = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx_queue:rx_queue tr retrnsmt uid timeout inode
            if f.len() > 9 && inodes.contains(f[9]) {
                let rx = f[4].split(':').nth(1).unwrap();
                unread += u64::from_str_radix(rx, 16).unwrap();
            }
        }
    }
    unread
}

pub(super) fn node_id(home: &Path) -> String {
    json(&ok(pluto(home).args(["--json", "status"])))["node_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Held object names (replica roots, hex) under a storer's home.
fn held_roots(home: &Path) -> std::collections::HashSet<String> {
    held_objects(home)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect()
}

#[test]
fn a_storer_gone_mid_upload_is_replaced() {
    let mut net = Net::start(3, &[]);
    let (home, _) = net.owner("owner");
    let data = net.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..8 {
        std::fs::write(data.join(format!("f{i}")), noise(10 + i, 2_000_000)).unwrap();
    }
    let ids: Vec<String> = net.storers.iter().map(|(h, _)| node_id(h)).collect();
    let (dead_home, dead) = (net.storers[0].0.clone(), ids[0].clone());
    let log = net.path("backup.log");
    let mut child = pluto(&home)
        .args(["--json", "backup"])
        .arg(&data)
        .env("PLUTO_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let running = |child: &mut std::process::Child| {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before the fault; give it more data"
        );
    };

    // The storer takes part: it holds some replicas of this backup...
    wait_until(
        "a first replica at the storer",
        Duration::from_secs(60),
        || {
            running(&mut child);
            !held_objects(&dead_home).is_empty()
        },
    );
    // ...then stops taking anything (SIGSTOP), while the coordinator still
    // lists it for a few heartbeats: the owner's packets pile up unread in
    // its socket, so a replica was on its way when it went...
    let pid = net.storers[0].1.child.id();
    ok(Command::new("kill").arg("-STOP").arg(pid.to_string()));
    wait_until(
        "bytes sent to the stopped storer",
        Duration::from_secs(20),
        || {
            running(&mut child);
            udp_unread(pid) > 0
        },
    );
    // ...and it is gone for good.
    running(&mut child);
    net.storers[0].1.kill();
    let kept_by_dead = held_roots(&dead_home);

    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Two storers are left for two copies: everything is placed.
    assert_eq!(out.status.code(), Some(0), "{r} {stderr}");
    assert_eq!(r["upload"]["short"], 0, "{r}");
    assert_eq!(r["upload"]["complete"], r["upload"]["packs"], "{r}");
    // The owner saw sends to it fail, and says which packs.
    assert!(
        r["upload"]["problems"].as_array().unwrap().iter().any(|p| p
            .as_str()
            .unwrap()
            .contains(&format!("storer {}", &dead[..8]))),
        "{r}"
    );
    let failed: std::collections::HashSet<String> = stderr
        .lines()
        .filter(|l| l.contains(&format!("storer {} failed", &dead[..8])))
        .map(|l| {
            let at = l.find("pack ").unwrap() + 5;
            l[at..at + 8].to_string()
        })
        .collect();
    assert!(!failed.is_empty(), "{stderr}");

    // The placement: every pack has its two copies; those the dead storer
    // failed are at the others; it is named only for what it holds whole.
    let placement = pluto_engine::manifest::Placement::load(&home.join("placement")).unwrap();
    let held: Vec<_> = net.storers.iter().map(|(h, _)| held_roots(h)).collect();
    let mut at_dead = 0;
    for (pack, p) in &placement.packs {
        assert_eq!(p.replicas.len(), 2, "pack {}", pack.short());
        let names_dead = p.replicas.iter().any(|x| x.storer.to_hex() == dead);
        if failed.contains(&pack.short()) {
            assert!(
                !names_dead,
                "pack {} still at the dead storer",
                pack.short()
            );
        }
        for x in &p.replicas {
            let i = ids.iter().position(|id| *id == x.storer.to_hex()).unwrap();
            let root = pluto_plugins_api::PackId(x.root).to_hex();
            assert!(held[i].contains(&root), "{root} is not at {}", &ids[i][..8]);
            if i == 0 {
                at_dead += 1;
                assert!(kept_by_dead.contains(&root));
            }
        }
    }
    // It held something whole before it went (a replica whose receipt it
    // never sent is not in the placement, so the placement may name it
    // for none), and not everything.
    assert!(!kept_by_dead.is_empty());
    assert!(at_dead < placement.packs.len(), "{at_dead}");

    // The restore needs nothing from the dead storer.
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

/// The coordinator's view of every node (`pluto-coordinator status --json`).
pub(super) fn standings(net: &Net) -> Vec<serde_json::Value> {
    let r = ok(Command::new(coordinator_bin())
        .arg("--home")
        .arg(&net.coordinator.home)
        .args(["status", "--json"]));
    serde_json::from_str(&r.stdout).unwrap()
}

/// Files under a storer's held store (one per replica).
pub(super) fn held_objects(home: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![home.join("held")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.file_name().is_some_and(|n| n.len() == 64) && !is_outboard(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Whether a held object is a replica's outboard (its tree of hashes)
/// rather than a replica.
fn is_outboard(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"PLUTOOB1")
}

pub(super) fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_cheating_storer_is_caught_excluded_and_repaired() {
    // Audits on a short clock: every storer at least twice a second.
    let mut net = Net::start_with(
        3,
        &[],
        "audit_tick_ms = 100\nstorer_audit_every_ms = 500\naudit_every_ms = 20000\n\
         proof_deadline_ms = 5000\nstanding_every_ms = 1000\n",
    );
    let (home, _) = net.owner("owner");
    // Many small packs: two hundred replicas or so per storer.
    for (k, v) in [
        ("pack_size", "65536"),
        ("min", "8192"),
        ("avg", "16384"),
        ("max", "32768"),
        ("daemon_every", "1"),
    ] {
        set(&home, k, v);
    }
    let data = net.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..26 {
        std::fs::write(data.join(format!("f{i}.bin")), noise(100 + i, 1_000_000)).unwrap();
    }
    backup_placed(&home, &data);
    // Every replica of the snapshot proven, from the command line.
    let proven = json(&ok(pluto(&home).args(["--json", "check", "--remote"])));
    assert_eq!(proven["failed"], 0, "{proven}");
    assert_eq!(proven["proven"], proven["replicas"], "{proven}");
    assert!(
        proven["replicas"].as_u64().unwrap() >= 600,
        "{}",
        proven["replicas"]
    );

    // The storer holding most deletes 1% of it behind everyone's back, and
    // carries on (restarted, so nothing it had open keeps the bytes).
    let (i, held) = net
        .storers
        .iter()
        .map(|(h, _)| held_objects(h))
        .enumerate()
        .max_by_key(|(_, v)| v.len())
        .unwrap();
    let cheater_home = net.storers[i].0.clone();
    let gone = held.len() / 100;
    assert!(gone >= 2, "{} replicas held", held.len());
    net.storers[i].1.kill();
    for p in held.iter().step_by(held.len() / gone).take(gone) {
        std::fs::remove_file(p).unwrap();
    }
    net.storers[i].1 = daemon(&cheater_home);
    let cheater = json(&ok(pluto(&cheater_home).args(["--json", "status"])))["node_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The owner's audit finds it at once; the coordinator's schedule would too.
    let r = run(pluto(&home).args(["--json", "check", "--remote"]));
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let found = json(&r);
    assert!(found["failed"].as_u64().unwrap() >= gone as u64, "{found}");
    let failed_at: Vec<&str> = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["outcome"] == "failed")
        .map(|x| x["storer"].as_str().unwrap())
        .collect();
    assert!(failed_at.iter().all(|s| *s == cheater), "{failed_at:?}");
    let excluded = |net: &Net| {
        standings(net)
            .into_iter()
            .find(|n| n["id"] == cheater.as_str())
            .is_some_and(|n| n["excluded"] == true)
    };
    wait_until("the cheater's exclusion", Duration::from_secs(90), || {
        excluded(&net)
    });
    let peers = json(&ok(pluto(&home).args(["--json", "peers"])));
    let seen = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == cheater.as_str())
        .unwrap()
        .clone();
    assert_eq!(seen["excluded"], true, "{seen}");
    assert!(seen["audits"]["failed"].as_u64().unwrap() >= 1, "{seen}");
    // Honest storers are untouched.
    for n in standings(&net) {
        if n["id"] != cheater.as_str() {
            assert_eq!(
                (n["excluded"].clone(), n["audits_failed"].clone()),
                (false.into(), 0.into()),
                "{n}"
            );
        }
    }

    // The owner's daemon moves everything off the cheater, from the
    // local packs or the other replica, and releases its claim.
    drop_local_packs(&home);
    std::fs::create_dir_all(home.join("packs")).unwrap();
    let d = daemon(&home);
    d.wait_for("repair: ", Duration::from_secs(120));
    wait_until(
        "the cheater holding nothing",
        Duration::from_secs(120),
        || {
            standings(&net)
                .into_iter()
                .find(|n| n["id"] == cheater.as_str())
                .is_some_and(|n| n["held"] == 0)
        },
    );
    wait_until(
        "every pack with its copies again",
        Duration::from_secs(120),
        || {
            let s = json(&ok(pluto(&home).args(["--json", "status"])));
            s["packs_placed"] == s["packs"]
        },
    );
    let fine = json(&ok(pluto(&home).args(["--json", "check", "--remote"])));
    assert_eq!(fine["failed"], 0, "{fine}");
    assert!(
        fine["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["storer"] != cheater.as_str() && x["outcome"] == "proven"),
        "{fine}"
    );
    drop(d);
    // Nothing was lost: the snapshot restores from the honest peers alone.
    drop_local_packs(&home);
    restore_same(&home, &data, &net.path("restore"));
}

/// A node's line in the coordinator's books.
pub(super) fn standing(net: &Net, id: &str) -> serde_json::Value {
    standings(net)
        .into_iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not in the books"))
}

#[test]
fn a_daemon_busy_uploading_stays_online_and_proves_what_it_holds() {
    // Audits on a short clock; a node is offline after 3 heartbeats (3 s)
    // without one.
    let net = Net::start_with(
        2,
        &[],
        "audit_tick_ms = 100\nstorer_audit_every_ms = 1000\naudit_every_ms = 20000\n\
         proof_deadline_ms = 5000\nstanding_every_ms = 1000\n",
    );
    // A node that saved a snapshot before it joined, and has a slow
    // uplink: its daemon spends most of a minute placing it.
    let busy = net.path("busy");
    ok(pluto(&busy).args(["init", "--offer", "256M"]));
    set(&busy, "pack_size", "1048576");
    set(&busy, "daemon_every", "1");
    let mine = net.path("busy-data");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("big.bin"), noise(7, 6_000_000)).unwrap();
    ok(pluto(&busy).arg("backup").arg(&mine));
    {
        let text = std::fs::read_to_string(busy.join("config.toml")).unwrap();
        let joined = format!(
            "coordinator = \"{}\"\nupload_limit = 262144\n{text}",
            net.url
        );
        std::fs::write(busy.join("config.toml"), joined).unwrap();
    }
    let busy_id = node_id(&busy);
    let d = daemon(&busy);

    // Another owner keeps a copy of everything with the busy node.
    let (home, _) = net.owner("owner");
    set(&home, "friends", &format!("[\"{busy_id}\"]"));
    set(&home, "friend_copies", "1");
    let data = net.path("data");
    corpus(&data);
    let started = std::time::Instant::now();
    backup_placed(&home, &data);
    let held_for_owner = held_objects(&busy).len();
    assert!(held_for_owner >= 3, "{held_for_owner} replicas held");

    // While the busy node uploads, it stays online in the books, and every
    // audit of what it holds is proven.
    let mut rounds = 0;
    loop {
        let st = json(&ok(pluto(&busy).args(["--json", "status"])));
        let uploading = st["packs_placed"] != st["packs"];
        let n = standing(&net, &busy_id);
        assert_eq!(n["online"], true, "offline while uploading: {n}");
        if !uploading {
            break;
        }
        let audited = json(&ok(pluto(&home).args(["--json", "check", "--remote"])));
        assert_eq!(audited["failed"], 0, "{audited}");
        assert_eq!(audited["proven"], audited["replicas"], "{audited}");
        rounds += 1;
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the upload never finished"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The upload took longer than three heartbeat intervals, and audits
    // ran through it.
    assert!(rounds >= 3, "only {rounds} rounds: the upload was not slow");
    let n = standing(&net, &busy_id);
    assert_eq!(n["audits_timed_out"], 0, "{n}");
    assert!(n["audits_passed"].as_u64().unwrap() >= 3, "{n}");
    drop(d);
}

#[test]
fn sigterm_mid_receive_leaves_nothing_half_written() {
    let mut net = Net::start(2, &[]);
    let (home, _) = net.owner("owner");
    // Packs of 2 MiB sent at 256 KiB/s: each replica takes seconds.
    set(&home, "pack_size", "2097152");
    let text = std::fs::read_to_string(home.join("config.toml")).unwrap();
    std::fs::write(
        home.join("config.toml"),
        format!("upload_limit = 262144\n{text}"),
    )
    .unwrap();
    let data = net.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.bin"), noise(3, 3_000_000)).unwrap();
    let backup = Command::new(env!("CARGO_BIN_EXE_pluto"))
        .arg("--home")
        .arg(&home)
        .args(["--json", "backup"])
        .arg(&data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A storer in the middle of receiving a replica: a temporary object
    // with some bytes in it.
    let receiving = |h: &Path| {
        std::fs::read_dir(h.join("held/tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
    };
    let mut victim = None;
    wait_until("a storer receiving", Duration::from_secs(60), || {
        victim = net.storers.iter().position(|(h, _)| receiving(h));
        victim.is_some()
    });
    let i = victim.unwrap();
    let storer_home = net.storers[i].0.clone();
    let pid = net.storers[i].1.child.id();
    ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(s) = net.storers[i].1.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    // Nothing half-written: no temporary object left, and every object in
    // the store is a whole replica the restarted daemon holds, or the
    // first bytes of the interrupted transfer, kept for resuming under a
    // name of their own and listed as such.
    assert!(!receiving(&storer_home), "a temporary object is left");
    let kept = std::fs::read_dir(storer_home.join("held-manifests"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("partial-")
        })
        .count();
    let objects = held_objects(&storer_home).len() - kept;
    let out = backup.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restarted = Proc::spawn(
        pluto(&storer_home).arg("daemon").env("PLUTO_LOG", "info"),
        &storer_home.with_extension("restarted.log"),
    );
    let line = restarted.wait_for("holding ", Duration::from_secs(30));
    assert!(
        line.contains(&format!("holding {objects} replicas")),
        "{line}, {objects} objects"
    );
    net.storers[i].1 = restarted;
    // The owner's next placement completes, and every replica is proven.
    let again = json(&ok(pluto(&home).args(["--json", "backup"]).arg(&data)));
    assert_eq!(again["upload"]["short"], 0, "{again}");
    let audited = json(&ok(pluto(&home).args(["--json", "check", "--remote"])));
    assert_eq!(audited["proven"], audited["replicas"], "{audited}");
    assert!(held_objects(&storer_home).len() >= objects);
}
