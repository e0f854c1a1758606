//! End-to-end tests of the `pluto` command: real processes, real files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod integration {
    mod attacks;
    mod cli;
    pub mod common;
    mod coordinator;
    mod exchange;
    mod faults;
    mod joining;
    pub mod netns;
    pub mod network;
    mod newcomer;
    mod standing;
    mod uplink;
}
