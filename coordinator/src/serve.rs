//! Running a coordinator on a channel: the message loop and the periodic
//! tasks beside it, all supervised.
//!
//! ```text
//! serve (supervisor)
//!  +-- messages: next_event --> JoinSet (at most max_in_flight) --> handle --> send
//!  |             presence "offline" (when the broker confines it) --> books
//!  +-- sweeper:  every sweep_ms          --> sweep (lapsed reservations, silent nodes)
//!  +-- auditor:  every audit_tick_ms     --> audit_tick --> send challenges
//!  +-- standing: every standing_every_ms --> refresh_standing
//! ```
//!
//! Errors from the books are logged and the task carries on. A task that
//! panics is logged and started again after a pause (one second, doubling
//! up to a minute); one that dies [`MAX_DEATHS`] times within
//! [`DEATH_WINDOW`] ends [`serve`] with [`ServeError::TaskFailed`], so the
//! binary exits non-zero instead of running on without audits. Dropping the
//! `serve` future stops every task.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pluto_plugins_api::{BooksStore, ChannelEvent, ControlChannel, NodeId};
use rand_core::OsRng;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Coordinator;

/// Deaths of one task within [`DEATH_WINDOW`] after which `serve` gives up.
pub const MAX_DEATHS: usize = 5;

/// See [`MAX_DEATHS`].
pub const DEATH_WINDOW: Duration = Duration::from_secs(600);

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A task kept dying.
    #[error("the {task} task died {deaths} times in {window:?}; last: {last}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// How many times within the window.
        deaths: usize,
        /// The window.
        window: Duration,
        /// What the last death said.
        last: String,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serves a channel until it closes (then `Ok`): each message is handled
/// on a task of its own, at most `max_in_flight` at once, and its reply
/// sent back; presence notices update the books; the books are swept,
/// audits scheduled and standings worked out meanwhile.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    channel: Arc<dyn ControlChannel>,
    books: Arc<dyn BooksStore>,
) -> Result<(), ServeError> {
    let tasks: Vec<Task> = vec![
        Task::new("messages", {
            let (c, ch) = (coordinator.clone(), channel.clone());
            move || Box::pin(messages(c.clone(), ch.clone(), books.clone()))
        }),
        Task::new("sweeper", {
            let c = coordinator.clone();
            move || Box::pin(sweeper(c.clone()))
        }),
        Task::new("auditor", {
            let (c, ch) = (coordinator.clone(), channel.clone());
            move || Box::pin(auditor(c.clone(), ch.clone()))
        }),
        Task::new("standing", {
            let c = coordinator.clone();
            move || Box::pin(standing(c.clone()))
        }),
    ];
    supervise(tasks, Backoff::default()).await
}

