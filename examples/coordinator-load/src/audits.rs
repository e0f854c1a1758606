//! Audits over the broker: owners ask the coordinator to audit their
//! replicas, simulated storers answer its challenges, each node on its own
//! MQTT connection (the engine's client, as a daemon uses it).
//!
//! ```text
//! owner  --Audit-->    broker --> coordinator --Prove (sealed)--> broker --> storer
//! owner  <--Audited--  broker <-- coordinator <--Proof---------- broker <-- storer
//! ```
//!
//! Setup: every node authenticates; storers heartbeat (the coordinator
//! challenges only online storers) and keep doing so; each owner matches and
//! records `--replicas` replicas, on the storers round robin, with the
//! storer's receipt (this process holds every key). Run: `--in-flight` owners' audits
//! at a time, `--audits` in all, round robin over the replicas.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pluto_engine::client::CoordinatorClient;
use pluto_engine::keys::Keys;
use pluto_plugins_api::NodeId;
use pluto_protocol::Message;
use pluto_transport_mqtt::MqttUrl;

use crate::replicas::{self, Blobs, WireSizes};
use crate::{report, Args, CpuWatch};

/// How long an owner waits for the outcome of one audit.
const AUDIT_WAIT: Duration = Duration::from_secs(60);

pub async fn run(args: &Args) -> Result<()> {
    let (owners_n, storers_n) = args.split()?;
    let blobs = Arc::new(Blobs::new(crate::BLOBS, args.replica_size));
    let plan = Arc::new(replicas::plan(owners_n, storers_n, args.replicas, &blobs));
    println!(
        "{owners_n} owners, {storers_n} storers, {} replicas of {} bytes",
        plan.len(),
        args.replica_size
    );

    let keys: Vec<Arc<Keys>> = crate::node_keys(args, owners_n + storers_n);
    let start = Instant::now();
    let connected = crate::connect_all(&args.url, &keys, args.concurrency).await;
    let failed = connected.iter().filter(|c| c.is_none()).count();
    let (clients, auth): (Vec<_>, Vec<_>) = connected.into_iter().flatten().unzip();
    report("connect+authenticate", auth, failed, start.elapsed());
    if failed > 0 {
        bail!("{failed} nodes did not authenticate");
    }
    let (owners, storers) = clients.split_at(owners_n);
    let (owners, storers) = (owners.to_vec(), storers.to_vec());
    let storer_keys: Arc<Vec<_>> = Arc::new(
        keys[owners_n..]
            .iter()
            .map(|k| k.identity.clone())
            .collect(),
    );
    let storer_ids: Arc<Vec<NodeId>> =
        Arc::new(keys[owners_n..].iter().map(|k| k.node_id()).collect());
    let owner_ids: Vec<NodeId> = keys[..owners_n].iter().map(|k| k.node_id()).collect();

    // Storers: answer every challenge, and stay online.
    let answered = Arc::new(AtomicUsize::new(0));
    let sizes = Arc::new(OnceLock::new());
    for s in &storers {
        tokio::spawn(answer_challenges(
            s.clone(),
            blobs.clone(),
            answered.clone(),
            sizes.clone(),
        ));
    }
    crate::all(storers.len(), args.concurrency, |i| {
        let s = storers[i].clone();
        async move {
            s.request(&Message::Heartbeat)
                .await
                .context("a storer's heartbeat")
        }
    })
    .await?;
    tokio::spawn(keep_online(storers.clone()));

    // Owners: match and record their replicas.
    let start = Instant::now();
    let mut by_owner = vec![Vec::new(); owners_n];
    for (i, p) in plan.iter().enumerate() {
        by_owner[p.owner].push(i);
    }
    let by_owner = Arc::new(by_owner);
    crate::all(owners_n, args.concurrency, |o| {
        let (owner, owner_id) = (owners[o].clone(), owner_ids[o]);
        let (plan, by_owner) = (plan.clone(), by_owner.clone());
        let (storer_keys, storer_ids) = (storer_keys.clone(), storer_ids.clone());
        async move {
            for &i in &by_owner[o] {
                let p = &plan[i];
                let want = storer_ids[p.storer];
                match owner.request(&p.match_request(want)).await? {
                    Message::MatchReply { storers, .. } if storers == [want] => {}
                    other => bail!("matched elsewhere: {other:?}"),
                }
                match owner
                    .request(&p.record(owner_id, &storer_keys[p.storer]))
                    .await?
                {
                    Message::Ok => {}
                    other => bail!("recording a replica: {other:?}"),
                }
            }
            Ok(())
        }
    })
    .await?;
    println!(
        "placed {} replicas in {:.2}s",
        plan.len(),
        start.elapsed().as_secs_f64()
    );

    // The run.
    let n = args.audits;
    let next = Arc::new(AtomicUsize::new(0));
    let owners = Arc::new(owners);
    let cpu = CpuWatch::start(&args.cpu_of);
    let answered_before = answered.load(Ordering::Relaxed);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.in_flight.max(1))
        .map(|_| {
            let (next, owners, plan, storer_ids) = (
                next.clone(),
                owners.clone(),
                plan.clone(),
                storer_ids.clone(),
            );
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut outcomes = BTreeMap::<String, usize>::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let p = &plan[i % plan.len()];
                    let t = Instant::now();
                    let got = owners[p.owner]
                        .request_patiently(&p.audit(storer_ids[p.storer]), AUDIT_WAIT)
                        .await;
                    let label = match got {
                        Ok(Message::Audited { outcome }) => {
                            lat.push(t.elapsed());
                            outcome.as_str().to_string()
                        }
                        Ok(other) => format!("unexpected answer {}", other.kind()),
                        Err(e) => format!("error: {e}"),
                    };
                    *outcomes.entry(label).or_default() += 1;
                }
                (lat, outcomes)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut outcomes = BTreeMap::<String, usize>::new();
    for w in workers {
        let (l, o) = w.await?;
        lat.extend(l);
        for (k, v) in o {
            *outcomes.entry(k).or_default() += v;
        }
    }
    let wall = start.elapsed();
    let cpu = cpu.stop(wall, n);
    let unanswered = n - lat.len();
    report(
        &format!(
            "audits over the broker, {} in flight (Audit -> Audited)",
            args.in_flight
        ),
        lat,
        unanswered,
        wall,
    );
    println!("  outcomes: {}", crate::outcome_line(&outcomes));
    println!(
        "  storers answered {} challenges (the coordinator's own schedule adds a few)",
        answered.load(Ordering::Relaxed) - answered_before
    );
    for line in cpu.lines {
        println!("  {line}");
    }
    if let Some(s) = sizes.get() {
        let prefix = MqttUrl::parse(&args.url).map(|u| u.prefix)?;
        println!("  envelopes (encoded alike): {}", s.line());
        println!(
            "  through MQTT (QoS 1 PUBLISH + PUBACK, both hops, prefix {prefix:?}, no TCP/IP): {} bytes per challenge",
            s.mqtt_per_challenge(&prefix)
        );
    }
    crate::replicas::all_proven(&outcomes, n)
}

