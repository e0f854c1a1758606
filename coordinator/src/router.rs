//! The router: checks an envelope, then sends its message to the module
//! that handles it, and seals and signs what comes back.
//!
//! ```text
//! handle: verify -> addressed to us? topic names the signer? -> answered already? (Answers:
//!         sent again once, then dropped) -> registered? (anything but Hello/Auth)
//!         -> fresh? (ReplayGuard: handshakes and the rest apart, a share per sender)
//!         -> open (sealed to us: everything but the Hello) -> dispatch
//! dispatch:  Hello, Auth               -> sessions      (before authentication)
//!            Relay                     -> relay         (passed on to another node)
//!            Audit, Proof              -> audits        (answered later, or to someone else)
//!            anything else, registered -> registered():
//!              Heartbeat, SetOffer, Announce, Locate, Put/GetManifest -> registry
//!              MatchRequest, RecordReplica, DropReplica, ReportHeld   -> matching
//!              GetStatus, ListPeers, GetRepairs                       -> reports
//! ```
//!
//! A message answered to its sender is kept in [`Answers`](crate::answers)
//! so that the same request again gets the same answer; relayed payloads
//! and audits go to someone else or later, and are not kept.

use pluto_plugins_api::{NodeId, NodeRecord, ReplicaRecord, StoreError};
use pluto_protocol::{Envelope, ErrorCode, Message, SEALED_BIT};
use rand_core::CryptoRngCore;

use crate::answers::Kept;
use crate::coordinator::{error, lock, Reply};
use crate::matching::Want;
use crate::{Coordinator, Outgoing, Rejected, ANY_COORDINATOR};

/// The kinds of [`Message::Auth`], [`Message::Relay`] and [`Message::Proof`].
const AUTH_KIND: u8 = 3;
const RELAY_KIND: u8 = 22;
const PROOF_KIND: u8 = 29;

/// Where a message's answer goes.
enum Routed {
    /// To the sender, as the answer to its request.
    Answer(Reply),
    /// Already addressed (to another node, or to the sender later), or nothing.
    Direct(Option<Outgoing>),
}

impl Coordinator {
    /// Handles one envelope that arrived on `claimed`'s topic (the channel's
    /// unauthenticated idea of the sender) at `now_ms`.
    pub async fn handle(
        &self,
        claimed: Option<NodeId>,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        self.route(claimed, bytes, now_ms, rng, false).await
    }

    /// Handles one envelope that arrived on `claimed`'s newcomer topic
    /// (a node without a broker account yet): only its `Hello` and `Auth`
    /// are taken. The answer goes back to the newcomer's own topic.
    pub async fn handle_newcomer(
        &self,
        claimed: NodeId,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        self.route(Some(claimed), bytes, now_ms, rng, true).await
    }

    async fn route(
        &self,
        claimed: Option<NodeId>,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
        newcomer: bool,
    ) -> Result<Option<Outgoing>, Rejected> {
        let env = Envelope::verify(bytes)?;
        let kind = env.kind & !SEALED_BIT;
        let handshake = kind == Message::Hello.kind() || kind == AUTH_KIND;
        if newcomer && !handshake {
            return Err(Rejected::NotHandshake(env.from));
        }
        // A node that does not know the coordinator yet (trust on first use)
        // may address its Hello to "any coordinator" (all zeros); the signed
        // challenge it gets back tells it whom to pin.
        let first_contact = env.to == ANY_COORDINATOR && env.kind == Message::Hello.kind();
        if env.to != self.id() && !first_contact {
            return Err(Rejected::WrongRecipient(env.to));
        }
        if let Some(c) = claimed {
            if c != env.from {
                return Err(Rejected::SenderMismatch {
                    signer: env.from,
                    claimed: c,
                });
            }
        }
        // The same request again (its answer was lost): the same answer,
        // once; a request copied and re-published by someone else gets no
        // more.
        let digest = *blake3::hash(bytes).as_bytes();
        match lock(&self.answers).get(&env.from, &env.nonce, &digest, now_ms) {
            Kept::Again(reply) => {
                return Ok(Some(Outgoing {
                    to: env.from,
                    bytes: reply,
                }))
            }
            Kept::Spent => return Ok(None),
            Kept::New => {}
        }
        // Keys nobody registered may only shake hands, and what they send
        // is remembered apart: fresh keys cost nothing, and must not crowd
        // registered nodes out of the replay guard.
        let node = if handshake {
            None
        } else {
            match self.books.node(&env.from).await? {
                Some(node) => Some(node),
                // What expects no answer (a payload to relay, a proof) is
                // dropped; a request is told to authenticate first.
                None if kind == RELAY_KIND || kind == PROOF_KIND => return Ok(None),
                None => {
                    let reply = error(ErrorCode::Unauthenticated, "authenticate first");
                    return self
                        .envelope_to(&env.from, Some(env.nonce), &reply, now_ms, rng)
                        .await;
                }
            }
        };
        let guard = if handshake {
            &self.handshake_guard
        } else {
            &self.guard
        };
        lock(guard)
            .check(&env, now_ms)
            .map_err(|r| Rejected::NotFresh(env.from, r))?;
        // Everything but the Hello is sealed to us: on the broker only the
        // envelope's header can be read.
        let msg = if env.is_private() {
            env.open_private(&self.exchange).map_err(|e| e.to_string())
        } else if kind == Message::Hello.kind() {
            env.message().map_err(|e| e.to_string())
        } else {
            Err("requests must be sealed to the coordinator's exchange key".to_string())
        };
        let reply = match msg {
            Ok(m) => match self
                .dispatch(&env.from, node, env.nonce, m, now_ms, rng)
                .await?
            {
                Routed::Answer(reply) => reply,
                Routed::Direct(out) => return Ok(out),
            },
            Err(e) => error(ErrorCode::Malformed, e),
        };
        let Some(out) = self
            .envelope_to(&env.from, Some(env.nonce), &reply, now_ms, rng)
            .await?
        else {
            return Ok(None);
        };
        lock(&self.answers).put(
            (env.from, env.nonce),
            digest,
            out.bytes.clone(),
            now_ms.saturating_add(self.config.window_ms),
            now_ms,
        );
        Ok(Some(out))
    }

