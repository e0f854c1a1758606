//! `pluto`: back up to other people's computers; for now, to the local pack
//! store in the node's home.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage, 3 backup saved but some
//! files could not be read (the snapshot is partial).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pluto_engine::backup::{backup_async, BackupOptions, BackupProgress};
use pluto_engine::check::{check, CheckOptions, CheckProgress};
use pluto_engine::keys::MasterKey;
use pluto_engine::restore::{restore, RestoreOptions, RestoreProgress};
use pluto_engine::tree::NodeContent;
use pluto_engine::{Config, Home, LockMode, Repo};
use serde::Serialize;

// The binary picks its plugins: linking them registers them.
use pluto_store_fs as _;
use pluto_store_sqlite as _;
use pluto_transport_mqtt as _;
use pluto_transport_quic as _;
use pluto_transport_relay as _;

/// `println!` for results: when whoever reads them has gone (`pluto
/// snapshots | head`), pluto stops quietly with the code a shell gives a
/// program killed by SIGPIPE, instead of panicking.
macro_rules! out {
    () => {
        $crate::write_out(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

mod exchange;
mod fmt;
mod node;
use fmt::{bytes, time};

/// Exit code of a backup that saved a partial snapshot.
const EXIT_PARTIAL: u8 = 3;
/// How long `init --mnemonic-file` waits for the storers by default. After
/// a coordinator restart every daemon reconnects (retrying with a backoff
/// of up to a minute) and then reports what it holds; five minutes covers
/// a few of those rounds, and is short enough to say soon that something
/// else is wrong (another coordinator, storers that are off).
const RECOVERY_WAIT_SECS: u64 = 300;

#[derive(Parser, Debug)]
#[command(
    name = "pluto",
    version,
    about = "Encrypted, deduplicated backups to your friends' disks"
)]
struct Cli {
    /// The node's home (secrets, config, catalog, local packs).
    #[arg(long, global = true, env = "PLUTO_HOME")]
    home: Option<PathBuf>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars or chatter.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new identity (prints its 24 words once) or recover one.
    Init {
        /// Recover from the 24 words in this file ("-" for standard input).
        #[arg(long)]
        mnemonic_file: Option<PathBuf>,
        /// The coordinator to join, as it prints its URL
        /// (mqtt://HOST:PORT#KEY); none means local-only (`pluto join`
        /// joins one later).
        #[arg(long)]
        coordinator: Option<String>,
        /// The coordinator's key (hex), when the URL does not carry it.
        #[arg(long, requires = "coordinator")]
        coordinator_key: Option<String>,
        /// With a URL that carries no key: pin whichever coordinator
        /// answers first (anyone on its broker could).
        #[arg(long, requires = "coordinator")]
        trust_first_use: bool,
        /// Do not contact the coordinator now (only the URL's form is
        /// checked).
        #[arg(long, requires = "coordinator", conflicts_with = "mnemonic_file")]
        offline: bool,
        /// Disk space to offer to others (e.g. 50G, 500MiB).
        #[arg(long, value_parser = fmt::parse_size, default_value = "0")]
        offer: u64,
        /// Recovering through a coordinator: how long to wait for the
        /// manifest and for the storers to be back online, in seconds
        /// (default 300; after a coordinator restart they come back one by
        /// one). 0 asks once.
        #[arg(long, value_name = "SECS", requires = "mnemonic_file")]
        wait: Option<u64>,
    },
    /// Join a coordinator from an existing home, or move to another one.
    /// The coordinator is contacted at once and its key pinned.
    Join {
        /// The coordinator, as it prints its URL (mqtt://HOST:PORT[/PREFIX]#KEY).
        url: String,
        /// The coordinator's key (hex), when the URL does not carry it.
        #[arg(long)]
        coordinator_key: Option<String>,
        /// With a URL that carries no key: pin whichever coordinator
        /// answers first (anyone on its broker could).
        #[arg(long)]
        trust_first_use: bool,
        /// Do not contact the coordinator now (only the URL's form is
        /// checked).
        #[arg(long)]
        offline: bool,
    },
    /// Show this node's state, and the coordinator's books about it.
    Status,
    /// Stay connected to the coordinator (reconnecting when needed).
    Daemon,
    /// List the peers that store for this node and those it stores for.
    Peers,
    /// Change the disk space offered to others (e.g. 50G, 500MiB).
    Offer {
        /// The new offer; never below what others already placed here.
        #[arg(value_parser = fmt::parse_size)]
        size: u64,
    },
    /// Ask the coordinator where a pack of SIZE bytes would be placed now,
    /// under the placement policy in config.toml. The space is held for a
    /// while and released unless something is stored there; exit code 3
    /// when fewer peers than copies have room.
    Match {
        /// Size of one replica (e.g. 16M).
        #[arg(value_parser = fmt::parse_size)]
        size: u64,
        /// Copies wanted (default: placement.copies from config.toml).
        #[arg(long)]
        copies: Option<u8>,
    },
    /// Save paths as a new snapshot.
    Backup {
        /// Files and directories to save.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Tag the snapshot (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Leave out matching paths (repeatable). Without '/' a pattern
        /// matches names anywhere; with '/' it matches whole paths.
        #[arg(long = "exclude")]
        excludes: Vec<String>,
        /// Host name to record.
        #[arg(long)]
        host: Option<String>,
        /// Snapshot to compare against (default: latest with the same paths).
        #[arg(long)]
        parent: Option<String>,
        /// Read every file again, ignoring the parent snapshot.
        #[arg(long)]
        force: bool,
        /// Detect changes by size and mtime only.
        #[arg(long)]
        ignore_inode: bool,
    },
    /// List snapshots.
    Snapshots,
    /// List what a snapshot holds.
    Ls {
        /// Snapshot id (prefix) or "latest".
        snapshot: String,
        /// Only below this path.
        path: Option<PathBuf>,
    },
    /// Restore a snapshot into a directory.
    Restore {
        /// Snapshot id (prefix) or "latest".
        snapshot: String,
        /// Directory to restore into (created when missing).
        #[arg(long)]
        target: PathBuf,
        /// Only this path of the snapshot (repeatable). A relative path is
        /// taken from the current directory, as backup takes it; a path the
        /// snapshot does not hold is an error.
        #[arg(long = "include")]
        include: Vec<PathBuf>,
    },
    /// Verify packs, index and snapshots.
    Check {
        /// Also read and verify every blob (fetching from peers what is not here).
        #[arg(long)]
        read_data: bool,
        /// Instead: have the coordinator audit every replica at peers of the
        /// latest snapshot's packs, and say which are proven, failed or
        /// unreachable (fast: nothing is downloaded).
        #[arg(long, conflicts_with = "read_data")]
        remote: bool,
    },
    /// Rebuild the catalog from the packs alone.
    RebuildCatalog,
}

fn default_home() -> Result<PathBuf> {
    let base = std::env::var_os("HOME").context("neither --home, PLUTO_HOME nor HOME is set")?;
    Ok(PathBuf::from(base).join(".pluto"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLUTO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pluto: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pluto: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("pluto: writing the output: {e}");
        std::process::exit(1);
    }
}

pub(crate) struct Ui {
    json: bool,
    quiet: bool,
}

impl Ui {
    fn interactive(&self) -> bool {
        !self.json && !self.quiet && std::io::stderr().is_terminal()
    }
    fn bar(&self, len: Option<u64>, template: &str) -> ProgressBar {
        if !self.interactive() {
            return ProgressBar::hidden();
        }
        let pb = match len {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        pb.set_draw_target(ProgressDrawTarget::stderr_with_hz(5));
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }
    pub(crate) fn print_json<T: Serialize>(&self, v: &T) -> Result<()> {
        out!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let home = Home::new(match cli.home {
        Some(h) => h,
        None => default_home()?,
    });
    let ui = Ui {
        json: cli.json,
        quiet: cli.quiet,
    };
    if !matches!(cli.command, Command::Init { .. }) && home.recovering_path().exists() {
        bail!(
            "the recovery of {} did not finish: run pluto init --coordinator URL --mnemonic-file FILE again",
            home.root().display()
        );
    }
    match cli.command {
        Command::Init {
            mnemonic_file,
            coordinator,
            coordinator_key,
            trust_first_use,
            offline,
            offer,
            wait,
        } => {
            let mut config = Config {
                offer,
                ..Config::default()
            };
            let (coordinator, pin) = match &coordinator {
                Some(url) => {
                    let (url, pin) =
                        node::check_coordinator(url, coordinator_key.as_deref(), trust_first_use)?;
                    (Some(url), pin)
                }
                None => (None, None),
            };
            let recovering = coordinator.is_some();
            config.coordinator = coordinator;
            config.coordinator_key = pin.map(|k| k.to_hex());
            match mnemonic_file {
                Some(words) if recovering => {
                    let wait = Duration::from_secs(wait.unwrap_or(RECOVERY_WAIT_SECS));
                    recover_cmd(&ui, &home, &words, &config, wait).await
                }
                _ => init(&ui, &home, mnemonic_file.as_deref(), config, offline).await,
            }
        }
        Command::Join {
            url,
            coordinator_key,
            trust_first_use,
            offline,
        } => {
            let (url, pin) =
                node::check_coordinator(&url, coordinator_key.as_deref(), trust_first_use)?;
            node::join(&ui, home, &url, pin, offline).await
        }
        Command::Status => node::status(&ui, home).await,
        Command::Daemon => exchange::daemon(&ui, home).await,
        Command::Peers => node::peers(&ui, home).await,
        Command::Offer { size } => node::offer(&ui, home, size).await,
        Command::Match { size, copies } => node::match_cmd(&ui, home, size, copies).await,
        Command::Backup {
            paths,
            tags,
            excludes,
            host,
            parent,
            force,
            ignore_inode,
        } => {
            let opts = BackupOptions {
                paths,
                excludes,
                tags,
                host,
                parent,
                force,
                ignore_inode,
                threads: 0,
            };
            backup_cmd(&ui, home, opts).await
        }
        Command::Snapshots => snapshots(&ui, home).await,
        Command::Ls { snapshot, path } => ls(&ui, home, &snapshot, path.as_deref()).await,
        Command::Restore {
            snapshot,
            target,
            include,
        } => restore_cmd(&ui, home, &snapshot, target, include).await,
        Command::Check { remote: true, .. } => exchange::check_remote(&ui, home).await,
        Command::Check { read_data, .. } => check_cmd(&ui, home, read_data).await,
        Command::RebuildCatalog => {
            let repo = Repo::open(home, LockMode::Exclusive).await?;
            let report = repo.rebuild_catalog().await?;
            repo.catalog.close().await;
            for p in &report.problems {
                eprintln!("warning: {p}");
            }
            if ui.json {
                ui.print_json(&report)?;
            } else if !ui.quiet {
                out!(
                    "catalog rebuilt from {} packs: {} snapshots",
                    report.packs,
                    report.snapshots
                );
            }
            Ok(0)
        }
    }
}

/// One line: the error and those of its causes that add something (an
/// error whose message already ends with its cause's is not repeated).
fn one_line(e: &anyhow::Error) -> String {
    pluto_plugins_api::error_line(e.as_ref())
}

/// The master key from the 24 words in `p` ("-": standard input).
fn read_words(p: &Path) -> Result<MasterKey> {
    let text = if p == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the words from stdin")?
    } else {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
    };
    Ok(MasterKey::from_mnemonic(&text)?)
}

/// `init`: a new identity, or one recovered without a coordinator. With a
/// coordinator (and not `offline`), it is reached first and its key
/// pinned; nothing is created when it cannot be.
async fn init(
    ui: &Ui,
    home: &Home,
    mnemonic_file: Option<&Path>,
    mut config: Config,
    offline: bool,
) -> Result<u8> {
    if home.exists() {
        return Err(
            pluto_engine::RepoError::AlreadyInitialized(home.root().display().to_string()).into(),
        );
    }
    let (master, recovered) = match mnemonic_file {
        Some(p) => (read_words(p)?, true),
        None => (MasterKey::generate(), false),
    };
    if let (Some(url), false) = (config.coordinator.clone(), offline) {
        let pin = config
            .coordinator_key
            .as_deref()
            .map(str::parse)
            .transpose()?;
        let key = node::reach(&url, pin, &master.keys(), config.offer)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}; nothing was created (--offline creates the home without contacting the coordinator)"
                )
            })?;
        config.coordinator_key = Some(key.to_hex());
    }
    Repo::init(home, &master, &config)?;
    let node = master.keys().node_id();
    let text = if ui.json {
        let mut v = serde_json::json!({
            "home": home.root(),
            "node_id": node,
            "recovered": recovered,
        });
        if !recovered {
            v["mnemonic"] = serde_json::Value::String(master.mnemonic().to_string());
        }
        format!("{}\n", serde_json::to_string_pretty(&v)?)
    } else if recovered {
        format!("recovered node {} in {}\n", node, home.root().display())
    } else {
        let mut t = format!("created node {} in {}\n\n", node, home.root().display());
        t.push_str(
            "Your recovery phrase (shown only this once; write it down and keep it safe):\n\n",
        );
        let words = master.mnemonic();
        for (i, line) in words.split(' ').collect::<Vec<_>>().chunks(6).enumerate() {
            let numbered: Vec<String> = line
                .iter()
                .enumerate()
                .map(|(j, w)| format!("{:>2}. {:<9}", i * 6 + j + 1, w))
                .collect();
            t.push_str(&format!("  {}\n", numbered.join(" ")));
        }
        t.push_str("\nThese 24 words are all it takes to restore everything on a new machine.\n");
        t
    };
    // A new identity whose words nobody saw must not stay behind: the home
    // is removed again (it did not exist before) and init can be re-run.
    let shown = {
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        o.write_all(text.as_bytes()).and_then(|()| o.flush())
    };
    if let Err(e) = shown {
        let _ = std::fs::remove_dir_all(home.root());
        bail!("could not show the result ({e}); nothing was created, run init again");
    }
    Ok(0)
}

