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
//!
//! The core is split by concern, in the way of a sans-IO protocol core:
//! each concern keeps a plain table (its methods take the time and the
//! randomness) and adds its message handlers to [`Coordinator`]; the
//! router only routes; [`serve`] is the one thing that runs tasks.
//!
//! ```text
//! settings     CoordinatorConfig and the rules it must keep (validate)
//! coordinator  the Coordinator: keys, books, settings, one lock per table
//! router       handle: envelope checks, answers kept, dispatch to one module
//! answers      a repeated request gets the same answer       (pure table)
//! sessions     Hello/Auth challenges                          (pure table)
//! limits       token buckets per node                         (pure table)
//! relay        payloads passed on between nodes
//! audits       issue, answers, outcomes, the audit tick, standings;
//!   rules      outcomes and reputation                        (pure)
//!   schedule   who is due, from (storers, now, rng)           (pure)
//!   pending    challenges awaiting an answer                  (pure table)
//! matching     storers for a pack; replicas recorded, dropped, reported
//! registry     presence, offer, addresses, manifests
//! reports      status, peers, repairs
//! serve        the message loop and periodic tasks, supervised
//! ```
//!
//! ```no_run
//! # async fn run(
//! #     books: std::sync::Arc<dyn pluto_plugins_api::BooksStore>,
//! #     channel: std::sync::Arc<dyn pluto_plugins_api::ControlChannel>,
//! #     identity: ed25519_dalek::SigningKey,
//! #     exchange: x25519_dalek::StaticSecret,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use pluto_coordinator::{serve, Coordinator, CoordinatorConfig};
//! let config: CoordinatorConfig = toml::from_str("audit_tick_ms = 1000")?;
//! config.validate()?; // one line naming the setting, when one breaks a rule
//! let coordinator = std::sync::Arc::new(Coordinator::new(identity, exchange, books.clone(), config));
//! serve(coordinator, channel, books).await?; // until the channel closes
//! # Ok(())
//! # }
//! ```

mod answers;
mod audits;
mod coordinator;
mod limits;
mod matching;
mod registry;
mod relay;
mod reports;
mod router;
mod serve;
mod sessions;
mod settings;

pub use audits::rules::decayed_speed;
pub use audits::AuditTick;
pub use coordinator::{BrokerAccounts, Coordinator, Outgoing, Rejected, Sweep, ANY_COORDINATOR};
pub use reports::uptime;
pub use serve::{serve, ServeError, DEATH_WINDOW, MAX_DEATHS};
pub use settings::{CoordinatorConfig, SettingsError, MAX_DURATION_MS};
