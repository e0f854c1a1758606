//! Snapshots: what was saved, when, from where, and its root tree.
//!
//! ```text
//! snapshot = version (u8 = 1) || time_ns (i64) || host (bytes) || user (bytes)
//!            || varint n || n paths (bytes) || varint n || n tags (bytes)
//!            || has_parent (u8) || [parent id (32)] || tree id (32)
//!            || varint n || n excludes (bytes) || summary
//! summary  = files_new, files_changed, files_unmodified, dirs, bytes_read,
//!            bytes_added_raw, bytes_added_packed, blobs_added, duration_ns (9 x u64)
//! ```
//!
//! The snapshot id is the keyed BLAKE3 of these bytes (its blob id).

use pluto_plugins_api::{BlobId, SnapshotId};

use crate::wire::{DecodeError, Reader, Writer};

const SNAPSHOT_VERSION: u8 = 1;

/// Counters of one backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Files not in the parent snapshot.
    pub files_new: u64,
    /// Files in the parent that changed.
    pub files_changed: u64,
    /// Files unchanged since the parent (not read again).
    pub files_unmodified: u64,
    /// Directories at or below the paths saved (a directory given counts;
    /// the parents leading to it do not). A restore of the whole snapshot
    /// counts the same.
    pub dirs: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// Plaintext bytes of new blobs.
    pub bytes_added_raw: u64,
    /// Bytes of new blobs as stored (compressed, sealed).
    pub bytes_added_packed: u64,
    /// New blobs.
    pub blobs_added: u64,
    /// Wall time of the backup.
    pub duration_ns: u64,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// When it was taken.
    pub time_ns: i64,
    /// Host name.
    pub host: String,
    /// User name.
    pub user: String,
    /// The absolute paths saved (raw bytes).
    pub paths: Vec<Vec<u8>>,
    /// Tags.
    pub tags: Vec<String>,
    /// The snapshot unchanged files were taken from.
    pub parent: Option<SnapshotId>,
    /// Root tree.
    pub tree: BlobId,
    /// Exclude patterns in force.
    pub excludes: Vec<String>,
    /// Counters.
    pub summary: Summary,
}

impl Snapshot {
    /// Encodes the snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(SNAPSHOT_VERSION);
        w.i64(self.time_ns);
        w.bytes(self.host.as_bytes());
        w.bytes(self.user.as_bytes());
        w.varint(self.paths.len() as u64);
        for p in &self.paths {
            w.bytes(p);
        }
        w.varint(self.tags.len() as u64);
        for t in &self.tags {
            w.bytes(t.as_bytes());
        }
        match &self.parent {
            Some(p) => {
                w.u8(1);
                w.id(&p.0);
            }
            None => w.u8(0),
        }
        w.id(&self.tree.0);
        w.varint(self.excludes.len() as u64);
        for e in &self.excludes {
            w.bytes(e.as_bytes());
        }
        let s = &self.summary;
        for v in [
            s.files_new,
            s.files_changed,
            s.files_unmodified,
            s.dirs,
            s.bytes_read,
            s.bytes_added_raw,
            s.bytes_added_packed,
            s.blobs_added,
            s.duration_ns,
        ] {
            w.u64(v);
        }
        w.finish()
    }

    /// Decodes a snapshot.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "snapshot");
        let v = r.u8()?;
        if v != SNAPSHOT_VERSION {
            return Err(r.error(format!("unknown snapshot version {v}")));
        }
        let time_ns = r.i64()?;
        let host = r.string()?;
        let user = r.string()?;
        let n = r.count(1)?;
        let mut paths = Vec::with_capacity(n);
        for _ in 0..n {
            paths.push(r.bytes()?.to_vec());
        }
        let n = r.count(1)?;
        let mut tags = Vec::with_capacity(n);
        for _ in 0..n {
            tags.push(r.string()?);
        }
        let parent = match r.u8()? {
            0 => None,
            1 => Some(SnapshotId(r.id()?)),
            b => return Err(r.error(format!("parent flag {b}"))),
        };
        let tree = BlobId(r.id()?);
        let n = r.count(1)?;
        let mut excludes = Vec::with_capacity(n);
        for _ in 0..n {
            excludes.push(r.string()?);
        }
        let summary = Summary {
            files_new: r.u64()?,
            files_changed: r.u64()?,
            files_unmodified: r.u64()?,
            dirs: r.u64()?,
            bytes_read: r.u64()?,
            bytes_added_raw: r.u64()?,
            bytes_added_packed: r.u64()?,
            blobs_added: r.u64()?,
            duration_ns: r.u64()?,
        };
        r.finish()?;
        Ok(Self {
            time_ns,
            host,
            user,
            paths,
            tags,
            parent,
            tree,
            excludes,
            summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(
            time_ns: i64,
            host in ".{0,10}",
            paths in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..10), 0..3),
            tags in proptest::collection::vec(".{0,5}", 0..3),
            parent: Option<[u8; 32]>,
            tree: [u8; 32],
            counters: [u64; 9],
        ) {
            let s = Snapshot {
                time_ns, host, user: "u".into(), paths, tags,
                parent: parent.map(SnapshotId), tree: BlobId(tree),
                excludes: vec!["*.o".into()],
                summary: Summary {
                    files_new: counters[0], files_changed: counters[1],
                    files_unmodified: counters[2], dirs: counters[3], bytes_read: counters[4],
                    bytes_added_raw: counters[5], bytes_added_packed: counters[6],
                    blobs_added: counters[7], duration_ns: counters[8],
                },
            };
            prop_assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn decoder_never_panics(data: Vec<u8>) {
            let _ = Snapshot::decode(&data);
        }
    }
}
