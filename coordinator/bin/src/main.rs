//! `pluto-coordinator`: runs the coordinator on one command.
//!
//! With no options it embeds an MQTT broker listening on 0.0.0.0:18830 (not
//! the usual 1883, so it never collides with a system broker) and keeps its
//! books in SQLite under its home. `--channel mqtt://HOST:PORT` uses an
//! external broker instead; `--db` picks the books.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ed25519_dalek::SigningKey;
use pluto_coordinator::{Coordinator, CoordinatorConfig};
use pluto_plugins_api::{human, ChannelOptions, ChannelRole, Login, NodeId};
use pluto_protocol::MAX_ENVELOPE;
use pluto_transport_mqtt::broker::{BrokerAuth, BrokerSettings, EmbeddedBroker};
use pluto_transport_mqtt::dynsec::Dynsec;
use rand_core::{OsRng, RngCore};

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

// The binary picks its plugins: linking them registers them.
use pluto_store_postgres as _;
use pluto_store_sqlite as _;
use pluto_transport_mqtt as _;

/// The embedded broker's default address.
const DEFAULT_LISTEN: &str = "0.0.0.0:18830";

#[derive(Parser, Debug)]
#[command(
    name = "pluto-coordinator",
    version,
    about = "Matches pluto nodes and keeps the books"
)]
struct Cli {
    /// Where the coordinator keeps its identity key (and, by default, its books).
    #[arg(long, global = true, env = "PLUTO_COORDINATOR_HOME")]
    home: Option<PathBuf>,
    /// Where the embedded MQTT broker listens (ignored with --channel).
    #[arg(long, global = true, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The books: sqlite:PATH or postgres://... (default: sqlite:HOME/books.db).
    #[arg(long, global = true)]
    db: Option<String>,
    /// An external broker (mqtt://HOST:PORT[/PREFIX]) instead of the embedded one.
    #[arg(long, global = true)]
    channel: Option<String>,
    /// Most clients the embedded broker accepts.
    #[arg(long, global = true, default_value_t = 20_000)]
    max_connections: usize,
    /// Most clients the embedded broker accepts from one address.
    #[arg(long, global = true, default_value_t = 256)]
    max_connections_per_address: usize,
    /// Bytes per second one node may publish on the embedded broker (the
    /// coordinator's relay rate by default); a node that publishes faster
    /// is read more slowly. 0: no limit.
    #[arg(long, global = true, default_value_t = 64 << 20)]
    max_publish_rate: u64,
    /// With --channel: the external broker lets each node publish only on
    /// its own presence topic (docs/security.md), so its "offline" will can
    /// be believed. Without it a node goes offline when it falls silent.
    #[arg(long, global = true)]
    trusted_presence: bool,
    /// With --channel on Mosquitto with its dynamic security plugin: the
    /// plugin's administrator, as whom this coordinator makes its own
    /// account, the newcomers' one, and each node's when it registers
    /// (docs/mosquitto.md). Presence is then trusted.
    #[arg(
        long,
        global = true,
        requires = "channel",
        requires = "dynsec_password_file"
    )]
    dynsec_admin: Option<String>,
    /// The administrator's password, in a file of its own.
    #[arg(long, global = true, requires = "dynsec_admin")]
    dynsec_password_file: Option<PathBuf>,
    /// Load-sharing group, when several coordinators share one broker and one database.
    #[arg(long, global = true)]
    group: Option<String>,
    /// Settings (intervals, limits) in TOML; see docs/protocol.md.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Every node in the books: space, presence, reputation per track,
    /// speed, and whether it is excluded or held back (reads the books; the
    /// coordinator may be running).
    Status {
        /// One JSON object per node, in an array.
        #[arg(long)]
        json: bool,
    },
}

/// Nodes' accounts on Mosquitto's dynamic security plugin.
struct Accounts(Dynsec);

#[pluto_plugins_api::async_trait]
impl pluto_coordinator::BrokerAccounts for Accounts {
    async fn provision(
        &self,
        node: &NodeId,
        password: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.0.provision(node, password).await?)
    }
}

/// The settings in `path` (the defaults without one), checked: a setting
/// that breaks a rule stops the coordinator here with one line naming it.
fn load_config(path: Option<&Path>) -> Result<CoordinatorConfig> {
    let Some(path) = path else {
        return Ok(CoordinatorConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: CoordinatorConfig = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid: {}",
            path.display(),
            toml_error_line(&text, &e)
        )
    })?;
    config
        .validate()
        .with_context(|| format!("{} is not valid", path.display()))?;
    Ok(config)
}

/// A TOML error in one line, with the line of the file it is about (which
/// names the setting).
fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    let Some(span) = e.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let number = before.matches('\n').count() + 1;
    let line = before
        .rfind('\n')
        .map_or(text, |i| &text[i + 1..])
        .lines()
        .next()
        .unwrap_or("")
        .trim();
    format!("line {number} (`{line}`): {message}")
}