/// `init --coordinator URL --mnemonic-file FILE`: the identity from its
/// words, everything else from the manifest at the coordinator or at the
/// storers ([`exchange::recover`]). The home is marked (`HOME/recovering`)
/// until the recovery has finished, and other commands refuse it meanwhile.
/// When the recovery fails or is interrupted, what this run created is
/// removed again, so that it can simply be run again; a marked home left
/// by a run that was killed is taken over by the next run with the same
/// words.
async fn recover_cmd(
    ui: &Ui,
    home: &Home,
    words: &Path,
    config: &Config,
    wait: Duration,
) -> Result<u8> {
    let master = read_words(words)?;
    let node = master.keys().node_id();
    let marker = home.recovering_path();
    // None: an unfinished recovery taken over, which stays marked on failure.
    let made = if home.exists() {
        if !marker.exists() {
            return Err(pluto_engine::RepoError::AlreadyInitialized(
                home.root().display().to_string(),
            )
            .into());
        }
        let theirs = MasterKey::load(&home.secrets())?.keys().node_id();
        if theirs != node {
            bail!(
                "{} holds the unfinished recovery of another node ({}); remove it or choose another --home",
                home.root().display(),
                theirs.short()
            );
        }
        home.save_config(config)?;
        None
    } else {
        let before = entries(home.root())?;
        let made = (|| -> Result<()> {
            home.create_dir()
                .with_context(|| format!("creating {}", home.root().display()))?;
            std::fs::write(&marker, b"")
                .with_context(|| format!("writing {}", marker.display()))?;
            Ok(Repo::init(home, &master, config)?)
        })();
        if let Err(e) = made {
            undo(home, before.as_ref());
            return Err(e);
        }
        Some(before)
    };
    let r = tokio::select! {
        r = exchange::recover(ui, home, wait) => r,
        s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    let rec = match (r, made) {
        (Ok(rec), _) => rec,
        (Err(e), Some(before)) => {
            undo(home, before.as_ref());
            bail!("{}; nothing was kept", one_line(&e));
        }
        (Err(e), None) => bail!(
            "{}; {} stays marked unfinished",
            one_line(&e),
            home.root().display()
        ),
    };
    std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    for p in &rec.catalog.problems {
        eprintln!("warning: {p}");
    }
    if ui.json {
        ui.print_json(&serde_json::json!({
            "home": home.root(),
            "node_id": node,
            "recovered": true,
            "manifest_version": rec.version,
            "packs": rec.packs,
            "packs_away": rec.away,
            "catalog": rec.catalog,
            "bytes_fetched": rec.fetched,
        }))?;
        return Ok(0);
    }
    out!("recovered node {} in {}", node, home.root().display());
    if !ui.quiet {
        out!(
            "found the manifest: {} packs at peers; catalog rebuilt with {} snapshots from {} of headers (the data comes when a restore needs it)",
            rec.packs,
            rec.catalog.snapshots,
            bytes(rec.fetched)
        );
    }
    Ok(0)
}

/// The names in `dir`, or None when it does not exist.
fn entries(dir: &Path) -> Result<Option<std::collections::HashSet<std::ffi::OsString>>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(Some(
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("listing {}", dir.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
    }
}

/// Takes away what a failed recovery created: the home when it did not
/// exist before, else what was not in it (`before`).
fn undo(home: &Home, before: Option<&std::collections::HashSet<std::ffi::OsString>>) {
    let root = home.root();
    let Some(before) = before else {
        if let Err(e) = std::fs::remove_dir_all(root) {
            eprintln!("warning: removing {}: {e}", root.display());
        }
        return;
    };
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if before.contains(&e.file_name()) {
            continue;
        }
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(e) = r {
            eprintln!("warning: removing {}: {e}", p.display());
        }
    }
}

/// Resolves when the process is asked to stop (SIGINT, SIGTERM, SIGHUP),
/// with the signal's name; never when the handlers cannot be set.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

struct BackupBar {
    pb: ProgressBar,
    files: AtomicU64,
}

impl BackupBar {
    fn done_one(&self) {
        let f = self.files.fetch_add(1, Relaxed) + 1;
        self.pb.set_message(format!("{f} files"));
    }
}

impl BackupProgress for BackupBar {
    fn bytes(&self, n: u64) {
        self.pb.inc(n);
    }
    fn file(&self, _path: &Path, _size: u64) {
        self.done_one();
    }
    fn reused(&self, _path: &Path, size: u64) {
        self.pb.inc(size);
        self.done_one();
    }
    fn warning(&self, message: &str) {
        self.pb.suspend(|| eprintln!("warning: {message}"));
    }
    fn skipped(&self, message: &str) {
        self.pb.suspend(|| eprintln!("warning: {message}"));
    }
}

/// Sums the sizes of the regular files under `paths` on its own thread and
/// grows the bar's length as it goes, so the bar can show a percentage and
/// an estimate. Stops early when the bar is finished.
fn scan_sizes(pb: ProgressBar, paths: Vec<PathBuf>) {
    std::thread::spawn(move || {
        let mut stack = paths;
        while let Some(p) = stack.pop() {
            if pb.is_finished() {
                return;
            }
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_file() {
                pb.inc_length(meta.len());
            } else if meta.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            }
        }
    });
}

