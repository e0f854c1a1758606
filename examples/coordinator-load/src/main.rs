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

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use pluto_engine::client::CoordinatorClient;
use pluto_engine::keys::MasterKey;
use pluto_protocol::Message;
use tokio::sync::Semaphore;

// The channel plugin this tool uses.
use pluto_transport_mqtt as _;

#[derive(Parser, Debug)]
struct Args {
    /// The coordinator's channel.
    #[arg(long, default_value = "mqtt://127.0.0.1:18830")]
    url: String,
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let keys: Vec<_> = (0..args.nodes)
        .map(|_| MasterKey::generate().keys())
        .collect();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let url = Arc::new(args.url.clone());

    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in keys {
        let (gate, url) = (gate.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let t = Instant::now();
            match CoordinatorClient::connect(&url, &k, None, 1 << 30, true).await {
                Ok(c) => Some((c, t.elapsed())),
                Err(e) => {
                    eprintln!("auth failed: {e}");
                    None
                }
            }
        }));
    }
    let mut clients = Vec::new();
    let mut auth = Vec::new();
    for t in tasks {
        if let Ok(Some((c, d))) = t.await {
            clients.push(Arc::new(c));
            auth.push(d);
        }
    }
    let failed = args.nodes - clients.len();
    report("connect+authenticate", auth, failed, start.elapsed());

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
