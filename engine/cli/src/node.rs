//! `pluto status` and `pluto daemon`: the node and the coordinator.

use std::time::Duration;

use anyhow::{Context, Result};
use pluto_engine::client::{ClientError, CoordinatorClient};
use pluto_engine::{Home, LockMode, Repo};
use pluto_plugins_api::NodeId;
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
}

#[derive(Serialize)]
struct Status {
    node_id: String,
    home: String,
    snapshots: usize,
    local_packs: usize,
    local_bytes: u64,
    offer: u64,
    coordinator: Option<CoordinatorState>,
}

fn pinned(repo: &Repo) -> Result<Option<NodeId>> {
    repo.config
        .coordinator_key
        .as_deref()
        .map(|k| {
            k.parse::<NodeId>()
                .context("coordinator_key in config.toml")
        })
        .transpose()
}

/// Connects and authenticates; pins the coordinator's key on first contact.
async fn connect(repo: &Repo, home: &Home, url: &str) -> Result<CoordinatorClient, ClientError> {
    let pin = pinned(repo).map_err(|e| ClientError::Unexpected(e.to_string()))?;
    let client = CoordinatorClient::connect(url, &repo.keys, pin, repo.config.offer).await?;
    if pin.is_none() {
        let mut cfg = repo.config.clone();
        cfg.coordinator_key = Some(client.coordinator().to_hex());
        if let Err(e) = home.save_config(&cfg) {
            tracing::warn!("could not pin the coordinator's key: {e}");
        }
    }
    Ok(client)
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
    let st = Status {
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
    println!("node        {}", st.node_id);
    println!("home        {}", st.home);
    println!("snapshots   {}", st.snapshots);
    println!("local packs {} ({})", st.local_packs, bytes(st.local_bytes));
    match &st.coordinator {
        None => println!("coordinator none (local-only mode)"),
        Some(c) => {
            println!("coordinator {} ({})", c.url, c.state);
            if let Some(k) = &c.key {
                println!("  key       {k}");
            }
            if let Some(e) = &c.error {
                println!("  error     {e}");
            }
            if let (Some(o), Some(h), Some(p), Some(n)) = (c.offered, c.held, c.placed, c.peers) {
                println!("  offered   {}", bytes(o));
                println!("  held      {} (stored here for others)", bytes(h));
                println!(
                    "  placed    {} (stored at peers, every copy counted)",
                    bytes(p)
                );
                println!("  peers     {n}");
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
    }
}

pub(crate) async fn daemon(ui: &Ui, home: Home) -> Result<u8> {
    let repo = Repo::open(home.clone(), LockMode::Shared).await?;
    let url = repo
        .config
        .coordinator
        .clone()
        .context("no coordinator configured (pluto init --coordinator URL)")?;
    let say = |what: String| {
        if ui.json {
            println!("{}", serde_json::json!({ "event": what }));
        } else if !ui.quiet {
            println!("{what}");
        }
    };
    let mut backoff = Duration::from_secs(1);
    let run = async {
        loop {
            match connect(&repo, &home, &url).await {
                Ok(client) => {
                    backoff = Duration::from_secs(1);
                    say(format!(
                        "connected to coordinator {} at {url}",
                        client.coordinator().short()
                    ));
                    loop {
                        tokio::time::sleep(client.heartbeat).await;
                        if let Err(e) = client.request(&Message::Heartbeat).await {
                            say(format!("lost the coordinator: {e}"));
                            break;
                        }
                    }
                    client.close().await;
                }
                // A changed key is not something retrying fixes.
                Err(e @ ClientError::KeyChanged { .. }) => return Err(anyhow::Error::new(e)),
                Err(e) => say(format!(
                    "cannot reach the coordinator: {e}; retrying in {}s",
                    backoff.as_secs()
                )),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    };
    tokio::select! {
        r = run => r.map(|()| 0),
        r = tokio::signal::ctrl_c() => { r?; Ok(0) }
    }
}