/// Makes `home` (0700) when it is missing, and narrows it, and the SQLite
/// books in it, to their owner when other users could read them: the books
/// name every node with its addresses, placements and audit history. A
/// file narrowed is said once, on stderr.
fn private_home(home: &Path, db: &str) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .with_context(|| format!("creating {}", home.display()))?;
    narrow(home, 0o700)?;
    let Some(books) = db.strip_prefix("sqlite:") else {
        return Ok(());
    };
    let books = Path::new(books.split('?').next().unwrap_or(books));
    if books.as_os_str().is_empty() || books.starts_with(":memory:") || db.contains("mode=memory") {
        return Ok(());
    }
    // SQLite gives its journal files the database's mode, so a database
    // made 0600 before SQLite first opens it keeps all three private.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(books)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        // A directory that does not exist yet is SQLite's to report.
        Err(_) => return Ok(()),
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = books.as_os_str().to_owned();
        name.push(suffix);
        narrow(Path::new(&name), 0o600)?;
    }
    Ok(())
}

/// Takes group and other access off `path` (if it exists), down to `mode`.
fn narrow(path: &Path, mode: u32) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("{} is open to other users; narrowing it", path.display()))?;
    tracing::warn!(
        "{} was open to other users; it is now {mode:o}",
        path.display()
    );
    Ok(())
}

/// The coordinator's identity lives in its own file (0600), not in the
/// books: losing or restoring the database does not change who it is.
fn load_or_create_identity(home: &Path) -> Result<(SigningKey, StaticSecret)> {
    let path = home.join("identity.key");
    let secret: Zeroizing<[u8; 32]> = if path.exists() {
        let meta = std::fs::metadata(&path)?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "{} is readable by other users; run `chmod 600` on it",
                path.display()
            );
        }
        let text = Zeroizing::new(std::fs::read_to_string(&path)?);
        let mut s = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), &mut s[..])
            .with_context(|| format!("{} is damaged", path.display()))?;
        s
    } else {
        let mut s = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut s[..]);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{}", hex::encode(&s[..]))?;
        f.sync_all()?;
        s
    };
    let identity = SigningKey::from_bytes(&secret);
    let exchange = StaticSecret::from(blake3::derive_key(
        "pluto v1 coordinator exchange x25519",
        &secret[..],
    ));
    Ok((identity, exchange))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLUTO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pluto-coordinator: cannot start: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Many errors already end with their cause's text (`books:
            // {0}`), which `{:#}` would print twice.
            eprintln!(
                "pluto-coordinator: {}",
                pluto_plugins_api::error_line(e.as_ref())
            );
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let home = match cli.home {
        Some(h) => h,
        None => PathBuf::from(std::env::var_os("HOME").context("set --home or HOME")?)
            .join(".pluto-coordinator"),
    };
    let config = load_config(cli.config.as_deref())?;
    let db = cli
        .db
        .unwrap_or_else(|| format!("sqlite:{}", home.join("books.db").display()));
    if let Some(Command::Status { json }) = cli.command {
        // Status reads; it never creates books where there were none.
        if let Some(path) = db.strip_prefix("sqlite:") {
            let path = Path::new(path.split('?').next().unwrap_or(path));
            if !path.exists() {
                bail!(
                    "no books at {}: no coordinator has run with this home (give --home DIR or --db URL)",
                    path.display()
                );
            }
        }
        let books = pluto_plugins_api::open_books_store(&db).await?;
        return status(&*books, &config, json).await;
    }
    private_home(&home, &db)?;
    let (identity, exchange) = load_or_create_identity(&home)?;
    let books: Arc<dyn pluto_plugins_api::BooksStore> =
        pluto_plugins_api::open_books_store(&db).await?.into();
    let me = NodeId(identity.verifying_key().to_bytes());
    // The embedded broker confines every node to its own topics.
    let trusted_presence = cli.trusted_presence || cli.channel.is_none();
    let signer = Arc::new(pluto_protocol::KeySigner(identity.clone()));
    let url = match cli.channel {
        Some(url) => url,
        None => {
            // Every client logs in with its key; nodes are confined to
            // their own topics, and only this coordinator's key has the
            // run of the broker.
            let broker = EmbeddedBroker::start_with(
                cli.listen,
                BrokerSettings {
                    max_per_address: cli.max_connections_per_address,
                    max_publish_rate: cli.max_publish_rate,
                    auth: Some(BrokerAuth::new(me)),
                    ..BrokerSettings::new(cli.max_connections, MAX_ENVELOPE)
                },
            )?;
            let addr = broker.addr;
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            };
            format!("mqtt://{host}:{}", addr.port())
        }
    };
    let mut logins = vec![Login::Signed(signer, me)];
    let accounts = match (&cli.dynsec_admin, &cli.dynsec_password_file) {
        (Some(admin), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let dynsec =
                Dynsec::connect(&url, admin, password.trim_end_matches(['\r', '\n'])).await?;
            // Our own account: its password follows from our key, so a
            // restart (or a replica of the same key) logs in the same way.
            let user = format!("pluto-coordinator-{}", &me.to_hex()[..16]);
            let password = hex::encode(blake3::derive_key(
                "pluto v1 coordinator broker password",
                &identity.to_bytes(),
            ));
            dynsec
                .prepare(&user, &password, cli.group.as_deref())
                .await?;
            logins = vec![Login::Password { user, password }];
            Some(Arc::new(Accounts(dynsec)))
        }
        _ => None,
    };
    let coordinator = Arc::new(Coordinator::new(identity, exchange, books.clone(), config));
    coordinator.trust_presence(trusted_presence);
    if let Some(accounts) = accounts {
        coordinator.keep_broker_accounts(accounts);
    }
    let channel: Arc<dyn pluto_plugins_api::ControlChannel> = pluto_plugins_api::connect_channel(
        &url,
        ChannelOptions {
            role: ChannelRole::Coordinator { group: cli.group },
            max_payload: MAX_ENVELOPE,
            logins,
        },
    )
    .await?
    .into();
    // Serving starts once the channel's subscriptions are in place, so the
    // ready line below is a promise: nothing sent after it is missed.
    loop {
        match channel.next_event().await {
            Some(pluto_plugins_api::ChannelEvent::Connected) => break,
            Some(
                pluto_plugins_api::ChannelEvent::Disconnected(why)
                | pluto_plugins_api::ChannelEvent::Refused(why),
            ) => {
                tracing::warn!("cannot reach {url} yet: {why}; retrying")
            }
            Some(pluto_plugins_api::ChannelEvent::Denied(why)) => bail!(
                "{why} at {}: this coordinator cannot serve there",
                pluto_plugins_api::redact_url(&url)
            ),
            Some(_) => {}
            None => bail!("the channel to {url} closed"),
        }
    }
    // One line that scripts (and tests) read: who we are, and where, as
    // the URL nodes join with: it carries our key, so a node never has to
    // trust whoever answers first.
    println!(
        "pluto-coordinator {} on {}#{} books {}",
        coordinator.id(),
        pluto_plugins_api::redact_url(&url),
        coordinator.id(),
        pluto_plugins_api::redact_url(&db)
    );
    let _ = std::io::stdout().flush();
    let serve = pluto_coordinator::serve(coordinator, channel.clone(), books);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = serve => {
            r?;
            bail!("the channel to {} closed", pluto_plugins_api::redact_url(&url))
        }
        r = tokio::signal::ctrl_c() => {
            r?;
            channel.close().await;
            Ok(())
        }
        _ = term.recv() => {
            channel.close().await;
            Ok(())
        }
    }
}

