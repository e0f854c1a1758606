//! Accounts on Mosquitto's dynamic security plugin, kept by the
//! coordinator so that Mosquitto confines each node as the embedded broker
//! does (docs/mosquitto.md says how to run it).
//!
//! Mosquitto cannot check a signature at login, so each node gets an
//! account of its own: user name its id in hex, a password the node
//! derives from its key and sends, sealed, in its `Auth`, and a role that
//! lets it publish on its own `to-coordinator` and `presence` topics (its
//! will included) and subscribe to its own `to-node` topic, nothing else.
//! Before it has one, a node logs in as [`NEWCOMER_USER`], whose role
//! reaches only `newcomer/<id>` (to send) and `welcome/<id>` (to hear, one
//! topic at a time, never `welcome/+`). The coordinator's own account may
//! subscribe to what nodes send (through its share group too) and publish
//! to any node. Mosquitto 2.0's ACLs have no `%u` patterns, hence a role
//! per node.
//!
//! Mosquitto ends the connections of every client whose roles change, so
//! [`Dynsec::prepare`] changes nothing that is already as it should be
//! (a restart kicks nobody), and the coordinator's and newcomers' roles are
//! per prefix (`pluto-coordinator:PREFIX`, `pluto-newcomer:PREFIX`).
//!
//! The coordinator talks to the plugin as its administrator, on
//! `$CONTROL/dynamic-security/v1`: each batch of commands is one message,
//! answered by one message that the batch's correlation data names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pluto_plugins_api::{NodeId, NEWCOMER_PASSWORD, NEWCOMER_USER};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::MqttUrl;

