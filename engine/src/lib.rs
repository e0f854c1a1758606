//! pluto's engine: keys, chunking, packs, snapshots, backup, restore and
//! check, over the storage contracts of `pluto-plugins-api`.
//!
//! The engine never names a store: a binary links the plugins it wants and
//! the engine opens them by the URLs in the node's config.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pluto_engine::RepoError> {
//! use std::sync::Arc;
//! use pluto_engine::{backup::{backup_async, BackupOptions, NoProgress}, Home, LockMode, Repo};
//! let home = Home::new("/tmp/pluto-home");
//! let repo = Arc::new(Repo::open(home, LockMode::Exclusive).await?);
//! let opts = BackupOptions { paths: vec!["/etc".into()], ..Default::default() };
//! let report = backup_async(repo, opts, Arc::new(NoProgress)).await?;
//! println!("snapshot {}", report.snapshot);
//! # Ok(()) }
//! ```
//!
//! Formats are documented in each module (`pack`, `tree`, `snapshot`,
//! `index`, `crypto`, `keys`) and gathered in `docs/formats.md`.

pub mod backup;
pub mod check;
pub mod client;
pub mod crypto;
pub mod daemon;
pub mod exchange;
pub mod held;
pub mod home;
pub mod index;
pub mod keys;
pub mod keystream;
pub mod manifest;
pub mod network;
pub mod pack;
pub mod peers;
pub mod remote;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod tree;

pub use home::{
    ChunkerConfig, Config, ConfigError, Home, PlacementConfig, SettingError, MAX_COPIES,
};
/// The byte-level codec every format is built from.
pub use pluto_plugins_api::wire;
pub use repo::{LockMode, Repo, RepoError};
