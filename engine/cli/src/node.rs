//! `pluto status` and `pluto daemon`: the node and the coordinator.

use anyhow::{Context, Result};
use pluto_engine::client::{ClientError, CoordinatorClient};
use pluto_engine::{Home, LockMode, Repo};
use pluto_plugins_api::{NodeId, PackId};
use pluto_protocol::Message;
use serde::Serialize;

use crate::fmt::bytes;
use crate::Ui;

#[derive(Serialize)]
struct CoordinatorState {
    url: String,
    key: Option<String>,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offered: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    placed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peers: Option<u32>,
    /// What this node may place in all: the grant plus `earned`, within
    /// its offer.
    #[serde(skip_serializing_if = "Option::is_none")]
    may_place: Option<u64>,
    /// What it is proven (by passed audits) to hold for others.
    #[serde(skip_serializing_if = "Option::is_none")]
    earned: Option<u64>,
    /// What every node may place before holding anything for others.
    #[serde(skip_serializing_if = "Option::is_none")]
    grant: Option<u64>,
}

#[derive(Serialize)]
struct Status {
    node_id: String,
    home: String,
    snapshots: usize,
    local_packs: usize,
    local_bytes: u64,
    offer: u64,
    /// Packs of this node's snapshots, and how many have every copy at
    /// peers (`copies` of them).
    packs: usize,
    packs_placed: usize,
    copies: u8,
    coordinator: Option<CoordinatorState>,
}

/// Connects and authenticates for one command (see
/// [`pluto_engine::daemon::connect`]).
async fn connect(repo: &Repo, home: &Home, url: &str) -> Result<CoordinatorClient, ClientError> {
    pluto_engine::daemon::connect(repo, home, url, false).await
}

/// The configured coordinator's URL, or a clear error.
fn coordinator_url(repo: &Repo) -> Result<String> {
    repo.config
        .coordinator
        .clone()
        .context("no coordinator configured (pluto join URL)")
}

/// Checks, without connecting, a coordinator URL as the coordinator prints
/// it (`mqtt://HOST:PORT#KEY`): that a linked channel plugin handles it and
/// that it has the form that plugin wants. Returns the URL without its key,
/// and the key (from the URL or `key`). A URL without a key is refused
/// unless `trust_first_use`: a node that pins whoever answers first can be
/// captured by anyone on the broker who answers faster.
pub(crate) fn check_coordinator(
    url: &str,
    key: Option<&str>,
    trust_first_use: bool,
) -> Result<(String, Option<NodeId>)> {
    let (base, in_url) = match url.split_once('#') {
        Some((base, k)) => (base, Some(k)),
        None => (url, None),
    };
    pluto_plugins_api::check_channel_url(base).map_err(|e| {
        anyhow::anyhow!(
            "{e}; a coordinator URL looks like mqtt://HOST:PORT#KEY (as the coordinator prints it)"
        )
    })?;
    let in_url = in_url
        .map(|k| {
            k.parse::<NodeId>()
                .context("the key after '#' in the coordinator URL must be 64 hex digits")
        })
        .transpose()?;
    let given = key
        .map(|k| {
            k.parse::<NodeId>()
                .context("--coordinator-key must be 64 hex digits")
        })
        .transpose()?;
    let pin = match (in_url, given) {
        (Some(a), Some(b)) if a != b => anyhow::bail!(
            "the URL carries key {a} and --coordinator-key says {b}; give one of them"
        ),
        (a, b) => a.or(b),
    };
    if pin.is_none() && !trust_first_use {
        let base = pluto_plugins_api::redact_url(base);
        anyhow::bail!(
            "{base} carries no coordinator key: use the URL the coordinator prints ({base}#KEY) or give --coordinator-key KEY; --trust-first-use pins whichever coordinator answers first, which anyone on its broker could be"
        );
    }
    Ok((base.to_string(), pin))
}

/// Reaches the coordinator at `url` as the node of `keys` (registering its
/// `offer`), checks its key against `pin` when given, and returns the key
/// it answered with. The error is one line that says what went wrong.
pub(crate) async fn reach(
    url: &str,
    pin: Option<NodeId>,
    keys: &pluto_engine::keys::Keys,
    offer: u64,
) -> Result<NodeId> {
    match CoordinatorClient::connect(url, keys, pin, offer, false).await {
        Ok(client) => {
            let key = client.coordinator();
            client.close().await;
            Ok(key)
        }
        Err(ClientError::KeyChanged { pinned, seen }) => anyhow::bail!(
            "the coordinator at {} answers with key {seen}, not with the key given ({pinned}); check the key (the coordinator prints its URL with its key: mqtt://HOST:PORT#KEY)",
            pluto_plugins_api::redact_url(url)
        ),
        Err(e) => Err(anyhow::anyhow!("{}", crate::one_line(&e.into()))),
    }
}

