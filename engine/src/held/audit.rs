//! Answering an audit from the disk: the range asked for, the 16 KiB group
//! around it and a few dozen stored hashes of the replica's outboard. A
//! proof is checked before it is sent; an outboard missing (an object
//! written before outboards, or a crash between the two writes) or
//! damaged is rebuilt from the replica once.

use std::collections::HashMap;

use pluto_plugins_api::{PackId, StoreError};
use pluto_protocol::proof::{self, outboard, ProofError};

use super::obfuscation::Replica;
use super::outboard_id;

/// What is read at a time to rebuild an outboard.
const REBUILD_WINDOW: u64 = 1 << 20;

/// A held replica, as an audit reads it.
pub struct Audited {
    /// Its bytes.
    pub replica: Replica,
    /// Its root.
    pub root: [u8; 32],
    /// Its size.
    pub size: u64,
}

impl Audited {
    /// The proof for `offset..offset + len`, from the outboard; one that
    /// does not verify (the outboard missing or damaged) is made again
    /// from an outboard rebuilt from the replica.
    pub fn prove(&self, offset: u64, len: u64) -> Result<Vec<u8>, ProofError> {
        let unreadable = |e: StoreError| ProofError::Unreadable(e.to_string());
        let store = &self.replica.store;
        let id = outboard_id(&self.root);
        let layout = outboard::Layout::new(self.size);
        let stored = store.size(&id).map_err(unreadable)? == Some(layout.len())
            && store
                .get_range(&id, 0, outboard::HEADER as u64)
                .ok()
                .and_then(|h| outboard::header(&h))
                == Some((self.root, self.size));
        if stored {
            let mut src = Source::new(self, OutboardAt::Store(id));
            let p = outboard::prove(self.size, offset, len, &mut src)?;
            if proof::verify(&self.root, self.size, offset, len, &p).is_ok() {
                return Ok(p);
            }
            tracing::warn!(
                "the outboard of {} does not give a proof that holds; rebuilding it",
                PackId(self.root).short()
            );
        }
        let (root, ob) = self.rebuild().map_err(unreadable)?;
        if root == self.root {
            // Replaced, not added to: `put` keeps an object already there.
            store.delete(&id).map_err(unreadable)?;
            store.put(&id, &ob).map_err(unreadable)?;
        } else {
            tracing::warn!(
                "the replica {} no longer hashes to its root",
                PackId(self.root).short()
            );
        }
        outboard::prove(
            self.size,
            offset,
            len,
            &mut Source::new(self, OutboardAt::Memory(ob)),
        )
    }

    /// Hashes the whole replica again: its root and outboard as they are now.
    fn rebuild(&self) -> Result<([u8; 32], Vec<u8>), StoreError> {
        let mut b = outboard::Builder::new();
        let mut at = 0;
        while at < self.size {
            let n = (self.size - at).min(REBUILD_WINDOW);
            b.update(&self.replica.read(at, n)?);
            at += n;
        }
        Ok(b.finish())
    }
}

/// Where an audit finds the outboard.
enum OutboardAt {
    Store(PackId),
    Memory(Vec<u8>),
}

/// An audit's reads: stored hashes, and whole 16 KiB groups of the replica,
/// each read once.
struct Source<'a> {
    audited: &'a Audited,
    outboard: OutboardAt,
    layout: outboard::Layout,
    groups: HashMap<u64, Vec<u8>>,
}

impl<'a> Source<'a> {
    fn new(audited: &'a Audited, outboard: OutboardAt) -> Self {
        Self {
            audited,
            outboard,
            layout: outboard::Layout::new(audited.size),
            groups: HashMap::new(),
        }
    }

    fn group(&mut self, g: u64) -> Result<&[u8], ProofError> {
        let a = self.audited;
        match self.groups.entry(g) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let start = g * outboard::GROUP;
                let n = outboard::GROUP.min(a.size.saturating_sub(start));
                let bytes = a
                    .replica
                    .read(start, n)
                    .map_err(|e| ProofError::Unreadable(e.to_string()))?;
                Ok(e.insert(bytes))
            }
        }
    }
}

impl outboard::Source for Source<'_> {
    fn cv(&mut self, level: u32, index: u64) -> Result<[u8; 32], ProofError> {
        let at = self
            .layout
            .position(level, index)
            .ok_or_else(|| ProofError::Unreadable(format!("no hash {index} at level {level}")))?;
        let bytes = match &self.outboard {
            OutboardAt::Store(id) => self
                .audited
                .replica
                .store
                .get_range(id, at, proof::CV_LEN as u64)
                .map_err(|e| ProofError::Unreadable(e.to_string()))?,
            OutboardAt::Memory(ob) => usize::try_from(at)
                .ok()
                .and_then(|at| ob.get(at..at + proof::CV_LEN))
                .unwrap_or_default()
                .to_vec(),
        };
        bytes
            .try_into()
            .map_err(|_| ProofError::Unreadable("the outboard is short".into()))
    }

    fn bytes(&mut self, start: u64, n: u64) -> Result<Vec<u8>, ProofError> {
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        let end = start + n;
        let mut at = start;
        while at < end {
            let g = at / outboard::GROUP;
            let g_start = g * outboard::GROUP;
            let group = self.group(g)?;
            let from = usize::try_from(at - g_start).unwrap_or(usize::MAX);
            let to = usize::try_from((end - g_start).min(group.len() as u64)).unwrap_or(0);
            let part = group
                .get(from..to)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| ProofError::Unreadable("the replica is short".into()))?;
            out.extend_from_slice(part);
            at += part.len() as u64;
        }
        Ok(out)
    }
}
