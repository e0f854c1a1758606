//! Audits: challenges to storers, their answers, and what they do to a
//! storer's standing. The thin async driver over three pure parts:
//! [`rules`] (outcomes and reputation), [`schedule`] (who is due) and
//! [`pending`] (challenges awaiting an answer).
//!
//! ```text
//! owner --Audit{pack, storer}--> (owner's rate)   --+
//! audit_tick: schedule.due(storers, now, rng) ------+--> issue: replica in the books? lost already?
//!                                                   |    storer online? --> Prove (sealed) --> storer
//!                                                   |    pending.insert(challenge)
//! storer --Proof{challenge, answer}--> pending.answered --> rules::judge --+
//! audit_tick: pending.lapsed(now) ------------------------> TimedOut -----+--> conclude:
//!     books (lost, released), standing (rules::on_audit), Audited --> owner who asked
//! ```

pub(crate) mod pending;
pub(crate) mod rules;
pub(crate) mod schedule;

use std::collections::HashSet;

use pluto_plugins_api::{NodeId, PackId, StoreError};
use pluto_protocol::{proof, AuditOutcome, ErrorCode, Message, ProofAnswer};
use rand::seq::SliceRandom;
use rand_core::CryptoRngCore;

use self::pending::{PendingAudit, PendingAudits, Quotas};
use self::schedule::{AuditSchedule, StorerLoad};
use crate::coordinator::{error, lock, private, public, RngAdapter};
use crate::limits::TokenBuckets;
use crate::{Coordinator, CoordinatorConfig, Outgoing, Rejected};

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

/// The audits' state in memory (one lock).
#[derive(Debug)]
pub(crate) struct Audits {
    pending: PendingAudits,
    owners: TokenBuckets,
    /// Audits owners ask of one storer, all owners together.
    storers: TokenBuckets,
    schedule: AuditSchedule,
}

impl Audits {
    pub(crate) fn new(c: &CoordinatorConfig) -> Self {
        Self {
            pending: PendingAudits::new(Quotas {
                capacity: c.max_audits,
                per_owner: c.audits_per_owner,
                per_storer: c.audits_per_storer,
            }),
            owners: TokenBuckets::new(c.owner_audits_per_s, c.owner_audit_burst),
            storers: TokenBuckets::new(c.storer_audits_per_s, c.storer_audit_burst),
            schedule: AuditSchedule::new(c),
        }
    }
}

/// What issuing an audit did.
enum Issued {
    /// The challenge to send to the storer.
    Sent(Outgoing),
    /// Settled at once (the storer is offline, or the replica lost already).
    Done(AuditOutcome),
    /// No such replica.
    Unknown,
    /// Too many audits outstanding.
    Busy,
}