/// `pluto join URL`: joins a coordinator from an existing home, or moves
/// to another one. The URL's form is checked, the coordinator reached
/// (unless `offline`) and its key pinned; the config changes only then.
pub(crate) async fn join(
    ui: &Ui,
    home: Home,
    url: &str,
    pin: Option<NodeId>,
    offline: bool,
) -> Result<u8> {
    let repo = Repo::open(home.clone(), LockMode::Exclusive).await?;
    let pin = if offline {
        pin
    } else {
        let key = reach(url, pin, &repo.keys, repo.config.offer)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; nothing was changed"))?;
        Some(key)
    };
    let mut cfg = home.load_config()?;
    let previous = cfg.coordinator.replace(url.to_string());
    cfg.coordinator_key = pin.map(|k| k.to_hex());
    home.save_config(&cfg)?;
    repo.catalog.close().await;
    let previous = previous.filter(|p| p != url);
    if ui.json {
        ui.print_json(&serde_json::json!({
            "coordinator": url,
            "coordinator_key": cfg.coordinator_key,
            "contacted": !offline,
            "previous": previous,
        }))?;
    } else if !ui.quiet {
        match &pin {
            Some(k) if !offline => out!("joined the coordinator at {url} (key {k})"),
            Some(k) => out!("the coordinator is now {url} (key {k}); not contacted yet"),
            None => out!(
                "the coordinator is now {url}; not contacted yet, its key is pinned at the first contact (--trust-first-use)"
            ),
        }
        if let Some(p) = previous {
            out!("(it was {p}; restart a running pluto daemon to follow)");
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct Peer {
    id: String,
    online: bool,
    last_seen_ms: u64,
    /// Online fraction over the coordinator's uptime window, or over the
    /// peer's life when it is younger; null while it is too new for a record.
    uptime: Option<f64>,
    /// Replicas of this node's packs the peer holds, and their bytes.
    replicas_held: u32,
    bytes_held: u64,
    /// Replicas of the peer's packs this node holds, and their bytes.
    replicas_stored: u32,
    bytes_stored: u64,
    /// The transport that reached it last (none yet: never reached).
    transport: Option<String>,
    /// That, with the transports tried before it and why they failed.
    route: Option<pluto_engine::network::Route>,
    /// Its reputation per track (0..1): right answers to audits, answers
    /// in time, and recent time online.
    scores: Scores,
    /// Its transfer speed as owners measured it, bytes per second (0: none).
    speed_bps: u64,
    /// Audits it passed, failed, and let lapse.
    audits: Audits,
    /// Excluded for failing audits: no new data, and what it holds is
    /// placed elsewhere.
    excluded: bool,
    /// Below a minimum (uptime, answers in time, speed): no new data for now.
    held_back: bool,
}

#[derive(serde::Serialize)]
struct Scores {
    audit: f64,
    timeout: f64,
    uptime: f64,
}

#[derive(serde::Serialize)]
struct Audits {
    passed: u64,
    failed: u64,
    timed_out: u64,
}

pub(crate) async fn peers(ui: &Ui, home: Home) -> Result<u8> {
    let repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let url = coordinator_url(&repo)?;
    let client = connect(&repo, &home, &url).await?;
    let answer = client.request(&Message::ListPeers).await;
    client.close().await;
    let Message::Peers(list) = answer? else {
        anyhow::bail!("unexpected answer from the coordinator");
    };
    let transports = pluto_engine::network::remembered_transports(&home);
    let peers: Vec<Peer> = list
        .iter()
        .map(|p| Peer {
            transport: transports.get(&p.id).map(|r| r.via.clone()),
            route: transports.get(&p.id).cloned(),
            id: p.id.to_hex(),
            online: p.online,
            last_seen_ms: p.last_seen_ms,
            uptime: p.uptime_permille.map(|u| f64::from(u) / 1000.0),
            replicas_held: p.replicas_held,
            bytes_held: p.bytes_held,
            replicas_stored: p.replicas_stored,
            bytes_stored: p.bytes_stored,
            scores: Scores {
                audit: f64::from(p.audit_permille) / 1000.0,
                timeout: f64::from(p.timeout_permille) / 1000.0,
                uptime: f64::from(p.uptime_score_permille) / 1000.0,
            },
            speed_bps: p.speed_bps,
            audits: Audits {
                passed: p.audits_passed,
                failed: p.audits_failed,
                timed_out: p.audits_timed_out,
            },
            excluded: p.excluded,
            held_back: p.held_back,
        })
        .collect();
    if ui.json {
        ui.print_json(&serde_json::json!({ "peers": peers }))?;
        return Ok(0);
    }
    if peers.is_empty() {
        out!("no peers yet: nobody stores for this node, and it stores for nobody");
        return Ok(0);
    }
    out!(
        "{:<16} {:<9} {:>7} {:>6} {:>11} {:>20} {:>20}  via",
        "peer",
        "state",
        "uptime",
        "audit",
        "speed",
        "holds for you",
        "you hold for it"
    );
    for p in &peers {
        let state = if p.excluded {
            "excluded"
        } else if p.held_back {
            "held back"
        } else if p.online {
            "online"
        } else {
            "offline"
        };
        out!(
            "{:<16} {:<9} {:>7} {:>6.3} {:>11} {:>20} {:>20}  {}",
            &p.id[..16],
            state,
            pluto_plugins_api::human::percent(p.uptime),
            p.scores.audit,
            pluto_plugins_api::human::rate(p.speed_bps),
            format!("{} ({})", p.replicas_held, bytes(p.bytes_held)),
            format!("{} ({})", p.replicas_stored, bytes(p.bytes_stored)),
            p.route
                .as_ref()
                .map_or_else(|| "-".to_string(), |r| r.to_string()),
        );
    }
    Ok(0)
}

/// `pluto offer SIZE`: the coordinator first (it refuses an offer below
/// what is in use), then the config. When the coordinator cannot be
/// reached the config changes alone and the coordinator learns the new
/// offer at the next connection (never below what is in use).
pub(crate) async fn offer(ui: &Ui, home: Home, size: u64) -> Result<u8> {
    let repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let mut applied = None;
    if let Some(url) = repo.config.coordinator.clone() {
        match connect(&repo, &home, &url).await {
            Ok(client) => {
                let r = client.request(&Message::SetOffer { bytes: size }).await;
                client.close().await;
                r?;
                applied = Some(true);
            }
            Err(e @ ClientError::KeyChanged { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!("{e}");
                applied = Some(false);
            }
        }
    }
    let mut cfg = home.load_config()?;
    cfg.offer = size;
    home.save_config(&cfg)?;
    if ui.json {
        ui.print_json(&serde_json::json!({ "offer": size, "coordinator_updated": applied }))?;
    } else if !ui.quiet {
        match applied {
            Some(true) => out!("now offering {}", bytes(size)),
            Some(false) => out!(
                "now offering {} (the coordinator is unreachable; it learns the new offer at the next connection)",
                bytes(size)
            ),
            None => out!("now offering {} (no coordinator configured)", bytes(size)),
        }
    }
    Ok(0)
}

/// `pluto match SIZE`: asks where one pack of SIZE bytes would go now,
/// under the placement policy in config.toml. The space stays reserved for
/// a while (the coordinator's reservation time) and is released unless a
/// replica is recorded.
pub(crate) async fn match_cmd(ui: &Ui, home: Home, size: u64, copies: Option<u8>) -> Result<u8> {
    let repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let url = coordinator_url(&repo)?;
    let placement = &repo.config.placement;
    let copies = copies.unwrap_or(placement.copies);
    if !(1..=pluto_engine::MAX_COPIES).contains(&copies) {
        anyhow::bail!("--copies must be 1..={}", pluto_engine::MAX_COPIES);
    }
    let friends = placement.friend_ids()?;
    let client = connect(&repo, &home, &url).await?;
    let answer = client
        .request(&Message::MatchRequest {
            // A pack that does not exist yet: a name nobody else uses.
            pack: PackId::of(
                &std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
                    .to_le_bytes(),
            ),
            size,
            copies,
            friends: friends.clone(),
            friend_copies: placement.friend_copies.min(copies),
            exclude: Vec::new(),
        })
        .await;
    client.close().await;
    let Message::MatchReply { storers, .. } = answer? else {
        anyhow::bail!("unexpected answer from the coordinator");
    };
    let list: Vec<serde_json::Value> = storers
        .iter()
        .map(|s| serde_json::json!({ "id": s.to_hex(), "friend": friends.contains(s) }))
        .collect();
    if ui.json {
        ui.print_json(&serde_json::json!({
            "size": size,
            "copies": copies,
            "storers": list,
        }))?;
    } else if !ui.quiet {
        out!(
            "{} of {copies} copies of {} have a place:",
            storers.len(),
            bytes(size)
        );
        for s in &storers {
            let tag = if friends.contains(s) { " (friend)" } else { "" };
            out!("  {}{tag}", s.to_hex());
        }
    }
    // Fewer storers than copies: the network lacks room (a partial answer).
    Ok(if storers.len() < usize::from(copies) {
        3
    } else {
        0
    })
}

pub(crate) async fn status(ui: &Ui, home: Home) -> Result<u8> {
    let repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let packs = repo.packs.list()?;
    let coordinator = match repo.config.coordinator.clone() {
        None => None,
        Some(url) => Some(match connect(&repo, &home, &url).await {
            Ok(client) => {
                let report = client.request(&Message::GetStatus).await;
                let key = Some(client.coordinator().to_hex());
                client.close().await;
                match report {
                    Ok(Message::Status(s)) => CoordinatorState {
                        url,
                        key,
                        state: "connected",
                        error: None,
                        offered: Some(s.offered),
                        held: Some(s.held),
                        placed: Some(s.placed),
                        peers: Some(s.peers),
                        may_place: s.quota.map(|q| q.may_place),
                        earned: s.quota.map(|q| q.earned),
                        grant: s.quota.map(|q| q.grant),
                    },
                    Ok(other) => {
                        unreachable_state(url, key, format!("unexpected answer {other:?}"))
                    }
                    Err(e) => unreachable_state(url, key, e.to_string()),
                }
            }
            Err(e) => unreachable_state(url, repo.config.coordinator_key.clone(), e.to_string()),
        }),
    };
    let all = repo.catalog.packs().await?;
    let placement = pluto_engine::manifest::Placement::load(&home.placement_path())?;
    let copies = repo.config.placement.copies;
    let packs_placed = all
        .iter()
        .filter(|(id, _)| {
            placement
                .packs
                .get(id)
                .is_some_and(|p| p.replicas.len() >= usize::from(copies))
        })
        .count();
    let st = Status {
        packs: all.len(),
        packs_placed,
        copies,
        node_id: repo.keys.node_id().to_hex(),
        home: repo.home.root().display().to_string(),
        snapshots: repo.snapshots().await?.len(),
        local_packs: packs.len(),
        local_bytes: packs.iter().map(|p| p.1).sum(),
        offer: repo.config.offer,
        coordinator,
    };
    if ui.json {
        ui.print_json(&st)?;
        return Ok(0);
    }
    out!("node        {}", st.node_id);
    out!("home        {}", st.home);
    out!("snapshots   {}", st.snapshots);
    out!("local packs {} ({})", st.local_packs, bytes(st.local_bytes));
    if st.coordinator.is_some() {
        out!(
            "at peers    {} of {} packs have their {} copies{}",
            st.packs_placed,
            st.packs,
            st.copies,
            if st.packs_placed == st.packs {
                ""
            } else {
                " (the daemon places the rest)"
            }
        );
    }
    match &st.coordinator {
        None => out!("coordinator none (local-only mode)"),
        Some(c) => {
            out!("coordinator {} ({})", c.url, c.state);
            if let Some(k) = &c.key {
                out!("  key       {k}");
            }
            if let Some(e) = &c.error {
                out!("  error     {e}");
            }
            if let (Some(o), Some(h), Some(p), Some(n)) = (c.offered, c.held, c.placed, c.peers) {
                out!("  offered   {}", bytes(o));
                out!("  held      {} (stored here for others)", bytes(h));
                out!(
                    "  placed    {} (stored at peers, every copy counted)",
                    bytes(p)
                );
                out!("  peers     {n}");
                if let (Some(may), Some(e), Some(g)) = (c.may_place, c.earned, c.grant) {
                    out!(
                        "  may place {} (a grant of {} + {} proven held for others, up to the offer)",
                        bytes(may),
                        bytes(g),
                        bytes(e)
                    );
                    if p >= may && may < o {
                        out!(
                            "            all of it placed: each byte held for others and proven by an audit lets you place one more"
                        );
                    } else {
                        out!("            {} left to place", bytes(may.saturating_sub(p)));
                    }
                }
            }
        }
    }
    Ok(0)
}

fn unreachable_state(url: String, key: Option<String>, error: String) -> CoordinatorState {
    CoordinatorState {
        url,
        key,
        state: "unreachable",
        error: Some(error),
        offered: None,
        held: None,
        placed: None,
        peers: None,
        may_place: None,
        earned: None,
        grant: None,
    }
}
