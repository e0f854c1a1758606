//! Audits in process: a coordinator of this process, on SQLite books in a
//! temporary directory, driven through [`Coordinator::handle`] from
//! `--tasks` tasks at once, with no broker. What is left is the
//! coordinator's own work per challenge (two Ed25519 verifications and two
//! signatures, an X25519 seal, the proof check, the books' reads and the
//! standing's write) and the simulated ends' work beside it.
//!
//! ```text
//! task: owner signs Audit --handle--> Prove, sealed to the storer
//!       storer opens it, signs Proof --handle--> Audited, to the owner
//!       owner checks it (signature, answers its nonce, Proven)
//! ```
//!
//! The ends' steps are synchronous CPU work, timed one by one, so the
//! process's CPU time less theirs is the coordinator's (the books' SQLite
//! threads included).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use pluto_coordinator::{Coordinator, CoordinatorConfig};
use pluto_engine::client::now_ms;
use pluto_plugins_api::{BooksStore, NodeId};
use pluto_protocol::{exchange_public, Envelope, Message};
use pluto_store_sqlite::SqliteBooks;
use rand_core::{OsRng, RngCore};
use x25519_dalek::StaticSecret;

use crate::replicas::{self, Blobs, WireSizes};
use crate::{report, Args, CpuWatch};

/// A simulated node: its identity and its key for sealed messages.
struct Node {
    key: SigningKey,
    exchange: StaticSecret,
}

impl Node {
    fn new() -> Self {
        Self {
            key: SigningKey::generate(&mut OsRng),
            exchange: StaticSecret::random_from_rng(OsRng),
        }
    }

    fn id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// `msg` signed to the coordinator `c`, stamped now, sealed to it as
    /// a node seals everything but its Hello; and its nonce.
    fn envelope(&self, c: &Coordinator, msg: &Message) -> Result<(Vec<u8>, [u8; 16])> {
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let env = match msg {
            Message::Hello => Envelope::new(&self.key, c.id(), now_ms(), nonce, None, msg),
            _ => Envelope::new_private(
                &self.key,
                c.id(),
                &c.exchange_key(),
                now_ms(),
                nonce,
                None,
                msg,
                &mut OsRng,
            )
            .map_err(|e| anyhow::anyhow!("sealing: {e}"))?,
        };
        Ok((env.sign(&self.key)?, nonce))
    }

    /// Sends `msg` and returns the coordinator's answer, opened.
    async fn ask(&self, c: &Coordinator, msg: &Message) -> Result<Message> {
        let (bytes, _) = self.envelope(c, msg)?;
        let out = c
            .handle(Some(self.id()), &bytes, now_ms(), &mut OsRng)
            .await?
            .context("no answer")?;
        let env = Envelope::verify(&out.bytes)?;
        Ok(if env.is_private() {
            env.open_private(&self.exchange)?
        } else {
            env.message()?
        })
    }
}

/// What one task saw.
#[derive(Default)]
struct Seen {
    latency: Vec<Duration>,
    outcomes: BTreeMap<String, usize>,
    /// Time inside `handle` for Audit and for Proof envelopes.
    in_audit: Duration,
    in_proof: Duration,
    /// Time in the simulated ends' steps.
    ends: Duration,
    sizes: Option<WireSizes>,
}

