//! Who may connect to the embedded broker, and what each client may do.
//!
//! ```text
//! CONNECT  user name = an Ed25519 public key (hex), password = TIME_MS.SIGNATURE (hex)
//!          SIGNATURE = Ed25519(key, broker_login_message(client id, TIME_MS, coordinator))
//!          the coordinator's key is this broker's (or zeros, from a node that does not
//!          know it yet: trust on first use)
//!          refused (CONNACK 5): no login, a bad key or signature, TIME_MS more than
//!          `window` from the broker's clock, a login already used
//! the coordinator's key   anything (wildcards, shared subscriptions)
//! any other key (a node)  publish   PREFIX/v1/to-coordinator/<its key>, PREFIX/v1/presence/<its key>
//!                         subscribe PREFIX/v1/to-node/<its key> (exactly; no wildcard, no $share)
//!                         will      on its presence topic only
//! ```
//!
//! A refused subscription gets the failure code in SUBACK; a refused
//! publish is dropped (MQTT 3.1.1 has no way to say no to a QoS 1
//! publish, so it is acknowledged and not routed). Pure: the clock is
//! passed in.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use pluto_plugins_api::{broker_login_message, NodeId};
use rumqttc::Login;

/// How the broker checks logins: whose key is the coordinator's, and how
/// far a login's time may be from the broker's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerAuth {
    /// The coordinator's identity key: the only one with the run of the
    /// broker.
    pub coordinator: NodeId,
    /// A login stamped further than this from now is refused.
    pub window: Duration,
}

impl BrokerAuth {
    /// Logins for `coordinator`, within two minutes of the clock.
    pub fn new(coordinator: NodeId) -> Self {
        Self {
            coordinator,
            window: Duration::from_secs(120),
        }
    }
}

/// What a connection may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// A broker that checks nothing: anything.
    Open,
    /// The coordinator: anything.
    Coordinator,
    /// A node: its own topics only (its id in hex).
    Node(String),
}

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LoginRefused {
    #[error("no login")]
    Missing,
    #[error("the user name is not a key")]
    NotAKey,
    #[error("the password is not TIME_MS.SIGNATURE")]
    Form,
    #[error("the login is stamped too far from now")]
    Stale,
    #[error("the signature does not verify")]
    Signature,
    #[error("the login was used before")]
    Replayed,
}

/// Logins seen within the window (their signatures), so each opens one
/// connection only.
#[derive(Debug, Default)]
pub(crate) struct Logins {
    seen: HashSet<[u8; 64]>,
    by_expiry: VecDeque<(u64, [u8; 64])>,
}

/// A login whose signature verified: who it is, and what to remember so
/// that it is not used again.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) role: Role,
    signature: [u8; 64],
    /// When the login lapses (its time plus the window).
    expiry_ms: u64,
}

/// Checks `login` for a connection with `client_id` at `now_ms`: its form,
/// its time and its signature. Pure, and the costly part (the signature),
/// so it runs outside any lock; [`Logins::remember`] then refuses a login
/// used before.
pub(crate) fn verify(
    auth: &BrokerAuth,
    client_id: &str,
    login: Option<&Login>,
    now_ms: u64,
) -> Result<Verified, LoginRefused> {
    let login = login.ok_or(LoginRefused::Missing)?;
    let id: NodeId = login.username.parse().map_err(|_| LoginRefused::NotAKey)?;
    let (time, sig) = login.password.split_once('.').ok_or(LoginRefused::Form)?;
    let time_ms: u64 = time.parse().map_err(|_| LoginRefused::Form)?;
    let mut sig_bytes = [0u8; 64];
    hex::decode_to_slice(sig, &mut sig_bytes).map_err(|_| LoginRefused::Form)?;
    let window = auth.window.as_millis() as u64;
    if time_ms.abs_diff(now_ms) > window {
        return Err(LoginRefused::Stale);
    }
    let key = VerifyingKey::from_bytes(&id.0).map_err(|_| LoginRefused::NotAKey)?;
    let signature = Signature::from_bytes(&sig_bytes);
    let signed_for = |coordinator: &NodeId| {
        key.verify_strict(
            &broker_login_message(client_id, time_ms, coordinator),
            &signature,
        )
        .is_ok()
    };
    // For this broker's coordinator, or for any (a node's first contact):
    // never for another coordinator's broker.
    if !signed_for(&auth.coordinator) && !signed_for(&NodeId([0; 32])) {
        return Err(LoginRefused::Signature);
    }
    Ok(Verified {
        role: if id == auth.coordinator {
            Role::Coordinator
        } else {
            Role::Node(id.to_hex())
        },
        signature: sig_bytes,
        expiry_ms: time_ms.saturating_add(window),
    })
}