/// `pluto-coordinator status`.
async fn status(
    books: &dyn pluto_plugins_api::BooksStore,
    config: &CoordinatorConfig,
    json: bool,
) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut nodes = books.nodes().await?;
    nodes.sort_by_key(|n| (n.standing.excluded_ms == 0, !n.standing.held_back, n.id));
    let mut uptimes = Vec::with_capacity(nodes.len());
    for n in &nodes {
        uptimes.push(pluto_coordinator::uptime(books, n, config, now).await?);
    }
    let rows: Vec<serde_json::Value> = nodes
        .iter()
        .zip(&uptimes)
        .map(|(n, uptime)| {
            let st = &n.standing;
            let speed = pluto_coordinator::decayed_speed(st, config.speed_half_life_ms, now);
            serde_json::json!({
                "id": n.id.to_hex(),
                "online": n.online,
                "last_seen_ms": n.last_seen_ms,
                "offer": n.offer,
                "held": n.held,
                "placed": n.placed,
                "audit_score": st.audit.score(),
                "timeout_score": st.timeout.score(),
                "uptime": uptime,
                "uptime_score": st.uptime.score(),
                "speed_bps": speed,
                "audits_passed": st.passed,
                "audits_failed": st.failed,
                "audits_timed_out": st.timed_out,
                "excluded": st.excluded_ms != 0,
                "excluded_ms": st.excluded_ms,
                "held_back": st.held_back,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>7} {:>11} {:>11} {:>6} {:>6} {:>7} {:>12} {:>14}  state",
        "node", "online", "held", "offer", "audit", "time", "uptime", "speed", "pass/fail/late"
    );
    for ((n, row), up) in nodes.iter().zip(&rows).zip(&uptimes) {
        let st = &n.standing;
        let state = if st.excluded_ms != 0 {
            "excluded"
        } else if st.held_back {
            "held back"
        } else {
            "ok"
        };
        println!(
            "{:<16} {:>7} {:>11} {:>11} {:>6.3} {:>6.3} {:>7} {:>12} {:>14}  {state}",
            n.id.short(),
            if n.online { "yes" } else { "no" },
            human::bytes(n.held),
            human::bytes(n.offer),
            st.audit.score(),
            st.timeout.score(),
            human::percent(*up),
            human::rate(row["speed_bps"].as_u64().unwrap_or(0)),
            format!("{}/{}/{}", st.passed, st.failed, st.timed_out),
        );
    }
    println!(
        "{} nodes, {} excluded, {} held back",
        nodes.len(),
        nodes.iter().filter(|n| n.standing.excluded_ms != 0).count(),
        nodes.iter().filter(|n| n.standing.held_back).count()
    );
    Ok(())
}
