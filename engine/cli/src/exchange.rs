//! The data path from the command line: uploads after a backup, restores
//! through the peers, recovery on a new machine, and the daemon that holds
//! replicas for others and finishes uploads.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use pluto_engine::daemon::{self, Event};
use pluto_engine::manifest::Placement;
use pluto_engine::network::Net;
use pluto_engine::peers::{audit, search_manifest, ManifestWait, UploadReport};
use pluto_engine::remote::PeerPacks;
use pluto_engine::repo::RebuildReport;
use pluto_engine::{Home, LockMode, Repo};
use pluto_plugins_api::PackId;
use pluto_protocol::AuditOutcome;
use tokio_util::sync::CancellationToken;

use crate::fmt::bytes;
use crate::Ui;

/// `pluto backup` saved the snapshot, but some new packs do not have all
/// their copies at peers yet (they stay local; the daemon goes on).
pub(crate) const EXIT_NOT_PLACED: u8 = 4;
/// Audits asked for at once by `check --remote`.
const AUDITING: usize = 32;

/// A coordinator session and the transports over it (see
/// [`daemon::open_net`]).
pub(crate) async fn open_net(repo: &Repo, home: &Home, presence: bool) -> Result<Arc<Net>> {
    Ok(daemon::open_net(repo, home, presence).await?)
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
                "pluto: the snapshot is saved here, but no copy went to peers: {}; the daemon uploads it later",
                crate::one_line(&e)
            );
            return Ok((EXIT_NOT_PLACED, None));
        }
    };
    let r = daemon::upload(repo, &net, true).await;
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
    let placement = Placement::load(&repo.home.placement_path())?;
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
    /// Bytes fetched from the storers to rebuild it.
    pub(crate) fetched: u64,
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
    // The catalog wants the packs' headers and the snapshots, not the
    // data: only those ranges come now, the packs when a restore wants them.
    let peer_packs = Arc::new(
        PeerPacks::new(
            repo.packs.clone(),
            placement.clone(),
            net.clone(),
            repo.keys.replica.clone(),
            tokio::runtime::Handle::current(),
        )
        .ranges_only(),
    );
    repo.packs = peer_packs.clone();
    let catalog = repo.rebuild_catalog().await?;
    let fetched = peer_packs.fetched().1;
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
    placement.save(&repo.home.placement_path())?;
    Ok(Recovered {
        version,
        packs,
        away: found.away,
        catalog,
        fetched,
    })
}

/// `pluto check --remote`: has the coordinator audit every replica of the
/// packs the latest snapshot needs, and says which are proven, failed or
/// unreachable. Exit 1 when any replica failed, or any pack has no replica
/// proven.
pub(crate) async fn check_remote(ui: &Ui, home: Home) -> Result<u8> {
    let mut repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let net = open_net(&repo, &home, false).await?;
    let placement = Placement::load(&home.placement_path())?;
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
/// audits of them, and places and repairs this node's packs
/// ([`pluto_engine::daemon`]) until SIGINT or SIGTERM; links being served
/// then get a few seconds to finish.
pub(crate) async fn daemon(ui: &Ui, home: Home) -> Result<u8> {
    let (json, quiet) = (ui.json, ui.quiet);
    let on_event = Arc::new(move |e: Event| {
        if json {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("message".into(), e.to_string().into());
            }
            out!("{v}");
        } else if !quiet {
            out!("{}", human(&e));
        }
    });
    let stop = CancellationToken::new();
    let mut run = tokio::spawn(daemon::run(home, stop.clone(), on_event));
    tokio::select! {
        r = &mut run => return match r? {
            Ok(()) => Ok(0),
            // The URL in config.toml is the mistake: say how to set another.
            Err(e @ daemon::DaemonError::Client(pluto_engine::client::ClientError::Channel(_))) => {
                bail!("{}; set another with pluto join URL", crate::one_line(&e.into()))
            }
            Err(e) => Err(e.into()),
        },
        r = stop_signal() => r?,
    }
    stop.cancel();
    // The daemon ends its links within its grace; past that and a margin,
    // it is not waited for.
    match tokio::time::timeout(daemon::GRACE * 2, run).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("the daemon did not stop in time"),
    }
    Ok(0)
}

/// Resolves at the first SIGINT or SIGTERM.
async fn stop_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// An event as a person reads it.
fn human(e: &Event) -> String {
    match e {
        Event::Holding {
            replicas,
            bytes: b,
            addresses,
        } => format!(
            "holding {replicas} replicas ({}) for others; addresses {}",
            bytes(*b),
            addresses.join(" ")
        ),
        Event::Uploaded {
            replicas,
            bytes: b,
            complete,
            packs,
        } => format!(
            "upload: sent {replicas} replicas ({}); {complete} of {packs} packs placed",
            bytes(*b)
        ),
        other => other.to_string(),
    }
}
