//! Message handling.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{
    online_fraction, BooksStore, NodeId, NodeRecord, PackId, Recorded, ReplicaRecord, StoreError,
};
use pluto_protocol::{
    delete_message, exchange_public, proof, AuditOutcome, Envelope, EnvelopeError, ErrorCode,
    Message, NodeAddresses, PeerReport, ProofAnswer, Refused, RepairItem, RepairReason,
    ReplayGuard, ReplicaStatement, StatusReport, Ticket, MAX_ADDRESSES, MAX_REPAIRS,
};
use rand::seq::SliceRandom;
use rand_core::CryptoRngCore;
use x25519_dalek::StaticSecret;

use crate::audit;
use crate::CoordinatorConfig;

/// The recipient of a first Hello to a coordinator not yet pinned.
pub const ANY_COORDINATOR: NodeId = NodeId([0; 32]);

/// Why an envelope got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// Did not decode or verify.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// Addressed to someone else.
    #[error("addressed to {0}, not to this coordinator")]
    WrongRecipient(NodeId),
    /// Published on one node's topic, signed by another.
    #[error("signed by {signer} but sent as {claimed}")]
    SenderMismatch {
        /// Who signed.
        signer: NodeId,
        /// Whose topic it came on.
        claimed: NodeId,
    },
    /// Stale, future-dated, replayed, or too many.
    #[error("from {0}: {1}")]
    NotFresh(NodeId, Refused),
    /// The books failed.
    #[error("books: {0}")]
    Store(#[from] StoreError),
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// To whom.
    pub to: NodeId,
    /// The signed envelope.
    pub bytes: Vec<u8>,
}

/// What one sweep of the books did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Reservations that lapsed and were released.
    pub released: u64,
    /// Nodes marked offline because they fell silent.
    pub silent: Vec<NodeId>,
    /// Presence changes forgotten.
    pub pruned: u64,
}

/// A request: its sender and nonce.
type RequestKey = (NodeId, [u8; 16]);

/// An answer kept: the request's digest, the signed reply, when it lapses.
type Answer = ([u8; 32], Vec<u8>, u64);

/// Answers already sent, by (sender, request nonce), so a node that missed
/// an answer and sends the very same request again gets the very same
/// answer, and the request (a match that reserves space, say) is not
/// carried out twice. Bounded by bytes and by the replay window.
struct Answers {
    map: HashMap<RequestKey, Answer>,
    order: VecDeque<(RequestKey, u64)>,
    bytes: usize,
    budget: usize,
}

impl Answers {
    fn get(
        &self,
        from: &NodeId,
        nonce: &[u8; 16],
        request: &[u8; 32],
        now: u64,
    ) -> Option<Vec<u8>> {
        match self.map.get(&(*from, *nonce)) {
            Some((digest, reply, expiry)) if digest == request && *expiry > now => {
                Some(reply.clone())
            }
            _ => None,
        }
    }

    fn put(&mut self, key: RequestKey, request: [u8; 32], reply: Vec<u8>, expiry: u64, now: u64) {
        while let Some(&(key, at)) = self.order.front() {
            if at > now && self.bytes + reply.len() <= self.budget {
                break;
            }
            self.order.pop_front();
            if let Some((_, r, _)) = self.map.remove(&key) {
                self.bytes -= r.len();
            }
        }
        if reply.len() > self.budget {
            return;
        }
        self.bytes += reply.len();
        if let Some((_, old, _)) = self.map.insert(key, (request, reply, expiry)) {
            self.bytes -= old.len();
        }
        self.order.push_back((key, expiry));
    }
}

/// An audit waiting for its storer's answer.
#[derive(Clone, Debug)]
struct PendingAudit {
    owner: NodeId,
    pack: PackId,
    storer: NodeId,
    root: [u8; 32],
    size: u64,
    offset: u64,
    len: u64,
    deadline_ms: u64,
    /// The owner's request, when an owner asked (scheduled audits answer
    /// nobody).
    reply_to: Option<[u8; 16]>,
}

/// What issuing an audit did.
enum Issued {
    /// The challenge to send to the storer.
    Sent(Outgoing),
    /// Settled at once (the storer is offline).
    Done(AuditOutcome),
    /// No such replica.
    Unknown,
    /// Too many audits outstanding.
    Busy,
}

/// What one audit tick did.
#[derive(Clone, Debug, Default)]
pub struct AuditTick {
    /// Challenges to send and answers to owners.
    pub outgoing: Vec<Outgoing>,
    /// Audits started by the schedule.
    pub scheduled: usize,
    /// Audits that lapsed without an answer.
    pub lapsed: usize,
}

/// When each storer is next audited, and the clock at the last tick (to
/// notice a clock that stepped back).
#[derive(Default)]
struct NextAudits {
    at: HashMap<NodeId, u64>,
    last_tick_ms: Option<u64>,
}