/// The message loop: returns when the channel closes.
async fn messages(
    coordinator: Arc<Coordinator>,
    channel: Arc<dyn ControlChannel>,
    books: Arc<dyn BooksStore>,
) {
    let limit = coordinator.config().max_in_flight.max(1);
    let mut handling: JoinSet<()> = JoinSet::new();
    while let Some(ev) = channel.next_event().await {
        while let Some(done) = handling.try_join_next() {
            handled(done);
        }
        // Bounded: past the limit, the next event waits for one to finish.
        if handling.len() >= limit {
            if let Some(done) = handling.join_next().await {
                handled(done);
            }
        }
        match ev {
            ChannelEvent::Message { from, payload } => {
                let (c, ch) = (coordinator.clone(), channel.clone());
                handling.spawn(async move {
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
            ChannelEvent::Newcomer { node, payload } => {
                let (c, ch) = (coordinator.clone(), channel.clone());
                handling.spawn(async move {
                    match c
                        .handle_newcomer(node, &payload, now_ms(), &mut OsRng)
                        .await
                    {
                        Ok(Some(out)) => {
                            if let Err(e) = ch.welcome(&out.to, &out.bytes).await {
                                tracing::warn!("answer to newcomer {}: {e}", out.to.short());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("refused a newcomer's message: {e}"),
                    }
                });
            }
            // A presence notice is believed only when the broker confines
            // each node's presence topic to the node's own connection: then
            // "offline" is the node's will (its next heartbeat, which is
            // signed, brings it back). Otherwise anyone could publish it,
            // and the sweeper alone finds nodes gone silent.
            ChannelEvent::Presence { node, payload }
                if payload == b"offline" && coordinator.presence_trusted() =>
            {
                let books = books.clone();
                handling.spawn(async move { offline(&*books, node).await });
            }
            ChannelEvent::Connected => tracing::info!("channel connected"),
            ChannelEvent::Disconnected(why) | ChannelEvent::Refused(why) => {
                tracing::warn!("channel: {why}; reconnecting")
            }
            ChannelEvent::Denied(why) => {
                tracing::error!("channel: {why}; nodes cannot reach this coordinator until the broker lets it in")
            }
            _ => {}
        }
    }
}

/// A message's task ended: a panic is logged (the sender retries).
fn handled(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!("handling a message panicked: {e}");
        }
    }
}

async fn offline(books: &dyn BooksStore, node: NodeId) {
    if let Ok(Some(_)) = books.node(&node).await {
        if let Err(e) = books.presence(&node, false, now_ms()).await {
            tracing::warn!("presence of {}: {e}", node.short());
        }
    }
}

/// A timer that ticks every `ms` (at least 10), at once the first time,
/// late ticks delayed rather than bunched.
fn every(ms: u64) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_millis(ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Releases lapsed reservations and marks silent nodes offline every
/// `sweep_ms` (see [`Coordinator::sweep`]).
async fn sweeper(coordinator: Arc<Coordinator>) {
    let mut tick = every(coordinator.config().sweep_ms);
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
}

/// Runs the audit schedule every `audit_tick_ms` (challenges that are due,
/// answers that are late), sending what comes of it on `channel`.
async fn auditor(coordinator: Arc<Coordinator>, channel: Arc<dyn ControlChannel>) {
    let mut tick = every(coordinator.config().audit_tick_ms);
    loop {
        tick.tick().await;
        match coordinator.audit_tick(now_ms(), &mut OsRng).await {
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
}

/// Works out uptime tracks and hold-backs every `standing_every_ms`.
async fn standing(coordinator: Arc<Coordinator>) {
    let mut tick = every(coordinator.config().standing_every_ms);
    loop {
        tick.tick().await;
        if let Err(e) = coordinator.refresh_standing(now_ms()).await {
            tracing::warn!("working out standings: {e}");
        }
    }
}

type TaskFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A long-lived task: its name, and how to start it (again).
pub(crate) struct Task {
    name: &'static str,
    start: Box<dyn Fn() -> TaskFuture + Send>,
}

impl Task {
    pub(crate) fn new(name: &'static str, start: impl Fn() -> TaskFuture + Send + 'static) -> Self {
        Self {
            name,
            start: Box::new(start),
        }
    }
}

/// How long to wait before starting a task that died again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    /// After the first death.
    pub first: Duration,
    /// The longest pause.
    pub most: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            most: Duration::from_secs(60),
        }
    }
}

/// One task's recent deaths; pure, with the time passed in.
#[derive(Debug, Default)]
pub(crate) struct Deaths {
    at: VecDeque<Instant>,
}

impl Deaths {
    /// A death at `now`: the pause before starting again, or `None` when
    /// it is the [`MAX_DEATHS`]th within [`DEATH_WINDOW`] (give up).
    pub(crate) fn died(&mut self, now: Instant, backoff: Backoff) -> Option<Duration> {
        while self
            .at
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > DEATH_WINDOW)
        {
            self.at.pop_front();
        }
        self.at.push_back(now);
        let recent = self.at.len();
        if recent >= MAX_DEATHS {
            return None;
        }
        let doublings = u32::try_from(recent - 1).unwrap_or(u32::MAX).min(16);
        Some(
            backoff
                .first
                .saturating_mul(1 << doublings)
                .min(backoff.most),
        )
    }

    fn recent(&self) -> usize {
        self.at.len()
    }
}

/// Runs `tasks`, starting again any that panics (after a pause), until the
/// first task (the message loop) returns (`Ok`) or one dies too often
/// (`Err`). Any other task returning is a death too: none is meant to.
pub(crate) async fn supervise(tasks: Vec<Task>, backoff: Backoff) -> Result<(), ServeError> {
    let mut running: JoinSet<()> = JoinSet::new();
    let mut which: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut deaths: Vec<Deaths> = tasks.iter().map(|_| Deaths::default()).collect();
    for (i, t) in tasks.iter().enumerate() {
        which.insert(running.spawn((t.start)()).id(), i);
    }
    while let Some(ended) = running.join_next_with_id().await {
        let (id, died) = match ended {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e.to_string())),
        };
        let Some(i) = which.remove(&id) else {
            continue;
        };
        let task = &tasks[i];
        if i == 0 && died.is_none() {
            tracing::info!("the {} task ended", task.name);
            return Ok(());
        }
        let why = died.unwrap_or_else(|| "it returned".to_string());
        let Some(pause) = deaths[i].died(Instant::now(), backoff) else {
            tracing::error!("the {} task died again ({why}); giving up", task.name);
            return Err(ServeError::TaskFailed {
                task: task.name,
                deaths: deaths[i].recent(),
                window: DEATH_WINDOW,
                last: why,
            });
        };
        tracing::error!(
            "the {} task died ({why}); starting it again in {pause:?}",
            task.name
        );
        let again = (task.start)();
        let handle = running.spawn(async move {
            tokio::time::sleep(pause).await;
            again.await
        });
        which.insert(handle.id(), i);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const QUICK: Backoff = Backoff {
        first: Duration::from_millis(1),
        most: Duration::from_millis(4),
    };

    #[test]
    fn pauses_double_and_the_fifth_death_in_ten_minutes_gives_up() {
        let b = Backoff::default();
        let t0 = Instant::now();
        let mut d = Deaths::default();
        let pauses: Vec<_> = (0..4)
            .map(|i| d.died(t0 + Duration::from_secs(i), b))
            .collect();
        assert_eq!(pauses, [1, 2, 4, 8].map(|s| Some(Duration::from_secs(s))));
        assert_eq!(d.died(t0 + Duration::from_secs(5), b), None);
        // Deaths older than the window are forgotten.
        let mut d = Deaths::default();
        for i in 0..20u64 {
            let at = t0 + DEATH_WINDOW * u32::try_from(i).unwrap() + Duration::from_secs(i);
            assert_eq!(d.died(at, b), Some(Duration::from_secs(1)), "death {i}");
        }
        // The pause never exceeds the most.
        let most = Backoff {
            first: Duration::from_secs(50),
            most: Duration::from_secs(60),
        };
        let mut d = Deaths::default();
        d.died(t0, most);
        assert_eq!(d.died(t0, most), Some(Duration::from_secs(60)));
    }

    /// A task that panics its first `n` runs, then runs for ever; counts runs.
    fn flaky(n: usize, runs: Arc<AtomicUsize>) -> Task {
        Task::new("flaky", move || {
            let runs = runs.clone();
            Box::pin(async move {
                if runs.fetch_add(1, Ordering::SeqCst) < n {
                    panic!("flaky task, as asked");
                }
                std::future::pending::<()>().await
            })
        })
    }

    /// The first task: ends once `done` is past `until`.
    fn main_until(done: Arc<AtomicUsize>, until: usize) -> Task {
        Task::new("main", move || {
            let done = done.clone();
            Box::pin(async move {
                while done.load(Ordering::SeqCst) < until {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
    }

    #[tokio::test]
    async fn a_task_that_panics_is_started_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        // The main task ends once the flaky one has run a fourth time.
        let tasks = vec![main_until(runs.clone(), 4), flaky(3, runs.clone())];
        let r = tokio::time::timeout(Duration::from_secs(10), supervise(tasks, QUICK)).await;
        assert!(matches!(r, Ok(Ok(()))), "{r:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_task_that_keeps_dying_ends_serving() {
        let runs = Arc::new(AtomicUsize::new(0));
        let never = Arc::new(AtomicUsize::new(0));
        let tasks = vec![main_until(never, 1), flaky(usize::MAX, runs.clone())];
        let r = tokio::time::timeout(Duration::from_secs(10), supervise(tasks, QUICK)).await;
        match r {
            Ok(Err(ServeError::TaskFailed { task, deaths, .. })) => {
                assert_eq!((task, deaths), ("flaky", MAX_DEATHS));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), MAX_DEATHS);
    }

    #[tokio::test]
    async fn a_periodic_task_that_returns_is_a_death_too() {
        let runs = Arc::new(AtomicUsize::new(0));
        let returns = {
            let runs = runs.clone();
            Task::new("returns", move || {
                runs.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {})
            })
        };
        let tasks = vec![main_until(Arc::new(AtomicUsize::new(0)), 1), returns];
        let r = tokio::time::timeout(Duration::from_secs(10), supervise(tasks, QUICK)).await;
        assert!(
            matches!(
                r,
                Ok(Err(ServeError::TaskFailed {
                    task: "returns",
                    ..
                }))
            ),
            "{r:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), MAX_DEATHS);
    }
}
