//! Relay links over an in-memory coordinator: honest, lossy and hostile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod hostile;
mod hub;
mod links;
mod wire;

// Linking the plugin registers it.
use pluto_transport_relay as _;