impl Coordinator {
    /// `Audit`: an owner asks for an audit of one of its replicas; answered
    /// when the storer has (or time is up), or at once when it cannot be.
    pub(crate) async fn audit_request(
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
        } else if !lock(&self.audits).owners.take(owner, 1, now_ms) {
            error(ErrorCode::Busy, "too many audits asked for; slow down")
        } else if !lock(&self.audits).storers.take(&storer, 1, now_ms) {
            error(
                ErrorCode::Busy,
                "that storer is asked for audits enough already; try again later",
            )
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
                Issued::Busy => error(
                    ErrorCode::Busy,
                    "too many audits outstanding (or one of that replica is under way)",
                ),
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
        let Some((replica, marks)) = self.books.replica_marked(owner, &pack, &storer).await? else {
            return Ok(Issued::Unknown);
        };
        if replica.size == 0 {
            return Ok(Issued::Unknown);
        }
        // Proven lost already: counted once, not again until its owner
        // has placed it elsewhere.
        if marks.lost_ms > 0 {
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
        let audit = PendingAudit {
            owner: *owner,
            pack,
            storer,
            root: replica.root,
            size: replica.size,
            offset,
            len,
            deadline_ms,
            reply_to,
            deletes_from_ms: marks.recorded_ms.saturating_sub(self.config.window_ms),
        };
        if !lock(&self.audits).pending.insert(challenge, audit) {
            return Ok(Issued::Busy);
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
        match self
            .envelope_to(&node.id, None, &prove, now_ms, rng)
            .await?
        {
            Some(out) => Ok(Issued::Sent(out)),
            None => {
                lock(&self.audits).pending.remove(&challenge);
                Ok(Issued::Done(AuditOutcome::Offline))
            }
        }
    }

    /// `Proof`: a storer's answer to a challenge; told to the owner who
    /// asked, if any (the storer gets nothing).
    pub(crate) async fn proof(
        &self,
        storer: &NodeId,
        challenge: &[u8; 32],
        answer: ProofAnswer,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<Option<Outgoing>, Rejected> {
        let pending = lock(&self.audits).pending.answered(challenge, storer);
        let Some(p) = pending else {
            tracing::debug!(
                "an answer from {} to no challenge of theirs",
                storer.short()
            );
            return Ok(None);
        };
        let outcome = rules::judge(&p, storer, answer, now_ms);
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
            // Proven held: its bytes count towards what the storer may
            // place itself (the first time).
            AuditOutcome::Proven => {
                self.books
                    .mark_proven(&p.owner, &p.pack, &p.storer, now_ms)
                    .await?;
            }
            _ => {}
        }
        // An audit an owner asked for that went unanswered says little of
        // the storer (owners may ask many at once): only the coordinator's
        // own schedule counts on the timeout track.
        let counts = !(p.reply_to.is_some() && outcome == AuditOutcome::TimedOut);
        if counts {
            let _held = self.standing.lock().await;
            if let Some(mut node) = self.books.node(&p.storer).await? {
                if rules::on_audit(&mut node.standing, outcome, &self.config, now_ms) {
                    tracing::warn!(
                        "node {} excluded: audit score {:.3} after {} passed, {} failed",
                        p.storer.short(),
                        node.standing.audit.score(),
                        node.standing.passed,
                        node.standing.failed
                    );
                }
                node.standing.held_back = rules::held_back(&node.standing, &self.config, now_ms);
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

    /// Audits whose deadline passed without an answer, and those that are
    /// due by the schedule (see [`schedule`]). Run every `audit_tick_ms`.
    pub async fn audit_tick(
        &self,
        now_ms: u64,
        rng: &mut (impl CryptoRngCore + Send),
    ) -> Result<AuditTick, Rejected> {
        let mut tick = AuditTick::default();
        let lapsed = lock(&self.audits)
            .pending
            .lapsed(now_ms, self.config.proof_deadline_ms);
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
        let online: HashSet<NodeId> = (self.books.nodes().await?.into_iter())
            .filter(|n| n.online)
            .map(|n| n.id)
            .collect();
        let storers: Vec<StorerLoad> = (self.books.storers().await?.into_iter())
            .map(|(id, replicas)| StorerLoad {
                id,
                replicas,
                online: online.contains(&id),
            })
            .collect();
        let due = lock(&self.audits).schedule.due(&storers, now_ms, rng);
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
                Some(rules::uptime_track(&log, from, now_ms, &self.config))
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
            node.standing.held_back = rules::held_back(&node.standing, &self.config, now_ms);
            if moved || node.standing.held_back != before {
                self.books.set_standing(&n.id, &node.standing).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Takes an owner's measure of a transfer to `storer` (big enough to
    /// say something about speed, not only about latency).
    pub(crate) async fn measured(
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
            rules::on_speed(
                &mut node.standing,
                bps,
                self.config.speed_half_life_ms,
                now_ms,
            );
            node.standing.held_back = rules::held_back(&node.standing, &self.config, now_ms);
            self.books.set_standing(storer, &node.standing).await?;
        }
        Ok(())
    }
}