async fn backup_cmd(ui: &Ui, home: Home, opts: BackupOptions) -> Result<u8> {
    let repo = Arc::new(Repo::open(home, LockMode::Exclusive).await?);
    let pb = ui.bar(
        Some(0),
        "{spinner} [{elapsed_precise}] [{bar:30}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
    );
    if !pb.is_hidden() {
        scan_sizes(pb.clone(), opts.paths.clone());
    }
    let progress = Arc::new(BackupBar {
        pb: pb.clone(),
        files: AtomicU64::new(0),
    });
    let report = backup_async(repo.clone(), opts, progress).await?;
    pb.finish_and_clear();
    let s = &report.summary;
    if !ui.json && !ui.quiet {
        out!(
            "snapshot {} saved: {} new, {} changed, {} unmodified files, {} dirs{}",
            report.snapshot.short(),
            s.files_new,
            s.files_changed,
            s.files_unmodified,
            s.dirs,
            match report.skipped.len() {
                0 => String::new(),
                n => format!(", {n} special files skipped (FIFOs, sockets, devices)"),
            }
        );
        out!(
            "read {}, added {} ({} stored) in {:.1}s",
            bytes(s.bytes_read),
            bytes(s.bytes_added_raw),
            bytes(s.bytes_added_packed),
            s.duration_ns as f64 / 1e9
        );
    }
    // Each warning was shown once, as it happened (BackupBar).
    if !report.warnings.is_empty() {
        eprintln!(
            "pluto: snapshot {} is partial: {} item(s) could not be saved",
            report.snapshot.short(),
            report.warnings.len()
        );
    }
    // The packs go to peers; a partial snapshot says so first (3), then
    // packs short of copies (4).
    let (placed, upload) = exchange::upload_after_backup(ui, &repo).await?;
    repo.catalog.close().await;
    if ui.json {
        let mut v = serde_json::to_value(&report)?;
        v["upload"] = serde_json::to_value(&upload)?;
        ui.print_json(&v)?;
    }
    if !report.warnings.is_empty() {
        return Ok(EXIT_PARTIAL);
    }
    Ok(placed)
}

