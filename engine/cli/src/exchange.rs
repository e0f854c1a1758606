//! The data path from the command line: uploads after a backup, restores
//! through the peers, recovery on a new machine, and the daemon that holds
//! replicas for others and finishes uploads.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use pluto_engine::client::{ClientError, CoordinatorClient};
use pluto_engine::held::Held;
use pluto_engine::manifest::Placement;
use pluto_engine::network::Net;
use pluto_engine::peers::{
    audit, search_manifest, ManifestWait, RepairReport, UploadReport, Uploader,
};
use pluto_engine::remote::PeerPacks;
use pluto_engine::repo::RebuildReport;
use pluto_engine::{Home, LockMode, Repo};
use pluto_plugins_api::{open_blob_store, BlobKind, PackId};
use pluto_protocol::{AuditOutcome, Message, MAX_HELD_REPORTS};

use crate::fmt::bytes;
use crate::node::connect_as;
use crate::Ui;

/// `pluto backup` saved the snapshot, but some new packs do not have all
/// their copies at peers yet (they stay local; the daemon goes on).
pub(crate) const EXIT_NOT_PLACED: u8 = 4;
/// Audits of what this node holds answered at once (each reads a replica
/// whole).
const PROVING: usize = 2;
/// Audits asked for at once by `check --remote`.
const AUDITING: usize = 32;

/// A coordinator session and the transports over it. The daemon's
/// (`presence`) listens where the config says; a command's listens on a
/// port of its own, as it only reaches out.
pub(crate) async fn open_net(repo: &Repo, home: &Home, presence: bool) -> Result<Arc<Net>> {
    let url = repo
        .config
        .coordinator
        .clone()
        .context("no coordinator configured (pluto init --coordinator URL)")?;
    let client = Arc::new(connect_as(repo, home, &url, presence).await?);
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
/// daemon). `wait` blocks until the other one is done.
fn upload_lock(home: &Home, wait: bool) -> Result<Option<File>> {
    let path = home.upload_lock_path();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if wait {
        f.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        return Ok(Some(f));
    }
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Repairs what the coordinator says was lost or sits on storers that are
/// excluded or gone, then uploads what lacks copies (packs no longer here
/// come from another replica); with `wait`, waits for another uploader to
/// finish first (None when not waiting and another one runs).
pub(crate) async fn upload(
    repo: &Repo,
    net: &Arc<Net>,
    wait: bool,
) -> Result<Option<(RepairReport, UploadReport)>> {
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
    let placement = Placement::load(&up.placement_path).map_err(anyhow::Error::msg)?;
    up.packs = Arc::new(PeerPacks::new(
        repo.packs.clone(),
        placement,
        net.clone(),
        repo.keys.replica.clone(),
        tokio::runtime::Handle::current(),
    ));
    let report = up.run(&packs).await.map_err(anyhow::Error::msg)?;
    if let Some(limit) = repo.config.local_cache {
        trim_cache(repo, limit).await?;
    }
    Ok(Some((repaired, report)))
}

/// Drops local data packs that have all their copies at peers, the oldest
/// first... by id order (packs carry no time), until the local store is
/// within `limit` bytes. Packs with trees or snapshots stay: the next
/// backup reads them.
async fn trim_cache(repo: &Repo, limit: u64) -> Result<()> {
    let placement = Placement::load(&repo.home.placement_path()).map_err(anyhow::Error::msg)?;
    let copies = usize::from(repo.config.placement.copies);
    let local = repo.packs.list()?;
    let mut total: u64 = local.iter().map(|p| p.1).sum();
    if total <= limit {
        return Ok(());
    }
    let mut kinds: std::collections::HashMap<PackId, Vec<BlobKind>> = Default::default();
    for b in repo.catalog.blobs().await? {
        kinds.entry(b.pack).or_default().push(b.kind);
    }
    for (id, size) in local {
        if total <= limit {
            break;
        }
        let placed = placement
            .packs
            .get(&id)
            .is_some_and(|p| p.replicas.len() >= copies);
        let data = kinds
            .get(&id)
            .is_some_and(|k| pluto_engine::peers::data_only(k));
        if placed && data {
            repo.packs.delete(&id)?;
            total -= size;
        }
    }
    Ok(())
}

/// After a backup: place the new packs. Returns the exit code it adds and
/// what it did (for `--json`, which prints it with the backup's report).
pub(crate) async fn upload_after_backup(
    ui: &Ui,
    repo: &Repo,
) -> Result<(u8, Option<UploadReport>)> {
    if repo.config.coordinator.is_none() {
        return Ok((0, None));
    }
    let net = match open_net(repo, &repo.home, false).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "pluto: the snapshot is saved here, but no copy went to peers: {e:#}; the daemon uploads it later"
            );
            return Ok((EXIT_NOT_PLACED, None));
        }
    };
    let r = upload(repo, &net, true).await;
    net.close().await;
    let (repaired, report) = r?.context("the upload lock was not taken")?;
    for why in &repaired.reasons {
        eprintln!("repair: {why}; placing it elsewhere");
    }
    for p in &report.problems {
        eprintln!("warning: {p}");
    }
    if !ui.json && !ui.quiet {
        out!(
            "sent {} replicas ({}); {} of {} packs have {} copies at peers",
            report.replicas_sent,
            bytes(report.bytes_sent),
            report.complete,
            report.packs,
            repo.config.placement.copies
        );
    }
    if report.short > 0 {
        eprintln!(
            "pluto: {} pack(s) lack copies at peers; they stay here and the daemon places them later",
            report.short
        );
        return Ok((EXIT_NOT_PLACED, Some(report)));
    }
    Ok((0, Some(report)))
}

