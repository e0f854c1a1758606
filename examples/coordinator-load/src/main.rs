//! Load test of a coordinator: connects N simulated nodes (one MQTT
//! connection each) from one process, authenticates them, then has each ask
//! for a match; prints nodes per second and p50/p99 latencies.
//!
//! ```text
//! pluto-coordinator --home /tmp/c --listen 127.0.0.1:18830 &
//! cargo run --release -p coordinator-load -- --url mqtt://127.0.0.1:18830 --nodes 10000
//! ```
//!
//! Each connection takes a file descriptor here and one in the broker: run
//! the coordinator in its own process and raise `ulimit -n` past N.
//!
//! Two more modes measure audits (challenges verified per second, their
//! latency and their bytes on the wire; see `bench/audits.sh`):
//!
//! - `--audits N`: after authenticating, owners (the first half of the
//!   nodes, see `--storers`) place replicas on storers and ask for N audits
//!   over the broker; the storers answer every challenge ([`audits`]).
//! - `--audits-in-process N`: the same against a coordinator of this
//!   process, through `Coordinator::handle`, with no broker ([`in_process`]).

mod audits;
mod in_process;
mod replicas;

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use pluto_engine::client::CoordinatorClient;
use pluto_engine::keys::{Keys, MasterKey};
use pluto_protocol::Message;
use tokio::sync::Semaphore;

// The channel plugin this tool uses.
use pluto_transport_mqtt as _;

/// Distinct blobs the replicas are made of (each with its proofs at hand).
const BLOBS: usize = 16;

#[derive(Parser, Debug)]
struct Args {
    /// The coordinator's channel.
    #[arg(long, default_value = "mqtt://127.0.0.1:18830")]
    url: String,
    /// Simulated nodes (in the audit modes, owners and storers together).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Handshakes in flight at once (and matches, and setup requests).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Audits to run over the broker instead of the match test.
    #[arg(long, default_value_t = 0)]
    audits: usize,
    /// Audits to run against a coordinator in this process (no broker).
    #[arg(long, default_value_t = 0, conflicts_with = "audits")]
    audits_in_process: usize,
    /// In the audit modes: how many of the nodes are storers (the rest own
    /// replicas); half by default.
    #[arg(long)]
    storers: Option<usize>,
    /// Replicas each owner places (each of another pack), round robin over
    /// the storers.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Bytes of each replica.
    #[arg(long, default_value_t = 64 << 10)]
    replica_size: usize,
    /// Audits in flight at once over the broker.
    #[arg(long, default_value_t = 200)]
    in_flight: usize,
    /// Tasks driving the in-process coordinator at once.
    #[arg(long, default_value_t = 4)]
    tasks: usize,
    /// A process whose CPU time over the audit run to report (Linux), as
    /// NAME=PID; may be repeated.
    #[arg(long, value_name = "NAME=PID")]
    cpu_of: Vec<String>,
    /// Makes the nodes' keys from this seed, so that runs with the same
    /// seed are the same nodes (a second run on Mosquitto finds their
    /// accounts made); random keys without it.
    #[arg(long)]
    key_seed: Option<u64>,
    /// Prints each node's broker account (user name and password, one
    /// line each) and stops: to make the accounts beforehand
    /// (bench/mosquitto-accounts.py).
    #[arg(long, requires = "key_seed")]
    print_accounts: bool,
}

