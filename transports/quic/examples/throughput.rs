//! How fast one QUIC link carries data between two nodes on this machine:
//! `cargo run --release -p pluto-transport-quic --example throughput [MiB] [links]`
//! sends MiB (default 1024) in 1 MiB frames over `links` parallel links
//! (default 1) and prints MB/s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use pluto_plugins_api::{open_transport, NodeId, TransportOptions};
use pluto_transport_quic as _;

fn seed(b: u8) -> [u8; 32] {
    [b; 32]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(1024, |a| a.parse().expect("MiB"));
    let links: usize = args.next().map_or(1, |a| a.parse().expect("links"));
    let opts = |s| TransportOptions {
        identity_seed: s,
        listen: Some("127.0.0.1:0".into()),
        max_frame: 1 << 20,
        relay: None,
    };
    let a = open_transport("quic", opts(seed(1))).await.unwrap();
    let b = open_transport("quic", opts(seed(2))).await.unwrap();
    let b_id = NodeId(
        ed25519_dalek::SigningKey::from_bytes(&seed(2))
            .verifying_key()
            .to_bytes(),
    );
    let addresses = b.addresses();
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
        let mut l = a.connect(&b_id, &addresses).await.unwrap();
        let frame = frame.clone();
        let count = mib / links + usize::from(i < mib % links);
        senders.push(tokio::spawn(async move {
            for _ in 0..count {
                l.send(&frame).await.unwrap();
            }
            l.finish().await.unwrap();
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let bytes = receiver.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} MiB over {links} QUIC link(s) in {secs:.2} s: {:.0} MB/s",
        bytes >> 20,
        bytes as f64 / secs / 1e6
    );
}
