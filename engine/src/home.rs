//! A node's home: the directory that holds its secrets, config, catalog and
//! local pack store.
//!
//! ```text
//! HOME/secrets      the master entropy (0600); whoever has it has the backups
//! HOME/config.toml  stores, chunker and pack settings (see [`Config`])
//! HOME/catalog.db   the catalog (default `sqlite:catalog.db`)
//! HOME/packs/       the local pack store (default `fs:packs`), a cache once
//!                   replicas live at peers (see `local_cache`)
//! HOME/held/        replicas held for others (default `fs:held`)
//! HOME/placement    where this node's pack replicas are (the manifest's content)
//! HOME/peers.json   how each peer was reached last, and why not by the transports before
//! HOME/lock         held shared by readers, exclusively by writers
//! ```

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use pluto_plugins_api::NodeId;
use serde::{Deserialize, Serialize};

/// A setting that breaks a rule, named by its key in `config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingError {
    /// `[chunker]` sizes out of FastCDC's bounds or out of order.
    #[error(
        "chunker sizes must satisfy min <= avg <= max with min in 64 B..1 MiB, \
         avg in 256 B..4 MiB, max in 1 KiB..16 MiB (got {min}/{avg}/{max}); \
         fix [chunker] or remove it for the defaults"
    )]
    ChunkerSizes {
        /// `chunker.min`.
        min: u32,
        /// `chunker.avg`.
        avg: u32,
        /// `chunker.max`.
        max: u32,
    },
    /// `pack_size` out of bounds.
    #[error("pack_size {0} is outside 64 KiB..1 GiB; set it between them")]
    PackSize(usize),
    /// `coordinator` carries a key (`URL#KEY`) that is not one, or that
    /// `coordinator_key` contradicts.
    #[error("coordinator = {url:?}: {why}")]
    CoordinatorKey {
        /// The URL as written.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `placement.copies` out of bounds.
    #[error("placement.copies {0} is outside 1..={MAX_COPIES}; set it between them")]
    Copies(u8),
    /// `placement.friend_copies` above `placement.copies`.
    #[error(
        "placement.friend_copies {friend_copies} is more than copies {copies}; \
         lower friend_copies or raise copies"
    )]
    FriendCopies {
        /// `placement.friend_copies`.
        friend_copies: u8,
        /// `placement.copies`.
        copies: u8,
    },
    /// `placement.friend_copies` without any friend.
    #[error(
        "placement.friend_copies is set but placement.friends is empty; \
         list the friends' node ids or set friend_copies = 0"
    )]
    NoFriends,
    /// An entry of `placement.friends` that is not a node id.
    #[error(
        "placement.friends: {0:?} is not a node id \
         (64 hex digits, as `pluto status` shows them)"
    )]
    Friend(String),
    /// `daemon_every` is 0.
    #[error("daemon_every must be at least 1 (seconds)")]
    DaemonEvery,
    /// `upload_limit` too low to be meant.
    #[error(
        "upload_limit {0} is below 1024 (bytes a second); \
         raise it, or remove it for no limit"
    )]
    UploadLimit(u64),
    /// `transports` is empty.
    #[error("transports is empty: list at least one (quic, relay)")]
    NoTransports,
    /// `listen` is not a socket address.
    #[error("listen {0:?} is not IP:PORT (say \"0.0.0.0:0\"; port 0 picks one)")]
    Listen(String),
    /// `compression` out of zstd's levels.
    #[error("compression level {0} is outside 0..=19 (0 turns compression off)")]
    Compression(i32),
}