/// Packs fetched at once ahead of a full restore.
const PREFETCH: usize = 6;

/// Lets `repo` read packs it lacks from the peers, when it has a
/// coordinator and packs placed there that are not here; with `prefetch`
/// (a reader that wants everything) they start coming at once, several at
/// a time. The returned session must live as long as the repo reads.
pub(crate) async fn attach_peers(repo: &mut Repo, prefetch: bool) -> Result<Option<Arc<Net>>> {
    if repo.config.coordinator.is_none() {
        return Ok(None);
    }
    let placement = Placement::load(&repo.home.placement_path()).map_err(anyhow::Error::msg)?;
    let local: std::collections::HashSet<PackId> =
        repo.packs.list()?.into_iter().map(|p| p.0).collect();
    if placement.packs.keys().all(|p| local.contains(p)) {
        return Ok(None);
    }
    let home = repo.home.clone();
    let net = open_net(repo, &home, false).await?;
    let packs = Arc::new(PeerPacks::new(
        repo.packs.clone(),
        placement,
        net.clone(),
        repo.keys.replica.clone(),
        tokio::runtime::Handle::current(),
    ));
    if prefetch {
        tokio::spawn(packs.clone().prefetch(PREFETCH));
    }
    repo.packs = packs;
    Ok(Some(net))
}

/// Between two manifest lookups while a recovery waits for the storers.
const RECOVERY_POLL: Duration = Duration::from_secs(2);
/// How often a recovery that waits says so (and at every change).
const RECOVERY_SAY_EVERY: Duration = Duration::from_secs(15);

/// What a recovery brought back.
pub(crate) struct Recovered {
    /// The manifest's version.
    pub(crate) version: u64,
    /// Packs it lists.
    pub(crate) packs: usize,
    /// Packs whose storers were all away when the waiting ended.
    pub(crate) away: usize,
    /// The catalog rebuilt from the packs' headers.
    pub(crate) catalog: RebuildReport,
}

/// On a new machine: the manifest from the coordinator or the peers, then
/// the catalog from the packs' headers (fetched from the peers). Waits up
/// to `wait` for the manifest and for a storer of each pack to be online
/// (after the coordinator lost its books, storers come back one by one as
/// their daemons reconnect), saying why on stderr. Fails, without saving a
/// placement, when no manifest is found or no snapshot comes back.
pub(crate) async fn recover(ui: &Ui, home: &Home, wait: Duration) -> Result<Recovered> {
    let mut repo = Repo::open(home.clone(), LockMode::Exclusive).await?;
    let net = match open_net(&repo, home, false).await {
        Ok(n) => n,
        Err(e) => {
            repo.catalog.close().await;
            return Err(e);
        }
    };
    let r = recover_over(ui, &mut repo, &net, wait).await;
    repo.catalog.close().await;
    net.close().await;
    r
}

