//! The session actor: one task per link, owning its [`Conn`] state machine.
//!
//! ```text
//!  demux task ──payloads──▶ Slot (inbox) ─┐
//!  RelayLink::send/finish ──Outgoing (1)──┤          ┌──▶ carrier.send(peer, payload)
//!  RelayLink::recv ◀──Event (unbounded*)──┤ session ─┤
//!  RelayLink::recv ──consumed + notify───▶│  task    └──▶ accept queue (responder, once
//!  RelayLink dropped ──alive (oneshot)───▶│                the initiator proved its keys)
//!  transport closed ──shutdown (watch)───▶┘
//! ```
//!
//! (*) bounded by flow control: the peer may not send more than the
//! receive window beyond what the application consumed.
//!
//! The task ends when the link failed, both ends finished and all was
//! acknowledged (then it lingers a little to repeat its close to a peer that
//! missed it), the application dropped the link and everything it sent was
//! acknowledged, the peer closed, or the transport closed. Its [`Slot`]
//! then unregisters the session id.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pluto_plugins_api::{Link, NodeId, TransportError};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::conn::{Conn, Delivery};
use crate::wire::{self, Kind, SessionId};
use crate::{lock, Inner};

/// What the application hands its session.
pub(crate) enum Outgoing {
    Frame(Vec<u8>),
    Finish,
}

/// What the session hands the application.
pub(crate) enum Event {
    Frame(Vec<u8>),
    End,
    Failed(String),
}

/// State the link handle and its session share.
#[derive(Default)]
pub(crate) struct Shared {
    reason: Mutex<Option<String>>,
    consumed: AtomicU64,
    notify: Notify,
}

impl Shared {
    fn closed(&self) -> TransportError {
        TransportError::Closed(
            lock(&self.reason)
                .clone()
                .unwrap_or_else(|| "the relay session ended".into()),
        )
    }

    fn set_reason(&self, why: &str) {
        lock(&self.reason).get_or_insert_with(|| why.to_string());
    }
}

/// A session id's registration with the demultiplexer, and its inbox.
/// Dropping it unregisters the id.
pub(crate) struct Slot {
    pub(crate) inner: Arc<Inner>,
    pub(crate) sid: SessionId,
    pub(crate) rx: mpsc::UnboundedReceiver<Vec<u8>>,
    pub(crate) queued: Arc<AtomicUsize>,
}

impl Slot {
    fn taken(&self, p: &[u8]) {
        self.queued.fetch_sub(p.len(), Ordering::Relaxed);
        self.inner
            .queued_total
            .fetch_sub(p.len(), Ordering::Relaxed);
    }

    pub(crate) async fn recv(&mut self) -> Option<Vec<u8>> {
        let p = self.rx.recv().await?;
        self.taken(&p);
        Some(p)
    }

    fn try_recv(&mut self) -> Option<Vec<u8>> {
        let p = self.rx.try_recv().ok()?;
        self.taken(&p);
        Some(p)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.inner.sessions).remove(&self.sid);
        self.rx.close();
        while let Some(p) = self.try_recv() {
            drop(p);
        }
    }
}

