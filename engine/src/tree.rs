//! Trees: the encoded listing of one directory.
//!
//! ```text
//! tree = version (u8 = 1) || varint n || n nodes, sorted by name bytes, names unique
//! node = name (bytes) || type (u8: 1 file, 2 dir, 3 symlink) || mode (u32) || uid (u32)
//!        || gid (u32) || mtime_ns (i64) || ctime_ns (i64) || inode (u64) || device (u64)
//!        || size (u64) || payload
//! payload: file    = varint n || n chunk ids (32 bytes each)
//!          dir     = subtree id (32 bytes)
//!          symlink = target (bytes)
//! ```
//!
//! Names and symlink targets are raw bytes (non-UTF-8 names survive). A
//! decoded tree is validated: a name is never empty, `.` or `..`, and never
//! holds `/` or NUL, so a hostile tree cannot steer a restore outside its
//! target.

use pluto_plugins_api::BlobId;

use crate::wire::{DecodeError, Reader, Writer};

const TREE_VERSION: u8 = 1;

/// What a node is, with what only that type has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeContent {
    /// A regular file: its chunks in order.
    File {
        /// Chunk ids.
        chunks: Vec<BlobId>,
    },
    /// A directory: its tree.
    Dir {
        /// The subtree's blob id.
        tree: BlobId,
    },
    /// A symbolic link: its target, as stored.
    Symlink {
        /// Raw target bytes.
        target: Vec<u8>,
    },
}

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The file name (raw bytes).
    pub name: Vec<u8>,
    /// Permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub device: u64,
    /// Size in bytes (files), 0 otherwise.
    pub size: u64,
    /// Type and payload.
    pub content: NodeContent,
}

/// A directory listing, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// Entries, sorted by name bytes, names unique.
    pub nodes: Vec<Node>,
}

/// True when `name` is a single, harmless path component.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// Encodes the tree. Nodes must already be sorted.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(TREE_VERSION);
        w.varint(self.nodes.len() as u64);
        for n in &self.nodes {
            w.bytes(&n.name);
            w.u8(match n.content {
                NodeContent::File { .. } => 1,
                NodeContent::Dir { .. } => 2,
                NodeContent::Symlink { .. } => 3,
            });
            w.u32(n.mode);
            w.u32(n.uid);
            w.u32(n.gid);
            w.i64(n.mtime_ns);
            w.i64(n.ctime_ns);
            w.u64(n.inode);
            w.u64(n.device);
            w.u64(n.size);
            match &n.content {
                NodeContent::File { chunks } => {
                    w.varint(chunks.len() as u64);
                    for c in chunks {
                        w.id(&c.0);
                    }
                }
                NodeContent::Dir { tree } => w.id(&tree.0),
                NodeContent::Symlink { target } => w.bytes(target),
            }
        }
        w.finish()
    }

    /// Decodes and validates a tree.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "tree");
        let v = r.u8()?;
        if v != TREE_VERSION {
            return Err(r.error(format!("unknown tree version {v}")));
        }
        let count = r.count(1 + 1 + 4 * 3 + 8 * 5 + 1)?;
        let mut nodes: Vec<Node> = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.bytes()?.to_vec();
            if !valid_name(&name) {
                return Err(r.error(format!(
                    "refusing entry name {:?}",
                    String::from_utf8_lossy(&name)
                )));
            }
            if let Some(prev) = nodes.last() {
                if prev.name >= name {
                    return Err(r.error("entries not sorted or not unique"));
                }
            }
            let ty = r.u8()?;
            let mode = r.u32()?;
            let uid = r.u32()?;
            let gid = r.u32()?;
            let mtime_ns = r.i64()?;
            let ctime_ns = r.i64()?;
            let inode = r.u64()?;
            let device = r.u64()?;
            let size = r.u64()?;
            let content = match ty {
                1 => {
                    let n = r.count(32)?;
                    let mut chunks = Vec::with_capacity(n);
                    for _ in 0..n {
                        chunks.push(BlobId(r.id()?));
                    }
                    NodeContent::File { chunks }
                }
                2 => NodeContent::Dir {
                    tree: BlobId(r.id()?),
                },
                3 => NodeContent::Symlink {
                    target: r.bytes()?.to_vec(),
                },
                t => return Err(r.error(format!("unknown node type {t}"))),
            };
            nodes.push(Node {
                name,
                mode,
                uid,
                gid,
                mtime_ns,
                ctime_ns,
                inode,
                device,
                size,
                content,
            });
        }
        r.finish()?;
        Ok(Self { nodes })
    }

    /// The node with this name.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_node() -> impl Strategy<Value = Node> {
        let content = prop_oneof![
            proptest::collection::vec(any::<[u8; 32]>(), 0..4).prop_map(|c| NodeContent::File {
                chunks: c.into_iter().map(BlobId).collect()
            }),
            any::<[u8; 32]>().prop_map(|t| NodeContent::Dir { tree: BlobId(t) }),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|target| NodeContent::Symlink { target }),
        ];
        (
            proptest::collection::vec(1u8..=255, 1..20).prop_filter("valid", |n| valid_name(n)),
            any::<(u32, u32, u32, i64, i64, u64, u64, u64)>(),
            content,
        )
            .prop_map(
                |(name, (mode, uid, gid, mtime_ns, ctime_ns, inode, device, size), content)| Node {
                    name,
                    mode,
                    uid,
                    gid,
                    mtime_ns,
                    ctime_ns,
                    inode,
                    device,
                    size,
                    content,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(mut nodes in proptest::collection::vec(arb_node(), 0..8)) {
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            nodes.dedup_by(|a, b| a.name == b.name);
            let t = Tree { nodes };
            prop_assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
        }

        #[test]
        fn decoder_never_panics(data: Vec<u8>) {
            let _ = Tree::decode(&data);
        }
    }

    fn one(name: &[u8]) -> Tree {
        Tree {
            nodes: vec![Node {
                name: name.to_vec(),
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
                ctime_ns: 0,
                inode: 0,
                device: 0,
                size: 0,
                content: NodeContent::File { chunks: vec![] },
            }],
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            &b".."[..],
            b".",
            b"",
            b"a/b",
            b"../../etc",
            b"x\0y",
            b"/abs",
        ] {
            assert!(Tree::decode(&one(bad).encode()).is_err(), "{bad:?}");
        }
        assert!(Tree::decode(&one(b"\xff\xfe non-utf8").encode()).is_ok());
        let mut dup = one(b"a");
        dup.nodes.push(dup.nodes[0].clone());
        assert!(Tree::decode(&dup.encode()).is_err(), "duplicate names");
    }
}