async fn recover_over(
    ui: &Ui,
    repo: &mut Repo,
    net: &Arc<Net>,
    wait: Duration,
) -> Result<Recovered> {
    let chatty = !ui.quiet && !ui.json;
    let mut said: Option<(ManifestWait, tokio::time::Instant)> = None;
    let found = search_manifest(net, &repo.keys, wait, RECOVERY_POLL, |why, left| {
        let now = tokio::time::Instant::now();
        let repeat = said
            .as_ref()
            .is_some_and(|(w, at)| w == why && now.duration_since(*at) < RECOVERY_SAY_EVERY);
        if !chatty || repeat {
            return;
        }
        let left = left.as_secs();
        match why {
            ManifestWait::NoManifest { .. } => eprintln!(
                "no manifest of this node at the coordinator or its storers yet; waiting for the storers to come back online ({left}s left)"
            ),
            ManifestWait::Storers { packs, away } => eprintln!(
                "found the manifest ({packs} packs); waiting for a storer of {away} of them to come back online ({left}s left)"
            ),
            ManifestWait::Failed(e) => {
                eprintln!("asking the coordinator: {e}; trying again ({left}s left)")
            }
            other => eprintln!("waiting: {other:?} ({left}s left)"),
        }
        said = Some((why.clone(), now));
    })
    .await;
    let Some(placement) = found.placement else {
        let url = repo.config.coordinator.clone().unwrap_or_default();
        let after = match found.waiting {
            Some(ManifestWait::Failed(e)) => format!("the last lookup failed: {e}"),
            _ => format!("after waiting {}s", wait.as_secs()),
        };
        bail!(
            "no manifest of this node at the coordinator {url} or at any storer it lists, {after}: \
             check that this is the coordinator the node used and that its storers are online \
             (their `pluto daemon` running), then run init --mnemonic-file again (--wait SECS waits longer)"
        );
    };
    if found.away > 0 && chatty {
        eprintln!(
            "warning: {} pack(s) have no storer online after waiting {}s; reading what can be read",
            found.away,
            wait.as_secs()
        );
    }
    let version = placement.version;
    let packs = placement.packs.len();
    repo.packs = Arc::new(PeerPacks::new(
        repo.packs.clone(),
        placement.clone(),
        net.clone(),
        repo.keys.replica.clone(),
        tokio::runtime::Handle::current(),
    ));
    let catalog = repo.rebuild_catalog().await?;
    if catalog.snapshots == 0 && !catalog.problems.is_empty() {
        for p in &catalog.problems {
            eprintln!("warning: {p}");
        }
        bail!(
            "the manifest lists {packs} packs, but no snapshot could be read from the storers: \
             check that they are online, then run init --mnemonic-file again"
        );
    }
    // Only a recovery that brought snapshots back leaves a placement: the
    // next upload builds on it.
    placement
        .save(&repo.home.placement_path())
        .map_err(anyhow::Error::msg)?;
    Ok(Recovered {
        version,
        packs,
        away: found.away,
        catalog,
    })
}

