//! The tests every [`Transport`] must pass.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{Link, NodeId, Transport, TransportError};

const MIB: usize = 1 << 20;

/// How long a step that moves data may take, generous for debug builds on
/// a busy machine; a step that takes longer is a hang.
const DATA: Duration = Duration::from_secs(120);

/// A node under test: its id and its transport.
type Node = (NodeId, Arc<dyn Transport>);

/// Runs the tests every [`Transport`] must pass on nodes from
/// `node(seed, max_frame)`, which starts a node of the plugin's kind with
/// that identity seed and frame limit and returns its id (the Ed25519
/// public key of the seed) with its transport; panics with a message
/// naming what broke. A transport plugin calls it from one of its tests:
///
/// ```ignore
/// #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// async fn transport_conformance() {
///     pluto_plugins_api::testkit::transport_conformance(|seed, max_frame| async move {
///         let t = my_plugin::open(TransportOptions {
///             identity_seed: seed,
///             listen: Some("127.0.0.1:0".into()),
///             max_frame,
///             relay: None,
///         })
///         .await
///         .unwrap();
///         (public_key_of(&seed), Box::new(t) as Box<dyn Transport>)
///     })
///     .await;
/// }
/// ```
///
/// Every node the suite asks for must be able to reach every other one: a
/// transport that goes through something shared (the relay's coordinator)
/// makes them all on one instance of it, which the function captures (see
/// `transports/relay/tests/integration/links.rs`). Seeds differ between nodes and
/// between checks, so one shared instance serves the whole run.
///
/// The suite always sends a frame on a new link before the other end
/// accepts it: a transport may announce a link only once it carries data
/// (a QUIC stream does). Whether a check that needs addresses applies is
/// read from [`Transport::reach`].
pub async fn transport_conformance<F, Fut>(mut node: F)
where
    F: FnMut([u8; 32], usize) -> Fut,
    Fut: Future<Output = (NodeId, Box<dyn Transport>)>,
{
    let mut make = |check: u8, n: u8, max_frame: usize| {
        let mut seed = [0x5a; 32];
        seed[0] = check;
        seed[1] = n;
        let fut = node(seed, max_frame);
        async move {
            let (id, t) = fut.await;
            (id, Arc::from(t)) as Node
        }
    };
    // Each check's nodes are dropped when it ends.
    frames_go_both_ways_in_order_between_proven_peers(&[
        make(1, 1, MIB).await,
        make(1, 2, MIB).await,
    ])
    .await;
    frames_at_the_limit_pass_and_over_it_are_refused(&[
        make(2, 1, MIB).await,
        make(2, 2, LIMIT).await,
    ])
    .await;
    a_listener_with_another_key_is_refused(&[
        make(3, 1, MIB).await,
        make(3, 2, MIB).await,
        make(3, 3, MIB).await,
    ])
    .await;
    several_links_at_once_stay_separate(&[
        make(4, 1, MIB).await,
        make(4, 2, MIB).await,
        make(4, 3, MIB).await,
    ])
    .await;
    many_small_frames_and_a_few_large_arrive_intact(&[
        make(5, 1, MIB).await,
        make(5, 2, MIB).await,
    ])
    .await;
    close_ends_accept_links_and_connects(&[make(6, 1, MIB).await, make(6, 2, MIB).await]).await;
}

/// The smaller frame limit of the limit check.
const LIMIT: usize = 100_000;

/// Awaits `fut`, or panics naming `what` once `limit` has passed.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {limit:?}"))
}

/// A frame whose bytes depend on `i` and on position, to check what arrives.
fn frame(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i * 7 + j * 13 + (j >> 9)) as u8)
        .collect()
}

fn connect_limit(t: &dyn Transport) -> Duration {
    t.reach().connect_timeout + Duration::from_secs(10)
}

