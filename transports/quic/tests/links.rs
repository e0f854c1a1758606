//! QUIC links between real sockets on this machine: the transport
//! conformance suite, then what only QUIC does (the refusal names the
//! certificate, a second link reuses the connection).
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

/// A QUIC node on a free local port, opened through the plugin registry.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_conformance() {
    pluto_plugins_api::testkit::transport_conformance(|seed, max_frame| async move {
        (id_of(&seed), node(seed, max_frame).await)
    })
    .await;
}

#[tokio::test]
async fn a_listener_with_another_key_is_refused_for_its_certificate() {
    let (sa, sb, sc) = (seed(), seed(), seed());
    let (a, b) = (node(sa, 1024).await, node(sb, 1024).await);
    // a means to reach c, but b answers at that address.
    match a.connect(&id_of(&sc), &b.addresses()).await {
        Err(TransportError::Unreachable(who, why)) => {
            assert_eq!(who, id_of(&sc));
            assert!(why.contains("certificate"), "refused for its key: {why}");
        }
        other => panic!("{:?}", other.err()),
    }
    // Addresses that are not addresses.
    let r = a.connect(&id_of(&sb), &["not an address".into()]).await;
    assert!(matches!(r, Err(TransportError::Unreachable(..))));
}

#[tokio::test]
async fn a_second_link_reuses_the_connection() {
    let (sa, sb) = (seed(), seed());
    let (a, b) = (node(sa, 1024).await, node(sb, 1024).await);
    let mut first = a.connect(&id_of(&sb), &b.addresses()).await.unwrap();
    first.send(b"1").await.unwrap();
    let mut one = b.accept().await.unwrap();
    assert_eq!(one.recv().await.unwrap().unwrap(), b"1");
    // No addresses needed while the connection is up.
    let mut again = a.connect(&id_of(&sb), &[]).await.unwrap();
    again.send(b"x").await.unwrap();
    let mut second = tokio::time::timeout(Duration::from_secs(10), b.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.peer(), id_of(&sa));
    assert_eq!(second.recv().await.unwrap().unwrap(), b"x");
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