impl Logins {
    /// Remembers a verified login until it lapses; refused when it was
    /// used before. Memory is bounded by the login rate times the window.
    pub(crate) fn remember(&mut self, v: &Verified, now_ms: u64) -> Result<(), LoginRefused> {
        while let Some(&(expiry, s)) = self.by_expiry.front() {
            if expiry >= now_ms {
                break;
            }
            self.by_expiry.pop_front();
            self.seen.remove(&s);
        }
        if !self.seen.insert(v.signature) {
            return Err(LoginRefused::Replayed);
        }
        // Expiries are pushed in arrival order, not time order; one that
        // lapses early stays a little longer behind a later one, never
        // shorter.
        self.by_expiry
            .push_back((v.expiry_ms.max(now_ms), v.signature));
        Ok(())
    }

    /// [`verify`], then [`Logins::remember`].
    #[cfg(test)]
    pub(crate) fn check(
        &mut self,
        auth: &BrokerAuth,
        client_id: &str,
        login: Option<&Login>,
        now_ms: u64,
    ) -> Result<Role, LoginRefused> {
        let v = verify(auth, client_id, login, now_ms)?;
        self.remember(&v, now_ms)?;
        Ok(v.role)
    }
}

/// `topic` ends with `/v1/<kind>/<id>` after a non-empty prefix.
fn own_topic(topic: &str, kind: &str, id: &str) -> bool {
    topic
        .strip_suffix(id)
        .and_then(|t| t.strip_suffix('/'))
        .and_then(|t| t.strip_suffix(kind))
        .and_then(|t| t.strip_suffix("/v1/"))
        .is_some_and(|prefix| !prefix.is_empty() && !prefix.starts_with('$'))
}

impl Role {
    /// Whether this client may publish on `topic` (a valid topic name).
    pub(crate) fn may_publish(&self, topic: &str) -> bool {
        match self {
            Self::Open | Self::Coordinator => true,
            Self::Node(id) => {
                own_topic(topic, "to-coordinator", id) || own_topic(topic, "presence", id)
            }
        }
    }

    /// Whether this client may leave a will on `topic`.
    pub(crate) fn may_will(&self, topic: &str) -> bool {
        match self {
            Self::Open | Self::Coordinator => true,
            Self::Node(id) => own_topic(topic, "presence", id),
        }
    }

