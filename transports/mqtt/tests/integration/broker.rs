//! The embedded broker against raw clients: routing, QoS 1, wills, bounds,
//! and hostile input.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use pluto_transport_mqtt::broker::EmbeddedBroker;
use rumqttc::{
    ConnAck, ConnectReturnCode, LastWill, Packet, PubAck, Publish, QoS, Subscribe, SubscribeFilter,
    SubscribeReasonCode, Unsubscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const MAX: usize = 64 << 10;

fn broker(max_connections: usize) -> SocketAddr {
    EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), max_connections, MAX)
        .unwrap()
        .addr
}

/// A client that speaks MQTT packet by packet.
pub(super) struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub(super) async fn open(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Opens with a tiny receive buffer: a client that reads nothing then
    /// holds almost nothing in the kernel, and its backlog stays in the
    /// broker.
    pub(super) async fn open_tight(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        Self {
            stream: socket.connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Connects with `id`, `keep_alive` seconds and a will, and expects
    /// CONNACK.
    async fn connect(addr: SocketAddr, id: &str, keep_alive: u16, will: Option<&str>) -> Self {
        let mut c = Self::open(addr).await;
        let mut connect = rumqttc::Connect::new(id);
        connect.keep_alive = keep_alive;
        connect.last_will = will.map(|t| LastWill::new(t, "gone", QoS::AtLeastOnce, false));
        c.send(Packet::Connect(connect)).await;
        assert_eq!(
            c.recv().await,
            Some(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false
            )))
        );
        c
    }

    pub(super) async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn raw(&mut self, bytes: &[u8]) {
        // The broker may already have closed: that is what some tests want.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet within 5 s; None when the broker closed.
    pub(super) async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(Duration::from_secs(5))
            .await
            .expect("no packet within the time")
    }

    /// Err on timeout, Ok(None) when the broker closed.
    pub(super) async fn recv_within(&mut self, t: Duration) -> Result<Option<Packet>, ()> {
        timeout(t, async {
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("the broker sent garbage: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    /// Expects the broker to close the connection within `t`.
    pub(super) async fn closed_within(&mut self, t: Duration) {
        loop {
            match self.recv_within(t).await {
                Ok(None) => return,
                Ok(Some(_)) => {}
                Err(()) => panic!("the broker kept the connection"),
            }
        }
    }

    pub(super) async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let sub = Subscribe {
            pkid: 7,
            filters: filters
                .iter()
                .map(|(f, q)| SubscribeFilter::new(f.to_string(), *q))
                .collect(),
        };
        self.send(Packet::Subscribe(sub)).await;
        match self.recv().await {
            Some(Packet::SubAck(a)) if a.pkid == 7 => a.return_codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub(super) async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        if qos == QoS::AtLeastOnce {
            assert_eq!(self.recv().await, Some(Packet::PubAck(PubAck::new(pkid))));
        }
    }

    /// The next publish within 5 s.
    pub(super) async fn next_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Expects nothing within `t`.
    pub(super) async fn quiet(&mut self, t: Duration) {
        if let Ok(p) = self.recv_within(t).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    pub(super) async fn ping(&mut self) {
        self.send(Packet::PingReq).await;
        assert_eq!(self.recv().await, Some(Packet::PingResp));
    }
}

/// The broker still routes between two fresh clients.
async fn still_serves(addr: SocketAddr) {
    let id = format!("check-{:x}", rand::random::<u64>());
    let mut sub = Raw::connect(addr, &format!("{id}-s"), 30, None).await;
    sub.subscribe(&[(&id, QoS::AtLeastOnce)]).await;
    let mut publisher = Raw::connect(addr, &format!("{id}-p"), 30, None).await;
    publisher.publish(&id, b"ok", QoS::AtLeastOnce, 1).await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (id.as_str(), &b"ok"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_wildcard_and_shared_filters_route() {
    let addr = broker(100);
    let mut exact = Raw::connect(addr, "exact", 30, None).await;
    let mut wild = Raw::connect(addr, "wild", 30, None).await;
    let mut g1 = Raw::connect(addr, "g1", 30, None).await;
    let mut g2 = Raw::connect(addr, "g2", 30, None).await;
    let mut other = Raw::connect(addr, "other", 30, None).await;
    let granted = |q| SubscribeReasonCode::Success(q);
    assert_eq!(
        exact.subscribe(&[("a/b/c", QoS::AtLeastOnce)]).await,
        [granted(QoS::AtLeastOnce)]
    );
    // Two overlapping filters: one copy, at the better QoS; QoS 2 is
    // granted as 1; invalid filters are refused one by one.
    assert_eq!(
        wild.subscribe(&[
            ("a/+/c", QoS::AtMostOnce),
            ("a/#", QoS::ExactlyOnce),
            ("a/#/c", QoS::AtMostOnce),
            ("$share//a", QoS::AtMostOnce),
        ])
        .await,
        [
            granted(QoS::AtMostOnce),
            granted(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure
        ]
    );
    for g in [&mut g1, &mut g2] {
        assert_eq!(
            g.subscribe(&[("$share/grp/a/+/c", QoS::AtLeastOnce)]).await,
            [granted(QoS::AtLeastOnce)]
        );
    }
    other.subscribe(&[("x/+", QoS::AtLeastOnce)]).await;

    let mut publisher = Raw::connect(addr, "publisher", 30, None).await;
    for i in 0..4u8 {
        publisher.publish("a/b/c", &[i], QoS::AtLeastOnce, 10).await;
    }
    for i in 0..4u8 {
        let p = exact.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..], p.qos),
            ("a/b/c", &[i][..], QoS::AtLeastOnce)
        );
        exact.send(Packet::PubAck(PubAck::new(p.pkid))).await;
        let p = wild.next_publish().await;
        assert_eq!((&p.payload[..], p.qos), (&[i][..], QoS::AtLeastOnce));
        wild.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    wild.quiet(Duration::from_millis(300)).await;
    // The group: two each, in turn.
    let mut shares = Vec::new();
    for g in [&mut g1, &mut g2] {
        let a = g.next_publish().await.payload[0];
        let b = g.next_publish().await.payload[0];
        g.quiet(Duration::from_millis(300)).await;
        shares.extend([a, b]);
    }
    shares.sort_unstable();
    assert_eq!(shares, [0, 1, 2, 3]);
    other.quiet(Duration::from_millis(100)).await;

    // QoS 0 publishes reach QoS 1 subscribers at QoS 0.
    publisher
        .publish("a/b/c", b"zero", QoS::AtMostOnce, 0)
        .await;
    let p = exact.next_publish().await;
    assert_eq!(
        (&p.payload[..], p.qos, p.pkid),
        (&b"zero"[..], QoS::AtMostOnce, 0)
    );
    assert_eq!(&wild.next_publish().await.payload[..], b"zero");

    // Unsubscribed: no more.
    exact
        .send(Packet::Unsubscribe(Unsubscribe::new("a/b/c")))
        .await;
    assert!(matches!(exact.recv().await, Some(Packet::UnsubAck(_))));
    publisher
        .publish("a/b/c", b"after", QoS::AtLeastOnce, 11)
        .await;
    exact.quiet(Duration::from_millis(300)).await;
    assert_eq!(&wild.next_publish().await.payload[..], b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_deliveries_wait_for_acknowledgements() {
    let addr = broker(100);
    let mut sub = Raw::connect(addr, "sub", 30, None).await;
    sub.subscribe(&[("q", QoS::AtLeastOnce)]).await;
    let mut publisher = Raw::connect(addr, "pub", 30, None).await;
    let n = 300u16;
    for i in 1..=n {
        publisher
            .publish("q", &i.to_be_bytes(), QoS::AtLeastOnce, i)
            .await;
    }
    // At most 256 unacknowledged, each with a packet id of its own.
    let mut ids = Vec::new();
    for i in 1..=256u16 {
        let p = sub.next_publish().await;
        assert_eq!(&p.payload[..], i.to_be_bytes());
        assert_eq!(p.qos, QoS::AtLeastOnce);
        ids.push(p.pkid);
    }
    sub.quiet(Duration::from_millis(500)).await;
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
    assert!(!ids.contains(&0));
    // Acknowledged: the rest follows, in order.
    for id in ids {
        sub.send(Packet::PubAck(PubAck::new(id))).await;
    }
    for i in 257..=n {
        let p = sub.next_publish().await;
        assert_eq!(&p.payload[..], i.to_be_bytes());
        sub.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    sub.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_on_keep_alive_timeout() {
    let addr = broker(100);
    let mut watcher = Raw::connect(addr, "watcher", 30, None).await;
    watcher.subscribe(&[("wills/+", QoS::AtLeastOnce)]).await;
    let started = std::time::Instant::now();
    let mut silent = Raw::connect(addr, "silent", 1, Some("wills/silent")).await;
    let p = watcher.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("wills/silent", &b"gone"[..])
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    silent.closed_within(Duration::from_secs(1)).await;

    // A client that pings in time stays; one that says goodbye leaves no will.
    let mut pinger = Raw::connect(addr, "pinger", 1, Some("wills/pinger")).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        pinger.ping().await;
    }
    pinger.send(Packet::Disconnect).await;
    pinger.closed_within(Duration::from_secs(2)).await;
    watcher.quiet(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_ends_the_old_connection_and_publishes_its_will() {
    let addr = broker(100);
    let mut watcher = Raw::connect(addr, "watcher", 30, None).await;
    watcher.subscribe(&[("wills/#", QoS::AtLeastOnce)]).await;
    let mut old = Raw::connect(addr, "same-id", 30, Some("wills/old")).await;
    old.subscribe(&[("for/same-id", QoS::AtLeastOnce)]).await;
    let mut new = Raw::connect(addr, "same-id", 30, Some("wills/new")).await;
    old.closed_within(Duration::from_secs(2)).await;
    let p = watcher.next_publish().await;
    assert_eq!(p.topic, "wills/old");
    // The new connection holds the id, with none of the old subscriptions.
    new.ping().await;
    let mut publisher = Raw::connect(addr, "publisher", 30, None).await;
    publisher
        .publish("for/same-id", b"x", QoS::AtLeastOnce, 1)
        .await;
    new.quiet(Duration::from_millis(300)).await;
    // A lost connection (the socket closed, no DISCONNECT) publishes its will.
    drop(new);
    assert_eq!(watcher.next_publish().await.topic, "wills/new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused() {
    let addr = broker(3);
    let mut a = Raw::connect(addr, "a", 30, None).await;
    let _b = Raw::connect(addr, "b", 30, None).await;
    let _c = Raw::connect(addr, "c", 30, None).await;
    let mut d = Raw::open(addr).await;
    d.send(Packet::Connect(rumqttc::Connect::new("d"))).await;
    d.closed_within(Duration::from_secs(2)).await;
    a.send(Packet::Disconnect).await;
    a.closed_within(Duration::from_secs(2)).await;
    // Its place is free again (once the broker has seen it go).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut e = Raw::connect(addr, "e", 30, None).await;
    e.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_loses_messages_and_holds_up_no_one() {
    let addr = broker(100);
    let mut slow = Raw::connect(addr, "slow", 60, None).await;
    slow.subscribe(&[("flood", QoS::AtMostOnce)]).await;
    let mut fast = Raw::connect(addr, "fast", 60, None).await;
    fast.subscribe(&[("flood", QoS::AtMostOnce)]).await;
    let mut publisher = Raw::connect(addr, "publisher", 60, None).await;
    // 64 MiB for a subscriber that reads nothing meanwhile, at the pace
    // of one that reads everything (which gets everything).
    let chunk = vec![0x5a; 32 << 10];
    let started = std::time::Instant::now();
    for i in 0..2048 {
        publisher.publish("flood", &chunk, QoS::AtMostOnce, 0).await;
        match fast.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => assert_eq!(p.payload.len(), chunk.len()),
            other => panic!("fast subscriber: {other:?} at {i}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    fast.ping().await;
    still_serves(addr).await;
    // The slow one gets what its queue and the sockets held, not 64 MiB.
    let mut received = 0usize;
    while let Ok(Some(p)) = slow.recv_within(Duration::from_secs(1)).await {
        if let Packet::Publish(p) = p {
            received += p.payload.len();
        }
    }
    assert!(received > 0);
    assert!(
        received < 24 << 20,
        "the slow subscriber's queue grew to {} MiB",
        received >> 20
    );
    slow.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_ends_only_its_own_connection() {
    let addr = broker(100);
    let mut watcher = Raw::connect(addr, "watcher", 60, None).await;
    watcher.subscribe(&[("hostile/+", QoS::AtLeastOnce)]).await;

    // Before CONNECT: garbage, a packet type that does not exist, a
    // remaining length of 5 bytes, a huge remaining length, another packet.
    let garbage: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0xf0, 0x00],
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        &[0x10, 0xff, 0xff, 0xff, 0x7f],
        &[0x30, 0x03, 0x00, 0x01, b'a'],
        &[0x10, 0x00],
        &[0xc0, 0x00],
    ];
    for bytes in garbage {
        let mut c = Raw::open(addr).await;
        c.raw(bytes).await;
        c.closed_within(Duration::from_secs(2)).await;
    }
    // A CONNECT with a wrong protocol name or level.
    let mut c = Raw::open(addr).await;
    c.raw(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'X', 4, 2, 0, 30, 0, 0])
        .await;
    c.closed_within(Duration::from_secs(2)).await;
    let mut c = Raw::open(addr).await;
    c.raw(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 30, 0, 0])
        .await;
    c.closed_within(Duration::from_secs(2)).await;

    // After CONNECT (each with a will, which the broker publishes): a
    // packet over the size limit, a second CONNECT, a publish to a
    // wildcard, QoS 2, a broken SUBSCRIBE, garbage, a malformed length.
    let mut oversized = vec![0x30];
    let mut len = MAX + 2048;
    while len > 0 {
        let b = (len % 128) as u8;
        len /= 128;
        oversized.push(if len > 0 { b | 0x80 } else { b });
    }
    let mut second_connect = BytesMut::new();
    Packet::Connect(rumqttc::Connect::new("again"))
        .write(&mut second_connect, usize::MAX)
        .unwrap();
    let after: Vec<Vec<u8>> = vec![
        oversized,
        second_connect.to_vec(),
        vec![0x30, 0x05, 0x00, 0x03, b'a', b'/', b'#'],
        vec![0x34, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, b'x'],
        vec![0x82, 0x05, 0x00, 0x01, 0x00, 0x09, b'a'],
        vec![0xff; 64],
        vec![0x30, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![0x20, 0x02, 0x00, 0x00],
    ];
    for (i, bytes) in after.iter().enumerate() {
        let id = format!("hostile-{i}");
        let mut c = Raw::connect(addr, &id, 60, Some(&format!("hostile/{i}"))).await;
        c.raw(bytes).await;
        c.closed_within(Duration::from_secs(2)).await;
        let p = watcher.next_publish().await;
        assert_eq!(p.topic, format!("hostile/{i}"), "{bytes:02x?}");
    }

    // Half a packet, then silence: dropped at the keep-alive.
    let mut c = Raw::connect(addr, "half", 1, Some("hostile/half")).await;
    c.raw(&[0x30, 0x7f, 0x00, 0x03, b'a']).await;
    c.closed_within(Duration::from_secs(3)).await;
    assert_eq!(watcher.next_publish().await.topic, "hostile/half");

    // A flood of pings from a client that reads nothing: cut off once its
    // answers pile up, while the others are served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut flood = Raw {
        stream: socket.connect(addr).await.unwrap(),
        buf: BytesMut::new(),
    };
    flood
        .send(Packet::Connect(rumqttc::Connect::new("flood")))
        .await;
    let pings = [0xc0u8, 0x00].repeat(64 << 10);
    let flooder = tokio::spawn(async move {
        for _ in 0..256 {
            if flood.stream.write_all(&pings).await.is_err() {
                return true;
            }
        }
        false
    });
    still_serves(addr).await;
    assert!(
        timeout(Duration::from_secs(20), flooder)
            .await
            .unwrap()
            .unwrap(),
        "the flood was never cut off"
    );

    // Connected but silent before CONNECT: dropped after the connect timeout.
    let mut idle = Raw::open(addr).await;
    idle.raw(&[0x10]).await;
    idle.closed_within(Duration::from_secs(8)).await;

    still_serves(addr).await;
    watcher.ping().await;
}