pub async fn run(args: &Args) -> Result<()> {
    let (owners_n, storers_n) = args.split()?;
    let n = args.audits_in_process;
    let blobs = Arc::new(Blobs::new(crate::BLOBS, args.replica_size));
    let plan = Arc::new(replicas::plan(owners_n, storers_n, args.replicas, &blobs));

    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("books.db").display());
    let books: Arc<dyn BooksStore> = Arc::new(SqliteBooks::open(&url).await?);
    // Defaults, but for the per-owner audit rate: it is not what is measured.
    let config = CoordinatorConfig {
        owner_audits_per_s: 1 << 30,
        owner_audit_burst: 1 << 30,
        ..CoordinatorConfig::default()
    };
    let c = Arc::new(Coordinator::new(
        SigningKey::generate(&mut OsRng),
        StaticSecret::random_from_rng(OsRng),
        books,
        config,
    ));
    println!(
        "in process: {owners_n} owners, {storers_n} storers, {} replicas of {} bytes, books {}",
        plan.len(),
        args.replica_size,
        dir.path().join("books.db").display()
    );

    // Setup: everyone authenticates, storers heartbeat, owners place.
    let nodes: Arc<Vec<Node>> = Arc::new((0..owners_n + storers_n).map(|_| Node::new()).collect());
    for (i, node) in nodes.iter().enumerate() {
        let Message::Challenge { challenge, .. } = node.ask(&c, &Message::Hello).await? else {
            bail!("no challenge");
        };
        let auth = Message::Auth {
            challenge,
            exchange_key: exchange_public(&node.exchange),
            offer: 1 << 30,
            broker_password: None,
        };
        match node.ask(&c, &auth).await? {
            Message::Welcome { .. } => {}
            other => bail!("not welcome: {other:?}"),
        }
        if i >= owners_n {
            match node.ask(&c, &Message::Heartbeat).await? {
                Message::Ok => {}
                other => bail!("heartbeat: {other:?}"),
            }
        }
    }
    for p in plan.iter() {
        let (owner, storer) = (&nodes[p.owner], &nodes[owners_n + p.storer]);
        match owner.ask(&c, &p.match_request(storer.id())).await? {
            Message::MatchReply { storers, .. } if storers == [storer.id()] => {}
            other => bail!("matched elsewhere: {other:?}"),
        }
        match owner.ask(&c, &p.record(owner.id(), &storer.key)).await? {
            Message::Ok => {}
            other => bail!("recording a replica: {other:?}"),
        }
    }

    // The run.
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = CpuWatch::start(&args.cpu_of);
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.tasks.max(1))
        .map(|_| {
            let (c, nodes, plan, blobs, next) = (
                c.clone(),
                nodes.clone(),
                plan.clone(),
                blobs.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut seen = Seen::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let p = &plan[i % plan.len()];
                    let (owner, storer) = (&nodes[p.owner], &nodes[owners_n + p.storer]);
                    one_audit(&c, owner, storer, p, &blobs, &mut seen).await?;
                }
                anyhow::Ok(seen)
            })
        })
        .collect();
    let mut all = Seen::default();
    for t in tasks {
        let seen = t.await??;
        all.latency.extend(seen.latency);
        for (k, v) in seen.outcomes {
            *all.outcomes.entry(k).or_default() += v;
        }
        all.in_audit += seen.in_audit;
        all.in_proof += seen.in_proof;
        all.ends += seen.ends;
        all.sizes = all.sizes.or(seen.sizes);
    }
    let wall = start.elapsed();
    let cpu = cpu.stop(wall, n);
    let ends_cpu = all.ends;
    let unanswered = n - all.latency.len();
    report(
        &format!("audits in process, {} tasks", args.tasks.max(1)),
        all.latency,
        unanswered,
        wall,
    );
    println!("  outcomes: {}", crate::outcome_line(&all.outcomes));
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    println!(
        "  inside Coordinator::handle per audit (wall, waits included): Audit {:.0} µs, Proof {:.0} µs",
        per(all.in_audit),
        per(all.in_proof)
    );
    for line in &cpu.lines {
        println!("  {line}");
    }
    println!(
        "  the simulated ends' work (owner signs and checks, storer opens and signs): {:.0} µs per audit",
        per(ends_cpu)
    );
    if let Some(total) = cpu.own_seconds {
        let coordinator_us = (total - ends_cpu.as_secs_f64()) * 1e6 / n.max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        println!(
            "  the coordinator alone: about {coordinator_us:.0} µs of CPU per audit, so about {:.0} audits/s on {cores} cores with nothing else on them",
            cores as f64 * 1e6 / coordinator_us.max(1.0)
        );
    }
    if let Some(s) = all.sizes {
        println!("  envelopes (measured): {}", s.line());
        println!(
            "  through MQTT (QoS 1 PUBLISH + PUBACK, both hops, prefix \"pluto\", no TCP/IP): {} bytes per challenge",
            s.mqtt_per_challenge("pluto")
        );
    }
    crate::replicas::all_proven(&all.outcomes, n)
}

/// One audit of `p`, from the owner's request to its outcome.
async fn one_audit(
    c: &Coordinator,
    owner: &Node,
    storer: &Node,
    p: &replicas::Placement,
    blobs: &Blobs,
    seen: &mut Seen,
) -> Result<()> {
    let t0 = Instant::now();
    let (audit, nonce) = owner.envelope(c, &p.audit(storer.id()))?;
    let t1 = Instant::now();
    let out = c
        .handle(Some(owner.id()), &audit, now_ms(), &mut OsRng)
        .await?
        .context("no answer to an audit request")?;
    let t2 = Instant::now();
    seen.ends += t1 - t0;
    seen.in_audit += t2 - t1;
    if out.to != storer.id() {
        // Settled at once (refused, or the storer is offline).
        let label = match Envelope::verify(&out.bytes)?.message()? {
            Message::Audited { outcome } => outcome.as_str().to_string(),
            other => format!("{other:?}"),
        };
        *seen.outcomes.entry(label).or_default() += 1;
        return Ok(());
    }
    let prove = Envelope::verify(&out.bytes)?.open_private(&storer.exchange)?;
    let Message::Prove {
        challenge,
        root,
        offset,
        len,
        ..
    } = prove
    else {
        bail!("the storer got {prove:?}");
    };
    let proof = Message::Proof {
        challenge,
        answer: blobs.answer(&root, offset, len),
    };
    let (answer, _) = storer.envelope(c, &proof)?;
    let t3 = Instant::now();
    let back = c
        .handle(Some(storer.id()), &answer, now_ms(), &mut OsRng)
        .await?
        .context("the owner heard nothing")?;
    let t4 = Instant::now();
    let env = Envelope::verify(&back.bytes)?;
    let label = match env.message()? {
        Message::Audited { outcome } if back.to == owner.id() && env.reply_to == Some(nonce) => {
            outcome.as_str().to_string()
        }
        other => format!("{other:?}"),
    };
    let t5 = Instant::now();
    seen.ends += (t3 - t2) + (t5 - t4);
    seen.in_proof += t4 - t3;
    seen.latency.push(t5 - t0);
    *seen.outcomes.entry(label).or_default() += 1;
    if seen.sizes.is_none() {
        let encoded = WireSizes::encoded(&prove, &proof);
        let measured = WireSizes {
            audit: audit.len(),
            prove: out.bytes.len(),
            proof: answer.len(),
            audited: back.bytes.len(),
        };
        if measured.per_challenge() != encoded.per_challenge() {
            eprintln!(
                "note: measured {} but encoded alike {}",
                measured.line(),
                encoded.line()
            );
        }
        seen.sizes = Some(measured);
    }
    Ok(())
}