impl Args {
    /// Owners and storers in the audit modes.
    fn split(&self) -> Result<(usize, usize)> {
        let storers = self.storers.unwrap_or(self.nodes / 2);
        if storers == 0 || storers >= self.nodes {
            bail!("the audit modes need at least one owner and one storer (--nodes, --storers)");
        }
        if self.replicas == 0 {
            bail!("--replicas must be above 0");
        }
        if self.replica_size == 0 {
            bail!("--replica-size must be above 0");
        }
        Ok((self.nodes - storers, storers))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut lat: Vec<Duration>, failed: usize, wall: Duration) {
    lat.sort_unstable();
    println!(
        "{name}: {} ok, {failed} failed in {:.2}s ({:.0}/s); p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

/// "proven 19998, timed out 2".
fn outcome_line(outcomes: &BTreeMap<String, usize>) -> String {
    outcomes
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `f(0..n)` as tasks, `concurrency` at once; their results in order,
/// or the first error.
async fn all<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (gate, fut) = (gate.clone(), f(i));
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Connects and authenticates a node per key, `concurrency` at once: each
/// session and how long it took, in the keys' order (None: it failed).
/// `n` nodes' keys: from `--key-seed` (the same nodes every run), or random.
fn node_keys(args: &Args, n: usize) -> Vec<Arc<Keys>> {
    (0..n)
        .map(|i| {
            Arc::new(
                match args.key_seed {
                    Some(seed) => MasterKey::from_entropy(
                        *blake3::hash(format!("coordinator-load {seed} {i}").as_bytes()).as_bytes(),
                    ),
                    None => MasterKey::generate(),
                }
                .keys(),
            )
        })
        .collect()
}

async fn connect_all(
    url: &str,
    keys: &[Arc<Keys>],
    concurrency: usize,
) -> Vec<Option<(Arc<CoordinatorClient>, Duration)>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let url = Arc::new(url.to_string());
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (gate, url, k) = (gate.clone(), url.clone(), k.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.ok()?;
                let t = Instant::now();
                match CoordinatorClient::connect(&url, &k, None, 1 << 30, true).await {
                    Ok(c) => {
                        let took = t.elapsed();
                        // Online, as its daemon's first heartbeat makes it:
                        // only online nodes are matched as storers.
                        if let Err(e) = c.request(&Message::Heartbeat).await {
                            eprintln!("heartbeat failed: {e}");
                        }
                        Some((Arc::new(c), took))
                    }
                    Err(e) => {
                        eprintln!("auth failed: {e}");
                        None
                    }
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for t in tasks {
        out.push(t.await.ok().flatten());
    }
    out
}

/// CPU time (user and system) of processes over a run, from
/// `/proc/PID/stat` (Linux, in clock ticks taken as 10 ms): this process
/// and those named with `--cpu-of`.
struct CpuWatch {
    /// Name, /proc path, ticks at the start.
    procs: Vec<(String, String, Option<u64>)>,
}

/// What a [`CpuWatch`] saw.
struct CpuReport {
    /// One line per process.
    lines: Vec<String>,
    /// This process's CPU seconds.
    own_seconds: Option<f64>,
}

impl CpuWatch {
    fn start(others: &[String]) -> Self {
        let mut procs = vec![("this process".to_string(), "/proc/self/stat".to_string())];
        for o in others {
            match o.split_once('=') {
                Some((name, pid)) if pid.parse::<u32>().is_ok() => {
                    procs.push((name.to_string(), format!("/proc/{pid}/stat")));
                }
                _ => eprintln!("--cpu-of {o}: expected NAME=PID; ignored"),
            }
        }
        Self {
            procs: procs
                .into_iter()
                .map(|(name, path)| {
                    let t = Self::ticks(&path);
                    (name, path, t)
                })
                .collect(),
        }
    }

    /// utime + stime (fields 14 and 15; the command name before them may
    /// hold spaces, so count from its closing parenthesis).
    fn ticks(path: &str) -> Option<u64> {
        let stat = std::fs::read_to_string(path).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }

    fn stop(self, wall: Duration, audits: usize) -> CpuReport {
        let mut lines = Vec::new();
        let mut own_seconds = None;
        for (i, (name, path, start)) in self.procs.into_iter().enumerate() {
            let (Some(start), Some(end)) = (start, Self::ticks(&path)) else {
                lines.push(format!("CPU of {name}: not readable from {path}"));
                continue;
            };
            let secs = end.saturating_sub(start) as f64 / 100.0;
            if i == 0 {
                own_seconds = Some(secs);
            }
            lines.push(format!(
                "CPU of {name}: {secs:.2} s ({:.0}% of one core), {:.0} µs per audit",
                secs * 100.0 / wall.as_secs_f64(),
                secs * 1e6 / audits.max(1) as f64
            ));
        }
        CpuReport { lines, own_seconds }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.audits_in_process > 0 {
        return in_process::run(&args).await;
    }
    if args.audits > 0 {
        return audits::run(&args).await;
    }
    let keys = node_keys(&args, args.nodes);
    if args.print_accounts {
        for k in &keys {
            println!(
                "{} {}",
                k.node_id().to_hex(),
                hex::encode(*k.broker_password())
            );
        }
        return Ok(());
    }
    let start = Instant::now();
    let connected = connect_all(&args.url, &keys, args.concurrency).await;
    let failed = connected.iter().filter(|c| c.is_none()).count();
    let (clients, auth): (Vec<_>, Vec<_>) = connected.into_iter().flatten().unzip();
    report("connect+authenticate", auth, failed, start.elapsed());

    let gate = Arc::new(Semaphore::new(args.concurrency));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in &clients {
        let (gate, c) = (gate.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let t = Instant::now();
            let req = Message::MatchRequest {
                pack: pluto_plugins_api::PackId([1; 32]),
                size: 16 << 20,
                copies: 2,
                friends: vec![],
                friend_copies: 0,
                exclude: vec![],
            };
            match c.request(&req).await {
                Ok(Message::MatchReply { .. }) => Some(t.elapsed()),
                other => {
                    eprintln!("match failed: {other:?}");
                    None
                }
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok(Some(d)) = t.await {
            lat.push(d);
        }
    }
    let failed = clients.len() - lat.len();
    report("match (2 copies of 16 MiB)", lat, failed, start.elapsed());
    Ok(())
}
