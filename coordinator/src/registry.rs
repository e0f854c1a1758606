//! What the books keep about a node itself, at its own word: presence,
//! the space it offers, the addresses it announces, and its manifest.
//!
//! ```text
//! Heartbeat          -> online (the sweep marks it offline after three missed)
//! SetOffer{bytes}    -> never below what it holds or placed
//! Announce[addr..]   -> replaces its addresses (single non-empty lines, MAX_ADDRESSES at most)
//! Locate[ids]        -> the registered ones among ids, online or not, with their addresses
//! PutManifest{v, ..} -> kept when newer than the one kept (versions only move forward)
//! GetManifest        -> the one kept, sealed to the node
//! ```

use pluto_plugins_api::{human, NodeId, NodeRecord};
use pluto_protocol::{ErrorCode, Message, NodeAddresses, MAX_ADDRESSES};

use crate::coordinator::{error, private, public, Reply};
use crate::{Coordinator, Rejected};

impl Coordinator {
    /// `Heartbeat`: the node is online.
    pub(crate) async fn heartbeat(&self, from: &NodeId, now_ms: u64) -> Result<Reply, Rejected> {
        self.books.presence(from, true, now_ms).await?;
        Ok(public(Message::Ok))
    }

    /// `SetOffer`: the space it offers others.
    pub(crate) async fn set_offer(&self, node: &NodeRecord, bytes: u64) -> Result<Reply, Rejected> {
        if self.books.set_offer(&node.id, bytes).await? {
            return Ok(public(Message::Ok));
        }
        Ok(error(
            ErrorCode::Refused,
            format!(
                "cannot offer less than is in use ({} held for others, {} placed with others)",
                human::bytes(node.held),
                human::bytes(node.placed)
            ),
        ))
    }

    /// `Announce`: where peers can reach it.
    pub(crate) async fn announce(
        &self,
        from: &NodeId,
        addresses: &[String],
    ) -> Result<Reply, Rejected> {
        if addresses.len() > MAX_ADDRESSES
            || addresses
                .iter()
                .any(|a| a.is_empty() || a.contains(['\n', '\0']))
        {
            return Ok(error(
                ErrorCode::Malformed,
                "addresses must be non-empty single lines",
            ));
        }
        self.books.set_addresses(from, addresses).await?;
        Ok(public(Message::Ok))
    }

    /// `Locate`: where other nodes can be reached.
    pub(crate) async fn locate(&self, nodes: &[NodeId]) -> Result<Reply, Rejected> {
        let found = self.books.addresses(nodes).await?;
        Ok(private(Message::Located(
            found
                .into_iter()
                .map(|(id, online, addresses)| NodeAddresses {
                    id,
                    online,
                    addresses,
                })
                .collect(),
        )))
    }

    /// `PutManifest`: keeps a newer manifest.
    pub(crate) async fn put_manifest(
        &self,
        from: &NodeId,
        version: u64,
        blob: &[u8],
    ) -> Result<Reply, Rejected> {
        if self.books.put_manifest(from, version, blob).await? {
            return Ok(public(Message::Ok));
        }
        Ok(error(
            ErrorCode::StaleVersion,
            "a manifest of this version or newer is kept",
        ))
    }

    /// `GetManifest`: the manifest kept.
    pub(crate) async fn get_manifest(&self, from: &NodeId) -> Result<Reply, Rejected> {
        Ok(match self.books.manifest(from).await? {
            Some(m) => private(Message::Manifest {
                version: m.version,
                blob: m.blob,
            }),
            None => error(ErrorCode::NotFound, "no manifest kept"),
        })
    }
}