/// Opens the store of replicas held for others.
fn open_held(repo: &Repo, coordinator: pluto_plugins_api::NodeId) -> Result<Arc<Held>> {
    let store = open_blob_store(&repo.home.resolve_url(&repo.config.held))?;
    Ok(Arc::new(Held::open(
        repo.keys.identity.clone(),
        coordinator,
        store.into(),
        *repo.keys.obfuscation,
        repo.home.held_manifests(),
        repo.config.offer,
    )?))
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

/// `pluto check --remote`: has the coordinator audit every replica of the
/// packs the latest snapshot needs, and says which are proven, failed or
/// unreachable. Exit 1 when any replica failed, or any pack has no replica
/// proven.
pub(crate) async fn check_remote(ui: &Ui, home: Home) -> Result<u8> {
    let mut repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let net = open_net(&repo, &home, false).await?;
    let placement = Placement::load(&home.placement_path()).map_err(anyhow::Error::msg)?;
    let snapshot = repo.find_snapshot("latest").await?;
    // The trees may be at peers only.
    repo.packs = Arc::new(PeerPacks::new(
        repo.packs.clone(),
        placement.clone(),
        net.clone(),
        repo.keys.replica.clone(),
        tokio::runtime::Handle::current(),
    ));
    let repo = Arc::new(repo);
    let index = repo.load_index().await?;
    let packs = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || repo.snapshot_packs(&index, &snapshot.id)).await??
    };
    let mut targets = Vec::new();
    let mut unplaced = Vec::new();
    for p in &packs {
        match placement.packs.get(p) {
            Some(pp) if !pp.replicas.is_empty() => {
                targets.extend(pp.replicas.iter().map(|r| (*p, r.storer)));
            }
            _ => unplaced.push(*p),
        }
    }
    let pb = ui.bar(
        Some(targets.len() as u64),
        "{bar:40} {pos}/{len} replicas {elapsed_precise}",
    );
    let results: Vec<(
        PackId,
        pluto_plugins_api::NodeId,
        Result<AuditOutcome, String>,
    )> = futures_util::stream::iter(targets.into_iter().map(|(pack, storer)| {
        let net = &net;
        let pb = &pb;
        async move {
            let r = audit(net, pack, storer).await.map_err(|e| e.to_string());
            pb.inc(1);
            (pack, storer, r)
        }
    }))
    .buffer_unordered(AUDITING)
    .collect()
    .await;
    pb.finish_and_clear();
    net.close().await;
    let count = |o: AuditOutcome| {
        results
            .iter()
            .filter(|(_, _, r)| matches!(r, Ok(x) if *x == o))
            .count()
    };
    let proven = count(AuditOutcome::Proven);
    let failed = count(AuditOutcome::Failed);
    let unreachable = results.len() - proven - failed;
    let mut proven_packs = std::collections::HashSet::new();
    for (p, _, r) in &results {
        if matches!(r, Ok(AuditOutcome::Proven)) {
            proven_packs.insert(*p);
        }
    }
    let unproven: Vec<PackId> = packs
        .iter()
        .filter(|p| !proven_packs.contains(*p))
        .copied()
        .collect();
    if ui.json {
        let list: Vec<serde_json::Value> = results
            .iter()
            .map(|(p, s, r)| {
                serde_json::json!({
                    "pack": p.to_hex(),
                    "storer": s.to_hex(),
                    "outcome": match r { Ok(o) => o.as_str().to_string(), Err(e) => format!("error: {e}") },
                })
            })
            .collect();
        ui.print_json(&serde_json::json!({
            "snapshot": snapshot.id.to_hex(),
            "packs": packs.len(),
            "replicas": results.len(),
            "proven": proven,
            "failed": failed,
            "unreachable": unreachable,
            "packs_without_proven_replica": unproven.len(),
            "packs_never_placed": unplaced.len(),
            "results": list,
        }))?;
    } else {
        for (p, s, r) in &results {
            match r {
                Ok(AuditOutcome::Proven) => {}
                Ok(o) => eprintln!("pack {} at {}: {}", p.short(), s.short(), o.as_str()),
                Err(e) => eprintln!("pack {} at {}: {e}", p.short(), s.short()),
            }
        }
        if !ui.quiet {
            out!(
                "snapshot {}: {} packs, {} replicas: {proven} proven, {failed} failed, {unreachable} unreachable",
                snapshot.id.short(),
                packs.len(),
                results.len()
            );
            if !unplaced.is_empty() {
                out!(
                    "{} packs have no replica at peers yet (local only)",
                    unplaced.len()
                );
            }
        }
    }
    if failed > 0 || !unproven.is_empty() {
        bail!(
            "{failed} replica(s) failed their audit; {} pack(s) have no replica proven now",
            unproven.len()
        );
    }
    if !ui.json && !ui.quiet {
        out!("every pack of the latest snapshot has a replica proven at a peer");
    }
    Ok(0)
}

