//! A peer's request, checked without I/O: the first frame of a link becomes
//! what the storer is to do, or the refusal to send back. Signatures,
//! tickets and times are checked here against the clock the caller passes;
//! who owns what is the ledger's question.

use pluto_plugins_api::NodeId;
use pluto_protocol::{ReplicaStatement, Ticket};

use super::{refuse, ServeError, MAX_REPLICA};
use crate::exchange::{delete_message, PeerError, PeerMsg, MAX_CONTROL};

/// How far a delete request's time may be from the storer's clock.
pub const DELETE_WINDOW_MS: u64 = 10 * 60_000;

/// What the storer is asked to do.
#[derive(Debug)]
// One per link and short-lived: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Keep a replica (ticket and the owner's statement checked).
    Store {
        /// The ticket as sent (it is kept in the object's header).
        ticket: Vec<u8>,
        /// The ticket, checked.
        t: Ticket,
        /// What the owner states about the replica.
        statement: ReplicaStatement,
        /// The owner's signature of it.
        attest: [u8; 64],
        /// The owner can resume.
        resume: bool,
    },
    /// Send a range of a replica.
    Read {
        /// The replica.
        root: [u8; 32],
        /// First byte.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// Drop a replica (the owner's signature and its time checked).
    Delete {
        /// The replica.
        root: [u8; 32],
        /// When asked.
        at_ms: u64,
        /// The owner's signature.
        signature: [u8; 64],
    },
    /// Keep the owner's manifest.
    KeepManifest {
        /// Its bytes (checked against the one kept by the caller).
        blob: Vec<u8>,
    },
    /// Give the owner's manifest back.
    GiveManifest,
}

/// Who the storer is and what time it is.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// This node.
    pub me: NodeId,
    /// The coordinator whose tickets count.
    pub coordinator: NodeId,
    /// Now, ms since the epoch.
    pub now_ms: u64,
}