    /// Whether this client may subscribe to `filter` (as sent).
    pub(crate) fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Self::Open | Self::Coordinator => true,
            Self::Node(id) => !filter.contains(['+', '#']) && own_topic(filter, "to-node", id),
        }
    }

    /// Whether this is the coordinator's connection.
    pub(crate) fn is_coordinator(&self) -> bool {
        matches!(self, Self::Coordinator)
    }

    /// The key that client ids are kept under: a node's ids are its own,
    /// so no client can take over another user's connection.
    pub(crate) fn client_key(&self, client_id: &str) -> String {
        match self {
            Self::Open => client_id.to_string(),
            Self::Coordinator => format!("c/{client_id}"),
            Self::Node(id) => format!("{id}/{client_id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const NOW: u64 = 1_800_000_000_000;

    /// The coordinator of [`logins_are_checked_once_each`].
    fn coordinator_id() -> NodeId {
        id(&SigningKey::from_bytes(&[1; 32]))
    }

    fn login(key: &SigningKey, client_id: &str, time_ms: u64) -> Login {
        login_for(key, client_id, time_ms, &coordinator_id())
    }

    fn login_for(key: &SigningKey, client_id: &str, time_ms: u64, c: &NodeId) -> Login {
        let sig = key.sign(&broker_login_message(client_id, time_ms, c));
        Login {
            username: hex::encode(key.verifying_key().to_bytes()),
            password: format!("{time_ms}.{}", hex::encode(sig.to_bytes())),
        }
    }

    fn id(key: &SigningKey) -> NodeId {
        NodeId(key.verifying_key().to_bytes())
    }

    #[test]
    fn logins_are_checked_once_each() {
        let coordinator = SigningKey::from_bytes(&[1; 32]);
        let node = SigningKey::from_bytes(&[2; 32]);
        assert_eq!(id(&coordinator), coordinator_id());
        let auth = BrokerAuth::new(id(&coordinator));
        let mut l = Logins::default();
        let check = |l: &mut Logins, login: Option<&Login>, client: &str, now: u64| {
            l.check(&auth, client, login, now)
        };
        assert_eq!(
            check(&mut l, Some(&login(&coordinator, "c", NOW)), "c", NOW),
            Ok(Role::Coordinator)
        );
        let n = login(&node, "n", NOW - 1000);
        assert_eq!(
            check(&mut l, Some(&n), "n", NOW),
            Ok(Role::Node(id(&node).to_hex()))
        );
        assert_eq!(
            check(&mut l, Some(&n), "n", NOW),
            Err(LoginRefused::Replayed)
        );
        // For another client id, or stamped too far off, or by another key.
        let other = login(&node, "n", NOW + 1);
        assert_eq!(
            check(&mut l, Some(&other), "m", NOW),
            Err(LoginRefused::Signature)
        );
        assert_eq!(
            check(&mut l, Some(&login(&node, "n", NOW - 121_000)), "n", NOW),
            Err(LoginRefused::Stale)
        );
        assert_eq!(
            check(&mut l, Some(&login(&node, "n", NOW + 121_000)), "n", NOW),
            Err(LoginRefused::Stale)
        );
        let mut forged = login(&node, "n", NOW + 2);
        forged.username = id(&coordinator).to_hex();
        assert_eq!(
            check(&mut l, Some(&forged), "n", NOW),
            Err(LoginRefused::Signature)
        );
        assert_eq!(check(&mut l, None, "n", NOW), Err(LoginRefused::Missing));
        // A login for another coordinator's broker is no login here; one
        // for any (a node's first contact) is.
        let elsewhere = login_for(&node, "n", NOW + 3, &NodeId([9; 32]));
        assert_eq!(
            check(&mut l, Some(&elsewhere), "n", NOW),
            Err(LoginRefused::Signature)
        );
        let first_contact = login_for(&node, "n", NOW + 4, &NodeId([0; 32]));
        assert_eq!(
            check(&mut l, Some(&first_contact), "n", NOW),
            Ok(Role::Node(id(&node).to_hex()))
        );
        for (user, pass) in [
            ("nobody", "1.00"),
            (&id(&node).to_hex()[..], "nodot"),
            (&id(&node).to_hex()[..], "x.00"),
            (&id(&node).to_hex()[..], "1.zz"),
        ] {
            let bad = Login {
                username: user.to_string(),
                password: pass.to_string(),
            };
            assert!(
                check(&mut l, Some(&bad), "n", NOW).is_err(),
                "{user} {pass}"
            );
        }
        // Remembered logins lapse.
        let late = NOW + 10 * 60_000;
        assert!(check(&mut l, Some(&login(&node, "n", late)), "n", late).is_ok());
        assert_eq!(l.seen.len(), 1);
    }

    #[test]
    fn a_node_has_its_own_topics_only() {
        let me = NodeId([3; 32]).to_hex();
        let other = NodeId([4; 32]).to_hex();
        let node = Role::Node(me.clone());
        assert!(node.may_publish(&format!("pluto/v1/to-coordinator/{me}")));
        assert!(node.may_publish(&format!("a/b/v1/presence/{me}")));
        assert!(!node.may_publish(&format!("pluto/v1/to-coordinator/{other}")));
        assert!(!node.may_publish(&format!("pluto/v1/to-node/{me}")));
        assert!(!node.may_publish(&format!("pluto/v1/presence/{other}")));
        assert!(!node.may_publish(&format!("/v1/presence/{me}")));
        assert!(!node.may_publish(&format!("pluto/v1/presence/{me}/x")));
        assert!(node.may_will(&format!("pluto/v1/presence/{me}")));
        assert!(!node.may_will(&format!("pluto/v1/to-coordinator/{me}")));
        assert!(node.may_subscribe(&format!("pluto/v1/to-node/{me}")));
        for f in [
            "#".to_string(),
            "pluto/#".to_string(),
            "pluto/v1/to-node/+".to_string(),
            format!("pluto/v1/to-node/{other}"),
            format!("$share/g/pluto/v1/to-node/{me}"),
            format!("pluto/v1/to-coordinator/{me}"),
            "$SYS/#".to_string(),
        ] {
            assert!(!node.may_subscribe(&f), "{f}");
        }
        for r in [Role::Open, Role::Coordinator] {
            assert!(r.may_subscribe("$share/g/pluto/v1/to-coordinator/+"));
            assert!(r.may_publish(&format!("pluto/v1/to-node/{other}")));
        }
        assert_ne!(node.client_key("x"), Role::Coordinator.client_key("x"));
    }
}