async fn connect(from: &Node, to: &Node) -> Box<dyn Link> {
    let what = format!("{} connecting", from.1.name());
    within(
        connect_limit(&*from.1),
        &what,
        from.1.connect(&to.0, &to.1.addresses()),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn accept(at: &Node) -> Box<dyn Link> {
    within(connect_limit(&*at.1), "accepting a link", at.1.accept())
        .await
        .expect("accept ended while a link was being opened")
}

async fn recv(link: &mut Box<dyn Link>, what: &str) -> Option<Vec<u8>> {
    within(DATA, what, link.recv())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Sends `frames`, finishes, and returns what comes back until the end.
fn send_all_then_collect(
    mut link: Box<dyn Link>,
    frames: Vec<Vec<u8>>,
) -> tokio::task::JoinHandle<Vec<Vec<u8>>> {
    tokio::spawn(async move {
        for (i, f) in frames.iter().enumerate() {
            within(DATA, "sending", link.send(f))
                .await
                .unwrap_or_else(|e| panic!("sending frame {i} of {} bytes: {e}", f.len()));
        }
        within(DATA, "finishing", link.finish())
            .await
            .unwrap_or_else(|e| panic!("finishing: {e}"));
        let mut back = Vec::new();
        while let Some(f) = recv(&mut link, "receiving after finishing").await {
            back.push(f);
        }
        back
    })
}

/// Sends back every frame until the end, then finishes.
async fn echo(mut link: Box<dyn Link>) -> usize {
    let mut n = 0;
    while let Some(f) = recv(&mut link, "receiving to echo").await {
        within(DATA, "echoing", link.send(&f))
            .await
            .unwrap_or_else(|e| panic!("echoing frame {n}: {e}"));
        n += 1;
    }
    within(DATA, "finishing the echo", link.finish())
        .await
        .unwrap_or_else(|e| panic!("finishing the echo: {e}"));
    n
}

async fn frames_go_both_ways_in_order_between_proven_peers([a, b]: &[Node; 2]) {
    assert_eq!(a.1.name(), b.1.name());
    let out = connect(a, b).await;
    assert_eq!(out.peer(), b.0, "the dialler's link names whom it dialled");
    assert_eq!(out.transport(), a.1.name(), "a link names its transport");
    // Empty frames, frames of the limit, sizes around common segment sizes.
    let frames: Vec<Vec<u8>> = [0, 1, MIB, 1200, 1199, 65_459, 65_460, 65_536, 0]
        .into_iter()
        .chain((0..40).map(|i| (i * 9973) % (300 * 1024)))
        .enumerate()
        .map(|(i, n)| frame(i, n))
        .collect();
    let sender = send_all_then_collect(out, frames.clone());
    let mut inc = accept(b).await;
    assert_eq!(inc.peer(), a.0, "the acceptor's link names the dialler");
    assert_eq!(inc.transport(), b.1.name());
    let mut got = Vec::new();
    while let Some(f) = recv(&mut inc, "receiving").await {
        got.push(f);
    }
    assert_eq!(
        got.len(),
        frames.len(),
        "finish ends recv after every frame"
    );
    assert!(got == frames, "frames arrived altered or out of order");
    assert_eq!(
        recv(&mut inc, "receiving after the end").await,
        None,
        "recv stays ended"
    );
    // The finished side still receives: a link closes one way at a time.
    for f in got.iter().rev() {
        within(DATA, "answering", inc.send(f))
            .await
            .unwrap_or_else(|e| panic!("answering on a link the other end finished: {e}"));
    }
    inc.finish().await.unwrap();
    let back = within(DATA, "the dialler's side", sender).await.unwrap();
    got.reverse();
    assert!(back == got, "frames came back altered or out of order");
}

async fn frames_at_the_limit_pass_and_over_it_are_refused([a, b]: &[Node; 2]) {
    // a allows a MiB, b only LIMIT bytes.
    let mut out = connect(a, b).await;
    within(DATA, "sending", out.send(&frame(1, LIMIT)))
        .await
        .unwrap();
    let mut inc = accept(b).await;
    assert_eq!(
        recv(&mut inc, "receiving a frame of the limit").await,
        Some(frame(1, LIMIT)),
        "a frame of exactly max_frame passes"
    );
    inc.send(&frame(2, LIMIT)).await.unwrap();
    assert_eq!(
        recv(&mut out, "receiving a frame of the peer's limit").await,
        Some(frame(2, LIMIT))
    );
    match inc.send(&frame(3, LIMIT + 1)).await {
        Err(TransportError::FrameTooLarge(n, max)) => assert_eq!((n, max), (LIMIT + 1, LIMIT)),
        other => panic!("sending over max_frame: expected FrameTooLarge, got {other:?}"),
    }
    match out.send(&frame(4, MIB + 1)).await {
        Err(TransportError::FrameTooLarge(n, max)) => assert_eq!((n, max), (MIB + 1, MIB)),
        other => panic!("sending over max_frame: expected FrameTooLarge, got {other:?}"),
    }
    // The link still works after refusing to send.
    out.send(b"after").await.unwrap();
    assert_eq!(
        recv(&mut inc, "receiving after a refused send").await,
        Some(b"after".to_vec()),
        "a refused send leaves the link usable"
    );
    // a may send what b will not take: b's link fails rather than
    // delivering it (or allocating for it).
    if out.send(&frame(5, LIMIT + 1)).await.is_ok() {
        let r = within(DATA, "receiving over the limit", inc.recv()).await;
        assert!(
            r.is_err(),
            "a frame over the receiver's max_frame must fail its link, got {:?}",
            r.map(|f| f.map(|f| f.len()))
        );
    }
}

async fn a_listener_with_another_key_is_refused([a, b, c]: &[Node; 3]) {
    if !a.1.reach().addresses {
        // Peers are found by key alone: no address can answer for another key.
        return;
    }
    // a means to reach c, but b answers at the addresses given.
    let r = within(
        connect_limit(&*a.1),
        "connecting to the wrong key",
        a.1.connect(&c.0, &b.1.addresses()),
    )
    .await;
    match r {
        Err(TransportError::Unreachable(who, _)) => assert_eq!(who, c.0),
        Err(TransportError::WrongPeer { expected, .. }) => assert_eq!(expected, c.0),
        Err(e) => panic!("a listener with another key: expected Unreachable or WrongPeer, got {e}"),
        Ok(l) => panic!(
            "a listener with another key was taken for {}: the link names {}",
            c.0,
            l.peer()
        ),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.1.accept())
            .await
            .is_err(),
        "the listener with another key got a link"
    );
    // No addresses, or nothing usable at them.
    assert!(
        within(connect_limit(&*a.1), "connecting", a.1.connect(&b.0, &[]))
            .await
            .is_err(),
        "connecting without addresses"
    );
}

async fn several_links_at_once_stay_separate(nodes: &[Node; 3]) {
    // Every node echoes whatever arrives, on as many links as come.
    let acceptors: Vec<_> = nodes
        .iter()
        .map(|n| {
            let t = n.1.clone();
            tokio::spawn(async move {
                let mut echoes = Vec::new();
                while let Some(l) = t.accept().await {
                    echoes.push(tokio::spawn(echo(l)));
                }
                for e in echoes {
                    e.await.unwrap();
                }
            })
        })
        .collect();
    let mut links = Vec::new();
    for (from, f) in nodes.iter().enumerate() {
        for (to, t) in nodes.iter().enumerate() {
            if from == to {
                continue;
            }
            for copy in 0..2 {
                let l = connect(f, t).await;
                assert_eq!(l.peer(), t.0);
                let frames: Vec<Vec<u8>> = (0..20)
                    .map(|i| frame(i + from * 100 + to * 10 + copy, (i * 7919) % 150_000))
                    .collect();
                links.push((
                    format!("link {from}->{to} #{copy}"),
                    frames.clone(),
                    send_all_then_collect(l, frames),
                ));
            }
        }
    }
    for (what, frames, task) in links {
        let back = within(DATA, &what, task).await.unwrap();
        assert!(back == frames, "{what} got back another link's frames");
    }
    for n in nodes {
        n.1.close().await;
    }
    for a in acceptors {
        within(
            Duration::from_secs(10),
            "accept after close",
            a, // ends once accept gives None
        )
        .await
        .unwrap();
    }
}

async fn many_small_frames_and_a_few_large_arrive_intact([a, b]: &[Node; 2]) {
    let mut out = connect(a, b).await;
    let sizes: Vec<usize> = (0..3_000)
        .map(|i| i % 97)
        .chain([MIB; 6])
        .chain((0..1_000).map(|i| i % 13))
        .collect();
    out.send(&frame(0, sizes[0])).await.unwrap();
    let sender = {
        let sizes = sizes.clone();
        tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate().skip(1) {
                within(DATA, "sending", out.send(&frame(i, n)))
                    .await
                    .unwrap_or_else(|e| panic!("sending frame {i}: {e}"));
            }
            out.finish().await.unwrap();
            out
        })
    };
    let mut inc = accept(b).await;
    for (i, &n) in sizes.iter().enumerate() {
        let f = recv(&mut inc, "receiving")
            .await
            .unwrap_or_else(|| panic!("the link ended after {i} of {} frames", sizes.len()));
        assert!(f == frame(i, n), "frame {i} ({n} bytes) arrived altered");
    }
    assert_eq!(recv(&mut inc, "receiving the end").await, None);
    drop(within(DATA, "the sender", sender).await.unwrap());
}