/// A storer: answers each challenge from the precomputed proofs.
async fn answer_challenges(
    client: Arc<CoordinatorClient>,
    blobs: Arc<Blobs>,
    answered: Arc<AtomicUsize>,
    sizes: Arc<OnceLock<WireSizes>>,
) {
    let mut rx = client.challenges();
    while let Some(m) = rx.recv().await {
        let Message::Prove {
            challenge,
            root,
            offset,
            len,
            ..
        } = m
        else {
            continue;
        };
        let answer = Message::Proof {
            challenge,
            answer: blobs.answer(&root, offset, len),
        };
        if sizes.get().is_none() {
            let _ = sizes.set(WireSizes::encoded(&m, &answer));
        }
        match client.notify(&answer).await {
            Ok(()) => {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => eprintln!("a storer's proof: {e}"),
        }
    }
}

/// Heartbeats for every storer, as their daemons would send them (a storer
/// silent for three intervals counts as offline, and is not challenged).
async fn keep_online(storers: Vec<Arc<CoordinatorClient>>) {
    let Some(every) = storers.first().map(|s| s.heartbeat) else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        for s in &storers {
            if let Err(e) = s.request(&Message::Heartbeat).await {
                eprintln!("a storer's heartbeat: {e}");
            }
        }
    }
}
