//! A coordinator and 20 nodes, all from the command line
//! (`pluto-coordinator`, `pluto init`, `pluto daemon`, `pluto match`,
//! `pluto offer`, `pluto status`, `pluto peers`): they authenticate, match
//! (with a friend pinned in one node's config), and keep their books across
//! a coordinator killed with SIGKILL and a broker restart, with the
//! embedded broker and with Mosquitto.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pluto_plugins_api::BooksStore;

use super::common::*;

const NODES: usize = 20;

pub fn coordinator_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_pluto")).with_file_name("pluto-coordinator");
    assert!(
        p.exists(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build -p pluto-coordinator-bin`)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A child process whose stdout lines arrive on a channel; killed when dropped.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line containing `want`.
    pub fn wait_for(&self, want: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(want) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {want:?} within {within:?}: {e}"),
            }
        }
    }

    /// Forgets the lines printed so far.
    pub fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Coordinator {
    pub home: PathBuf,
    pub args: Vec<String>,
}

impl Coordinator {
    /// Starts it and waits for its ready line; returns it and its id.
    pub fn start(&self) -> (Proc, String) {
        std::fs::create_dir_all(&self.home).unwrap();
        let p = Proc::spawn(
            Command::new(coordinator_bin())
                .arg("--home")
                .arg(&self.home)
                .args(&self.args)
                .env("PLUTO_LOG", "info"),
            &self.home.join(format!("log-{}", now_ms())),
        );
        let line = p.wait_for("pluto-coordinator ", Duration::from_secs(30));
        let id = line.split_whitespace().nth(1).unwrap().to_string();
        (p, id)
    }
}

/// Where a test broker runs: inside the coordinator, or a Mosquitto of the
/// test's own (so it can be restarted without touching anyone else's).
enum Broker {
    Embedded,
    Mosquitto,
}

fn mosquitto(port: u16, dir: &Path) -> Proc {
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let bin = std::env::var("PLUTO_TEST_MOSQUITTO").unwrap_or_else(|_| "mosquitto".into());
    if let Err(e) = Command::new(&bin).arg("-h").output() {
        panic!(
            "PLUTO_TEST_MOSQUITTO: cannot run {bin} ({e}); install mosquitto or set \
             PLUTO_TEST_MOSQUITTO to its path (README.md, \"Run the tests\")"
        );
    }
    let p = Proc::spawn(
        Command::new(&bin).arg("-c").arg(&conf),
        &dir.join(format!("mosquitto-{}.log", now_ms())),
    );
    wait_port(port);
    p
}

#[derive(Debug, PartialEq, Eq)]
struct Books {
    offered: u64,
    held: u64,
    placed: u64,
}

fn books_of(home: &Path) -> Books {
    let s = json(&ok(pluto(home).args(["--json", "status"])));
    let c = &s["coordinator"];
    assert_eq!(c["state"], "connected", "{s}");
    Books {
        offered: c["offered"].as_u64().unwrap(),
        held: c["held"].as_u64().unwrap(),
        placed: c["placed"].as_u64().unwrap(),
    }
}

fn network(broker: Broker) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let config = dir.path().join("coordinator.toml");
    // A short clock: heartbeats every second, sweeps twice a second.
    std::fs::write(&config, "heartbeat_ms = 1000\nsweep_ms = 500\n").unwrap();
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    let mut mosq = None;
    match broker {
        Broker::Embedded => args.extend(["--listen".into(), format!("127.0.0.1:{port}")]),
        Broker::Mosquitto => {
            mosq = Some(mosquitto(port, dir.path()));
            args.extend(["--channel".into(), url.clone()]);
        }
    }
    let coordinator = Coordinator {
        home: dir.path().join("coordinator"),
        args,
    };
    let (mut running, coordinator_id) = coordinator.start();

    // 20 nodes join and stay connected.
    let homes: Vec<PathBuf> = (0..NODES)
        .map(|i| dir.path().join(format!("node{i:02}")))
        .collect();
    let mut ids = Vec::new();
    for home in &homes {
        let r = json(&ok(pluto(home)
            .args(["--json", "init", "--offer", "256M", "--coordinator"])
            .arg(format!("{url}#{coordinator_id}"))));
        ids.push(r["node_id"].as_str().unwrap().to_string());
    }
    let daemons: Vec<Proc> = homes
        .iter()
        .map(|h| {
            Proc::spawn(
                pluto(h).args(["--json", "daemon"]),
                &h.with_extension("daemon.log"),
            )
        })
        .collect();
    for d in &daemons {
        let line = d.wait_for("connected to coordinator", Duration::from_secs(30));
        assert!(line.contains(&coordinator_id[..8]), "{line}");
        // Holding: online in the books, and ready to take replicas.
        d.wait_for("holding", Duration::from_secs(30));
    }

    // Node 0 pins node 1 as a friend for one of its two copies.
    let cfg_path = homes[0].join("config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains("friends = []"), "{cfg}");
    let cfg = cfg
        .replace("friends = []", &format!("friends = [\"{}\"]", ids[1]))
        .replace("friend_copies = 0", "friend_copies = 1");
    std::fs::write(&cfg_path, cfg).unwrap();

    // Every node asks room for a 16 MiB pack, two copies.
    for (i, home) in homes.iter().enumerate() {
        let m = json(&ok(pluto(home).args(["--json", "match", "16M"])));
        let storers: Vec<&str> = m["storers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(storers.len(), 2, "{m}");
        assert_ne!(storers[0], storers[1], "distinct storers");
        assert!(!storers.contains(&ids[i].as_str()), "never itself");
        if i == 0 {
            assert!(storers.contains(&ids[1].as_str()), "the friend: {m}");
            assert_eq!(m["storers"][0]["friend"], true, "{m}");
        }
    }
    // Offers change from the command line, never below what is in use.
    ok(pluto(&homes[2]).args(["offer", "300M"]));
    fails(pluto(&homes[2]).args(["offer", "1M"]), "cannot offer less");
    let before: Vec<Books> = homes.iter().map(|h| books_of(h)).collect();
    assert_eq!(before[2].offered, 300 << 20);
    assert_eq!(
        before.iter().map(|b| b.placed).sum::<u64>(),
        (NODES as u64) * 2 * (16 << 20),
        "every copy is booked"
    );
    assert_eq!(
        before.iter().map(|b| b.held).sum::<u64>(),
        before.iter().map(|b| b.placed).sum::<u64>()
    );
    assert!(before.iter().all(|b| b.held <= b.offered));

    // The coordinator is killed (SIGKILL); with Mosquitto the broker is
    // restarted too. Both come back on their own addresses.
    running.kill();
    if let Some(mut m) = mosq.take() {
        m.kill();
        std::thread::sleep(Duration::from_millis(500));
        mosq = Some(mosquitto(port, dir.path()));
    }
    let restarted_at = now_ms();
    let (_running, again) = coordinator.start();
    assert_eq!(again, coordinator_id, "the same identity");

    // Every daemon reaches it again by itself: its heartbeats are heard.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = format!("sqlite:{}", coordinator.home.join("books.db").display());
    let books = rt
        .block_on(pluto_store_sqlite::SqliteBooks::open(&db))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = rt.block_on(books.nodes()).unwrap();
        let back = nodes
            .iter()
            .filter(|n| n.online && n.last_seen_ms > restarted_at)
            .count();
        if back == NODES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{back} of {NODES} nodes came back"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Nothing in the books was lost.
    let after: Vec<Books> = homes.iter().map(|h| books_of(h)).collect();
    assert_eq!(after, before);
    let peers = json(&ok(pluto(&homes[0]).args(["--json", "peers"])));
    assert!(peers["peers"].is_array(), "{peers}");
    drop(daemons);
    drop(mosq);
}

#[test]
fn twenty_nodes_on_the_embedded_broker_keep_their_books_across_restarts() {
    network(Broker::Embedded);
}

#[test]
fn twenty_nodes_on_mosquitto_keep_their_books_across_restarts() {
    network(Broker::Mosquitto);
}
