//! pluto's coordinator: authenticates nodes, keeps the books, matches
//! storers with free space, and keeps each node's manifest.
//!
//! [`Coordinator::handle`] takes one envelope as it came off the channel and
//! returns the reply to send, if any:
//!
//! ```text
//! bytes --verify signature--> envelope --addressed to us? topic names the signer?--
//!       --fresh (ReplayGuard)?--> message --dispatch--> books --> reply envelope
//!                                                        (signed; sealed to the node when private)
//! ```
//!
//! Anything that fails before the sender is known to be who it claims
//! (malformed, bad signature, another recipient, another node's topic,
//! replayed or stale) gets no reply and is only logged, so forged traffic
//! cannot make the coordinator talk to a victim. An authenticated sender gets
//! an `Error` reply it can act on.
//!
//! Time and randomness come from the caller; the books are the only state
//! that matters across restarts (pending challenges and the replay window
//! are memory, and a restart only makes nodes authenticate again).

mod audit;
mod service;
mod settings;

pub use audit::decayed_speed;

pub use service::{AuditTick, Coordinator, Outgoing, Rejected, Sweep, ANY_COORDINATOR};
pub use settings::{CoordinatorConfig, SettingsError, MAX_DURATION_MS};

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pluto_plugins_api::{BooksStore, ChannelEvent, ControlChannel};
use rand_core::OsRng;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sweeps the books every `sweep_ms` (see [`Coordinator::sweep`]) until
/// the returned task is aborted.
pub fn spawn_sweeper(coordinator: Arc<Coordinator>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let period = std::time::Duration::from_millis(coordinator.config().sweep_ms.max(10));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match coordinator.sweep(now_ms()).await {
                Ok(s) => {
                    if s.released > 0 || !s.silent.is_empty() {
                        tracing::info!(
                            "released {} lapsed reservations; {} silent nodes marked offline",
                            s.released,
                            s.silent.len()
                        );
                    }
                }
                Err(e) => tracing::warn!("sweeping the books: {e}"),
            }
        }
    })
}

/// Runs the audit schedule every `audit_tick_ms` (challenges that are due,
/// answers that are late) and works out standings every
/// `standing_every_ms`, sending what comes of it on `channel`.
pub fn spawn_auditor(
    coordinator: Arc<Coordinator>,
    channel: Arc<dyn ControlChannel>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = coordinator.config().clone();
        let mut tick =
            tokio::time::interval(std::time::Duration::from_millis(c.audit_tick_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut standing_at = 0u64;
        loop {
            tick.tick().await;
            let now = now_ms();
            // (A clock that stepped back does not wait to catch up.)
            if now < standing_at || now - standing_at >= c.standing_every_ms {
                standing_at = now;
                if let Err(e) = coordinator.refresh_standing(now).await {
                    tracing::warn!("working out standings: {e}");
                }
            }
            match coordinator.audit_tick(now, &mut OsRng).await {
                Ok(t) => {
                    for out in t.outgoing {
                        if let Err(e) = channel.send(Some(&out.to), &out.bytes).await {
                            tracing::warn!("audit message to {}: {e}", out.to.short());
                        }
                    }
                }
                Err(e) => tracing::warn!("audits: {e}"),
            }
        }
    })
}

/// Serves a channel until it closes: each message is handled on a task of
/// its own and its reply sent back; presence notices update the books; the
/// books are swept and audits scheduled meanwhile.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    channel: Arc<dyn ControlChannel>,
    books: Arc<dyn BooksStore>,
) {
    let sweeper = spawn_sweeper(coordinator.clone());
    let _stop = AbortOnDrop(sweeper);
    let _audits = AbortOnDrop(spawn_auditor(coordinator.clone(), channel.clone()));
    while let Some(ev) = channel.next_event().await {
        match ev {
            ChannelEvent::Message { from, payload } => {
                let (c, ch) = (coordinator.clone(), channel.clone());
                tokio::spawn(async move {
                    match c.handle(from, &payload, now_ms(), &mut OsRng).await {
                        Ok(Some(out)) => {
                            if let Err(e) = ch.send(Some(&out.to), &out.bytes).await {
                                tracing::warn!("reply to {}: {e}", out.to.short());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("refused a message: {e}"),
                    }
                });
            }
            // Presence notices are unauthenticated hints: only "offline" for
            // a registered node is taken (its next heartbeat, which is
            // signed, brings it back online).
            ChannelEvent::Presence { node, payload } if payload == b"offline" => {
                if let Ok(Some(_)) = books.node(&node).await {
                    if let Err(e) = books.presence(&node, false, now_ms()).await {
                        tracing::warn!("presence of {}: {e}", node.short());
                    }
                }
            }
            ChannelEvent::Connected => tracing::info!("channel connected"),
            ChannelEvent::Disconnected(why) => tracing::warn!("channel: {why}; reconnecting"),
            _ => {}
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