/// Why the config file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file is there but could not be read.
    #[error("reading {}: {source}", .path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML, or a key is unknown or has a value of the
    /// wrong type.
    #[error(
        "{}{}: {message}; correct it or remove it (every setting has a default)",
        .path.display(),
        at(.line, .key)
    )]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The line at fault (1-based), when known.
        line: Option<usize>,
        /// The key at fault (`placement.copies`), when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A setting breaks a rule.
    #[error("{}: {source}", .path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The setting.
        source: SettingError,
    },
    /// The config could not be encoded (a bug: every setting is TOML).
    #[error("encoding the config: {0}")]
    Encode(#[from] toml::ser::Error),
    /// The file could not be written.
    #[error("writing {}: {source}", .path.display())]
    Write {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// `" line N, KEY"` for a parse error's message.
fn at(line: &Option<usize>, key: &Option<String>) -> String {
    match (line, key) {
        (Some(l), Some(k)) => format!(" line {l}, {k}"),
        (Some(l), None) => format!(" line {l}"),
        (None, Some(k)) => format!(", {k}"),
        (None, None) => String::new(),
    }
}

/// The line (1-based) and the key (with its table, `placement.copies`) at
/// byte `at` of a TOML text, as far as a plain reading of the lines finds
/// them.
fn locate(text: &str, at: usize) -> (Option<usize>, Option<String>) {
    let Some(before) = text.get(..at) else {
        return (None, None);
    };
    let line = before.matches('\n').count() + 1;
    let mut table = None;
    for l in before.lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix('[') {
            let name = name.trim_start_matches('[');
            table = name.split(']').next().map(|t| t.trim().to_string());
        }
    }
    let key = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        })
        .map(|k| match &table {
            Some(t) if !t.is_empty() => format!("{t}.{k}"),
            _ => k,
        });
    (Some(line), key)
}

/// Settings of a node, from `HOME/config.toml`. Every field has a default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Catalog store URL; a relative `sqlite:` path is taken from the home.
    pub catalog: String,
    /// Local pack store URL; a relative `fs:` path is taken from the home.
    pub packs: String,
    /// Coordinator URL; none means local-only mode.
    pub coordinator: Option<String>,
    /// The coordinator's identity (hex), pinned at `init` or on first contact.
    pub coordinator_key: Option<String>,
    /// Space offered to others, in bytes.
    pub offer: u64,
    /// Where replicas of this node's packs go.
    pub placement: PlacementConfig,
    /// Content-defined chunking.
    pub chunker: ChunkerConfig,
    /// Target size of a pack in bytes.
    pub pack_size: usize,
    /// zstd level for blobs (0 turns compression off).
    pub compression: i32,
    /// Worker threads for backup, restore and check (0: one per core).
    pub threads: usize,
    /// Where replicas held for others are kept (a blob store URL; a
    /// relative `fs:` path is taken from the home).
    pub held: String,
    /// Transports to reach peers, tried in this order.
    pub transports: Vec<String>,
    /// Where the QUIC transport listens (`IP:PORT`; port 0 picks one).
    pub listen: String,
    /// Addresses to announce instead of those found (`quic:HOST:PORT`, say
    /// for a forwarded port behind NAT); empty: the listening address, or
    /// the machine's addresses when listening on all of them.
    pub announce: Vec<String>,
    /// Most bytes the local pack store keeps once packs have their copies
    /// at peers (data packs beyond it are dropped, oldest first); none:
    /// keep everything.
    pub local_cache: Option<u64>,
    /// How often the daemon places packs that lack copies and repairs what
    /// was lost, in seconds.
    pub daemon_every: u64,
    /// Most bytes a second sent to peers, all uploads together; none: as
    /// fast as the link goes.
    pub upload_limit: Option<u64>,
}

/// Where replicas go: `copies` distinct peers per pack, of which up to
/// `friend_copies` with the nodes listed in `friends` (when they have
/// room), the rest with peers the coordinator picks.
///
/// ```toml
/// [placement]
/// copies = 2
/// friends = ["5c1f...e2"]   # node ids (hex), as `pluto status` shows them
/// friend_copies = 1         # one copy with friends, one with anyone
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// Replicas per pack, each with a different peer.
    pub copies: u8,
    /// Node ids (hex) to prefer.
    pub friends: Vec<String>,
    /// How many of the copies go to friends.
    pub friend_copies: u8,
}

/// Most copies of a pack a node may ask for.
pub const MAX_COPIES: u8 = 8;

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            copies: 2,
            friends: Vec::new(),
            friend_copies: 0,
        }
    }
}

impl PlacementConfig {
    /// The friends as node ids.
    pub fn friend_ids(&self) -> Result<Vec<NodeId>, SettingError> {
        self.friends
            .iter()
            .map(|f| f.parse().map_err(|_| SettingError::Friend(f.clone())))
            .collect()
    }

    fn validate(&self) -> Result<(), SettingError> {
        if !(1..=MAX_COPIES).contains(&self.copies) {
            return Err(SettingError::Copies(self.copies));
        }
        if self.friend_copies > self.copies {
            return Err(SettingError::FriendCopies {
                friend_copies: self.friend_copies,
                copies: self.copies,
            });
        }
        if self.friend_copies > 0 && self.friends.is_empty() {
            return Err(SettingError::NoFriends);
        }
        self.friend_ids().map(|_| ())
    }
}

