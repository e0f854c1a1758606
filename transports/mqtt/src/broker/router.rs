//! Who receives a publish: the broker's sessions and subscriptions, with no
//! I/O of their own (deliveries go into each connection's [`Outbox`]).
//!
//! Exact filters (no wildcard, not shared) live in a map from topic to
//! subscribers, so routing a publish to a node's own topic is one lookup
//! whatever the number of nodes. Wildcard and shared filters are few (the
//! coordinator's `PREFIX/v1/to-coordinator/+` and `PREFIX/v1/presence/+`)
//! and are each checked against every publish; their number is capped, so
//! a client cannot make every publish slow by subscribing to many of them.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::QoS;

use super::connection::{Delivery, Outbox};

/// A connection's number, unique for the broker's life.
pub(crate) type ConnId = u64;

/// Most filters one connection may hold at once.
pub(crate) const MAX_FILTERS_PER_CONNECTION: usize = 64;

/// A subscriber of a filter, and the QoS it was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sub {
    conn: ConnId,
    qos: QoS,
}

/// A wildcard or shared filter and its subscribers.
#[derive(Debug)]
struct Pattern {
    /// The topic filter's levels (after `$share/GROUP/` for a shared one).
    levels: Vec<String>,
    /// Each publish goes to one subscriber, in turn.
    shared: bool,
    subs: Vec<Sub>,
    /// The next subscriber's turn, for a shared filter.
    next: usize,
}

/// A live connection as the router knows it.
#[derive(Debug)]
struct Conn {
    /// None for a client that gave no id: nobody can take it over.
    client_id: Option<String>,
    outbox: Outbox,
    /// Its filters (as subscribed, `$share/` included) and granted QoS.
    filters: HashMap<String, QoS>,
}

/// Why a filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubscribeRefused {
    /// Not a valid MQTT 3.1.1 filter (or shared subscription).
    Invalid,
    /// The connection or the broker holds too many filters.
    TooMany,
    /// The connection is gone.
    Gone,
}

/// A filter, classified.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Filter<'a> {
    /// The topic filter (without `$share/GROUP/`).
    pub(crate) topic: &'a str,
    /// A shared subscription.
    pub(crate) shared: bool,
    /// Holds `+` or `#`.
    pub(crate) wildcard: bool,
}

/// Parses a subscription filter: `a/b`, `a/+/c`, `a/#`, `$share/GROUP/FILTER`.
pub(crate) fn parse_filter(raw: &str) -> Option<Filter<'_>> {
    let (topic, shared) = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, topic) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) {
                return None;
            }
            (topic, true)
        }
        None => (raw, false),
    };
    if topic.is_empty() || topic.contains('\0') {
        return None;
    }
    let mut levels = topic.split('/').peekable();
    let mut wildcard = false;
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_none() => wildcard = true,
            "+" => wildcard = true,
            l if l.contains(['+', '#']) => return None,
            _ => {}
        }
    }
    Some(Filter {
        topic,
        shared,
        wildcard,
    })
}

