//! pluto's coordinator: authenticates nodes, keeps the books, matches
//! storers with free space, and keeps each node's manifest.
//!
//! [`Coordinator::handle`] takes one envelope as it came off the channel and
//! returns the reply to send, if any:
//!
//! ```text
//! bytes --verify signature--> envelope --addressed to us? topic names the signer?--
//!       --fresh (ReplayGuard)?--> message --dispatch--> books --> reply envelope
//!                                                        (signed; sealed to the node when private)
//! ```
//!
//! Anything that fails before the sender is known to be who it claims
//! (malformed, bad signature, another recipient, another node's topic,
//! replayed or stale) gets no reply and is only logged, so forged traffic
//! cannot make the coordinator talk to a victim. An authenticated sender gets
//! an `Error` reply it can act on.
//!
//! Time and randomness come from the caller; the books are the only state
//! that matters across restarts (pending challenges and the replay window
//! are memory, and a restart only makes nodes authenticate again).

mod audit;
mod serve;
mod service;
mod settings;

pub use audit::decayed_speed;

pub use serve::{serve, ServeError, DEATH_WINDOW, MAX_DEATHS};
pub use service::{AuditTick, Coordinator, Outgoing, Rejected, Sweep, ANY_COORDINATOR};
pub use settings::{CoordinatorConfig, SettingsError, MAX_DURATION_MS};
