//! The owner's side of the exchange: replicas of this node's packs go to
//! `copies` distinct storers, come back for a restore, and the manifest
//! that lists them is kept at the coordinator and at every storer.
//!
//! ```text
//! upload:  for each local pack with fewer than `copies` confirmed replicas
//!          (the first alone while the line is unmeasured, then
//!          `uploads_at_once` at a time)
//!            match (the pack, its size, copies missing, storers to avoid)
//!            for each storer: replica = pack XOR replica key(pack, storer)
//!              Put + bytes -> Ok (root checked, synced) -> RecordReplica
//!            a storer that fails is avoided and another one asked for
//!          placement saved as replicas are confirmed; at the end the
//!          manifest goes to the coordinator and every storer
//! fetch:   a replica from any storer that holds one (online ones first):
//!          bytes hash to the root, decrypt, hash to the pack id
//! ```
//!
//! A pack that arrived is never sent again: an upload that was cut off
//! resumes with the packs that lack copies (a storer that already holds a
//! replica answers `Have`). The unit of resumption is the pack.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures_util::{FutureExt, StreamExt};
use pluto_plugins_api::{BlobKind, BlobStore, Link, NodeId, PackId, StoreError, TransportError};
use pluto_protocol::{
    ErrorCode, Message, PeerReport, RepairItem, RepairReason, ReplicaStatement, Ticket,
};

use crate::client::now_ms;
use crate::client::ClientError;
use crate::crypto::SealKey;
use crate::exchange::{PeerError, PeerMsg, MAX_CONTROL, UPLOAD_FRAME};
use crate::keys::Keys;
use crate::keystream::StreamKey;
use crate::manifest::{PackPlacement, Placement, Replica};
use crate::network::{Net, NetError};

/// Packs uploaded at once, at most: on a slow uplink fewer (see
/// [`uploads_at_once`]).
const PARALLEL_PACKS: usize = 4;
/// How long an upload may make no progress (a frame not taken, no answer)
/// before its storer counts as failed. There is no limit on the whole: a
/// slow line that moves is not a failure.
pub const STALL: Duration = Duration::from_secs(60);
/// About how long one round of uploads at once should keep the line busy,
/// which sets how many go at once on a slow line.
const ROUND: Duration = Duration::from_secs(30);

/// Why placing or repairing packs failed as a whole (one storer failing
/// is a [`PeerFailure`], told in the report).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    /// The placement file.
    #[error(transparent)]
    Placement(#[from] crate::manifest::ManifestError),
    /// The coordinator.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An answer that does not fit the question.
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
    /// The placement settings.
    #[error("config: {0}")]
    Config(#[from] crate::home::SettingError),
    /// A worker thread died.
    #[error("a worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Saves `placement` on a worker thread (a file write and its fsync).
async fn save_off_executor(
    placement: &Placement,
    path: &std::path::Path,
) -> Result<(), UploadError> {
    let (placement, path) = (placement.clone(), path.to_path_buf());
    Ok(tokio::task::spawn_blocking(move || placement.save(&path)).await??)
}

/// How many packs of about `size` bytes, `copies` each, to send at once at
/// `rate` bytes a second (0: not measured yet): as many as the line moves
/// in [`ROUND`], between 1 and [`PARALLEL_PACKS`]. On a slow line, packs
/// then finish one after another instead of all crawling together, so
/// each one is safe sooner and an interruption costs less.
pub fn uploads_at_once(rate: u64, size: u64, copies: usize) -> usize {
    if rate == 0 {
        return PARALLEL_PACKS;
    }
    let per_pack = size.max(1).saturating_mul(copies.max(1) as u64);
    let fits = rate.saturating_mul(ROUND.as_secs()) / per_pack;
    usize::try_from(fits)
        .unwrap_or(PARALLEL_PACKS)
        .clamp(1, PARALLEL_PACKS)
}

/// `f`, or a protocol failure when it makes no progress within [`STALL`].
async fn progress<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, PeerFailure>>,
) -> Result<T, PeerFailure> {
    tokio::time::timeout(STALL, f)
        .await
        .map_err(|_| PeerFailure::Stalled(format!("{what}: no progress for {STALL:?}")))?
}
/// Rounds of matching per pack before it is left for later.
const MATCH_ROUNDS: usize = 3;

/// Why an exchange with a peer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerFailure {
    /// Not reachable.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The link broke.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer refused.
    #[error("refused: {message} ({code:?})")]
    Refused {
        /// Why, for programs.
        code: PeerError,
        /// Why, for people.
        message: String,
    },
    /// Nothing moved for [`STALL`].
    #[error("{0}")]
    Stalled(String),
    /// The peer answered out of protocol or sent bad bytes.
    #[error("{0}")]
    Protocol(String),
    /// A local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an upload did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UploadReport {
    /// Packs of this node.
    pub packs: usize,
    /// Packs with every copy at peers.
    pub complete: usize,
    /// Packs still short of copies.
    pub short: usize,
    /// Replicas sent this time.
    pub replicas_sent: usize,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Why some replicas could not be placed (one line each, deduplicated).
    pub problems: Vec<String>,
    /// The manifest's version after the upload.
    pub manifest_version: u64,
}

