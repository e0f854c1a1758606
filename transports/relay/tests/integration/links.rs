//! Links over an honest (or merely lossy) coordinator: the transport
//! conformance suite, then what is the relay's own (loss, timeouts, sessions).

use std::time::{Duration, Instant};

use pluto_plugins_api::{open_transport, Transport, TransportError, TransportOptions};
use pluto_transport_relay::{RelayConfig, RelayTransport};

use crate::hub::{fast, frame, id_of, node, options, seed, Hub, Relayed, Rng};

const MIB: usize = 1 << 20;

async fn pair(hub: &std::sync::Arc<Hub>, max_frame: usize) -> (RelayTransport, RelayTransport) {
    (
        node(hub, seed(1), max_frame, fast()),
        node(hub, seed(2), max_frame, fast()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_conformance() {
    // Every node on one coordinator; the suite gives each its own seed.
    let hub = Hub::new(64 * 1024);
    pluto_plugins_api::testkit::transport_conformance(|s, max_frame| {
        let t = node(&hub, s, max_frame, fast());
        async move { (id_of(&s), Box::new(t) as Box<dyn Transport>) }
    })
    .await;
}

#[tokio::test]
async fn the_plugin_registers_as_relay_and_needs_no_addresses() {
    let hub = Hub::new(64 * 1024);
    let a = open_transport("relay", options(&hub, seed(1), MIB))
        .await
        .unwrap();
    let b = node(&hub, seed(2), MIB, fast());
    assert_eq!(a.name(), "relay");
    assert!(a.addresses().is_empty());
    assert!(!a.reach().addresses);
    let mut out = a.connect(&id_of(&seed(2)), &[]).await.unwrap();
    assert_eq!(out.transport(), "relay");
    out.send(b"hi").await.unwrap();
    let mut inc = b.accept().await.unwrap();
    assert_eq!(inc.recv().await.unwrap().unwrap(), b"hi");
}

#[tokio::test]
async fn a_frame_over_the_receivers_limit_closes_the_link_on_both_ends() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = node(&hub, seed(2), 100_000, fast());
    let mut out = a.connect(&b.node(), &[]).await.unwrap();
    let mut inc = b.accept().await.unwrap();
    out.send(&vec![2; 300_000]).await.unwrap();
    match inc.recv().await {
        Err(TransportError::Closed(why)) => assert!(why.contains("limit"), "{why}"),
        other => panic!("expected a closed link, got {other:?}"),
    }
    // A hears about it.
    let r = tokio::time::timeout(Duration::from_secs(3), out.recv())
        .await
        .unwrap();
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn sixty_four_mib_through_one_link() {
    let hub = Hub::new(MIB - 256);
    let (a, b) = pair(&hub, MIB).await;
    let mut out = a.connect(&b.node(), &[]).await.unwrap();
    let mut inc = b.accept().await.unwrap();
    let n = 64;
    let template = frame(3, MIB);
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let mut f = template.clone();
            f[0] = i as u8;
            out.send(&f).await.unwrap();
        }
        out.finish().await.unwrap();
        out
    });
    let expected = frame(3, MIB);
    let mut got = 0;
    while let Some(f) = inc.recv().await.unwrap() {
        assert_eq!(f[0], got as u8);
        assert!(f[1..] == expected[1..], "frame {got} differs");
        got += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, n);
    drop(sender.await.unwrap());
    println!(
        "relay, in-memory hub: {n} MiB in {secs:.2} s = {:.0} MB/s",
        (n * MIB) as f64 / secs / 1e6
    );
}