    /// Sends a message to its handler; `node` is the sender's record
    /// (None for a handshake).
    async fn dispatch(
        &self,
        from: &NodeId,
        node: Option<NodeRecord>,
        nonce: [u8; 16],
        msg: Message,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Routed, Rejected> {
        use Routed::{Answer, Direct};
        Ok(match msg {
            Message::Hello => Answer(self.hello(from, now_ms, rng)),
            Message::Auth {
                challenge,
                exchange_key,
                offer,
                broker_password,
            } => Answer(
                self.auth(
                    from,
                    &challenge,
                    &exchange_key,
                    offer,
                    broker_password,
                    now_ms,
                )
                .await?,
            ),
            Message::Relay { to, payload } => {
                Direct(self.relay(from, &to, payload, now_ms, rng).await?)
            }
            Message::Audit { pack, storer } => Direct(
                self.audit_request(from, nonce, pack, storer, now_ms, rng)
                    .await?,
            ),
            Message::Proof { challenge, answer } => {
                Direct(self.proof(from, &challenge, answer, now_ms, rng).await?)
            }
            // Everything else: only from registered nodes.
            other => match node {
                Some(node) => Answer(self.registered(&node, other, now_ms, rng).await?),
                None => Answer(error(ErrorCode::Unauthenticated, "authenticate first")),
            },
        })
    }

    /// Sends a registered node's message to its handler.
    async fn registered(
        &self,
        node: &NodeRecord,
        msg: Message,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Reply, Rejected> {
        let from = &node.id;
        Ok(match msg {
            Message::Heartbeat => self.heartbeat(from, now_ms).await?,
            Message::SetOffer { bytes } => self.set_offer(node, bytes).await?,
            Message::Announce { addresses } => self.announce(from, &addresses).await?,
            Message::Locate { nodes } => self.locate(&nodes).await?,
            Message::PutManifest { version, blob } => {
                self.put_manifest(from, version, &blob).await?
            }
            Message::GetManifest => self.get_manifest(from).await?,
            Message::MatchRequest {
                pack,
                size,
                copies,
                friends,
                friend_copies,
                exclude,
            } => {
                let want = Want {
                    size,
                    copies,
                    friends: &friends,
                    friend_copies,
                    exclude: &exclude,
                };
                self.match_request(node, pack, &want, now_ms, rng).await?
            }
            Message::RecordReplica {
                pack,
                storer,
                size,
                root,
                receipt,
                micros,
            } => {
                let replica = ReplicaRecord {
                    owner: *from,
                    pack,
                    storer,
                    size,
                    root,
                };
                self.record_replica(&replica, &receipt, micros, now_ms)
                    .await?
            }
            Message::DropReplica { pack, storer } => {
                self.drop_replica(from, &pack, &storer).await?
            }
            Message::ReportHeld(held) => self.report_held(from, &held, now_ms).await?,
            Message::GetStatus => self.status(node).await?,
            Message::ListPeers => self.list_peers(from, now_ms).await?,
            Message::GetRepairs => self.list_repairs(from, now_ms).await?,
            other => error(
                ErrorCode::Malformed,
                format!("a node does not send message kind {}", other.kind()),
            ),
        })
    }

    /// A signed envelope from the coordinator to `to` (sealed to it when
    /// private; None when a private one goes to a node the books do not
    /// know).
    pub(crate) async fn envelope_to(
        &self,
        to: &NodeId,
        reply_to: Option<[u8; 16]>,
        reply: &Reply,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let env = if reply.private {
            let Some(node) = self.books.node(to).await? else {
                return Ok(None);
            };
            Envelope::new_private(
                &self.identity,
                *to,
                &node.exchange_key,
                now_ms,
                nonce,
                reply_to,
                &reply.msg,
                rng,
            )
            .map_err(|e| Rejected::Store(StoreError::Corrupt(format!("node exchange key: {e}"))))?
        } else {
            Envelope::new(&self.identity, *to, now_ms, nonce, reply_to, &reply.msg)
        };
        Ok(Some(Outgoing {
            to: *to,
            bytes: env.sign(&self.identity)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_the_messages_kinds() {
        let auth = Message::Auth {
            challenge: [0; 32],
            exchange_key: [0; 32],
            offer: 0,
            broker_password: None,
        };
        let relay = Message::Relay {
            to: NodeId([0; 32]),
            payload: vec![],
        };
        let proof = Message::Proof {
            challenge: [0; 32],
            answer: pluto_protocol::ProofAnswer::NotHeld,
        };
        assert_eq!(
            [auth.kind(), relay.kind(), proof.kind()],
            [AUTH_KIND, RELAY_KIND, PROOF_KIND]
        );
    }
}