/// What an upload needs from the node.
pub struct Uploader<'a> {
    /// The node's keys.
    pub keys: &'a Keys,
    /// Where packs are read from.
    pub packs: Arc<dyn BlobStore>,
    /// Copies wanted, friends and how many copies go to them.
    pub placement: &'a crate::home::PlacementConfig,
    /// The placement file.
    pub placement_path: std::path::PathBuf,
    /// Reach.
    pub net: &'a Net,
}

async fn recv_msg(link: &mut dyn Link) -> Result<PeerMsg, PeerFailure> {
    let frame = link
        .recv()
        .await?
        .ok_or_else(|| PeerFailure::Protocol("the peer closed the link".into()))?;
    if frame.len() > MAX_CONTROL {
        return Err(PeerFailure::Protocol("control frame too big".into()));
    }
    let m = PeerMsg::decode(&frame).map_err(|e| PeerFailure::Protocol(e.to_string()))?;
    if let PeerMsg::Error { code, message } = m {
        return Err(PeerFailure::Refused { code, message });
    }
    Ok(m)
}

impl PeerFailure {
    /// Whether asking again may go through: the way to the peer or the
    /// link failed, or it stalled (a refusal or a broken protocol will not
    /// change).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Net(_) | Self::Transport(_) | Self::Stalled(_))
    }

    /// Whether a storer refused a kind of request it does not know (one
    /// that predates it).
    fn unknown_request(&self) -> bool {
        matches!(self, Self::Refused { code: PeerError::Malformed, message }
            if message.contains("unknown peer message kind"))
    }
}

/// A replica a storer keeps.
#[derive(Clone, Copy, Debug)]
pub struct Placed {
    /// It was there already (nothing was sent).
    pub already: bool,
    /// The storer's signature of the replica's statement.
    pub receipt: [u8; 64],
    /// How long sending it took (0 when nothing was sent).
    pub micros: u64,
    /// Bytes sent this time (less than the replica when the storer had
    /// kept the first bytes of a transfer that broke).
    pub sent: u64,
}

/// Times a replica is sent again to the same storer, resuming, when the
/// link breaks or stalls (the ticket allowing).
pub const RESUME_TRIES: usize = 3;

/// Sends one replica to `storer`, with the owner's signature (`identity`)
/// of its statement; the storer's receipt is checked before it counts.
/// When the storer kept the first bytes of an earlier transfer of it that
/// broke, only the rest is sent. A storer that predates resuming is asked
/// again the old way.
pub async fn put_replica(
    net: &Net,
    identity: &SigningKey,
    storer: &NodeId,
    ticket: Vec<u8>,
    pack: PackId,
    replica: &[u8],
    root: [u8; 32],
) -> Result<Placed, PeerFailure> {
    let args = (net, identity, storer, pack, replica, root);
    match put_once(args, ticket.clone(), true).await {
        Err(e) if e.unknown_request() => put_once(args, ticket, false).await,
        r => r,
    }
}

async fn put_once(
    (net, identity, storer, pack, replica, root): (
        &Net,
        &SigningKey,
        &NodeId,
        PackId,
        &[u8],
        [u8; 32],
    ),
    ticket: Vec<u8>,
    resume: bool,
) -> Result<Placed, PeerFailure> {
    let statement = ReplicaStatement {
        owner: NodeId(identity.verifying_key().to_bytes()),
        storer: *storer,
        pack,
        size: replica.len() as u64,
        root,
    };
    let checked = |receipt: [u8; 64]| {
        if statement.signed_by(storer, &receipt) {
            Ok(receipt)
        } else {
            Err(PeerFailure::Protocol(
                "the storer's receipt does not name this replica".into(),
            ))
        }
    };
    let mut link = progress("connecting", async { Ok(net.connect(storer).await?) }).await?;
    let started = std::time::Instant::now();
    let put = PeerMsg::Put {
        ticket,
        pack,
        root,
        size: statement.size,
        attest: statement.sign(identity),
        resume,
    };
    progress("asking to store", async {
        Ok(link.send(&put.encode()).await?)
    })
    .await?;
    let from = match progress("waiting for the storer", recv_msg(&mut *link)).await? {
        PeerMsg::Have { size, receipt } if size == statement.size => {
            return Ok(Placed {
                already: true,
                receipt: checked(receipt)?,
                micros: 0,
                sent: 0,
            });
        }
        PeerMsg::Ready => 0,
        PeerMsg::ReadyFrom { offset } if resume && offset <= statement.size => offset as usize,
        other => return Err(PeerFailure::Protocol(format!("{other:?} to a Put"))),
    };
    let rest = &replica[from..];
    if from > 0 {
        tracing::info!(
            "storer {} kept {from} bytes of pack {}; sending the other {}",
            storer.short(),
            pack.short(),
            rest.len()
        );
    }
    for frame in rest.chunks(UPLOAD_FRAME) {
        if let Some(p) = net.pacer() {
            p.wait(frame.len()).await;
        }
        progress("sending", async { Ok(link.send(frame).await?) }).await?;
    }
    match progress("waiting for the receipt", recv_msg(&mut *link)).await? {
        PeerMsg::Kept { receipt } => {
            let micros = started.elapsed().as_micros().max(1) as u64;
            net.note_upload(rest.len() as u64, micros);
            let _ = link.finish().await;
            Ok(Placed {
                already: false,
                receipt: checked(receipt)?,
                micros,
                sent: rest.len() as u64,
            })
        }
        other => Err(PeerFailure::Protocol(format!("{other:?} after a replica"))),
    }
}