#[tokio::test]
async fn a_lossy_reordering_coordinator_still_delivers_everything_in_order() {
    let hub = Hub::new(32 * 1024);
    let (a, b) = pair(&hub, MIB).await;
    let mut rng = Rng::new(7);
    let mut held: Option<Relayed> = None;
    hub.set_hook(Some(Box::new(move |r: Relayed| {
        if rng.chance(0.05) {
            return Vec::new();
        }
        if held.is_none() && rng.chance(0.1) {
            held = Some(r);
            return Vec::new();
        }
        match held.take() {
            Some(h) => vec![r, h],
            None => vec![r],
        }
    })));
    let mut out = a.connect(&b.node(), &[]).await.unwrap();
    let mut inc = b.accept().await.unwrap();
    let frames: Vec<Vec<u8>> = (0..120).map(|i| frame(i, (i * 15013) % 200_000)).collect();
    let sender = {
        let frames = frames.clone();
        tokio::spawn(async move {
            for f in &frames {
                out.send(f).await.unwrap();
            }
            out.finish().await.unwrap();
            // Kept until the peer has everything.
            assert_eq!(out.recv().await.unwrap(), None);
        })
    };
    let mut got = Vec::new();
    while let Some(f) = inc.recv().await.unwrap() {
        got.push(f);
    }
    inc.finish().await.unwrap();
    sender.await.unwrap();
    assert!(got == frames, "frames lost, altered or out of order");
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    // Registered with the hub, but no transport reads its payloads.
    let _port = hub.port(id_of(&seed(9)));
    let start = Instant::now();
    match a.connect(&id_of(&seed(9)), &[]).await {
        Err(TransportError::Unreachable(..)) => {}
        other => panic!("expected Unreachable, got {:?}", other.map(|l| l.peer())),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(a.sessions(), 0);
}

#[tokio::test]
async fn a_vanished_peer_fails_the_link_within_the_dead_peer_timeout() {
    let hub = Hub::new(64 * 1024);
    let (a, b) = pair(&hub, MIB).await;
    let mut out = a.connect(&b.node(), &[]).await.unwrap();
    let mut inc = b.accept().await.unwrap();
    out.send(b"hi").await.unwrap();
    assert_eq!(inc.recv().await.unwrap().unwrap(), b"hi");
    // The coordinator loses B for good.
    let b_id = b.node();
    hub.set_hook(Some(Box::new(move |r: Relayed| {
        if r.to == b_id || r.from == b_id {
            Vec::new()
        } else {
            vec![r]
        }
    })));
    let start = Instant::now();
    match out.recv().await {
        Err(TransportError::Closed(_)) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(out.send(b"more").await.is_err());
    assert!(inc.recv().await.is_err());
}

#[tokio::test]
async fn dropping_a_link_finishes_it_and_frees_both_sessions() {
    let hub = Hub::new(64 * 1024);
    let (a, b) = pair(&hub, MIB).await;
    let mut out = a.connect(&b.node(), &[]).await.unwrap();
    let mut inc = b.accept().await.unwrap();
    for i in 0..5 {
        out.send(&frame(i, 100_000)).await.unwrap();
    }
    drop(out);
    for i in 0..5 {
        assert_eq!(inc.recv().await.unwrap().unwrap(), frame(i, 100_000));
    }
    assert_eq!(inc.recv().await.unwrap(), None);
    // A is gone: B's sends fail soon, well before the dead-peer timeout.
    let start = Instant::now();
    let err = loop {
        match inc.send(&[0; 10_000]).await {
            Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => break e,
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "B's link stayed up"
        );
    };
    assert!(matches!(err, TransportError::Closed(_)), "{err:?}");
    drop(inc);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!((a.sessions(), b.sessions()), (0, 0));

    // A link dropped on the accepting side ends the other's receive (a
    // dropped link is finished) and then fails its sends.
    let mut out = a.connect(&b.node(), &[]).await.unwrap();
    let inc = b.accept().await.unwrap();
    drop(inc);
    let r = tokio::time::timeout(Duration::from_secs(1), out.recv())
        .await
        .unwrap();
    assert!(matches!(r, Ok(None)), "{r:?}");
    let start = Instant::now();
    while out.send(&[0; 1000]).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "A's link stayed up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn without_a_coordinator_session_the_transport_does_not_open() {
    let opts = TransportOptions {
        identity_seed: seed(1),
        listen: None,
        max_frame: MIB,
        relay: None,
    };
    match RelayTransport::open(opts).await {
        Err(TransportError::Config(_)) => {}
        other => panic!("expected Config, got {other:?}"),
    }
}

#[tokio::test]
async fn sessions_per_peer_are_capped() {
    let hub = Hub::new(64 * 1024);
    let cfg = RelayConfig {
        max_sessions_per_peer: 2,
        ..fast()
    };
    let a = node(&hub, seed(1), MIB, cfg.clone());
    let b = node(&hub, seed(2), MIB, cfg);
    let l1 = a.connect(&b.node(), &[]).await.unwrap();
    let l2 = a.connect(&b.node(), &[]).await.unwrap();
    assert!(matches!(
        a.connect(&b.node(), &[]).await,
        Err(TransportError::Unreachable(..))
    ));
    let (_i1, _i2) = (b.accept().await.unwrap(), b.accept().await.unwrap());
    drop((l1, l2));
}
