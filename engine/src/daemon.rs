//! The node daemon: stays connected to the coordinator, holds replicas for
//! others and answers audits of them, and places and repairs this node's
//! packs.
//!
//! ```text
//! run(home, stop) ─ reconnects with backoff (1 s doubling to 60 s)
//!   └ session: one coordinator connection, three tasks under one token
//!       control ── Heartbeat every `heartbeat` ─────────────▶ coordinator
//!               ◀─ Prove ── each answered on a task of its own
//!                            (PROVING at once; reads kilobytes)
//!       uploads ── every `daemon_every`: repair, place, trim the cache
//!                  (HOME/upload.lock, shared with `pluto backup`)
//!       serving ◀─ links from peers: Held::serve, one task per link
//!   the first task to end (coordinator lost, transports closed) or `stop`
//!   cancels the others; links being served get GRACE to finish
//! ```
//!
//! The control task does nothing but talk to the coordinator, so an upload
//! of many minutes on a slow uplink never delays a heartbeat or an audit
//! answer. What happens is told through [`Event`]s; printing them is the
//! caller's business.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use pluto_plugins_api::{open_blob_store, BlobKind, NodeId, PackId, StoreError};
use pluto_protocol::{Message, MAX_HELD_REPORTS};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::{now_ms, ClientError, CoordinatorClient};
use crate::held::Held;
use crate::manifest::Placement;
use crate::network::{Net, NetError};
use crate::peers::{RepairReport, UploadReport, Uploader};
use crate::remote::PeerPacks;
use crate::{Home, LockMode, Repo, RepoError};

/// Audits of what this node holds answered at once.
const PROVING: usize = 4;
/// How long links being served may take to finish when the daemon stops.
pub const GRACE: Duration = Duration::from_secs(10);
/// The longest wait between two tries to reach the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl DaemonError {
    /// Whether reaching the coordinator again later may succeed (it or
    /// the network was down); otherwise the daemon stops at once.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Client(c) => c.is_transient(),
            Self::NoCoordinator => false,
            _ => true,
        }
    }
}