/// How long an owner waits for an audit's outcome (the coordinator's
/// deadline for the storer, and the way there and back).
pub const AUDIT_WAIT: Duration = Duration::from_secs(90);

/// Has the coordinator audit this node's replica of `pack` at `storer`
/// and waits for the outcome (asking again, slower, while it is busy).
pub async fn audit(
    net: &Net,
    pack: PackId,
    storer: NodeId,
) -> Result<pluto_protocol::AuditOutcome, ClientError> {
    let mut pause = Duration::from_millis(500);
    loop {
        let r = net
            .client()
            .request_patiently(&Message::Audit { pack, storer }, AUDIT_WAIT)
            .await;
        match r {
            Ok(Message::Audited { outcome }) => return Ok(outcome),
            Ok(other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
            Err(ClientError::Refused {
                code: ErrorCode::Busy,
                ..
            }) if pause < Duration::from_secs(30) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Asks `storer` to delete the replica `root` (signed by the owner).
pub async fn delete_replica(
    net: &Net,
    identity: &SigningKey,
    storer: &NodeId,
    root: &[u8; 32],
) -> Result<(), PeerFailure> {
    use ed25519_dalek::Signer;
    let at_ms = crate::client::now_ms();
    let signature = identity
        .sign(&crate::exchange::delete_message(storer, root, at_ms))
        .to_bytes();
    let mut link = net.connect(storer).await?;
    link.send(
        &PeerMsg::Delete {
            root: *root,
            at_ms,
            signature,
        }
        .encode(),
    )
    .await?;
    match recv_msg(&mut *link).await? {
        PeerMsg::Ok => Ok(()),
        other => Err(PeerFailure::Protocol(format!("{other:?} to a Delete"))),
    }
}

/// Reads `len` bytes at `offset` of the replica `root` from `storer`.
pub async fn get_range(
    net: &Net,
    storer: &NodeId,
    root: &[u8; 32],
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, PeerFailure> {
    let mut link = net.connect(storer).await?;
    link.send(
        &PeerMsg::Get {
            root: *root,
            offset,
            len,
        }
        .encode(),
    )
    .await?;
    match recv_msg(&mut *link).await? {
        PeerMsg::Sending { len: l } if l == len => {}
        other => return Err(PeerFailure::Protocol(format!("{other:?} to a Get"))),
    }
    let want = usize::try_from(len).map_err(|_| PeerFailure::Protocol("too long".into()))?;
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let frame = link.recv().await?.ok_or_else(|| {
            PeerFailure::Protocol(format!(
                "the stream ended after {} of {len} bytes",
                out.len()
            ))
        })?;
        if out.len() + frame.len() > want {
            return Err(PeerFailure::Protocol("more bytes than announced".into()));
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

/// Fetches pack `pack` from one of its replicas, checking the replica's
/// root and then the pack's id; the storers are tried in turn.
pub async fn fetch_pack(
    net: &Net,
    replica_keys: &[u8; 32],
    pack: &PackId,
    placed: &PackPlacement,
) -> Result<Vec<u8>, PeerFailure> {
    let mut why = Vec::new();
    for r in &placed.replicas {
        match get_range(net, &r.storer, &r.root, 0, placed.size).await {
            Ok(mut bytes) => {
                if *blake3::hash(&bytes).as_bytes() != r.root {
                    why.push(format!(
                        "{}: bytes do not match the replica's root",
                        r.storer.short()
                    ));
                    continue;
                }
                StreamKey::replica(replica_keys, pack, &r.storer).apply(0, &mut bytes);
                if PackId::of(&bytes) != *pack {
                    why.push(format!(
                        "{}: the replica does not decrypt to the pack",
                        r.storer.short()
                    ));
                    continue;
                }
                return Ok(bytes);
            }
            Err(e) => why.push(format!("{}: {e}", r.storer.short())),
        }
    }
    if why.is_empty() {
        why.push("no replica is recorded".into());
    }
    Err(PeerFailure::Protocol(format!(
        "pack {} could not be fetched: {}",
        pack.short(),
        why.join("; ")
    )))
}

/// What a repair did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Replicas taken out of the placement, to be placed again elsewhere.
    pub moved: usize,
    /// Why, one line per replica.
    pub reasons: Vec<String>,
}

impl Uploader<'_> {
    /// Asks the coordinator which replicas must move (lost, or on a storer
    /// excluded or gone past its grace period), takes them out of the
    /// placement and out of the books (the storer's claim on space is
    /// released) and asks their storers, best effort, to delete them. The
    /// next [`Self::run`] places the missing copies elsewhere, from the
    /// local pack or from another replica. Call with the upload lock held.
    pub async fn repair(&self) -> Result<RepairReport, UploadError> {
        let items = match self.net.client().request(&Message::GetRepairs).await {
            Ok(Message::Repairs(items)) => items,
            Ok(other) => return Err(UploadError::Unexpected(format!("{other:?} to GetRepairs"))),
            Err(e) => return Err(e.into()),
        };
        let mut rep = RepairReport::default();
        if items.is_empty() {
            return Ok(rep);
        }
        let mut placement = Placement::load(&self.placement_path)?;
        let bad: HashSet<(PackId, NodeId)> = items.iter().map(|i| (i.pack, i.storer)).collect();
        let mut gone: Vec<(RepairItem, Option<[u8; 32]>)> = Vec::new();
        for item in items {
            // A replica that may still be read (its storer is excluded or
            // away, not proven to have lost it) stays the pack's source
            // until another one exists: with no local pack and no other
            // good replica, it is kept for now.
            if item.reason != RepairReason::Lost {
                let other = placement.packs.get(&item.pack).is_some_and(|p| {
                    p.replicas
                        .iter()
                        .any(|r| !bad.contains(&(item.pack, r.storer)))
                });
                let local = matches!(self.packs.size(&item.pack), Ok(Some(_)));
                if !other && !local {
                    tracing::warn!(
                        "pack {}: its only replica is at {} ({}); kept until another copy can be made",
                        item.pack.short(),
                        item.storer.short(),
                        item.reason.as_str()
                    );
                    continue;
                }
            }
            let root = placement.packs.get_mut(&item.pack).and_then(|p| {
                let i = p.replicas.iter().position(|r| r.storer == item.storer)?;
                Some(p.replicas.remove(i).root)
            });
            if root.is_some() {
                rep.moved += 1;
                rep.reasons.push(format!(
                    "pack {} at {}: {}",
                    item.pack.short(),
                    item.storer.short(),
                    item.reason.as_str()
                ));
            }
            gone.push((item, root));
        }
        if rep.moved > 0 {
            placement.version += 1;
            save_off_executor(&placement, &self.placement_path).await?;
        }
        // The books follow the placement: a replica that is not in it (any
        // more) is released, so its storer's space and this node's quota
        // come back; its storer is asked to delete it (best effort).
        futures_util::stream::iter(gone.iter().map(|(item, root)| {
            async move {
                if let Err(e) = self
                    .net
                    .client()
                    .request(&Message::DropReplica {
                        pack: item.pack,
                        storer: item.storer,
                    })
                    .await
                {
                    tracing::warn!("releasing a replica at {}: {e}", item.storer.short());
                }
                if let Some(root) = root {
                    let del = tokio::time::timeout(
                        Duration::from_secs(10),
                        delete_replica(self.net, &self.keys.identity, &item.storer, root),
                    )
                    .await;
                    if !matches!(del, Ok(Ok(()))) {
                        tracing::info!(
                            "could not ask {} to delete a replica it should no longer hold",
                            item.storer.short()
                        );
                    }
                }
            }
            .boxed()
        }))
        .buffer_unordered(16)
        .boxed()
        .collect::<Vec<()>>()
        .await;
        Ok(rep)
    }

    /// Places every pack in `packs` (id, size) that lacks copies, saves the
    /// placement as it goes and publishes the manifest when anything
    /// changed. Call with the upload lock held.
    pub async fn run(&self, packs: &[(PackId, u64)]) -> Result<UploadReport, UploadError> {
        let mut placement = Placement::load(&self.placement_path)?;
        let copies = usize::from(self.placement.copies);
        let friends = self.placement.friend_ids().map_err(UploadError::Config)?;
        for (id, size) in packs {
            placement.packs.entry(*id).or_insert(PackPlacement {
                size: *size,
                replicas: Vec::new(),
            });
        }
        let todo: Vec<(PackId, u64, Vec<Replica>)> = packs
            .iter()
            .filter_map(|(id, _)| {
                let p = placement.packs.get(id)?;
                (p.replicas.len() < copies).then(|| (*id, p.size, p.replicas.clone()))
            })
            .collect();
        // The placements come back on this task: plain state suffices.
        let changed = !todo.is_empty();
        let typical = todo.iter().map(|t| t.1).max().unwrap_or(0);
        // On a line not measured yet, the first pack goes alone and
        // measures it; the rest go as many at once as it moves. Sent all
        // at once, packs on a slow uplink would each crawl, and each
        // storer would be measured (by the coordinator too) at a fraction
        // of the line.
        let mut todo = todo;
        let rest = if self.net.upload_rate() == 0 && todo.len() > 1 {
            todo.split_off(1)
        } else {
            Vec::new()
        };
        let mut rep = UploadReport::default();
        let mut problems = BTreeMap::<String, usize>::new();
        let mut saved_at = std::time::Instant::now();
        for batch in [todo, rest] {
            let at_once = uploads_at_once(self.net.upload_rate(), typical, copies);
            let mut stream =
                futures_util::stream::iter(batch.into_iter().map(|(pack, size, have)| {
                    let friends = &friends;
                    // Boxed: the stream's future must be Send for every lifetime,
                    // which the compiler cannot see through an unboxed closure.
                    async move { (pack, self.place(pack, size, have, copies, friends).await) }
                        .boxed()
                }))
                .buffer_unordered(at_once)
                .boxed();
            while let Some((pack, (placed, sent, errs))) = stream.next().await {
                if let Some(p) = placement.packs.get_mut(&pack) {
                    for r in placed {
                        if !p.replicas.iter().any(|x| x.storer == r.storer) {
                            p.replicas.push(r);
                        }
                    }
                }
                rep.replicas_sent += sent.0;
                rep.bytes_sent += sent.1;
                for e in errs {
                    *problems.entry(e).or_insert(0) += 1;
                }
                if saved_at.elapsed() > Duration::from_secs(2) {
                    save_off_executor(&placement, &self.placement_path).await?;
                    saved_at = std::time::Instant::now();
                }
            }
        }
        if changed {
            placement.version += 1;
            save_off_executor(&placement, &self.placement_path).await?;
            self.publish(&placement).await;
        }
        rep.packs = packs.len();
        rep.complete = packs
            .iter()
            .filter(|(id, _)| {
                placement
                    .packs
                    .get(id)
                    .is_some_and(|p| p.replicas.len() >= copies)
            })
            .count();
        rep.short = rep.packs - rep.complete;
        rep.problems = problems
            .iter()
            .map(|(e, n)| {
                if *n > 1 {
                    format!("{e} ({n} times)")
                } else {
                    e.clone()
                }
            })
            .collect();
        rep.manifest_version = placement.version;
        Ok(rep)
    }

    /// Places the missing copies of one pack. Returns the new replicas, what
    /// was sent (replicas, bytes) and what went wrong.
    async fn place(
        &self,
        pack: PackId,
        size: u64,
        have: Vec<Replica>,
        copies: usize,
        friends: &[NodeId],
    ) -> (Vec<Replica>, (usize, u64), Vec<String>) {
        let mut placed = Vec::new();
        let mut sent = (0, 0);
        let mut errs = Vec::new();
        let packs = self.packs.clone();
        let bytes = match tokio::task::spawn_blocking(move || packs.get(&pack)).await {
            Ok(Ok(b)) => Arc::new(b),
            Ok(Err(e)) => return (placed, sent, vec![format!("reading pack: {e}")]),
            Err(e) => return (placed, sent, vec![format!("reading pack: {e}")]),
        };
        let mut avoid: Vec<NodeId> = have.iter().map(|r| r.storer).collect();
        for _ in 0..MATCH_ROUNDS {
            let need = copies.saturating_sub(have.len() + placed.len());
            if need == 0 {
                break;
            }
            let friends_holding = avoid.iter().filter(|s| friends.contains(s)).count();
            let friend_copies = usize::from(self.placement.friend_copies)
                .saturating_sub(friends_holding)
                .min(need);
            let answer = self
                .net
                .client()
                .request(&Message::MatchRequest {
                    pack,
                    size,
                    copies: need as u8,
                    friends: friends.to_vec(),
                    friend_copies: friend_copies as u8,
                    exclude: avoid.clone(),
                })
                .await;
            let (storers, tickets) = match answer {
                Ok(Message::MatchReply { storers, tickets }) => (storers, tickets),
                Ok(other) => {
                    errs.push(format!("unexpected answer to a match: {other:?}"));
                    break;
                }
                Err(ClientError::Refused {
                    code: ErrorCode::NoCapacity,
                    ..
                }) => {
                    errs.push("no storer with room for the missing copies".into());
                    break;
                }
                Err(e) => {
                    errs.push(e.to_string());
                    break;
                }
            };
            let attempts = storers.iter().zip(tickets).map(|(storer, ticket)| {
                let bytes = bytes.clone();
                let key = StreamKey::replica(&self.keys.replica, &pack, storer);
                async move {
                    // A whole pack's keystream and hash: a worker thread's job.
                    let prepared = tokio::task::spawn_blocking(move || {
                        let mut replica = bytes.to_vec();
                        key.apply(0, &mut replica);
                        let root = *blake3::hash(&replica).as_bytes();
                        (replica, root)
                    })
                    .await;
                    let Ok((replica, root)) = prepared else {
                        let failed = PeerFailure::Protocol("preparing the replica failed".into());
                        return (*storer, [0; 32], Err(failed));
                    };
                    // A storer that stalls fails (`STALL`); a slow one that
                    // moves is waited for. A link that breaks or stalls is
                    // tried again, resuming, while the ticket lasts.
                    let deadline = Ticket::parse_unverified(&ticket).map_or(0, |t| t.expires_ms);
                    let mut tries = 1;
                    let r = loop {
                        let r = put_replica(
                            self.net,
                            &self.keys.identity,
                            storer,
                            ticket.clone(),
                            pack,
                            &replica,
                            root,
                        )
                        .await;
                        match r {
                            Err(e)
                                if e.is_transient()
                                    && tries < RESUME_TRIES
                                    && now_ms() + 10_000 < deadline =>
                            {
                                tracing::info!(
                                    "pack {}: storer {}: {e}; trying again",
                                    pack.short(),
                                    storer.short()
                                );
                                tokio::time::sleep(Duration::from_secs(2 << tries)).await;
                                tries += 1;
                            }
                            r => break r,
                        }
                    };
                    (*storer, root, r)
                }
                .boxed()
            });
            for (storer, root, r) in futures_util::future::join_all(attempts).await {
                avoid.push(storer);
                match r {
                    Ok(p) => {
                        let rec = self
                            .net
                            .client()
                            .request(&Message::RecordReplica {
                                pack,
                                storer,
                                size,
                                root,
                                receipt: p.receipt,
                                micros: p.micros,
                            })
                            .await;
                        if let Err(e) = rec {
                            // Stored, but the books do not say so: the storer
                            // reports it again; keep it as placed.
                            tracing::warn!("recording a replica at {}: {e}", storer.short());
                        }
                        if !p.already {
                            sent.0 += 1;
                            sent.1 += p.sent;
                        }
                        placed.push(Replica { storer, root });
                    }
                    Err(e) => {
                        tracing::info!(
                            "pack {}: storer {} failed: {e}",
                            pack.short(),
                            storer.short()
                        );
                        errs.push(format!("storer {}: {e}", storer.short()));
                    }
                }
            }
        }
        (placed, sent, errs)
    }

    /// Sends the manifest to the coordinator and to every storer (best
    /// effort: each failure is logged, the next upload sends it again).
    async fn publish(&self, placement: &Placement) {
        let blob = placement.seal(&self.keys.identity, &SealKey::new(&self.keys.metadata));
        let r = self
            .net
            .client()
            .request(&Message::PutManifest {
                version: placement.version,
                blob: blob.clone(),
            })
            .await;
        if let Err(e) = r {
            tracing::warn!("keeping the manifest at the coordinator: {e}");
        }
        let storers: HashSet<NodeId> = placement
            .packs
            .values()
            .flat_map(|p| p.replicas.iter().map(|r| r.storer))
            .collect();
        let sends = storers.into_iter().map(|s| {
            let blob = blob.clone();
            async move {
                let r = async {
                    let mut link = self.net.connect(&s).await?;
                    link.send(&PeerMsg::PutManifest { blob }.encode()).await?;
                    recv_msg(&mut *link).await.map(|_| ())
                }
                .await;
                if let Err(e) = r {
                    tracing::info!("keeping the manifest at {}: {e}", s.short());
                }
            }
            .boxed()
        });
        futures_util::future::join_all(sends).await;
    }
}

/// The newest manifest of this node that opens: the coordinator's, or any
/// storer's (those the coordinator lists as holding for this node).
pub async fn fetch_manifest(net: &Net, keys: &Keys) -> Result<Option<Placement>, ClientError> {
    Ok(lookup_manifest(net, keys).await?.0)
}

/// The newest manifest that opens, and the coordinator's list of this
/// node's peers (asked once for both).
async fn lookup_manifest(
    net: &Net,
    keys: &Keys,
) -> Result<(Option<Placement>, Vec<PeerReport>), ClientError> {
    let me = keys.node_id();
    let key = SealKey::new(&keys.metadata);
    let mut best: Option<Placement> = None;
    let consider = |best: &mut Option<Placement>, blob: &[u8], from: &str| match Placement::open(
        &me, &key, blob,
    ) {
        Ok(p) => {
            if best.as_ref().is_none_or(|b| p.version > b.version) {
                *best = Some(p);
            }
        }
        Err(e) => tracing::warn!("the manifest kept by {from}: {e}"),
    };
    match net.client().request(&Message::GetManifest).await {
        Ok(Message::Manifest { blob, .. }) => consider(&mut best, &blob, "the coordinator"),
        Ok(_) => {}
        Err(ClientError::Refused {
            code: ErrorCode::NotFound,
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    let peers = match net.client().request(&Message::ListPeers).await {
        Ok(Message::Peers(list)) => list,
        _ => Vec::new(),
    };
    let mut storers: Vec<NodeId> = peers
        .iter()
        .filter(|p| p.replicas_held > 0)
        .map(|p| p.id)
        .collect();
    if let Some(b) = &best {
        storers.extend(
            b.packs
                .values()
                .flat_map(|p| p.replicas.iter().map(|r| r.storer)),
        );
    }
    storers.sort_unstable();
    storers.dedup();
    let asks = storers.into_iter().map(|s| async move {
        let r = async {
            let mut link = net.connect(&s).await?;
            link.send(&PeerMsg::GetManifest.encode()).await?;
            match recv_msg(&mut *link).await? {
                PeerMsg::Manifest { blob } => Ok(blob),
                other => Err(PeerFailure::Protocol(format!("{other:?}"))),
            }
        }
        .await;
        (s, r)
    });
    for (s, r) in futures_util::future::join_all(asks).await {
        match r {
            Ok(blob) => consider(&mut best, &blob, &s.short()),
            Err(e) => tracing::info!("no manifest from {}: {e}", s.short()),
        }
    }
    Ok((best, peers))
}

/// Packs of `placement` that have replicas, none of them at a storer the
/// coordinator lists online and holding for this node (after the
/// coordinator lost its books, a storer is listed once it is back and has
/// reported what it holds). Packs without any replica are not counted:
/// no waiting brings them.
pub fn packs_away(placement: &Placement, peers: &[PeerReport]) -> usize {
    let back: HashSet<NodeId> = peers
        .iter()
        .filter(|p| p.online && p.replicas_held > 0)
        .map(|p| p.id)
        .collect();
    placement
        .packs
        .values()
        .filter(|p| !p.replicas.is_empty() && !p.replicas.iter().any(|r| back.contains(&r.storer)))
        .count()
}

/// Why a manifest search is still waiting (passed to its progress callback).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ManifestWait {
    /// Neither the coordinator nor any storer it lists has a manifest of
    /// this node (yet: storers re-register after a coordinator restart).
    NoManifest {
        /// Storers the coordinator lists as holding for this node.
        storers: usize,
    },
    /// The manifest is found, but some of its packs have no replica at a
    /// storer that is back online.
    Storers {
        /// Packs the manifest lists.
        packs: usize,
        /// Of those, packs whose storers are all away.
        away: usize,
    },
    /// Asking the coordinator failed.
    Failed(Arc<ClientError>),
}

/// The same reason to wait (two failures are the same when they read the
/// same), so that a caller can tell a repeat from news.
impl PartialEq for ManifestWait {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::NoManifest { storers: a }, Self::NoManifest { storers: b }) => a == b,
            (Self::Storers { packs, away }, Self::Storers { packs: p, away: a }) => {
                packs == p && away == a
            }
            (Self::Failed(a), Self::Failed(b)) => {
                Arc::ptr_eq(a, b) || a.to_string() == b.to_string()
            }
            _ => false,
        }
    }
}

impl Eq for ManifestWait {}

/// What a manifest search found.
#[derive(Clone, Debug)]
pub struct ManifestSearch {
    /// The newest manifest that opens, if any was found.
    pub placement: Option<Placement>,
    /// Packs of it whose storers were all away when the search ended.
    pub away: usize,
    /// Why it was still waiting when the time was up (None: done in time).
    pub waiting: Option<ManifestWait>,
}

/// Looks for this node's manifest ([`fetch_manifest`]) until it is found
/// and every pack in it with replicas has one at a storer back online, or
/// until `wait` has passed, asking again every `every`; `progress` hears why
/// it waits before each pause, with the time left. When the time is up, the
/// best found so far is returned (with the packs still away).
pub async fn search_manifest(
    net: &Net,
    keys: &Keys,
    wait: Duration,
    every: Duration,
    mut progress: impl FnMut(&ManifestWait, Duration),
) -> ManifestSearch {
    let deadline = tokio::time::Instant::now() + wait;
    let mut best: Option<Placement> = None;
    let mut away = 0;
    loop {
        let why = match lookup_manifest(net, keys).await {
            Ok((found, peers)) => {
                if let Some(p) = found {
                    if best.as_ref().is_none_or(|b| p.version >= b.version) {
                        best = Some(p);
                    }
                }
                match &best {
                    Some(p) => {
                        away = packs_away(p, &peers);
                        if away == 0 {
                            return ManifestSearch {
                                placement: best,
                                away: 0,
                                waiting: None,
                            };
                        }
                        ManifestWait::Storers {
                            packs: p.packs.len(),
                            away,
                        }
                    }
                    None => ManifestWait::NoManifest {
                        storers: peers.iter().filter(|p| p.replicas_held > 0).count(),
                    },
                }
            }
            Err(e) => ManifestWait::Failed(Arc::new(e)),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return ManifestSearch {
                placement: best,
                away,
                waiting: Some(why),
            };
        }
        progress(&why, left);
        tokio::time::sleep(every.min(left)).await;
    }
}

/// Whether a pack holds file data only (the kind a local cache may drop).
pub fn data_only(kinds: &[BlobKind]) -> bool {
    kinds.iter().all(|k| *k == BlobKind::Data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storer_that_predates_resuming_is_asked_the_old_way() {
        // What such a storer answers a kind-13 put: its decoder's error
        // for a kind it does not know (250 is unknown here too).
        let why = PeerMsg::decode(&[250]).unwrap_err().to_string();
        let old = PeerFailure::Refused {
            code: PeerError::Malformed,
            message: why,
        };
        assert!(old.unknown_request());
        let other = PeerFailure::Refused {
            code: PeerError::Malformed,
            message: "more bytes than announced".into(),
        };
        assert!(!other.unknown_request() && !other.is_transient());
        assert!(PeerFailure::Stalled("sending".into()).is_transient());
    }

    #[test]
    fn a_slow_line_sends_fewer_packs_at_once() {
        // Not measured yet: the most.
        assert_eq!(uploads_at_once(0, 16 << 20, 2), PARALLEL_PACKS);
        // 2 Mbit/s moves 7.5 MB in 30 s: less than one pack of 16 MiB, twice.
        assert_eq!(uploads_at_once(250_000, 16 << 20, 2), 1);
        // 20 Mbit/s: two packs' copies fit a round.
        assert_eq!(uploads_at_once(2_500_000, 16 << 20, 2), 2);
        // A fast line, or small packs: the most.
        assert_eq!(uploads_at_once(100 << 20, 16 << 20, 2), PARALLEL_PACKS);
        assert_eq!(uploads_at_once(250_000, 256 << 10, 2), PARALLEL_PACKS);
        // Nothing divides by zero or overflows.
        assert_eq!(uploads_at_once(1, 0, 0), PARALLEL_PACKS);
        assert_eq!(uploads_at_once(u64::MAX, u64::MAX, usize::MAX), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_keeps_to_its_rate() {
        let p = crate::network::Pacer::new(1 << 20);
        let start = tokio::time::Instant::now();
        for _ in 0..8 {
            p.wait(512 << 10).await;
        }
        // Eight half-MiB sends at 1 MiB/s: the last may start after 3.5 s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(3_500) && took < Duration::from_millis(3_600),
            "{took:?}"
        );
    }

    fn peer(id: u8, online: bool, replicas_held: u32) -> PeerReport {
        PeerReport {
            id: NodeId([id; 32]),
            online,
            last_seen_ms: 0,
            uptime_permille: None,
            replicas_held,
            bytes_held: 0,
            replicas_stored: 0,
            bytes_stored: 0,
            audit_permille: 0,
            timeout_permille: 0,
            uptime_score_permille: 0,
            speed_bps: 0,
            audits_passed: 0,
            audits_failed: 0,
            audits_timed_out: 0,
            excluded: false,
            held_back: false,
        }
    }

    fn at(storers: &[u8]) -> PackPlacement {
        PackPlacement {
            size: 1,
            replicas: storers
                .iter()
                .map(|s| Replica {
                    storer: NodeId([*s; 32]),
                    root: [0; 32],
                })
                .collect(),
        }
    }

    #[test]
    fn a_pack_is_away_until_one_of_its_storers_is_back() {
        let mut p = Placement::default();
        p.packs.insert(PackId([1; 32]), at(&[1, 2]));
        p.packs.insert(PackId([2; 32]), at(&[2, 3]));
        // Never placed: no waiting brings it.
        p.packs.insert(PackId([3; 32]), at(&[]));
        assert_eq!(packs_away(&p, &[]), 2);
        // Back but offline, or online but not yet reporting what it holds.
        assert_eq!(packs_away(&p, &[peer(2, false, 5), peer(3, true, 0)]), 2);
        assert_eq!(packs_away(&p, &[peer(1, true, 1)]), 1);
        assert_eq!(packs_away(&p, &[peer(1, true, 1), peer(3, true, 1)]), 0);
        assert_eq!(packs_away(&p, &[peer(2, true, 2)]), 0);
    }
}
