//! The `pluto-coordinator` binary as a process: its settings refused at
//! start, and its identity and books across a kill, its files private.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "integration/files.rs"]
mod files;
#[path = "integration/restart.rs"]
mod restart;
#[path = "integration/settings.rs"]
mod settings;