/// The coordinator.
pub struct Coordinator {
    identity: SigningKey,
    exchange: StaticSecret,
    books: Arc<dyn BooksStore>,
    config: CoordinatorConfig,
    guard: Mutex<ReplayGuard>,
    challenges: Mutex<HashMap<[u8; 32], (NodeId, u64)>>,
    answers: Mutex<Answers>,
    relay_buckets: Mutex<Buckets>,
    audits: Mutex<HashMap<[u8; 32], PendingAudit>>,
    audit_buckets: Mutex<Buckets>,
    next_audit: Mutex<NextAudits>,
    /// Standing is read, changed and written back under this lock.
    standing: tokio::sync::Mutex<()>,
}

/// A token bucket per node for relayed bytes.
#[derive(Default)]
struct Buckets {
    map: HashMap<NodeId, (f64, u64)>,
}

impl Buckets {
    /// Takes `n` bytes from `node`'s bucket (refilled at `rate` per second
    /// up to `burst`); false when there are not enough.
    fn take(&mut self, node: &NodeId, n: u64, rate: u64, burst: u64, now_ms: u64) -> bool {
        if self.map.len() > 100_000 {
            // Full buckets idle for a minute are the same as new ones.
            self.map
                .retain(|_, (_, at)| now_ms.saturating_sub(*at) < 60_000);
        }
        let (tokens, at) = self.map.entry(*node).or_insert((burst as f64, now_ms));
        let elapsed = now_ms.saturating_sub(*at) as f64 / 1000.0;
        *tokens = (*tokens + elapsed * rate as f64).min(burst as f64);
        // A clock that stepped back resumes refilling from its new time
        // rather than waiting to catch up with the old one.
        *at = now_ms;
        if *tokens >= n as f64 {
            *tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Coordinator({})", self.id().short())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a message handler answers: a message, and whether it is private.
struct Reply {
    msg: Message,
    private: bool,
}

fn public(msg: Message) -> Reply {
    Reply {
        msg,
        private: false,
    }
}

fn private(msg: Message) -> Reply {
    Reply { msg, private: true }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
    public(Message::Error {
        code,
        message: message.into(),
    })
}

impl Coordinator {
    /// A coordinator with this identity (kept in its own key file, not in
    /// the books) and exchange secret.
    pub fn new(
        identity: SigningKey,
        exchange: StaticSecret,
        books: Arc<dyn BooksStore>,
        config: CoordinatorConfig,
    ) -> Self {
        Self {
            identity,
            exchange,
            books,
            guard: Mutex::new(ReplayGuard::new(config.window_ms, config.replay_capacity)),
            challenges: Mutex::new(HashMap::new()),
            answers: Mutex::new(Answers {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                budget: config.answer_cache_bytes,
            }),
            relay_buckets: Mutex::new(Buckets::default()),
            audits: Mutex::new(HashMap::new()),
            audit_buckets: Mutex::new(Buckets::default()),
            next_audit: Mutex::new(NextAudits::default()),
            standing: tokio::sync::Mutex::new(()),
            config,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Releases lapsed reservations, marks nodes that fell silent (no
    /// heartbeat for three intervals) offline, and forgets old presence
    /// changes. Run every `sweep_ms`.
    pub async fn sweep(&self, now_ms: u64) -> Result<Sweep, StoreError> {
        let released = self.books.release_expired(now_ms).await?;
        let silent = self
            .books
            .mark_silent_offline(
                now_ms.saturating_sub(self.config.heartbeat_ms.saturating_mul(3)),
                now_ms,
            )
            .await?;
        let pruned = self
            .books
            .prune_presence(now_ms.saturating_sub(self.config.presence_keep_ms))
            .await?;
        Ok(Sweep {
            released,
            silent,
            pruned,
        })
    }

    /// The coordinator's identity, which nodes pin.
    pub fn id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    /// The coordinator's X25519 public key.
    pub fn exchange_key(&self) -> [u8; 32] {
        exchange_public(&self.exchange)
    }

    /// Handles one envelope that arrived on `claimed`'s topic (the channel's
    /// unauthenticated idea of the sender) at `now_ms`.
    pub async fn handle(
        &self,
        claimed: Option<NodeId>,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let env = Envelope::verify(bytes)?;
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
        // The same request again (its answer was lost): the same answer.
        let digest = *blake3::hash(bytes).as_bytes();
        if let Some(reply) = lock(&self.answers).get(&env.from, &env.nonce, &digest, now_ms) {
            return Ok(Some(Outgoing {
                to: env.from,
                bytes: reply,
            }));
        }
        lock(&self.guard)
            .check(&env, now_ms)
            .map_err(|r| Rejected::NotFresh(env.from, r))?;
        let msg = if env.is_private() {
            env.open_private(&self.exchange).map_err(|e| e.to_string())
        } else {
            env.message().map_err(|e| e.to_string())
        };
        let msg = match msg {
            Ok(Message::Relay { to, payload }) => {
                return self.relay(&env.from, &to, payload, now_ms, rng).await;
            }
            // Answered later, when the storer has (or time is up).
            Ok(Message::Audit { pack, storer }) => {
                return self
                    .audit_request(&env.from, env.nonce, pack, storer, now_ms, rng)
                    .await;
            }
            // Answered to the owner who asked, if any; the storer gets nothing.
            Ok(Message::Proof { challenge, answer }) => {
                return self.proof(&env.from, &challenge, answer, now_ms, rng).await;
            }
            m => m,
        };
        let reply = match msg {
            Ok(m) => self.dispatch(&env.from, m, now_ms, rng).await?,
            Err(e) => error(ErrorCode::Malformed, e),
        };
        let Some(out) = self
            .envelope_to(&env.from, Some(env.nonce), &reply, now_ms, rng)
            .await?
        else {
            return Ok(None);
        };
        let reply = out.bytes;
        lock(&self.answers).put(
            (env.from, env.nonce),
            digest,
            reply.clone(),
            now_ms.saturating_add(self.config.window_ms),
            now_ms,
        );
        Ok(Some(Outgoing {
            to: env.from,
            bytes: reply,
        }))
    }

    /// A signed envelope from the coordinator to `to` (sealed to it when
    /// private; None when a private one goes to a node the books do not
    /// know).
    async fn envelope_to(
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

    /// An owner asks for an audit of one of its replicas.
    async fn audit_request(
        &self,
        owner: &NodeId,
        nonce: [u8; 16],
        pack: PackId,
        storer: NodeId,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let answer = if self.books.node(owner).await?.is_none() {
            error(ErrorCode::Unauthenticated, "authenticate first")
        } else if !lock(&self.audit_buckets).take(
            owner,
            1,
            self.config.owner_audits_per_s,
            self.config.owner_audit_burst,
            now_ms,
        ) {
            error(ErrorCode::Busy, "too many audits asked for; slow down")
        } else {
            match self
                .issue(owner, pack, storer, Some(nonce), now_ms, rng)
                .await?
            {
                Issued::Sent(out) => return Ok(Some(out)),
                Issued::Done(outcome) => public(Message::Audited { outcome }),
                Issued::Unknown => error(
                    ErrorCode::NotFound,
                    "no replica of yours of that pack is recorded at that storer",
                ),
                Issued::Busy => error(ErrorCode::Busy, "too many audits outstanding"),
            }
        };
        self.envelope_to(owner, Some(nonce), &answer, now_ms, rng)
            .await
    }

    /// Challenges `storer` on a random range of `owner`'s replica of `pack`.
    async fn issue(
        &self,
        owner: &NodeId,
        pack: PackId,
        storer: NodeId,
        reply_to: Option<[u8; 16]>,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Issued, Rejected> {
        let Some(replica) = self.books.replica(owner, &pack, &storer).await? else {
            return Ok(Issued::Unknown);
        };
        if replica.size == 0 {
            return Ok(Issued::Unknown);
        }
        // Proven lost already: counted once, not again until its owner
        // has placed it elsewhere.
        if self.books.is_lost(owner, &pack, &storer).await? {
            return Ok(Issued::Done(AuditOutcome::Failed));
        }
        let node = match self.books.node(&storer).await? {
            Some(n) if n.online => n,
            _ => return Ok(Issued::Done(AuditOutcome::Offline)),
        };
        let (offset, len) = proof::pick_range(replica.size, self.config.audit_bytes, rng);
        let mut challenge = [0u8; 32];
        rng.fill_bytes(&mut challenge);
        let deadline_ms = now_ms.saturating_add(self.config.proof_deadline_ms);
        {
            let mut audits = lock(&self.audits);
            if audits.len() >= self.config.max_audits {
                return Ok(Issued::Busy);
            }
            audits.insert(
                challenge,
                PendingAudit {
                    owner: *owner,
                    pack,
                    storer,
                    root: replica.root,
                    size: replica.size,
                    offset,
                    len,
                    deadline_ms,
                    reply_to,
                },
            );
        }
        let prove = private(Message::Prove {
            challenge,
            owner: *owner,
            pack,
            root: replica.root,
            size: replica.size,
            offset,
            len,
            deadline_ms,
        });
        let out = self
            .envelope_to(&node.id, None, &prove, now_ms, rng)
            .await?;
        match out {
            Some(out) => Ok(Issued::Sent(out)),
            None => {
                lock(&self.audits).remove(&challenge);
                Ok(Issued::Done(AuditOutcome::Offline))
            }
        }
    }

    /// A storer's answer to a challenge: checked against the root recorded
    /// under both ends' signatures, and only from the storer challenged.
    async fn proof(
        &self,
        storer: &NodeId,
        challenge: &[u8; 32],
        answer: ProofAnswer,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let pending = {
            let mut audits = lock(&self.audits);
            match audits.get(challenge) {
                Some(p) if p.storer == *storer => audits.remove(challenge),
                _ => None,
            }
        };
        let Some(p) = pending else {
            tracing::debug!(
                "an answer from {} to no challenge of theirs",
                storer.short()
            );
            return Ok(None);
        };
        let outcome = if now_ms > p.deadline_ms {
            AuditOutcome::TimedOut
        } else {
            match answer {
                ProofAnswer::Held(bytes) => {
                    match proof::verify(&p.root, p.size, p.offset, p.len, &bytes) {
                        Ok(_) => AuditOutcome::Proven,
                        Err(e) => {
                            tracing::warn!(
                                "storer {} failed an audit of {}'s pack {}: {e}",
                                storer.short(),
                                p.owner.short(),
                                p.pack.short()
                            );
                            AuditOutcome::Failed
                        }
                    }
                }
                ProofAnswer::NotHeld => AuditOutcome::Failed,
                ProofAnswer::Deleted { at_ms, signature } => {
                    let asked = delete_message(storer, &p.root, at_ms);
                    if pluto_protocol::verify(&p.owner, &asked, &signature) {
                        AuditOutcome::Released
                    } else {
                        AuditOutcome::Failed
                    }
                }
            }
        };
        self.conclude(&p, outcome, now_ms, rng).await
    }

    /// Books an audit's outcome and tells the owner who asked.
    async fn conclude(
        &self,
        p: &PendingAudit,
        outcome: AuditOutcome,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        match outcome {
            AuditOutcome::Released => {
                self.books
                    .drop_replica(&p.owner, &p.pack, &p.storer)
                    .await?;
            }
            AuditOutcome::Failed => {
                self.books
                    .mark_lost(&p.owner, &p.pack, &p.storer, now_ms)
                    .await?;
            }
            _ => {}
        }
        {
            let _held = self.standing.lock().await;
            if let Some(mut node) = self.books.node(&p.storer).await? {
                if audit::on_audit(&mut node.standing, outcome, &self.config, now_ms) {
                    tracing::warn!(
                        "node {} excluded: audit score {:.3} after {} passed, {} failed",
                        p.storer.short(),
                        node.standing.audit.score(),
                        node.standing.passed,
                        node.standing.failed
                    );
                }
                node.standing.held_back = audit::held_back(&node.standing, &self.config, now_ms);
                self.books.set_standing(&p.storer, &node.standing).await?;
            }
        }
        match p.reply_to {
            Some(nonce) => {
                self.envelope_to(
                    &p.owner,
                    Some(nonce),
                    &public(Message::Audited { outcome }),
                    now_ms,
                    rng,
                )
                .await
            }
            None => Ok(None),
        }
    }

    /// Audits that are due by the schedule, and those whose deadline
    /// passed without an answer. Run every `audit_tick_ms`.
    ///
    /// Each storer is audited at a rate proportional to the replicas it
    /// holds (each replica about once per `audit_every_ms`), and at least
    /// once per `storer_audit_every_ms`, so a storer with little is watched
    /// as well as one with much. Offline storers are skipped: their absence
    /// is for the uptime track.
    pub async fn audit_tick(
        &self,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<AuditTick, Rejected> {
        let mut tick = AuditTick::default();
        let lapsed: Vec<PendingAudit> = {
            let mut audits = lock(&self.audits);
            // Deadlines were set on the clock of the time; one that stepped
            // back since must not keep audits pending for the whole step.
            let latest = now_ms.saturating_add(self.config.proof_deadline_ms);
            for p in audits.values_mut() {
                p.deadline_ms = p.deadline_ms.min(latest);
            }
            let keys: Vec<[u8; 32]> = audits
                .iter()
                .filter(|(_, p)| p.deadline_ms < now_ms)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| audits.remove(k)).collect()
        };
        tick.lapsed = lapsed.len();
        for p in &lapsed {
            tracing::info!(
                "storer {} did not answer an audit in time",
                p.storer.short()
            );
            if let Some(out) = self
                .conclude(p, AuditOutcome::TimedOut, now_ms, rng)
                .await?
            {
                tick.outgoing.push(out);
            }
        }
        let storers = self.books.storers().await?;
        let mut due = Vec::new();
        {
            let mut next = lock(&self.next_audit);
            // The clock stepped back: the schedule steps back with it, so
            // audits carry on at their cadence instead of waiting for the
            // clock to catch up.
            if let Some(step) = next.last_tick_ms.and_then(|t| t.checked_sub(now_ms)) {
                for at in next.at.values_mut() {
                    *at = at.saturating_sub(step);
                }
            }
            next.last_tick_ms = Some(now_ms);
            let live: std::collections::HashSet<NodeId> = storers.iter().map(|s| s.0).collect();
            next.at.retain(|id, _| live.contains(id));
            let (tick_ms, most) = (
                self.config.audit_tick_ms,
                self.config.storer_audit_every_ms.max(1),
            );
            for (storer, count) in &storers {
                // Each replica about once per audit_every_ms, no more often
                // than the tick and no less than storer_audit_every_ms
                // (which wins should the settings contradict each other).
                let every = (self.config.audit_every_ms / (*count).max(1))
                    .max(tick_ms)
                    .min(most)
                    .max(1);
                let at = *next
                    .at
                    .entry(*storer)
                    .or_insert_with(|| now_ms.saturating_add(rng.next_u64() % every));
                if at <= now_ms {
                    // Keep the cadence between ticks; after a long pause
                    // (the coordinator was down) start afresh.
                    let then = at.saturating_add(every);
                    let then = if then > now_ms {
                        then
                    } else {
                        now_ms.saturating_add(every)
                    };
                    next.at.insert(*storer, then);
                    due.push(*storer);
                }
            }
        }
        for storer in due {
            let held = self.books.replicas_held_by(&storer).await?;
            // A few tries: a replica already proven lost is skipped.
            for r in held.choose_multiple(&mut RngAdapter(rng), 4) {
                match self
                    .issue(&r.owner, r.pack, storer, None, now_ms, rng)
                    .await?
                {
                    Issued::Sent(out) => {
                        tick.outgoing.push(out);
                        tick.scheduled += 1;
                        break;
                    }
                    Issued::Done(AuditOutcome::Failed) => continue,
                    _ => break,
                }
            }
        }
        Ok(tick)
    }

    /// Works out every node's uptime track from its presence log and
    /// whether it is held back. Run every `standing_every_ms`.
    pub async fn refresh_standing(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut changed = 0;
        for n in self.books.nodes().await? {
            let from = now_ms
                .saturating_sub(self.config.uptime_window_ms)
                .max(n.registered_ms);
            // Registered "after" now: the clock stepped back. No time of the
            // node's life has passed on this clock, so its uptime stays.
            let uptime = if from < now_ms {
                let log = self.books.presence_log(&n.id, from).await?;
                Some(audit::uptime_track(&log, from, now_ms, &self.config))
            } else {
                None
            };
            let _held = self.standing.lock().await;
            let Some(mut node) = self.books.node(&n.id).await? else {
                continue;
            };
            // Written when it moved enough to show (a thousandth), not at
            // every refresh of every node.
            let before = node.standing.held_back;
            let mut moved = false;
            if let Some(uptime) = uptime {
                if (uptime.score() - node.standing.uptime.score()).abs() >= 1e-3 {
                    node.standing.uptime = uptime;
                    moved = true;
                }
            }
            node.standing.held_back = audit::held_back(&node.standing, &self.config, now_ms);
            if moved || node.standing.held_back != before {
                self.books.set_standing(&n.id, &node.standing).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The replicas of `owner` to place elsewhere: lost ones, and those on
    /// storers excluded or offline past the grace period.
    async fn repairs(&self, owner: &NodeId, now_ms: u64) -> Result<Vec<RepairItem>, Rejected> {
        let mut out: Vec<RepairItem> = self
            .books
            .lost_replicas(owner)
            .await?
            .into_iter()
            .map(|(pack, storer)| RepairItem {
                pack,
                storer,
                reason: RepairReason::Lost,
            })
            .collect();
        let lost: std::collections::HashSet<(PackId, NodeId)> =
            out.iter().map(|i| (i.pack, i.storer)).collect();
        let mut verdicts: HashMap<NodeId, Option<RepairReason>> = HashMap::new();
        for r in self.books.replicas_of(owner).await? {
            if out.len() >= MAX_REPAIRS {
                break;
            }
            if lost.contains(&(r.pack, r.storer)) {
                continue;
            }
            let verdict = match verdicts.get(&r.storer) {
                Some(v) => *v,
                None => {
                    let v = match self.books.node(&r.storer).await? {
                        None => Some(RepairReason::Offline),
                        Some(n) if n.standing.excluded_ms != 0 => Some(RepairReason::Excluded),
                        Some(n)
                            if !n.online
                                && now_ms.saturating_sub(n.last_seen_ms)
                                    > self.config.offline_grace_ms =>
                        {
                            Some(RepairReason::Offline)
                        }
                        Some(_) => None,
                    };
                    verdicts.insert(r.storer, v);
                    v
                }
            };
            if let Some(reason) = verdict {
                out.push(RepairItem {
                    pack: r.pack,
                    storer: r.storer,
                    reason,
                });
            }
        }
        out.truncate(MAX_REPAIRS);
        Ok(out)
    }

    /// Passes a relay payload on, signed by the coordinator so that other
    /// broker clients cannot pass for it. Dropped (with no answer: the relay
    /// transport re-sends) when the sender is over its rate or either end is
    /// not registered.
    async fn relay(
        &self,
        from: &NodeId,
        to: &NodeId,
        payload: Vec<u8>,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let allowed = lock(&self.relay_buckets).take(
            from,
            payload.len() as u64,
            self.config.relay_bytes_per_s,
            self.config.relay_burst_bytes,
            now_ms,
        );
        if !allowed {
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

    /// Takes what a storer reports it holds: each entry must come with a
    /// ticket this coordinator signed for this storer and that pack, and be
    /// no bigger than the ticket allows.
    async fn take_held(
        &self,
        storer: &NodeId,
        held: &[pluto_protocol::HeldReport],
        now_ms: u64,
    ) -> Result<u32, Rejected> {
        let mut taken = 0;
        for h in held {
            let Ok(t) = Ticket::verify(&h.ticket, &self.id()) else {
                continue;
            };
            if t.storer != *storer || t.pack != h.pack || h.size > t.size || t.owner == *storer {
                continue;
            }
            // The root the owner signed when it sent the bytes, not one the
            // storer names now.
            let statement = ReplicaStatement {
                owner: t.owner,
                storer: *storer,
                pack: h.pack,
                size: h.size,
                root: h.root,
            };
            if !statement.signed_by(&t.owner, &h.attest) {
                continue;
            }
            let replica = ReplicaRecord {
                owner: t.owner,
                pack: h.pack,
                storer: *storer,
                size: h.size,
                root: h.root,
            };
            self.books.restore_replica(&replica, now_ms).await?;
            taken += 1;
        }
        Ok(taken)
    }

    async fn dispatch(
        &self,
        from: &NodeId,
        msg: Message,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Reply, Rejected> {
        // Before authentication: the handshake.
        match msg {
            Message::Hello => {
                let mut challenge = [0u8; 32];
                rng.fill_bytes(&mut challenge);
                let mut pending = lock(&self.challenges);
                pending.retain(|_, (_, expiry)| *expiry > now_ms);
                if pending.len() >= self.config.max_challenges {
                    return Ok(error(ErrorCode::Busy, "too many handshakes at once"));
                }
                let expiry = now_ms.saturating_add(self.config.challenge_ttl_ms);
                pending.insert(challenge, (*from, expiry));
                return Ok(public(Message::Challenge { challenge }));
            }
            Message::Auth {
                challenge,
                exchange_key,
                offer,
            } => {
                let issued = lock(&self.challenges).remove(&challenge);
                return Ok(match issued {
                    Some((node, expiry)) if node == *from && expiry > now_ms => {
                        // Registered, not yet online: a node is online once
                        // it heartbeats (its daemon does at once), so a
                        // command that connects for a moment is never
                        // matched as a storer.
                        self.books
                            .register(from, &exchange_key, offer, now_ms)
                            .await?;
                        tracing::info!("node {} authenticated", from.short());
                        public(Message::Welcome {
                            exchange_key: self.exchange_key(),
                            heartbeat_ms: self.config.heartbeat_ms,
                        })
                    }
                    _ => error(ErrorCode::Unauthenticated, "unknown or expired challenge"),
                });
            }
            _ => {}
        }
        // Everything else: only from registered nodes.
        let Some(node) = self.books.node(from).await? else {
            return Ok(error(ErrorCode::Unauthenticated, "authenticate first"));
        };
        Ok(match msg {
            Message::Heartbeat => {
                self.books.presence(from, true, now_ms).await?;
                public(Message::Ok)
            }
            Message::SetOffer { bytes } => {
                if self.books.set_offer(from, bytes).await? {
                    public(Message::Ok)
                } else {
                    error(
                        ErrorCode::Refused,
                        format!(
                            "cannot offer less than is in use ({} held, {} placed)",
                            node.held, node.placed
                        ),
                    )
                }
            }
            Message::MatchRequest {
                pack,
                size,
                copies,
                friends,
                friend_copies,
                exclude,
            } => {
                if copies == 0 || copies > self.config.max_copies || size == 0 {
                    error(
                        ErrorCode::Refused,
                        format!(
                            "copies must be 1..={}, size above 0",
                            self.config.max_copies
                        ),
                    )
                } else {
                    let want = Want {
                        size,
                        copies,
                        friends: &friends,
                        friend_copies,
                        exclude: &exclude,
                    };
                    let storers = self.match_storers(&node, &want, now_ms, rng).await?;
                    if storers.is_empty() {
                        error(
                            ErrorCode::NoCapacity,
                            "no storer has room (or your offer is used up)",
                        )
                    } else {
                        let expires_ms = now_ms.saturating_add(self.config.reservation_ttl_ms);
                        let tickets = storers
                            .iter()
                            .map(|storer| {
                                Ticket {
                                    owner: *from,
                                    storer: *storer,
                                    size,
                                    expires_ms,
                                    pack,
                                }
                                .sign(&self.identity)
                            })
                            .collect();
                        private(Message::MatchReply { storers, tickets })
                    }
                }
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
                let statement = ReplicaStatement {
                    owner: *from,
                    storer,
                    pack,
                    size,
                    root,
                };
                if !statement.signed_by(&storer, &receipt) {
                    return Ok(error(
                        ErrorCode::Refused,
                        "the storer's receipt does not name this replica",
                    ));
                }
                match self.books.record_replica(&replica).await? {
                    Recorded::New | Recorded::Again => {
                        self.measured(&storer, size, micros, now_ms).await?;
                        public(Message::Ok)
                    }
                    Recorded::NoReservation => error(
                        ErrorCode::Refused,
                        "no reservation of yours on that storer covers this replica (ask for a match first)",
                    ),
                    Recorded::Conflict => error(
                        ErrorCode::Refused,
                        "another replica of this pack is recorded at that storer",
                    ),
                }
            }
            Message::PutManifest { version, blob } => {
                if self.books.put_manifest(from, version, &blob).await? {
                    public(Message::Ok)
                } else {
                    error(
                        ErrorCode::StaleVersion,
                        "a manifest of this version or newer is kept",
                    )
                }
            }
            Message::GetManifest => match self.books.manifest(from).await? {
                Some(m) => private(Message::Manifest {
                    version: m.version,
                    blob: m.blob,
                }),
                None => error(ErrorCode::NotFound, "no manifest kept"),
            },
            Message::GetStatus => {
                let mut peers: Vec<NodeId> = (self.books.replicas_of(from).await?.iter())
                    .map(|r| r.storer)
                    .chain(
                        self.books
                            .replicas_held_by(from)
                            .await?
                            .iter()
                            .map(|r| r.owner),
                    )
                    .collect();
                peers.sort_unstable();
                peers.dedup();
                private(Message::Status(StatusReport {
                    offered: node.offer,
                    held: node.held,
                    placed: node.placed,
                    peers: peers.len() as u32,
                }))
            }
            Message::ListPeers => private(Message::Peers(self.peers_of(from, now_ms).await?)),
            Message::Announce { addresses } => {
                if addresses.len() > MAX_ADDRESSES
                    || addresses
                        .iter()
                        .any(|a| a.is_empty() || a.contains(['\n', '\0']))
                {
                    error(
                        ErrorCode::Malformed,
                        "addresses must be non-empty single lines",
                    )
                } else {
                    self.books.set_addresses(from, &addresses).await?;
                    public(Message::Ok)
                }
            }
            Message::Locate { nodes } => {
                let found = self.books.addresses(&nodes).await?;
                private(Message::Located(
                    found
                        .into_iter()
                        .map(|(id, online, addresses)| NodeAddresses {
                            id,
                            online,
                            addresses,
                        })
                        .collect(),
                ))
            }
            Message::ReportHeld(held) => public(Message::HeldTaken {
                taken: self.take_held(from, &held, now_ms).await?,
            }),
            Message::GetRepairs => private(Message::Repairs(self.repairs(from, now_ms).await?)),
            Message::DropReplica { pack, storer } => {
                self.books.drop_replica(from, &pack, &storer).await?;
                public(Message::Ok)
            }
            other => error(
                ErrorCode::Malformed,
                format!("a node does not send message kind {}", other.kind()),
            ),
        })
    }

    /// Takes an owner's measure of a transfer to `storer` (big enough to
    /// say something about speed, not only about latency).
    async fn measured(
        &self,
        storer: &NodeId,
        size: u64,
        micros: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if micros == 0 || size < (256 << 10) {
            return Ok(());
        }
        let bps =
            (u128::from(size) * 1_000_000 / u128::from(micros)).min(u128::from(u64::MAX)) as u64;
        let _held = self.standing.lock().await;
        if let Some(mut node) = self.books.node(storer).await? {
            audit::on_speed(
                &mut node.standing,
                bps,
                self.config.speed_half_life_ms,
                now_ms,
            );
            node.standing.held_back = audit::held_back(&node.standing, &self.config, now_ms);
            self.books.set_standing(storer, &node.standing).await?;
        }
        Ok(())
    }

    /// The nodes that store for `me` or that `me` stores for, the biggest
    /// exchanges first (at most as many as one message holds).
    async fn peers_of(&self, me: &NodeId, now_ms: u64) -> Result<Vec<PeerReport>, Rejected> {
        let mut by_peer: BTreeMap<NodeId, (u32, u64, u32, u64)> = BTreeMap::new();
        for r in self.books.replicas_of(me).await? {
            let e = by_peer.entry(r.storer).or_default();
            e.0 += 1;
            e.1 = e.1.saturating_add(r.size);
        }
        for r in self.books.replicas_held_by(me).await? {
            let e = by_peer.entry(r.owner).or_default();
            e.2 += 1;
            e.3 = e.3.saturating_add(r.size);
        }
        let mut peers: Vec<_> = by_peer.into_iter().collect();
        peers.sort_by_key(|(id, t)| (std::cmp::Reverse(t.1.saturating_add(t.3)), *id));
        peers.truncate(1024);
        let mut out = Vec::with_capacity(peers.len());
        for (id, (replicas_held, bytes_held, replicas_stored, bytes_stored)) in peers {
            let node = self.books.node(&id).await?;
            // The window, or the node's life when it is younger.
            let from = now_ms
                .saturating_sub(self.config.uptime_window_ms)
                .max(node.as_ref().map_or(0, |n| n.registered_ms));
            let log = self.books.presence_log(&id, from).await?;
            let st = node
                .as_ref()
                .map(|n| n.standing.clone())
                .unwrap_or_default();
            out.push(PeerReport {
                id,
                online: node.as_ref().is_some_and(|n| n.online),
                last_seen_ms: node.as_ref().map_or(0, |n| n.last_seen_ms),
                uptime_permille: (online_fraction(&log, from, now_ms) * 1000.0).round() as u16,
                replicas_held,
                bytes_held,
                replicas_stored,
                bytes_stored,
                audit_permille: audit::permille(&st.audit),
                timeout_permille: audit::permille(&st.timeout),
                uptime_score_permille: audit::permille(&st.uptime),
                speed_bps: audit::decayed_speed(&st, self.config.speed_half_life_ms, now_ms),
                audits_passed: st.passed,
                audits_failed: st.failed,
                audits_timed_out: st.timed_out,
                excluded: st.excluded_ms != 0,
                held_back: st.held_back,
            });
        }
        Ok(out)
    }

    /// Picks up to `copies` distinct storers with room, never the asker,
    /// friends first for `friend_copies`, then others: online ones first,
    /// those online more often before the rest, random within each group
    /// (so load spreads), offline ones last. Each pick reserves its space
    /// atomically until `reservation_ttl_ms` from now; a candidate that
    /// filled up meanwhile is skipped.
    async fn match_storers(
        &self,
        owner: &NodeRecord,
        want: &Want<'_>,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Vec<NodeId>, Rejected> {
        let size = want.size;
        let usable = |n: &NodeRecord| {
            n.id != owner.id
                && !want.exclude.contains(&n.id)
                && n.free() >= size
                && n.standing.eligible()
                && audit::vetted_room(&n.standing, n.held, size, &self.config)
        };
        // A bounded sample of nodes with room, so a match costs the same
        // with ten nodes or ten thousand.
        let sample = 32 + 4 * want.copies as usize + want.exclude.len();
        let mut others: Vec<NodeRecord> = self
            .books
            .candidates(size, sample)
            .await?
            .into_iter()
            .filter(|n| usable(n) && !want.friends.contains(&n.id))
            .collect();
        let rank = |n: &NodeRecord| (!n.online, 4 - (n.lifetime_uptime(now_ms) * 4.0) as u8);
        others.shuffle(&mut RngAdapter(rng));
        others.sort_by_key(rank);
        let mut friendly = Vec::new();
        for f in want.friends.iter().take(64) {
            if let Some(n) = self.books.node(f).await? {
                if usable(&n) && !friendly.iter().any(|x: &NodeRecord| x.id == n.id) {
                    friendly.push(n);
                }
            }
        }
        friendly.shuffle(&mut RngAdapter(rng));
        friendly.sort_by_key(rank);
        let expires = now_ms.saturating_add(self.config.reservation_ttl_ms);
        let want_friends = want.friend_copies.min(want.copies) as usize;
        let mut picked = Vec::new();
        for n in &friendly {
            if picked.len() >= want_friends {
                break;
            }
            if self.books.reserve(&owner.id, &n.id, size, expires).await? {
                picked.push(n.id);
            }
        }
        // The rest from anyone (friends who are left too, if others lack room).
        for n in others.iter().chain(friendly.iter()) {
            if picked.len() >= want.copies as usize {
                break;
            }
            if !picked.contains(&n.id)
                && self.books.reserve(&owner.id, &n.id, size, expires).await?
            {
                picked.push(n.id);
            }
        }
        Ok(picked)
    }
}

/// What a match asks for.
struct Want<'a> {
    size: u64,
    copies: u8,
    friends: &'a [NodeId],
    friend_copies: u8,
    exclude: &'a [NodeId],
}

/// rand's `SliceRandom` wants a `rand::RngCore`; ours is rand_core's (the
/// same trait, re-exported), reached through a mutable reference.
struct RngAdapter<'a, R: ?Sized>(&'a mut R);

impl<R: CryptoRngCore + ?Sized> rand::RngCore for RngAdapter<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.try_fill_bytes(dest)
    }
}
