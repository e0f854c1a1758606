//! A hostile coordinator: it alters, forges, replays, misattributes and
//! answers for others. Links either carry exactly what was sent or fail.

use std::sync::Arc;
use std::time::Duration;

use pluto_plugins_api::{Link, Transport, TransportError};
use pluto_transport_relay::wire::{self, Hello, Kind, Welcome};

use crate::hub::{fast, frame, node, seed, Hub, Relayed, Rng};

const MIB: usize = 1 << 20;

/// Sends `frames` from `out` to `inc` and returns what `inc` received, or
/// the first error of either end.
async fn carry(
    mut out: Box<dyn Link>,
    mut inc: Box<dyn Link>,
    frames: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, TransportError> {
    let sender = tokio::spawn(async move {
        for f in &frames {
            out.send(f).await?;
        }
        out.finish().await?;
        out.recv().await.map(|_| ())
    });
    let mut got = Vec::new();
    while let Some(f) = inc.recv().await? {
        got.push(f);
    }
    inc.finish().await?;
    sender.await.unwrap()?;
    Ok(got)
}

#[tokio::test]
async fn altered_forged_and_replayed_payloads_never_reach_the_application() {
    let hub = Hub::new(16 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = node(&hub, seed(2), MIB, fast());
    let mut rng = Rng::new(11);
    let mut seen: Vec<Relayed> = Vec::new();
    hub.set_hook(Some(Box::new(move |mut r: Relayed| {
        let mut out = Vec::new();
        let sealed = wire::header(&r.payload).map(|h| h.kind) == Ok(Kind::Sealed);
        if sealed && rng.chance(0.2) {
            // Replay something seen before, to the same node.
            if let Some(old) = seen.get((rng.next() as usize) % seen.len().max(1)) {
                out.push(Relayed {
                    from: old.from,
                    to: old.to,
                    payload: old.payload.clone(),
                });
            }
        }
        if sealed && seen.len() < 200 {
            seen.push(Relayed {
                from: r.from,
                to: r.to,
                payload: r.payload.clone(),
            });
        }
        if sealed && rng.chance(0.2) {
            // A forged payload in the same session.
            let mut forged = r.payload.clone();
            let body = wire::SEALED_HEADER_LEN..forged.len();
            for b in &mut forged[body] {
                *b = rng.next() as u8;
            }
            out.push(Relayed {
                from: r.from,
                to: r.to,
                payload: forged,
            });
        }
        if sealed && rng.chance(0.1) {
            // One flipped bit, anywhere.
            let at = (rng.next() as usize) % r.payload.len();
            r.payload[at] ^= 1 << (rng.next() % 8);
        }
        out.push(r);
        out
    })));
    let out = a.connect(&b.node(), &[]).await.unwrap();
    let inc = b.accept().await.unwrap();
    let frames: Vec<Vec<u8>> = (0..60).map(|i| frame(i, (i * 7717) % 100_000)).collect();
    let got = carry(out, inc, frames.clone()).await.unwrap();
    assert!(got == frames, "altered data was delivered");
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.unauthenticated + sb.unauthenticated > 0, "{sa:?} {sb:?}");
    assert!(sa.replayed + sb.replayed > 0, "{sa:?} {sb:?}");
}

#[tokio::test]
async fn an_answer_signed_by_another_key_fails_the_connect() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = Arc::new(node(&hub, seed(2), MIB, fast()));
    let (a_id, b_id) = (a.node(), b.node());
    // The coordinator answers A's opening itself, as B, with its own key.
    let mallory = ed25519_dalek::SigningKey::from_bytes(&seed(66));
    hub.set_hook(Some(Box::new(move |r: Relayed| {
        let Ok(hello) = Hello::decode(&r.payload) else {
            return vec![r];
        };
        let mut w = Welcome {
            sid: hello.sid,
            ephemeral: [9; 32],
            signature: [0; 64],
        };
        use ed25519_dalek::Signer;
        w.signature = mallory.sign(&w.transcript(&hello)).to_bytes();
        vec![Relayed {
            from: b_id,
            to: a_id,
            payload: w.encode(),
        }]
    })));
    let accepting = {
        let b = b.clone();
        tokio::spawn(async move { b.accept().await.map(|l| l.peer()) })
    };
    match a.connect(&b_id, &[]).await {
        Err(TransportError::WrongPeer { expected, .. }) => assert_eq!(expected, b_id),
        other => panic!("expected WrongPeer, got {:?}", other.map(|l| l.peer())),
    }
    assert!(a.stats().refused_handshakes > 0);
    // B never saw an opening, let alone accepted one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!accepting.is_finished());
    accepting.abort();
}

