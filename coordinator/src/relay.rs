//! The relay: payloads from one node to another through the coordinator,
//! for when no direct path works, within each sender's rate.
//!
//! ```text
//! a --Relay { to: b, payload }--> coordinator --(a's bucket has the bytes? a and b registered?)-->
//!   --Relayed { from: a, payload }, signed by the coordinator--> b
//! ```
//!
//! Payloads are end-to-end sealed by the relay transport; the coordinator
//! signs what it passes on so that other broker clients cannot pass for it.
//! A payload over the rate is dropped with no answer: the relay transport
//! slows down and sends again.

use pluto_plugins_api::NodeId;
use pluto_protocol::{Envelope, Message};
use rand_core::CryptoRngCore;

use crate::coordinator::lock;
use crate::{Coordinator, Outgoing, Rejected};

impl Coordinator {
    /// Passes a relay payload on, or drops it (sender over its rate, or
    /// either end not registered).
    pub(crate) async fn relay(
        &self,
        from: &NodeId,
        to: &NodeId,
        payload: Vec<u8>,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        if !lock(&self.relay).take(from, payload.len() as u64, now_ms) {
            tracing::debug!("relay from {} over its rate; dropped", from.short());
            return Ok(None);
        }
        if from == to
            || self.books.node(from).await?.is_none()
            || self.books.node(to).await?.is_none()
        {
            tracing::debug!("relay {} -> {}: not registered", from.short(), to.short());
            return Ok(None);
        }
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let msg = Message::Relayed {
            from: *from,
            payload,
        };
        let bytes =
            Envelope::new(&self.identity, *to, now_ms, nonce, None, &msg).sign(&self.identity)?;
        Ok(Some(Outgoing { to: *to, bytes }))
    }
}
