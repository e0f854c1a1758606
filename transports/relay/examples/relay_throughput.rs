//! How fast one relay link carries data through an in-memory coordinator:
//! `cargo run --release -p pluto-transport-relay --example relay_throughput [MiB] [links]`
//! sends MiB (default 256) in 1 MiB frames over `links` parallel links
//! (default 1) and prints MB/s. The hub is the test suite's: channels, no
//! network, so this measures the transport itself (crypto, segmentation,
//! acknowledgements), not a coordinator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/integration/hub.rs"]
mod hub;

use std::time::Instant;

use pluto_plugins_api::Transport;
use pluto_transport_relay::RelayConfig;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(256, |a| a.parse().expect("MiB"));
    let links: usize = args.next().map_or(1, |a| a.parse().expect("links"));
    // About what a coordinator carries: 1 MiB less room for its own framing.
    let hub = hub::Hub::new((1 << 20) - 256);
    let a = hub::node(&hub, hub::seed(1), 1 << 20, RelayConfig::default());
    let b = hub::node(&hub, hub::seed(2), 1 << 20, RelayConfig::default());
    let b_id = b.node();
    let frame = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..links {
            let mut l = b.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while let Some(f) = l.recv().await.unwrap() {
                    n += f.len();
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    let mut senders = Vec::new();
    for i in 0..links {
        let mut l = a.connect(&b_id, &[]).await.unwrap();
        let frame = frame.clone();
        let share = mib / links + usize::from(i < mib % links);
        senders.push(tokio::spawn(async move {
            for _ in 0..share {
                l.send(&frame).await.unwrap();
            }
            l.finish().await.unwrap();
            l
        }));
    }
    let mut keep = Vec::new();
    for s in senders {
        keep.push(s.await.unwrap());
    }
    let total = receiver.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, mib << 20);
    println!(
        "relay over an in-memory hub: {mib} MiB over {links} link(s) in {secs:.2} s = {:.0} MB/s",
        total as f64 / secs / 1e6
    );
}
