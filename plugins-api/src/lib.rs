//! pluto's plugin contracts.
//!
//! This crate is the vocabulary every other pluto crate shares: identifiers
//! ([`BlobId`], [`PackId`], [`SnapshotId`], [`NodeId`]), the records a node's
//! catalog keeps, and the traits that storage plugins implement:
//!
//! - [`BlobStore`]: where whole packs are kept (the node's local pack store now,
//!   the packs a node holds for others later). Blocking by contract, so that it
//!   maps one-to-one onto the C ABI of dynamically loaded plugins.
//! - [`MetaStore`]: the node's catalog (index, snapshots, pack list), async.
//! - [`ControlChannel`]: how control messages travel between nodes and the
//!   coordinator (opaque bytes addressed by node id, plus presence).
//! - [`Transport`]: how two nodes exchange data (links of frames with an
//!   authenticated peer).
//!
//! Plugins announce themselves with a const descriptor submitted to
//! [`inventory`]; a binary links the plugins it wants and resolves them by URL
//! scheme at run time:
//!
//! ```no_run
//! # async fn demo() -> Result<(), pluto_plugins_api::StoreError> {
//! let catalog = pluto_plugins_api::open_meta_store("sqlite:/tmp/catalog.db").await?;
//! let packs = pluto_plugins_api::open_blob_store("fs:/tmp/packs")?;
//! # let _ = (catalog, packs); Ok(()) }
//! ```
//!
//! No async runtime, database or network types appear in this crate's API.

mod books;
mod channel;
pub mod human;
mod ids;
mod registry;
pub mod sqlint;
mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
mod transport;
pub mod wire;

pub use books::{
    online_fraction, Beta, BooksStore, ManifestRecord, NodeRecord, OwnerLimits, Recorded,
    ReplicaMarks, ReplicaRecord, Standing,
};
pub use channel::{
    broker_login_message, check_channel_url, connect_channel, ChannelDescriptor, ChannelError,
    ChannelEvent, ChannelFuture, ChannelOptions, ChannelRole, ChannelSigner, ControlChannel, Login,
    NEWCOMER_PASSWORD, NEWCOMER_USER,
};
pub use ids::{BlobId, BlobKind, IdParseError, NodeId, PackId, SnapshotId};
pub use registry::{
    open_blob_store, open_books_store, open_meta_store, redact_url, BlobStoreDescriptor,
    BooksStoreDescriptor, BooksStoreFuture, MetaStoreDescriptor, MetaStoreFuture,
    PLUGIN_ABI_VERSION,
};
pub use store::{BlobLocation, BlobStore, MetaStore, PackRecord, SnapshotRecord, StoreError};
pub use transport::{
    open_transport, Link, Reach, RelayCarrier, Transport, TransportDescriptor, TransportError,
    TransportFuture, TransportOptions,
};

pub use async_trait::async_trait;

/// An error on one line: its message and those of its causes that add
/// something (a message that already ends with its cause's is not
/// repeated), joined by ": ". What both binaries print for a failure.
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}
pub use inventory;