#[tokio::test]
async fn a_coordinator_that_swaps_the_key_exchange_gets_no_link() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = Arc::new(node(&hub, seed(2), MIB, fast()));
    let b_id = b.node();
    // It puts its own ephemeral key into A's opening (and forwards the rest).
    hub.set_hook(Some(Box::new(move |mut r: Relayed| {
        if let Ok(mut hello) = Hello::decode(&r.payload) {
            hello.ephemeral = [5; 32];
            r.payload = hello.encode();
        }
        vec![r]
    })));
    let accepting = {
        let b = b.clone();
        tokio::spawn(async move { b.accept().await.map(|l| l.peer()) })
    };
    match a.connect(&b_id, &[]).await {
        Err(TransportError::Unreachable(..) | TransportError::WrongPeer { .. }) => {}
        other => panic!(
            "expected a failed connect, got {:?}",
            other.map(|l| l.peer())
        ),
    }
    assert!(b.stats().refused_handshakes > 0, "{:?}", b.stats());
    assert!(!accepting.is_finished());
    accepting.abort();
}

#[tokio::test]
async fn payloads_the_coordinator_misattributes_are_dropped() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = node(&hub, seed(2), MIB, fast());
    let c = node(&hub, seed(3), MIB, fast());
    let (a_id, c_id) = (a.node(), c.node());
    // Openings from A arrive at B as if from C: refused.
    hub.set_hook(Some(Box::new(move |mut r: Relayed| {
        if r.from == a_id {
            r.from = c_id;
        }
        vec![r]
    })));
    assert!(matches!(
        a.connect(&b.node(), &[]).await,
        Err(TransportError::Unreachable(..))
    ));
    assert!(b.stats().refused_handshakes > 0);
    // Mid-link, copies of A's payloads named as from C are dropped.
    hub.set_hook(None);
    let out = a.connect(&b.node(), &[]).await.unwrap();
    let inc = b.accept().await.unwrap();
    hub.set_hook(Some(Box::new(move |r: Relayed| {
        let copy = Relayed {
            from: c_id,
            to: r.to,
            payload: r.payload.clone(),
        };
        vec![copy, r]
    })));
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(i, i * 3000)).collect();
    assert!(carry(out, inc, frames.clone()).await.unwrap() == frames);
    assert!(b.stats().wrong_sender > 0, "{:?}", b.stats());
    drop(c);
}

#[tokio::test]
async fn garbage_payloads_are_dropped_and_links_survive() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = node(&hub, seed(2), MIB, fast());
    let mut rng = Rng::new(3);
    // Learn session ids from the real traffic, then aim garbage at them.
    let mut sids: Vec<[u8; 16]> = Vec::new();
    hub.set_hook(Some(Box::new(move |r: Relayed| {
        if let Ok(h) = wire::header(&r.payload) {
            if !sids.contains(&h.sid) {
                sids.push(h.sid);
            }
        }
        let mut out = vec![];
        for _ in 0..2 {
            let n = (rng.next() % 300) as usize;
            let mut g = rng.bytes(n);
            if n >= wire::HEADER_LEN && rng.chance(0.7) {
                g[0] = wire::VERSION;
                g[1] = (rng.next() % 4) as u8;
                if let Some(sid) = sids.get((rng.next() as usize) % sids.len().max(1)) {
                    g[2..18].copy_from_slice(sid);
                }
            }
            out.push(Relayed {
                from: r.from,
                to: r.to,
                payload: g,
            });
        }
        out.push(r);
        out
    })));
    let out = a.connect(&b.node(), &[]).await.unwrap();
    let inc = b.accept().await.unwrap();
    let frames: Vec<Vec<u8>> = (0..30).map(|i| frame(i, (i * 5003) % 90_000)).collect();
    assert!(carry(out, inc, frames.clone()).await.unwrap() == frames);
    let s = b.stats();
    assert!(
        s.unauthenticated + s.unroutable + s.refused_handshakes > 0,
        "{s:?}"
    );
}

#[tokio::test]
async fn a_replayed_opening_yields_no_link() {
    let hub = Hub::new(64 * 1024);
    let a = node(&hub, seed(1), MIB, fast());
    let b = Arc::new(node(&hub, seed(2), MIB, fast()));
    let (a_id, b_id) = (a.node(), b.node());
    let captured = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
    {
        let captured = captured.clone();
        hub.set_hook(Some(Box::new(move |r: Relayed| {
            if Hello::decode(&r.payload).is_ok() {
                *captured.lock().unwrap() = Some(r.payload.clone());
            }
            vec![r]
        })));
    }
    let l = a.connect(&b_id, &[]).await.unwrap();
    let first = b.accept().await.unwrap();
    drop((l, first));
    // A is gone; the coordinator replays its opening to B, twice.
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hello = captured.lock().unwrap().clone().unwrap();
    hub.inject(a_id, b_id, hello.clone()).await;
    hub.inject(a_id, b_id, hello).await;
    let r = tokio::time::timeout(Duration::from_millis(2000), b.accept()).await;
    assert!(r.is_err(), "a replayed opening was accepted");
    // The half-open session expired.
    assert_eq!(b.sessions(), 0);
}