const CONTROL: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE: &str = "$CONTROL/dynamic-security/v1/response";
/// How long the plugin has to answer a batch (it rewrites its whole file
/// after every change, 10 to 40 ms each with thousands of accounts).
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Why the plugin could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DynsecError {
    /// The URL is not an MQTT URL.
    #[error(transparent)]
    Url(#[from] pluto_plugins_api::ChannelError),
    /// No answer in time: the broker is down, the administrator's login was
    /// refused, or the plugin is not loaded.
    #[error("no answer from Mosquitto's dynamic security plugin at {0} in {1:?} (is the plugin loaded, and the administrator's login right?)")]
    NoAnswer(String, Duration),
    /// The administrator's login was refused.
    #[error("Mosquitto at {0} refused the administrator's login: {1}")]
    Refused(String, String),
    /// The plugin refused a command.
    #[error("the dynamic security plugin refused {command}: {error}")]
    Command {
        /// The command.
        command: String,
        /// What the plugin said.
        error: String,
    },
    /// The connection is gone.
    #[error("the administrator's connection to Mosquitto is closed")]
    Closed,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<Value>>>>>;

/// An administrator's connection to the plugin.
pub struct Dynsec {
    client: AsyncClient,
    url: String,
    prefix: String,
    waiters: Waiters,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Dynsec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dynsec({:?})", self.url)
    }
}

impl Drop for Dynsec {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dynsec {
    /// Connects to the broker of `url` (an `mqtt://` channel URL; its
    /// prefix names the topics the accounts reach) as the plugin's
    /// administrator.
    pub async fn connect(url: &str, user: &str, password: &str) -> Result<Self, DynsecError> {
        let u = MqttUrl::parse(url)?;
        let shown = pluto_plugins_api::redact_url(url);
        let mut mo = MqttOptions::new(
            format!("pluto-admin-{:016x}", rand::random::<u64>()),
            u.host.clone(),
            u.port,
        );
        mo.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(64 << 20, 64 << 10)
            .set_credentials(user, password);
        let (client, mut eventloop) = AsyncClient::new(mo, 64);
        let waiters: Waiters = Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let task = tokio::spawn({
            let (client, waiters) = (client.clone(), waiters.clone());
            async move {
                let mut ready = Some(ready_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe(RESPONSE, QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(Ok(()));
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE => {
                            answered(&waiters, &p.payload);
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(Err(format!("{code:?}")));
                                return;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => {
                            tracing::warn!("mosquitto administrator connection: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        });
        let this = Self {
            client,
            url: shown.clone(),
            prefix: u.prefix,
            waiters,
            task,
        };
        match tokio::time::timeout(Duration::from_secs(15), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(this),
            Ok(Ok(Err(why))) => Err(DynsecError::Refused(shown, why)),
            _ => Err(DynsecError::NoAnswer(shown, Duration::from_secs(15))),
        }
    }

    /// Runs a batch of commands; the plugin's response to each, in order.
    async fn run(&self, mut commands: Vec<Value>) -> Result<Vec<Value>, DynsecError> {
        let tag = format!("{:016x}", rand::random::<u64>());
        for c in &mut commands {
            c["correlationData"] = Value::String(tag.clone());
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(tag.clone(), tx);
        let body = json!({ "commands": commands }).to_string();
        let sent = self
            .client
            .publish(CONTROL, QoS::AtLeastOnce, false, body)
            .await;
        let answer = match sent {
            Ok(()) => {
                tokio::time::timeout(ANSWER_WAIT, async {
                    rx.await.map_err(|_| DynsecError::Closed)
                })
                .await
            }
            Err(_) => Ok(Err(DynsecError::Closed)),
        };
        lock(&self.waiters).remove(&tag);
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(DynsecError::Closed),
            Err(_) => Err(DynsecError::NoAnswer(self.url.clone(), ANSWER_WAIT)),
        }
    }

    /// Runs a batch, where an error that means "already so" is no error.
    async fn ensure(&self, commands: Vec<Value>) -> Result<Vec<Option<String>>, DynsecError> {
        let names: Vec<String> = commands
            .iter()
            .map(|c| c["command"].as_str().unwrap_or("?").to_string())
            .collect();
        let answers = self.run(commands).await?;
        let mut out = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let error = answers
                .get(i)
                .and_then(|a| a["error"].as_str())
                .map(str::to_string);
            match error {
                Some(e) if !already(&e) => {
                    return Err(DynsecError::Command {
                        command: name.clone(),
                        error: e,
                    })
                }
                e => out.push(e),
            }
        }
        Ok(out)
    }

    fn topic(&self, kind: &str, node: &str) -> String {
        format!("{}/v1/{kind}/{node}", self.prefix)
    }

    /// Makes (or brings up to date) the coordinator's account `user` with
    /// `password`, allowed the share group `group` if any, and the
    /// newcomers' account. Idempotent: run at every start.
    pub async fn prepare(
        &self,
        user: &str,
        password: &str,
        group: Option<&str>,
    ) -> Result<(), DynsecError> {
        let mut acls = Vec::new();
        for kind in ["to-coordinator", "presence", "newcomer"] {
            acls.push(acl("subscribePattern", &self.topic(kind, "+"), true, 0));
            if let Some(g) = group {
                acls.push(acl(
                    "subscribePattern",
                    &format!("$share/{g}/{}", self.topic(kind, "+")),
                    true,
                    0,
                ));
            }
        }
        for kind in ["to-node", "welcome"] {
            acls.push(acl("publishClientSend", &self.topic(kind, "+"), true, 0));
        }
        // Roles of this prefix's own: changing a role ends the connections
        // of every client that has it, so a coordinator starting on another
        // prefix of the same broker must not touch these.
        let role = format!("pluto-coordinator:{}", self.prefix);
        self.role(&role, acls).await?;
        self.account(user, password, &role, true).await?;
        let newcomer = vec![
            acl("publishClientSend", &self.topic("newcomer", "+"), true, 0),
            // One node's answers at a time: never all of them.
            acl("subscribeLiteral", &self.topic("welcome", "+"), false, 10),
            acl("subscribePattern", &self.topic("welcome", "+"), true, 0),
        ];
        let role = format!("{NEWCOMER_USER}:{}", self.prefix);
        self.role(&role, newcomer).await?;
        // Its password is public and fixed: set once, never again (setting
        // a password ends the connections of the client's every login).
        self.account(NEWCOMER_USER, NEWCOMER_PASSWORD, &role, false)
            .await
    }

    /// Makes `node`'s account with `password`, confined to its own topics
    /// (or sets the password of the one it has).
    pub async fn provision(&self, node: &NodeId, password: &str) -> Result<(), DynsecError> {
        let hex = node.to_hex();
        let acls = vec![
            acl(
                "publishClientSend",
                &self.topic("to-coordinator", &hex),
                true,
                0,
            ),
            acl("publishClientSend", &self.topic("presence", &hex), true, 0),
            acl("subscribeLiteral", &self.topic("to-node", &hex), true, 0),
        ];
        self.role(&format!("pluto-node-{hex}"), acls).await?;
        self.account(&hex, password, &format!("pluto-node-{hex}"), true)
            .await
    }

    /// Makes role `name` with `acls`, or adds them to the role of that name
    /// (another prefix's coordinator may have made it).
    async fn role(&self, name: &str, acls: Vec<Value>) -> Result<(), DynsecError> {
        let made = self
            .ensure(vec![json!({
                "command": "createRole", "rolename": name, "acls": acls.clone(),
            })])
            .await?;
        if made[0].is_some() {
            let adds = acls
                .into_iter()
                .map(|mut a| {
                    a["command"] = json!("addRoleACL");
                    a["rolename"] = json!(name);
                    a
                })
                .collect();
            self.ensure(adds).await?;
        }
        Ok(())
    }

    /// Makes client `user` with `password` and `role`, or (with `reset`)
    /// sets the password of the one there is, which ends its connections.
    async fn account(
        &self,
        user: &str,
        password: &str,
        role: &str,
        reset: bool,
    ) -> Result<(), DynsecError> {
        let made = self
            .ensure(vec![json!({
                "command": "createClient", "username": user, "password": password,
            })])
            .await?;
        let mut next = Vec::new();
        if made[0].is_some() {
            if reset {
                next.push(json!({
                    "command": "setClientPassword", "username": user, "password": password,
                }));
            }
            // Mosquitto 2.0.11 answers "Internal error" to a role the client
            // has already: look first.
            let has = self
                .run(vec![json!({ "command": "getClient", "username": user })])
                .await?;
            let roles = &has.first().map(|h| h["data"]["client"]["roles"].clone());
            let held = roles
                .as_ref()
                .and_then(|r| r.as_array())
                .is_some_and(|r| r.iter().any(|r| r["rolename"] == role));
            if held {
                return self.ensure(next).await.map(|_| ());
            }
        }
        // Roles are added apart from createClient: Mosquitto 2.0.11 can
        // crash on a role given inline.
        next.push(json!({ "command": "addClientRole", "username": user, "rolename": role }));
        self.ensure(next).await.map(|_| ())
    }
}

/// One ACL as the plugin spells it.
fn acl(kind: &str, topic: &str, allow: bool, priority: i64) -> Value {
    json!({ "acltype": kind, "topic": topic, "allow": allow, "priority": priority })
}

/// Whether the plugin's error says the thing already exists.
fn already(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("already")
}

/// Hands a response message to the batch it answers.
fn answered(waiters: &Waiters, payload: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let Some(responses) = v["responses"].as_array() else {
        return;
    };
    let Some(tag) = responses.iter().find_map(|r| r["correlationData"].as_str()) else {
        return;
    };
    if let Some(tx) = lock(waiters).remove(tag) {
        let _ = tx.send(responses.clone());
    }
}