/// FastCDC sizes, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChunkerConfig {
    /// Smallest chunk.
    pub min: u32,
    /// Average chunk.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        // Chosen by measurement, see docs/benchmarks.md.
        Self {
            min: 512 << 10,
            avg: 1 << 20,
            max: 8 << 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            catalog: "sqlite:catalog.db".into(),
            packs: "fs:packs".into(),
            coordinator: None,
            coordinator_key: None,
            offer: 0,
            placement: PlacementConfig::default(),
            chunker: ChunkerConfig::default(),
            pack_size: 16 << 20,
            // Chosen by measurement, see docs/benchmarks.md.
            compression: 2,
            threads: 0,
            held: "fs:held".into(),
            transports: vec!["quic".into(), "relay".into()],
            listen: "0.0.0.0:0".into(),
            announce: Vec::new(),
            local_cache: None,
            daemon_every: 60,
            upload_limit: None,
        }
    }
}

impl Config {
    /// A coordinator URL written as the coordinator prints it
    /// (`mqtt://HOST:PORT#KEY`) is the URL and `coordinator_key`.
    fn with_key_from_url(mut self) -> Result<Self, SettingError> {
        let Some((url, key)) = self
            .coordinator
            .as_deref()
            .and_then(|c| c.split_once('#'))
            .map(|(u, k)| (u.to_string(), k.to_string()))
        else {
            return Ok(self);
        };
        let bad = |why| SettingError::CoordinatorKey {
            url: self.coordinator.clone().unwrap_or_default(),
            why,
        };
        let key: NodeId = key
            .parse()
            .map_err(|_| bad("the key after '#' must be 64 hex digits"))?;
        match self.coordinator_key.as_deref().map(str::parse::<NodeId>) {
            Some(Ok(pinned)) if pinned != key => {
                return Err(bad("its key and coordinator_key differ; keep one"))
            }
            _ => {}
        }
        self.coordinator = Some(url);
        self.coordinator_key = Some(key.to_hex());
        Ok(self)
    }

    /// Checks that the values are usable.
    pub fn validate(&self) -> Result<(), SettingError> {
        let c = &self.chunker;
        // FastCDC 2020's own bounds.
        if !(64..=1 << 20).contains(&c.min)
            || !(256..=4 << 20).contains(&c.avg)
            || !(1024..=16 << 20).contains(&c.max)
            || c.min > c.avg
            || c.avg > c.max
        {
            return Err(SettingError::ChunkerSizes {
                min: c.min,
                avg: c.avg,
                max: c.max,
            });
        }
        if !(1 << 16..=1 << 30).contains(&self.pack_size) {
            return Err(SettingError::PackSize(self.pack_size));
        }
        self.placement.validate()?;
        if self.daemon_every == 0 {
            return Err(SettingError::DaemonEvery);
        }
        if let Some(l) = self.upload_limit.filter(|l| *l < 1024) {
            return Err(SettingError::UploadLimit(l));
        }
        if self.transports.is_empty() {
            return Err(SettingError::NoTransports);
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(SettingError::Listen(self.listen.clone()));
        }
        if !(0..=19).contains(&self.compression) {
            return Err(SettingError::Compression(self.compression));
        }
        Ok(())
    }
}