#[derive(Serialize)]
struct SnapshotJson {
    id: String,
    short_id: String,
    time: String,
    time_ns: i64,
    host: String,
    paths: Vec<String>,
    tags: Vec<String>,
    parent: Option<String>,
    tree: String,
}

async fn snapshots(ui: &Ui, home: Home) -> Result<u8> {
    let repo = Repo::open(home, LockMode::Shared).await?;
    let all = repo.snapshots().await?;
    if ui.json {
        let v: Vec<SnapshotJson> = all
            .iter()
            .map(|s| SnapshotJson {
                id: s.id.to_hex(),
                short_id: s.id.short(),
                time: time(s.time_ns),
                time_ns: s.time_ns,
                host: s.host.clone(),
                paths: s.paths.clone(),
                tags: s.tags.clone(),
                parent: s.parent.map(|p| p.to_hex()),
                tree: s.tree.to_hex(),
            })
            .collect();
        return ui.print_json(&v).map(|()| 0);
    }
    out!(
        "{:<8}  {:<20}  {:<16}  {:<12}  paths",
        "id",
        "time (UTC)",
        "host",
        "tags"
    );
    for s in &all {
        out!(
            "{:<8}  {:<20}  {:<16}  {:<12}  {}",
            s.id.short(),
            time(s.time_ns),
            s.host,
            s.tags.join(","),
            s.paths.join(" ")
        );
    }
    if !ui.quiet {
        out!("{} snapshot(s)", all.len());
    }
    Ok(0)
}