/// Reads the first frame `peer` sent.
pub fn request(frame: &[u8], peer: &NodeId, cx: &Context) -> Result<Request, ServeError> {
    if frame.len() > MAX_CONTROL {
        return refuse(PeerError::Malformed, "control frame too big");
    }
    let msg = match PeerMsg::decode(frame) {
        Ok(m) => m,
        Err(e) => return refuse(PeerError::Malformed, e.to_string()),
    };
    Ok(match msg {
        PeerMsg::Put {
            ticket,
            pack,
            root,
            size,
            attest,
            resume,
        } => {
            let statement = ReplicaStatement {
                owner: *peer,
                storer: cx.me,
                pack,
                size,
                root,
            };
            if !statement.signed_by(peer, &attest) {
                return refuse(
                    PeerError::Unauthorized,
                    "the replica's statement is not signed by you",
                );
            }
            let t = match Ticket::check(&ticket, &cx.coordinator, &cx.me, peer, cx.now_ms) {
                Ok(t) => t,
                Err(e) => return refuse(PeerError::Ticket, e.to_string()),
            };
            if t.pack != pack {
                return refuse(PeerError::Ticket, "the ticket is for another pack");
            }
            if size > t.size || size > MAX_REPLICA {
                return refuse(
                    PeerError::Ticket,
                    format!("{size} bytes, the ticket allows {}", t.size),
                );
            }
            Request::Store {
                ticket,
                t,
                statement,
                attest,
                resume,
            }
        }
        PeerMsg::Get { root, offset, len } => Request::Read { root, offset, len },
        PeerMsg::Delete {
            root,
            at_ms,
            signature,
        } => {
            if cx.now_ms.abs_diff(at_ms) > DELETE_WINDOW_MS {
                return refuse(PeerError::Unauthorized, "the request's time is off");
            }
            if !pluto_protocol::verify(peer, &delete_message(&cx.me, &root, at_ms), &signature) {
                return refuse(PeerError::Unauthorized, "bad signature");
            }
            Request::Delete {
                root,
                at_ms,
                signature,
            }
        }
        PeerMsg::PutManifest { blob } => Request::KeepManifest { blob },
        PeerMsg::GetManifest => Request::GiveManifest,
        other => return refuse(PeerError::Malformed, format!("{other:?} is not a request")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use pluto_plugins_api::PackId;

    fn key(b: u8) -> (SigningKey, NodeId) {
        let k = SigningKey::from_bytes(&[b; 32]);
        let id = NodeId(k.verifying_key().to_bytes());
        (k, id)
    }

    struct World {
        coordinator: SigningKey,
        owner: SigningKey,
        cx: Context,
    }

    fn world(now_ms: u64) -> World {
        let (coordinator, cid) = key(1);
        let (_, me) = key(2);
        World {
            coordinator,
            owner: key(3).0,
            cx: Context {
                me,
                coordinator: cid,
                now_ms,
            },
        }
    }

    fn code(r: Result<Request, ServeError>) -> PeerError {
        match r {
            Err(ServeError::Refused(c, _)) => c,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn put(w: &World, ticket_size: u64, size: u64, expires_ms: u64) -> Vec<u8> {
        let owner = NodeId(w.owner.verifying_key().to_bytes());
        let pack = PackId([7; 32]);
        let ticket = Ticket {
            owner,
            storer: w.cx.me,
            size: ticket_size,
            expires_ms,
            pack,
        }
        .sign(&w.coordinator);
        let statement = ReplicaStatement {
            owner,
            storer: w.cx.me,
            pack,
            size,
            root: [8; 32],
        };
        PeerMsg::Put {
            ticket,
            pack,
            root: [8; 32],
            size,
            attest: statement.sign(&w.owner),
            resume: true,
        }
        .encode()
    }

    #[test]
    fn a_put_needs_a_live_ticket_and_the_owners_word_within_size() {
        let w = world(1_000);
        let owner = NodeId(w.owner.verifying_key().to_bytes());
        assert!(matches!(
            request(&put(&w, 100, 100, 2_000), &owner, &w.cx),
            Ok(Request::Store { resume: true, .. })
        ));
        assert_eq!(
            code(request(&put(&w, 100, 101, 2_000), &owner, &w.cx)),
            PeerError::Ticket
        );
        let later = Context {
            now_ms: 3_000,
            ..w.cx
        };
        assert_eq!(
            code(request(&put(&w, 100, 100, 2_000), &owner, &later)),
            PeerError::Ticket,
            "an expired ticket"
        );
        let (_, mallory) = key(9);
        assert_eq!(
            code(request(&put(&w, 100, 100, 2_000), &mallory, &w.cx)),
            PeerError::Unauthorized,
            "someone else's put"
        );
    }

    #[test]
    fn a_delete_must_be_signed_and_fresh() {
        let w = world(DELETE_WINDOW_MS * 3);
        let owner = NodeId(w.owner.verifying_key().to_bytes());
        let at = |at_ms: u64, by: &SigningKey| {
            use ed25519_dalek::Signer;
            let signature = by
                .sign(&delete_message(&w.cx.me, &[8; 32], at_ms))
                .to_bytes();
            PeerMsg::Delete {
                root: [8; 32],
                at_ms,
                signature,
            }
            .encode()
        };
        let now = w.cx.now_ms;
        assert!(request(&at(now - DELETE_WINDOW_MS, &w.owner), &owner, &w.cx).is_ok());
        for stale in [now - DELETE_WINDOW_MS - 1, now + DELETE_WINDOW_MS + 1] {
            assert_eq!(
                code(request(&at(stale, &w.owner), &owner, &w.cx)),
                PeerError::Unauthorized
            );
        }
        assert_eq!(
            code(request(&at(now, &key(9).0), &owner, &w.cx)),
            PeerError::Unauthorized
        );
    }

    #[test]
    fn answers_and_garbage_are_not_requests() {
        let w = world(0);
        let peer = key(3).1;
        for frame in [
            PeerMsg::Ready.encode(),
            PeerMsg::Ok.encode(),
            vec![200, 1, 2],
            vec![],
            vec![0; MAX_CONTROL + 1],
        ] {
            assert_eq!(code(request(&frame, &peer, &w.cx)), PeerError::Malformed);
        }
    }
}