/// Counts a responder session that has not yet been accepted.
pub(crate) struct PendingGuard(pub(crate) Arc<Inner>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending_accepts.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A responder session waiting for the initiator to prove its keys.
pub(crate) struct Pending {
    pub(crate) link: Box<dyn Link>,
    pub(crate) hello: Vec<u8>,
    pub(crate) welcome: Vec<u8>,
    pub(crate) deadline: Instant,
    pub(crate) _guard: PendingGuard,
}

/// One link's task.
pub(crate) struct Session {
    inner: Arc<Inner>,
    peer: NodeId,
    slot: Slot,
    conn: Conn,
    frames: mpsc::Receiver<Outgoing>,
    alive: oneshot::Receiver<()>,
    handle_gone: bool,
    events: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
    pending: Option<Pending>,
    shutdown: watch::Receiver<bool>,
}

enum Ending {
    Failed(String),
    PeerClosed,
    Done,
    Abandoned,
}

/// A session and the link handle that drives it.
pub(crate) fn new_session(
    inner: Arc<Inner>,
    peer: NodeId,
    slot: Slot,
    conn: Conn,
) -> (Session, RelayLink) {
    let (frames_tx, frames) = mpsc::channel(1);
    let (events, events_rx) = mpsc::unbounded_channel();
    let (alive_tx, alive) = oneshot::channel();
    let shared = Arc::new(Shared::default());
    let link = RelayLink {
        peer,
        max_frame: inner.params.max_frame,
        frames: frames_tx,
        events: events_rx,
        shared: shared.clone(),
        _alive: alive_tx,
        finished: false,
        ended: false,
    };
    let shutdown = inner.shutdown.subscribe();
    let session = Session {
        inner,
        peer,
        slot,
        conn,
        frames,
        alive,
        handle_gone: false,
        events,
        shared,
        pending: None,
        shutdown,
    };
    (session, link)
}

impl Session {
    /// Makes this a responder session that sends `pending.welcome` first.
    pub(crate) fn with_pending(mut self, pending: Pending) -> Self {
        self.conn.transmit.push(pending.welcome.clone());
        self.pending = Some(pending);
        self
    }

    async fn transmit(&mut self) {
        for p in std::mem::take(&mut self.conn.transmit) {
            if let Err(e) = self.inner.carrier.send(&self.peer, p).await {
                tracing::debug!("relay: the coordinator did not take a payload: {e}");
            }
        }
    }

    fn deliver(&mut self) {
        let mut gone_bytes = 0u64;
        for d in self.conn.delivered.drain(..) {
            let ev = match d {
                Delivery::Frame(f) => {
                    if self.handle_gone {
                        gone_bytes += f.len() as u64;
                        continue;
                    }
                    Event::Frame(f)
                }
                Delivery::End => Event::End,
            };
            let _ = self.events.send(ev);
        }
        if gone_bytes > 0 {
            self.conn.consumed(gone_bytes);
        }
    }

    fn on_payload(&mut self, p: Vec<u8>, now: Instant) {
        if let Ok(h) = wire::header(&p) {
            match (h.kind, &self.pending) {
                (Kind::Sealed, _) => {
                    self.conn.on_payload(p, now);
                }
                // The initiator did not hear our WELCOME: say it again.
                (Kind::Hello, Some(pending)) if p == pending.hello => {
                    let w = pending.welcome.clone();
                    self.conn.transmit.push(w);
                }
                _ => tracing::trace!("relay: dropped an out-of-place handshake payload"),
            }
        }
    }

    fn on_handle_gone(&mut self) {
        self.handle_gone = true;
        // Frames the application already handed over still go out.
        while let Ok(o) = self.frames.try_recv() {
            match o {
                Outgoing::Frame(f) => self.conn.push_frame(f),
                Outgoing::Finish => {}
            }
        }
        self.frames.close();
        self.conn.push_fin();
    }

    fn ending(&mut self, now: Instant) -> Option<Ending> {
        if self.conn.authenticated {
            if let Some(p) = self.pending.take() {
                if self.inner.accept_tx.try_send(p.link).is_err() {
                    return Some(Ending::Failed(
                        "too many links waiting to be accepted".into(),
                    ));
                }
            }
        }
        if let Some(why) = &self.conn.failure {
            return Some(Ending::Failed(why.clone()));
        }
        if self.conn.peer_closed {
            return Some(if self.conn.done() {
                Ending::Done
            } else {
                Ending::PeerClosed
            });
        }
        if self.conn.done() || (self.handle_gone && self.conn.send_done()) {
            return Some(Ending::Done);
        }
        match &self.pending {
            Some(p) if now >= p.deadline => Some(Ending::Abandoned),
            _ => None,
        }
    }

    pub(crate) async fn run(mut self) {
        let ending = loop {
            self.transmit().await;
            self.deliver();
            self.inner.stats.add(std::mem::take(&mut self.conn.refused));
            let now = Instant::now();
            if let Some(e) = self.ending(now) {
                break e;
            }
            let mut deadline = self.conn.deadline();
            if let Some(p) = &self.pending {
                deadline = deadline.min(p.deadline);
            }
            let wants = !self.handle_gone && self.conn.wants_frames();
            tokio::select! {
                biased;
                _ = closed(&mut self.shutdown) => {
                    break Ending::Failed("the relay transport closed".into());
                }
                p = self.slot.recv() => {
                    let Some(p) = p else {
                        break Ending::Failed("the relay transport closed".into());
                    };
                    let now = Instant::now();
                    self.on_payload(p, now);
                    for _ in 0..64 {
                        let Some(p) = self.slot.try_recv() else { break };
                        self.on_payload(p, now);
                    }
                }
                o = self.frames.recv(), if wants => match o {
                    Some(Outgoing::Frame(f)) => self.conn.push_frame(f),
                    Some(Outgoing::Finish) => self.conn.push_fin(),
                    None => self.on_handle_gone(),
                },
                _ = &mut self.alive, if !self.handle_gone => self.on_handle_gone(),
                _ = self.shared.notify.notified() => {
                    let n = self.shared.consumed.swap(0, Ordering::Relaxed);
                    self.conn.consumed(n);
                }
                _ = tokio::time::sleep_until(deadline) => self.conn.on_timer(Instant::now()),
            }
            self.conn.flush(Instant::now());
        };
        self.finish(ending).await;
    }

    async fn finish(mut self, ending: Ending) {
        self.deliver();
        match ending {
            Ending::Abandoned => {
                tracing::debug!(
                    "relay: {} opened a session but never proved its keys",
                    self.peer.short()
                );
            }
            Ending::Failed(why) => {
                tracing::debug!("relay: link with {} failed: {why}", self.peer.short());
                self.shared.set_reason(&why);
                let _ = self.events.send(Event::Failed(why));
                if !self.conn.peer_closed && self.pending.is_none() {
                    self.conn.transmit.clear();
                    self.conn.send_close(Instant::now());
                    self.transmit().await;
                }
            }
            Ending::PeerClosed => {
                let why = "the peer closed the link";
                self.shared.set_reason(why);
                if !self.conn.peer_finished() {
                    let _ = self.events.send(Event::Failed(why.into()));
                }
            }
            Ending::Done => {
                self.shared.set_reason("the link is finished");
                if !self.conn.peer_closed {
                    self.linger().await;
                }
            }
        }
        self.inner.stats.add(std::mem::take(&mut self.conn.refused));
    }

    /// Says goodbye, and says it again to a peer that missed it, for a while.
    async fn linger(&mut self) {
        self.conn.send_close(Instant::now());
        self.transmit().await;
        let until = Instant::now() + self.inner.cfg.linger;
        loop {
            tokio::select! {
                biased;
                _ = closed(&mut self.shutdown) => return,
                p = self.slot.recv() => {
                    let Some(p) = p else { return };
                    let now = Instant::now();
                    if wire::header(&p).map(|h| h.kind) == Ok(Kind::Sealed)
                        && self.conn.on_payload(p, now)
                    {
                        if self.conn.peer_closed {
                            return;
                        }
                        self.conn.send_close(now);
                        self.transmit().await;
                    }
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

/// The application's end of a relay link.
pub(crate) struct RelayLink {
    peer: NodeId,
    max_frame: usize,
    frames: mpsc::Sender<Outgoing>,
    events: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    _alive: oneshot::Sender<()>,
    finished: bool,
    ended: bool,
}

#[async_trait::async_trait]
impl Link for RelayLink {
    fn peer(&self) -> NodeId {
        self.peer
    }

    fn transport(&self) -> &'static str {
        crate::NAME
    }

    async fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        if frame.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge(frame.len(), self.max_frame));
        }
        if self.finished {
            return Err(TransportError::Closed(
                "this end already finished the link".into(),
            ));
        }
        self.frames
            .send(Outgoing::Frame(frame.to_vec()))
            .await
            .map_err(|_| self.shared.closed())
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        if self.ended {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(Event::Frame(f)) => {
                self.shared
                    .consumed
                    .fetch_add(f.len() as u64, Ordering::Relaxed);
                self.shared.notify.notify_one();
                Ok(Some(f))
            }
            Some(Event::End) => {
                self.ended = true;
                Ok(None)
            }
            Some(Event::Failed(why)) => Err(TransportError::Closed(why)),
            None => Err(self.shared.closed()),
        }
    }

    async fn finish(&mut self) -> Result<(), TransportError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.frames
            .send(Outgoing::Finish)
            .await
            .map_err(|_| self.shared.closed())
    }
}

/// Resolves once the transport closes.
pub(crate) async fn closed(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