/// Whether a topic may be published to: not empty, no wildcard, no NUL.
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Whether `topic` matches a filter's `levels` (MQTT 3.1.1 section 4.7:
/// `a/#` also matches `a`; a wildcard in first place does not match a topic
/// that starts with `$`).
fn matches(levels: &[String], topic: &str) -> bool {
    let dollar = topic.starts_with('$');
    let mut parts = topic.split('/');
    for (i, f) in levels.iter().enumerate() {
        if f == "#" {
            return !(i == 0 && dollar);
        }
        match parts.next() {
            None => return false,
            Some(_) if f == "+" => {
                if i == 0 && dollar {
                    return false;
                }
            }
            Some(level) if level == f => {}
            Some(_) => return false,
        }
    }
    parts.next().is_none()
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

/// The broker's sessions and subscriptions.
#[derive(Debug)]
pub(crate) struct Router {
    next_id: ConnId,
    conns: HashMap<ConnId, Conn>,
    /// Client id to the connection that holds it.
    sessions: HashMap<String, ConnId>,
    /// Exact (not shared, no wildcard) filters: topic to subscribers.
    exact: HashMap<String, Vec<Sub>>,
    /// Wildcard and shared filters, by their full text.
    patterns: HashMap<String, Pattern>,
    max_patterns: usize,
    /// When backlogged connections were last ended to make room.
    last_shed: Option<std::time::Instant>,
}

/// How often backlogged connections may be ended to make room.
const SHED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Router {
    /// A router that holds at most `max_patterns` distinct wildcard or
    /// shared filters.
    pub(crate) fn new(max_patterns: usize) -> Self {
        Self {
            next_id: 1,
            conns: HashMap::new(),
            sessions: HashMap::new(),
            exact: HashMap::new(),
            patterns: HashMap::new(),
            max_patterns,
            last_shed: None,
        }
    }

    /// All queues together are full: the connections that let theirs grow
    /// (clients that do not read) are ended, so that memory goes to those
    /// that read, not to whoever hoards it. At most every [`SHED_EVERY`].
    /// Returns how many were ended.
    fn shed(&mut self) -> usize {
        let now = std::time::Instant::now();
        if self
            .last_shed
            .is_some_and(|at| now.duration_since(at) < SHED_EVERY)
        {
            return 0;
        }
        self.last_shed = Some(now);
        let mut ended = 0;
        for c in self.conns.values() {
            if c.outbox.backlogged() {
                c.outbox.end();
                ended += 1;
            }
        }
        if ended > 0 {
            tracing::warn!("mqtt broker: queues full; ended {ended} clients that read nothing");
        }
        ended
    }

    /// Registers a connection under `client_id`. When another connection
    /// held that id, it is forgotten as its holder and its outbox returned:
    /// the caller ends it (MQTT-3.1.4-2), and that connection's own end
    /// publishes its will.
    pub(crate) fn connect(
        &mut self,
        client_id: Option<String>,
        outbox: Outbox,
    ) -> (ConnId, Option<Outbox>) {
        let id = self.next_id;
        self.next_id += 1;
        let old = client_id
            .clone()
            .and_then(|c| self.sessions.insert(c, id))
            .and_then(|old| self.conns.get(&old))
            .map(|c| c.outbox.clone());
        self.conns.insert(
            id,
            Conn {
                client_id,
                outbox,
                filters: HashMap::new(),
            },
        );
        (id, old)
    }

    /// Forgets a connection and all its subscriptions.
    pub(crate) fn disconnect(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        if let Some(client_id) = &conn.client_id {
            if self.sessions.get(client_id) == Some(&id) {
                self.sessions.remove(client_id);
            }
        }
        for filter in conn.filters.keys() {
            self.remove_sub(id, filter);
        }
    }

    /// Subscribes a connection to `raw` at `qos` (QoS 2 is granted as 1),
    /// replacing its earlier subscription to the same filter.
    pub(crate) fn subscribe(
        &mut self,
        id: ConnId,
        raw: &str,
        qos: QoS,
    ) -> Result<QoS, SubscribeRefused> {
        let qos = min_qos(qos, QoS::AtLeastOnce);
        let filter = parse_filter(raw).ok_or(SubscribeRefused::Invalid)?;
        let conn = self.conns.get_mut(&id).ok_or(SubscribeRefused::Gone)?;
        let known = conn.filters.contains_key(raw);
        if !known && conn.filters.len() >= MAX_FILTERS_PER_CONNECTION {
            return Err(SubscribeRefused::TooMany);
        }
        let sub = Sub { conn: id, qos };
        if filter.shared || filter.wildcard {
            let count = self.patterns.len();
            match self.patterns.entry(raw.to_string()) {
                Entry::Occupied(mut e) => upsert(&mut e.get_mut().subs, sub),
                Entry::Vacant(e) => {
                    if count >= self.max_patterns {
                        return Err(SubscribeRefused::TooMany);
                    }
                    e.insert(Pattern {
                        levels: filter.topic.split('/').map(str::to_string).collect(),
                        shared: filter.shared,
                        subs: vec![sub],
                        next: 0,
                    });
                }
            }
        } else {
            upsert(self.exact.entry(raw.to_string()).or_default(), sub);
        }
        conn.filters.insert(raw.to_string(), qos);
        Ok(qos)
    }

    /// Removes a connection's subscription to `raw`, if it has one.
    pub(crate) fn unsubscribe(&mut self, id: ConnId, raw: &str) {
        let held = self
            .conns
            .get_mut(&id)
            .is_some_and(|c| c.filters.remove(raw).is_some());
        if held {
            self.remove_sub(id, raw);
        }
    }

    fn remove_sub(&mut self, id: ConnId, raw: &str) {
        if let Some(subs) = self.exact.get_mut(raw) {
            subs.retain(|s| s.conn != id);
            if subs.is_empty() {
                self.exact.remove(raw);
            }
        } else if let Some(p) = self.patterns.get_mut(raw) {
            p.subs.retain(|s| s.conn != id);
            if p.subs.is_empty() {
                self.patterns.remove(raw);
            }
        }
    }

    /// Routes a publish: each subscriber gets it once at the lower of the
    /// publish's and its subscription's QoS (the highest of its matching
    /// subscriptions), and each shared filter's next subscriber in turn
    /// gets a copy of its own. A full outbox drops the message for that
    /// subscriber (a shared filter tries its other subscribers first).
    /// Returns how many outboxes took it.
    pub(crate) fn publish(&mut self, topic: &str, payload: &Bytes, qos: QoS) -> usize {
        let mut targets: Vec<Sub> = Vec::new();
        if let Some(subs) = self.exact.get(topic) {
            targets.extend(subs.iter().copied());
        }
        let mut shared: Vec<(ConnId, QoS, usize)> = Vec::new();
        for p in self.patterns.values_mut() {
            if p.subs.is_empty() || !matches(&p.levels, topic) {
                continue;
            }
            if p.shared {
                let start = p.next % p.subs.len();
                p.next = start + 1;
                shared.push((p.subs[start].conn, p.subs[start].qos, 0));
                for k in 1..p.subs.len() {
                    let s = p.subs[(start + k) % p.subs.len()];
                    shared.push((s.conn, s.qos, k));
                }
            } else {
                targets.extend(p.subs.iter().copied());
            }
        }
        // One copy per connection, at the best QoS it holds.
        targets.sort_unstable_by_key(|s| (s.conn, std::cmp::Reverse(s.qos as u8)));
        targets.dedup_by_key(|s| s.conn);
        let topic: Arc<str> = Arc::from(topic);
        let mut delivered = 0;
        let mut pressure = false;
        for s in targets {
            if let Some(c) = self.conns.get(&s.conn) {
                match c.outbox.deliver(&topic, payload, min_qos(qos, s.qos)) {
                    Delivery::Taken => delivered += 1,
                    Delivery::Pressure => pressure = true,
                    Delivery::Full | Delivery::Gone => {}
                }
            }
        }
        // Shared: candidates come as runs that start at rank 0; the first
        // of a run that takes the message ends the run.
        let mut done = false;
        for (conn, sub_qos, rank) in shared {
            if rank == 0 {
                done = false;
            }
            if done {
                continue;
            }
            if let Some(c) = self.conns.get(&conn) {
                match c.outbox.deliver(&topic, payload, min_qos(qos, sub_qos)) {
                    Delivery::Taken => {
                        delivered += 1;
                        done = true;
                    }
                    Delivery::Pressure => pressure = true,
                    Delivery::Full | Delivery::Gone => {}
                }
            }
        }
        if pressure {
            self.shed();
        }
        delivered
    }
}

/// Adds `sub`, or updates the QoS of the same connection's subscription.
fn upsert(subs: &mut Vec<Sub>, sub: Sub) {
    match subs.iter_mut().find(|s| s.conn == sub.conn) {
        Some(s) => s.qos = sub.qos,
        None => subs.push(sub),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(f: &str) -> Vec<String> {
        f.split('/').map(str::to_string).collect()
    }

    #[test]
    fn filters_are_classified() {
        let f = parse_filter("a/b").unwrap();
        assert!(!f.shared && !f.wildcard);
        let f = parse_filter("a/+/c").unwrap();
        assert!(!f.shared && f.wildcard);
        let f = parse_filter("$share/g/p/v1/to-coordinator/+").unwrap();
        assert!(f.shared && f.wildcard);
        assert_eq!(f.topic, "p/v1/to-coordinator/+");
        let f = parse_filter("$share/g/a/b").unwrap();
        assert!(f.shared && !f.wildcard);
        assert!(parse_filter("#").unwrap().wildcard);
        for bad in [
            "",
            "a/#/b",
            "a+",
            "a/b#",
            "$share/",
            "$share//a",
            "$share/g",
            "$share/g/",
            "$share/g+/a",
            "a\0b",
        ] {
            assert_eq!(parse_filter(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn topics_match_filters() {
        assert!(matches(&levels("a/+/c"), "a/b/c"));
        assert!(!matches(&levels("a/+/c"), "a/b/d"));
        assert!(!matches(&levels("a/+"), "a/b/c"));
        assert!(matches(&levels("a/+"), "a/"));
        assert!(matches(&levels("a/#"), "a"));
        assert!(matches(&levels("a/#"), "a/b/c"));
        assert!(!matches(&levels("a/#"), "b/a"));
        assert!(matches(&levels("#"), "x/y"));
        assert!(!matches(&levels("#"), "$SYS/x"));
        assert!(!matches(&levels("+/x"), "$SYS/x"));
        assert!(matches(&levels("$SYS/+"), "$SYS/x"));
        assert!(matches(&levels("é/+"), "é/ü"));
        assert!(!matches(&levels("a/b"), "a/b/c"));
        assert!(!matches(&levels("a/b/c"), "a/b"));
    }

    #[test]
    fn topics_are_validated() {
        assert!(valid_topic("a/b"));
        assert!(valid_topic("é"));
        for bad in ["", "a/+", "#", "a\0"] {
            assert!(!valid_topic(bad), "{bad:?}");
        }
    }
}
