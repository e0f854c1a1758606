//! QUIC links between real sockets on this machine: identities proved by
//! the TLS handshake, the wrong peer refused, frame limits kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pluto_plugins_api::{open_transport, NodeId, Transport, TransportError, TransportOptions};
use rand_core::{OsRng, RngCore};

fn seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    OsRng.fill_bytes(&mut s);
    s
}

fn id_of(seed: &[u8; 32]) -> NodeId {
    NodeId(
        ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes(),
    )
}

async fn node(seed: [u8; 32], max_frame: usize) -> Box<dyn Transport> {
    open_transport(
        "quic",
        TransportOptions {
            identity_seed: seed,
            listen: Some("127.0.0.1:0".into()),
            max_frame,
            relay: None,
        },
    )
    .await
    .unwrap()
}

// Linking the plugin registers it.
use pluto_transport_quic as _;

#[tokio::test]
async fn a_link_carries_frames_both_ways_between_proven_peers() {
    let (sa, sb) = (seed(), seed());
    let (a, b) = (node(sa, 1 << 20).await, node(sb, 1 << 20).await);
    let mut out = a.connect(&id_of(&sb), &b.addresses()).await.unwrap();
    assert_eq!(out.peer(), id_of(&sb));
    assert_eq!(out.transport(), "quic");
    let frames: Vec<Vec<u8>> = (0..64u32)
        .map(|i| {
            (0..(i as usize * 4099) % (1 << 20))
                .map(|j| (i as usize + j) as u8)
                .collect()
        })
        .collect();
    let sender = {
        let frames = frames.clone();
        tokio::spawn(async move {
            for f in &frames {
                out.send(f).await.unwrap();
            }
            out.finish().await.unwrap();
            // The answer comes back on the same link.
            let echo = out.recv().await.unwrap().unwrap();
            assert_eq!(echo, b"got 64");
            assert!(out.recv().await.unwrap().is_none());
        })
    };
    let mut inbound = tokio::time::timeout(Duration::from_secs(10), b.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inbound.peer(), id_of(&sa), "the dialler is who signed");
    let mut got = Vec::new();
    while let Some(f) = inbound.recv().await.unwrap() {
        got.push(f);
    }
    assert_eq!(got, frames);
    inbound.send(b"got 64").await.unwrap();
    inbound.finish().await.unwrap();
    sender.await.unwrap();
    // A second link reuses the connection.
    let mut again = a.connect(&id_of(&sb), &[]).await.unwrap();
    again.send(b"x").await.unwrap();
    let mut second = b.accept().await.unwrap();
    assert_eq!(second.recv().await.unwrap().unwrap(), b"x");
}

#[tokio::test]
async fn a_listener_with_another_key_is_refused() {
    let (sa, sb, sc) = (seed(), seed(), seed());
    let (a, b) = (node(sa, 1024).await, node(sb, 1024).await);
    // a means to reach c, but b answers at that address.
    let r = a.connect(&id_of(&sc), &b.addresses()).await;
    match r {
        Err(TransportError::Unreachable(who, why)) => {
            assert_eq!(who, id_of(&sc));
            assert!(why.contains("certificate"), "refused for its key: {why}");
        }
        other => panic!("{:?}", other.err()),
    }
    // Nothing reached b as a link.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.accept())
            .await
            .is_err(),
        "b accepted nothing"
    );
    // Addresses that are not addresses, or nothing listening.
    let r = a.connect(&id_of(&sb), &["not an address".into()]).await;
    assert!(matches!(r, Err(TransportError::Unreachable(..))));
    assert!(a.connect(&id_of(&sb), &[]).await.is_err(), "no address");
}

#[tokio::test]
async fn frames_over_the_limit_are_refused_on_both_ends() {
    let (sa, sb) = (seed(), seed());
    let (a, b) = (node(sa, 1 << 20).await, node(sb, 1024).await);
    let mut out = a.connect(&id_of(&sb), &b.addresses()).await.unwrap();
    out.send(&[1u8; 1000]).await.unwrap();
    out.send(&vec![2u8; 4096]).await.unwrap();
    let mut inbound = b.accept().await.unwrap();
    assert_eq!(inbound.recv().await.unwrap().unwrap(), vec![1u8; 1000]);
    assert!(matches!(
        inbound.recv().await,
        Err(TransportError::FrameTooLarge(4096, 1024))
    ));
    // The sender's own limit.
    let mut big = b.connect(&id_of(&sa), &a.addresses()).await.unwrap();
    assert!(matches!(
        big.send(&vec![0u8; 2048]).await,
        Err(TransportError::FrameTooLarge(2048, 1024))
    ));
}

#[tokio::test]
async fn unknown_transports_are_named() {
    let r = open_transport(
        "carrier-pigeon",
        TransportOptions {
            identity_seed: seed(),
            listen: None,
            max_frame: 1,
            relay: None,
        },
    )
    .await;
    match r {
        Err(TransportError::Unknown(name, known)) => {
            assert_eq!(name, "carrier-pigeon");
            assert!(known.contains("quic"), "{known}");
        }
        other => panic!("{:?}", other.err()),
    }
}