/// Paths inside a home.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home at `root` (nothing is checked yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The secrets file.
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }
    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// The lock file.
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("lock")
    }
    /// True when `init` ran here.
    pub fn exists(&self) -> bool {
        self.secrets().exists()
    }
    /// Creates the directory (0700).
    pub fn create_dir(&self) -> std::io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
    }
    /// Resolves a store URL whose path is relative against the home.
    pub fn resolve_url(&self, url: &str) -> String {
        for scheme in ["sqlite:", "fs:"] {
            if let Some(rest) = url.strip_prefix(scheme) {
                if !rest.starts_with('/') && !rest.starts_with(':') && !rest.is_empty() {
                    return format!("{scheme}{}", self.root.join(rest).display());
                }
            }
        }
        url.to_string()
    }
    /// Reads the config; a missing file means defaults.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let path = self.config_path();
        let cfg = match fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|e| {
                let (line, key) = e
                    .span()
                    .map_or((None, None), |span| locate(&text, span.start));
                ConfigError::Parse {
                    path: path.clone(),
                    line,
                    key,
                    message: e.message().to_string(),
                }
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let cfg = cfg
            .with_key_from_url()
            .map_err(|source| ConfigError::Invalid {
                path: path.clone(),
                source,
            })?;
        match cfg.validate() {
            Ok(()) => Ok(cfg),
            Err(source) => Err(ConfigError::Invalid { path, source }),
        }
    }
    /// Writes the config (atomically: a daemon may be reading it).
    pub fn save_config(&self, cfg: &Config) -> Result<(), ConfigError> {
        let text = toml::to_string(cfg)?;
        let path = self.config_path();
        write_atomic(&path, text.as_bytes()).map_err(|source| ConfigError::Write { path, source })
    }
    /// Where this node's replicas are.
    pub fn placement_path(&self) -> PathBuf {
        self.root.join("placement")
    }
    /// Held by whoever uploads packs (a backup or the daemon).
    pub fn upload_lock_path(&self) -> PathBuf {
        self.root.join("upload.lock")
    }
    /// Which transport reached each peer.
    pub fn peers_path(&self) -> PathBuf {
        self.root.join("peers.json")
    }
    /// Manifests of the owners whose replicas this node holds.
    pub fn held_manifests(&self) -> PathBuf {
        self.root.join("held-manifests")
    }
    /// Present while a recovery from the 24 words has not finished: such
    /// a home has keys but not yet its catalog and placement.
    pub fn recovering_path(&self) -> PathBuf {
        self.root.join("recovering")
    }
}

/// Replaces `path` with `bytes` so that a reader (or a crash) sees the old
/// file or the new one, whole: a temporary file beside it, fsync, rename,
/// fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".{name}.{:016x}.tmp",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    let r = write();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_url_as_printed_carries_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let h = Home::new(dir.path());
        let key = "ab".repeat(32);
        fs::write(
            h.config_path(),
            format!("coordinator = \"mqtt://h:1#{key}\"\n"),
        )
        .unwrap();
        let c = h.load_config().unwrap();
        assert_eq!(c.coordinator.as_deref(), Some("mqtt://h:1"));
        assert_eq!(c.coordinator_key.as_deref(), Some(key.as_str()));
        for (text, want) in [
            ("coordinator = \"mqtt://h:1#beef\"\n".to_string(), "64 hex"),
            (
                format!(
                    "coordinator = \"mqtt://h:1#{key}\"\ncoordinator_key = \"{}\"\n",
                    "cd".repeat(32)
                ),
                "differ",
            ),
        ] {
            fs::write(h.config_path(), text).unwrap();
            let e = h.load_config().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn config_round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let h = Home::new(dir.path());
        assert_eq!(h.load_config().unwrap(), Config::default());
        let c = Config {
            compression: 5,
            ..Config::default()
        };
        h.save_config(&c).unwrap();
        assert_eq!(h.load_config().unwrap(), c);
        fs::write(h.config_path(), "nonsense = 1\n").unwrap();
        let e = h.load_config().unwrap_err().to_string();
        assert!(
            e.contains("config.toml line 1, nonsense: unknown field"),
            "{e}"
        );
        fs::write(
            h.config_path(),
            "offer = 1\n[placement]\ncopies = \"two\"\n",
        )
        .unwrap();
        let e = h.load_config().unwrap_err().to_string();
        assert!(
            e.contains("config.toml line 3, placement.copies: invalid type"),
            "{e}"
        );
        fs::write(h.config_path(), "[chunker]\nmin = 10\navg = 5\nmax = 1\n").unwrap();
        assert!(matches!(
            h.load_config(),
            Err(ConfigError::Invalid {
                source: SettingError::ChunkerSizes { .. },
                ..
            })
        ));
        fs::write(h.config_path(), "[placement]\nfriends = [\"x\"]\n").unwrap();
        let e = h.load_config().unwrap_err().to_string();
        assert!(
            e.contains("config.toml: placement.friends: \"x\" is not"),
            "{e}"
        );
        assert_eq!(
            h.resolve_url("fs:packs"),
            format!("fs:{}/packs", dir.path().display())
        );
        assert_eq!(h.resolve_url("fs:/abs"), "fs:/abs");
    }
}