/// `pluto daemon`: stays connected, holds replicas for others, answers
/// audits of them, and places and repairs this node's packs.
pub(crate) async fn daemon(ui: &Ui, home: Home) -> Result<u8> {
    tokio::select! {
        r = daemon_loop(ui, &home) => r.map(|()| 0),
        r = tokio::signal::ctrl_c() => { r?; Ok(0) }
    }
}

async fn daemon_loop(ui: &Ui, home: &Home) -> Result<()> {
    let say = |what: String| {
        if ui.json {
            out!("{}", serde_json::json!({ "event": what }));
        } else if !ui.quiet {
            out!("{what}");
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        // The home is not locked: backups run beside the daemon.
        let repo = Repo::open(home.clone(), LockMode::Unlocked).await?;
        match open_net(&repo, home, true).await {
            Ok(net) => {
                backoff = Duration::from_secs(1);
                serve_session(&repo, home, &net, &say).await?;
                net.close().await;
            }
            // A changed key is not something retrying fixes.
            Err(e)
                if e.downcast_ref::<ClientError>()
                    .is_some_and(|c| matches!(c, ClientError::KeyChanged { .. })) =>
            {
                return Err(e);
            }
            Err(e) => say(format!(
                "cannot reach the coordinator: {e:#}; retrying in {}s",
                backoff.as_secs()
            )),
        }
        repo.catalog.close().await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// One connected stretch of the daemon: until the coordinator is lost.
async fn serve_session(
    repo: &Repo,
    home: &Home,
    net: &Arc<Net>,
    say: &impl Fn(String),
) -> Result<()> {
    let client = net.client();
    say(format!(
        "connected to coordinator {} as {}",
        client.coordinator().short(),
        repo.keys.node_id().short()
    ));
    let held = open_held(repo, client.coordinator())?;
    if let Err(e) = net.announce().await {
        say(format!("announcing addresses: {e}"));
    }
    match report_held(client, &held).await {
        Ok(n) if n > 0 => say(format!("reported {n} held replicas")),
        Ok(_) => {}
        Err(e) => say(format!("reporting held replicas: {e}")),
    }
    let (used, count) = held.usage();
    say(format!(
        "holding {count} replicas ({}) for others; addresses {}",
        bytes(used),
        net.own_addresses().join(" ")
    ));
    let serving = net.serve(held.clone());
    let mut challenges = client.challenges();
    let proving = tokio::sync::Semaphore::new(PROVING);
    let work = async {
        let mut beat = tokio::time::interval(client.heartbeat);
        let mut uploads =
            tokio::time::interval(Duration::from_secs(repo.config.daemon_every.max(1)));
        let mut answers = futures_util::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(m) = challenges.recv() => {
                    let (held, proving) = (&held, &proving);
                    answers.push(async move {
                        let _permit = proving.acquire().await;
                        answer_audit(client, held, m).await;
                    });
                }
                Some(()) = answers.next(), if !answers.is_empty() => {}
                _ = beat.tick() => {
                    if let Err(e) = client.request(&Message::Heartbeat).await {
                        say(format!("lost the coordinator: {e}"));
                        return;
                    }
                }
                _ = uploads.tick() => {
                    let cfg = home.load_config().unwrap_or_else(|_| repo.config.clone());
                    held.set_capacity(cfg.offer);
                    match upload(repo, net, false).await {
                        Ok(Some((fixed, r))) => {
                            for why in &fixed.reasons {
                                say(format!("repair: {why}; placing it elsewhere"));
                            }
                            if r.replicas_sent > 0 || r.short > 0 || fixed.moved > 0 {
                                say(format!(
                                    "upload: sent {} replicas ({}); {} of {} packs placed",
                                    r.replicas_sent, bytes(r.bytes_sent), r.complete, r.packs
                                ));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => say(format!("upload: {e:#}")),
                    }
                }
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = serving => say("the transports closed".into()),
    }
    Ok(())
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
    if pluto_engine::client::now_ms() > deadline_ms {
        return;
    }
    let answer = held.prove(&owner, &pack, root, size, offset, len).await;
    if let Err(e) = client.notify(&Message::Proof { challenge, answer }).await {
        tracing::warn!("answering an audit: {e}");
    }
}