/// Why the daemon (or an upload) stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The home.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The coordinator.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The transports.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The home has no coordinator.
    #[error("no coordinator configured (pluto join URL)")]
    NoCoordinator,
    /// A file could not be used.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Placing packs failed as a whole.
    #[error("placing packs: {0}")]
    Upload(#[from] crate::peers::UploadError),
    /// A worker thread died.
    #[error("a worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the daemon did, for its caller to show.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A session began.
    Connected {
        /// The coordinator's key.
        coordinator: String,
        /// This node.
        node: String,
    },
    /// Replicas reported again to a coordinator that had lost them.
    Reported {
        /// How many it took.
        replicas: u32,
    },
    /// What this node holds for others, and where it listens.
    Holding {
        /// Replicas.
        replicas: usize,
        /// Their bytes.
        bytes: u64,
        /// The addresses announced.
        addresses: Vec<String>,
    },
    /// A replica of this node's moves elsewhere.
    Repair {
        /// Which and why.
        why: String,
    },
    /// An upload round placed something, or left packs short.
    Uploaded {
        /// Replicas sent.
        replicas: usize,
        /// Their bytes.
        bytes: u64,
        /// Packs with every copy.
        complete: usize,
        /// Packs in all.
        packs: usize,
    },
    /// Something went wrong and the daemon goes on.
    Warning {
        /// What.
        what: String,
    },
    /// The session ended; the daemon reconnects.
    Lost {
        /// Why.
        why: String,
    },
    /// The coordinator could not be reached.
    Unreachable {
        /// Why.
        why: String,
        /// Seconds until the next try.
        retry_secs: u64,
    },
    /// The daemon was told to stop and did.
    Stopped,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connected { coordinator, node } => write!(
                f,
                "connected to coordinator {} as {}",
                short(coordinator),
                short(node)
            ),
            Self::Reported { replicas } => write!(f, "reported {replicas} held replicas"),
            Self::Holding {
                replicas,
                bytes,
                addresses,
            } => write!(
                f,
                "holding {replicas} replicas ({bytes} bytes) for others; addresses {}",
                addresses.join(" ")
            ),
            Self::Repair { why } => write!(f, "repair: {why}; placing it elsewhere"),
            Self::Uploaded {
                replicas,
                bytes,
                complete,
                packs,
            } => write!(
                f,
                "upload: sent {replicas} replicas ({bytes} bytes); {complete} of {packs} packs placed"
            ),
            Self::Warning { what } => f.write_str(what),
            Self::Lost { why } => write!(f, "lost the coordinator: {why}"),
            Self::Unreachable { why, retry_secs } => write!(
                f,
                "cannot reach the coordinator: {why}; retrying in {retry_secs}s"
            ),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

/// Connects to the coordinator at `url` and authenticates; pins the
/// coordinator's key on first contact. The config is read afresh, so a
/// long-running daemon picks up an offer changed meanwhile (`pluto offer`)
/// when it reconnects. `presence` marks the node's long-lived connection.
pub async fn connect(
    repo: &Repo,
    home: &Home,
    url: &str,
    presence: bool,
) -> Result<CoordinatorClient, ClientError> {
    let config = home.load_config().unwrap_or_else(|_| repo.config.clone());
    let pin = config
        .coordinator_key
        .as_deref()
        .map(|k| k.parse::<NodeId>())
        .transpose()
        .map_err(|e| ClientError::BadPin(e.to_string()))?;
    let client = CoordinatorClient::connect(url, &repo.keys, pin, config.offer, presence).await?;
    if pin.is_none() {
        let mut cfg = config;
        cfg.coordinator_key = Some(client.coordinator().to_hex());
        if let Err(e) = home.save_config(&cfg) {
            tracing::warn!("could not pin the coordinator's key: {e}");
        }
    }
    Ok(client)
}

/// A coordinator session and the transports over it. The daemon's
/// (`presence`) listens where the config says; a command's listens on a
/// port of its own, as it only reaches out.
pub async fn open_net(repo: &Repo, home: &Home, presence: bool) -> Result<Arc<Net>, DaemonError> {
    let url = repo
        .config
        .coordinator
        .clone()
        .ok_or(DaemonError::NoCoordinator)?;
    let client = Arc::new(connect(repo, home, &url, presence).await?);
    let mut config = repo.config.clone();
    if !presence {
        config.listen = if config.listen.starts_with('[') {
            "[::]:0".into()
        } else {
            "0.0.0.0:0".into()
        };
    }
    Ok(Arc::new(
        Net::open(&repo.keys, &config, home, client).await?,
    ))
}

/// Holds `HOME/upload.lock`: one uploader at a time (a backup or the
/// daemon). `wait` blocks until the other one is done. Blocking.
fn upload_lock(home: &Home, wait: bool) -> Result<Option<File>, DaemonError> {
    let path = home.upload_lock_path();
    let io = |source| DaemonError::Io {
        context: format!("locking {}", path.display()),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    if wait {
        f.lock().map_err(io)?;
        return Ok(Some(f));
    }
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Repairs what the coordinator says was lost or sits on storers that are
/// excluded or gone, then uploads what lacks copies (packs no longer here
/// come from another replica); with `wait`, waits for another uploader to
/// finish first (None when not waiting and another one runs). The lock is
/// released however this ends, dropped future included.
pub async fn upload(
    repo: &Repo,
    net: &Arc<Net>,
    wait: bool,
) -> Result<Option<(RepairReport, UploadReport)>, DaemonError> {
    let home = repo.home.clone();
    let Some(_lock) = tokio::task::spawn_blocking(move || upload_lock(&home, wait)).await?? else {
        return Ok(None);
    };
    let packs = repo.catalog.packs().await?;
    let mut up = Uploader {
        keys: &repo.keys,
        packs: repo.packs.clone(),
        placement: &repo.config.placement,
        placement_path: repo.home.placement_path(),
        net,
    };
    let repaired = match up.repair().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("asking what to repair: {e}");
            RepairReport::default()
        }
    };
    let path = up.placement_path.clone();
    let placement = tokio::task::spawn_blocking(move || Placement::load(&path))
        .await?
        .map_err(crate::peers::UploadError::from)?;
    up.packs = Arc::new(PeerPacks::new(
        repo.packs.clone(),
        placement,
        net.clone(),
        repo.keys.replica.clone(),
        tokio::runtime::Handle::current(),
    ));
    let report = up.run(&packs).await?;
    if let Some(limit) = repo.config.local_cache {
        trim_cache(repo, limit).await?;
    }
    Ok(Some((repaired, report)))
}

/// Drops local data packs that have all their copies at peers, in id
/// order (packs carry no time), until the local store is within `limit`
/// bytes. Packs with trees or snapshots stay: the next backup reads them.
async fn trim_cache(repo: &Repo, limit: u64) -> Result<(), DaemonError> {
    let mut kinds: std::collections::HashMap<PackId, Vec<BlobKind>> = Default::default();
    for b in repo.catalog.blobs().await? {
        kinds.entry(b.pack).or_default().push(b.kind);
    }
    let (path, packs) = (repo.home.placement_path(), repo.packs.clone());
    let copies = usize::from(repo.config.placement.copies);
    tokio::task::spawn_blocking(move || {
        let placement = Placement::load(&path).map_err(crate::peers::UploadError::from)?;
        let local = packs.list()?;
        let mut total: u64 = local.iter().map(|p| p.1).sum();
        for (id, size) in local {
            if total <= limit {
                break;
            }
            let placed = placement
                .packs
                .get(&id)
                .is_some_and(|p| p.replicas.len() >= copies);
            let data = kinds.get(&id).is_some_and(|k| crate::peers::data_only(k));
            if placed && data {
                packs.delete(&id)?;
                total -= size;
            }
        }
        Ok(())
    })
    .await?
}

/// Opens the store of replicas held for others (on a worker thread: it
/// reads every object's header).
pub async fn open_held(repo: &Repo, coordinator: NodeId) -> Result<Arc<Held>, DaemonError> {
    let url = repo.home.resolve_url(&repo.config.held);
    let (identity, obfuscation, manifests, offer) = (
        repo.keys.identity.clone(),
        *repo.keys.obfuscation,
        repo.home.held_manifests(),
        repo.config.offer,
    );
    let held = tokio::task::spawn_blocking(move || {
        let store = open_blob_store(&url)?;
        Held::open(
            identity,
            coordinator,
            store.into(),
            obfuscation,
            manifests,
            offer,
        )
    })
    .await??;
    Ok(Arc::new(held))
}

/// Tells the coordinator again what this node holds, in batches.
async fn report_held(client: &CoordinatorClient, held: &Held) -> Result<u32, ClientError> {
    let mut taken = 0;
    for batch in held.reports().chunks(MAX_HELD_REPORTS) {
        if let Message::HeldTaken { taken: n } =
            client.request(&Message::ReportHeld(batch.to_vec())).await?
        {
            taken += n;
        }
    }
    Ok(taken)
}

/// Runs the daemon of the node at `home` until `stop` is cancelled, or an
/// error that retrying cannot fix (no coordinator, a URL no plugin handles,
/// a key that does not match, a broken home). Each thing that happens is passed to `on_event`.
pub async fn run(
    home: Home,
    stop: CancellationToken,
    on_event: Arc<dyn Fn(Event) + Send + Sync>,
) -> Result<(), DaemonError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        // The home is not locked: backups run beside the daemon.
        let repo = Arc::new(Repo::open(home.clone(), LockMode::Unlocked).await?);
        let opened = tokio::select! {
            r = open_net(&repo, &home, true) => Some(r),
            () = stop.cancelled() => None,
        };
        match opened {
            None => {}
            Some(Ok(net)) => {
                backoff = Duration::from_secs(1);
                let r = session(repo.clone(), net.clone(), &stop, &on_event).await;
                net.close().await;
                r?;
            }
            // A changed key, a URL no plugin handles: not something
            // retrying fixes.
            Some(Err(e)) if !e.is_transient() => return Err(e),
            Some(Err(e)) => on_event(Event::Unreachable {
                why: e.to_string(),
                retry_secs: backoff.as_secs(),
            }),
        }
        repo.catalog.close().await;
        if stop.is_cancelled() {
            on_event(Event::Stopped);
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => {
                on_event(Event::Stopped);
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connected stretch: until the coordinator is lost, the transports
/// close, or `stop`.
async fn session(
    repo: Arc<Repo>,
    net: Arc<Net>,
    stop: &CancellationToken,
    on_event: &Arc<dyn Fn(Event) + Send + Sync>,
) -> Result<(), DaemonError> {
    let client = net.client();
    on_event(Event::Connected {
        coordinator: client.coordinator().to_hex(),
        node: repo.keys.node_id().to_hex(),
    });
    let held = open_held(&repo, client.coordinator()).await?;
    if let Err(e) = net.announce().await {
        on_event(Event::Warning {
            what: format!("announcing addresses: {e}"),
        });
    }
    match report_held(client, &held).await {
        Ok(n) if n > 0 => on_event(Event::Reported { replicas: n }),
        Ok(_) => {}
        Err(e) => on_event(Event::Warning {
            what: format!("reporting held replicas: {e}"),
        }),
    }
    // Online from here: the coordinator matches only online storers, and
    // this node can now take what it is given (the transports are served
    // just below). The heartbeat task goes on from there.
    if let Err(e) = client.request(&Message::Heartbeat).await {
        on_event(Event::Lost { why: e.to_string() });
        return Ok(());
    }
    let (bytes, replicas) = held.usage();
    on_event(Event::Holding {
        replicas,
        bytes,
        addresses: net.own_addresses(),
    });
    let token = stop.child_token();
    // Every line a task logs names the node, so the logs of several nodes
    // on one machine (tests, demos) stay apart.
    let span = tracing::info_span!("node", id = %repo.keys.node_id().short());
    let mut tasks = JoinSet::new();
    tasks.spawn(control(net.clone(), held.clone(), token.clone()).instrument(span.clone()));
    tasks.spawn(
        uploads(
            repo.clone(),
            net.clone(),
            held.clone(),
            token.clone(),
            on_event.clone(),
        )
        .instrument(span.clone()),
    );
    {
        let (net, held, token) = (net.clone(), held.clone(), token.clone());
        tasks.spawn(
            async move {
                net.serve(held, token, GRACE).await;
                Some("the transports closed".to_string())
            }
            .instrument(span),
        );
    }
    // The first task to end ends the session.
    let first = tasks.join_next().await;
    token.cancel();
    match first {
        Some(Ok(Some(why))) if !stop.is_cancelled() => on_event(Event::Lost { why }),
        Some(Err(e)) => on_event(Event::Warning {
            what: format!("a daemon task failed: {e}"),
        }),
        _ => {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Heartbeats and audit answers. Ends (with why) when the coordinator is
/// lost, or (with nothing) on `token`.
async fn control(net: Arc<Net>, held: Arc<Held>, token: CancellationToken) -> Option<String> {
    let client = net.client();
    let mut challenges = client.challenges();
    let proving = Arc::new(tokio::sync::Semaphore::new(PROVING));
    let mut answers = JoinSet::new();
    let mut beat = tokio::time::interval(client.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return None,
            Some(m) = challenges.recv() => {
                let (net, held, proving) = (net.clone(), held.clone(), proving.clone());
                answers.spawn(async move {
                    let _permit = proving.acquire_owned().await;
                    answer_audit(net.client(), &held, m).await;
                });
            }
            Some(_) = answers.join_next(), if !answers.is_empty() => {}
            _ = beat.tick() => {
                let r = tokio::select! {
                    r = client.request(&Message::Heartbeat) => r,
                    () = token.cancelled() => return None,
                };
                if let Err(e) = r {
                    return Some(e.to_string());
                }
            }
        }
    }
}

/// Answers one audit of a replica held here.
async fn answer_audit(client: &CoordinatorClient, held: &Held, m: Message) {
    let Message::Prove {
        challenge,
        owner,
        pack,
        root,
        size,
        offset,
        len,
        deadline_ms,
    } = m
    else {
        return;
    };
    if now_ms() > deadline_ms {
        return;
    }
    let answer = held.prove(&owner, &pack, root, size, offset, len).await;
    if let Err(e) = client.notify(&Message::Proof { challenge, answer }).await {
        tracing::warn!("answering an audit: {e}");
    }
}

/// Every `daemon_every`: the offer from the config, then repair and place.
/// Never ends on its own (an upload that fails is told and tried again).
async fn uploads(
    repo: Arc<Repo>,
    net: Arc<Net>,
    held: Arc<Held>,
    token: CancellationToken,
    on_event: Arc<dyn Fn(Event) + Send + Sync>,
) -> Option<String> {
    let mut tick = tokio::time::interval(Duration::from_secs(repo.config.daemon_every.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return None,
            _ = tick.tick() => {}
        }
        let home = repo.home.clone();
        let offer = tokio::task::spawn_blocking(move || home.load_config().map(|c| c.offer))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(repo.config.offer);
        held.set_capacity(offer);
        let r = tokio::select! {
            r = upload(&repo, &net, false) => r,
            () = token.cancelled() => return None,
        };
        match r {
            Ok(Some((fixed, r))) => {
                for why in fixed.reasons {
                    on_event(Event::Repair { why });
                }
                if r.replicas_sent > 0 || r.short > 0 || fixed.moved > 0 {
                    on_event(Event::Uploaded {
                        replicas: r.replicas_sent,
                        bytes: r.bytes_sent,
                        complete: r.complete,
                        packs: r.packs,
                    });
                }
            }
            Ok(None) => {}
            Err(e) => on_event(Event::Warning {
                what: format!("upload: {e}"),
            }),
        }
    }
}
