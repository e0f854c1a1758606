//! The engine's integration tests: real files, the real SQLite catalog and
//! the real filesystem pack store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod integration {
    mod backup_restore;
    pub mod common;
    mod faults;
    mod keys;
    mod storer;
}