#[derive(Serialize)]
struct LsEntry {
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: String,
    size: u64,
    mtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

async fn ls(ui: &Ui, home: Home, spec: &str, under: Option<&Path>) -> Result<u8> {
    let mut repo = Repo::open(home, LockMode::Shared).await?;
    let _net = exchange::attach_peers(&mut repo, false).await?;
    let snap = repo.find_snapshot(spec).await?;
    let index = repo.load_index().await?;
    let under = under.map(|p| p.components().collect::<PathBuf>());
    let mut out = Vec::new();
    list_tree(
        &repo,
        &index,
        snap.tree,
        Path::new("/"),
        under.as_deref(),
        &mut out,
    )?;
    if ui.json {
        return ui.print_json(&out).map(|()| 0);
    }
    for e in &out {
        match &e.target {
            Some(t) => out!("{} -> {}", e.path, t),
            None => out!("{}", e.path),
        }
    }
    Ok(0)
}

/// Lists a tree depth-first, parents before children, in name order.
fn list_tree(
    repo: &Repo,
    index: &pluto_engine::index::Index,
    tree: pluto_plugins_api::BlobId,
    dir: &Path,
    under: Option<&Path>,
    out: &mut Vec<LsEntry>,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for n in &repo.load_tree(index, &tree)?.nodes {
        let p = dir.join(std::ffi::OsStr::from_bytes(&n.name));
        let shown = under.is_none_or(|u| p.starts_with(u));
        let leads = under.is_none_or(|u| u.starts_with(&p) || p.starts_with(u));
        if shown {
            let (kind, target) = match &n.content {
                NodeContent::File { .. } => ("file", None),
                NodeContent::Dir { .. } => ("dir", None),
                NodeContent::Symlink { target } => (
                    "symlink",
                    Some(String::from_utf8_lossy(target).into_owned()),
                ),
            };
            out.push(LsEntry {
                path: p.display().to_string(),
                kind,
                mode: format!("{:04o}", n.mode),
                size: n.size,
                mtime: time(n.mtime_ns),
                target,
            });
        }
        if let NodeContent::Dir { tree } = n.content {
            if leads {
                list_tree(repo, index, tree, &p, under, out)?;
            }
        }
    }
    Ok(())
}

struct RestoreBar(ProgressBar);
impl RestoreProgress for RestoreBar {
    fn total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn bytes(&self, n: u64) {
        self.0.inc(n);
    }
    fn error(&self, message: &str) {
        self.0.suspend(|| eprintln!("error: {message}"));
    }
}

async fn restore_cmd(
    ui: &Ui,
    home: Home,
    spec: &str,
    target: PathBuf,
    include: Vec<PathBuf>,
) -> Result<u8> {
    let mut repo = Repo::open(home, LockMode::Shared).await?;
    // A whole snapshot wants (nearly) every pack: fetch them ahead.
    let net = exchange::attach_peers(&mut repo, include.is_empty()).await?;
    let repo = Arc::new(repo);
    let snap = repo.find_snapshot(spec).await?;
    let index = Arc::new(repo.load_index().await?);
    let pb = ui.bar(
        None,
        "{spinner} {elapsed_precise} {bytes} written ({bytes_per_sec})",
    );
    let progress = RestoreBar(pb.clone());
    let opts = RestoreOptions {
        target: target.clone(),
        include,
        threads: 0,
    };
    let report =
        tokio::task::spawn_blocking(move || restore(&repo, &index, &snap, &opts, &progress))
            .await??;
    pb.finish_and_clear();
    if ui.json {
        ui.print_json(&report)?;
    } else {
        if !ui.interactive() {
            for e in &report.errors {
                eprintln!("error: {e}");
            }
        }
        if !ui.quiet {
            out!(
                "restored {} files ({} already in place), {} dirs, {} symlinks, {} into {}",
                report.files_restored,
                report.files_already_there,
                report.dirs,
                report.symlinks,
                bytes(report.bytes_written),
                target.display()
            );
        }
    }
    if let Some(net) = net {
        net.close().await;
    }
    if !report.errors.is_empty() {
        bail!("{} item(s) could not be restored", report.errors.len());
    }
    Ok(0)
}

struct CheckBar(ProgressBar);
impl CheckProgress for CheckBar {
    fn pack(&self, bytes: u64) {
        self.0.inc(1);
        let _ = bytes;
    }
}

async fn check_cmd(ui: &Ui, home: Home, read_data: bool) -> Result<u8> {
    let mut repo = Repo::open(home, LockMode::Shared).await?;
    let net = exchange::attach_peers(&mut repo, read_data).await?;
    let repo = Arc::new(repo);
    let n = repo.catalog.packs().await?.len() as u64;
    let pb = ui.bar(Some(n), "{bar:40} {pos}/{len} packs {elapsed_precise}");
    let progress = CheckBar(pb.clone());
    let rt = tokio::runtime::Handle::current();
    let report = tokio::task::spawn_blocking(move || {
        check(&repo, &rt, CheckOptions { read_data }, &progress)
    })
    .await??;
    pb.finish_and_clear();
    if let Some(net) = net {
        net.close().await;
    }
    if ui.json {
        ui.print_json(&report)?;
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        for d in &report.damaged_files {
            eprintln!("damaged: snapshot {}: {}", d.snapshot.short(), d.path);
        }
        if !ui.quiet {
            for n in &report.notes {
                out!("note: {n}");
            }
            out!(
                "checked {} packs{}, {} blobs, {} snapshots, {} trees",
                report.packs,
                if read_data {
                    format!(" ({} read)", bytes(report.bytes_read))
                } else {
                    String::new()
                },
                report.blobs,
                report.snapshots,
                report.trees
            );
        }
    }
    if !report.ok() {
        bail!(
            "check found {} error(s) and {} damaged file(s)",
            report.errors.len(),
            report.damaged_files.len()
        );
    }
    if !ui.json && !ui.quiet {
        out!("no errors found");
    }
    Ok(0)
}