async fn close_ends_accept_links_and_connects([a, b]: &[Node; 2]) {
    let mut out = connect(a, b).await;
    out.send(b"hi").await.unwrap();
    let mut inc = accept(b).await;
    assert_eq!(recv(&mut inc, "receiving").await, Some(b"hi".to_vec()));
    let waiting = {
        let t = b.1.clone();
        tokio::spawn(async move { t.accept().await.map(|l| l.peer()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.1.close().await;
    assert_eq!(
        within(
            Duration::from_secs(10),
            "a waiting accept after close",
            waiting
        )
        .await
        .unwrap(),
        None,
        "close ends a waiting accept with None"
    );
    assert!(
        within(Duration::from_secs(10), "accept after close", b.1.accept())
            .await
            .is_none(),
        "accept after close gives None"
    );
    let r = within(
        Duration::from_secs(10),
        "recv on a closed transport's link",
        inc.recv(),
    )
    .await;
    assert!(
        !matches!(r, Ok(Some(_))),
        "close closes the transport's links"
    );
    let r = within(
        Duration::from_secs(10),
        "the peer's recv after close",
        out.recv(),
    )
    .await;
    assert!(
        !matches!(r, Ok(Some(_))),
        "the peer's link ends when the transport at the other end closes"
    );
    let r = within(
        connect_limit(&*b.1),
        "connecting from a closed transport",
        b.1.connect(&a.0, &a.1.addresses()),
    )
    .await;
    assert!(r.is_err(), "a closed transport connects nowhere");
    a.1.close().await;
}
