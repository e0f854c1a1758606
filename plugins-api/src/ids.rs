//! Identifiers. All are 32 bytes, printed as lowercase hex.

use std::fmt;
use std::str::FromStr;

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a valid id (expected 64 hex digits): {0:?}")]
pub struct IdParseError(pub String);

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first 8 hex digits, as shown to people.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
            /// From a byte slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError(s.to_string()))?;
                Ok(Self(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }
    };
}

id32!(
    /// Keyed BLAKE3 of a blob's plaintext. A data blob's id is its chunk id;
    /// the key is the owner's, so nobody else can test for known content.
    BlobId
);
id32!(
    /// Plain BLAKE3 of a pack's bytes, so whoever holds a pack can verify it.
    PackId
);
id32!(
    /// The blob id of an encoded snapshot.
    SnapshotId
);
id32!(
    /// A node's Ed25519 public key.
    NodeId
);

impl PackId {
    /// The id of a pack with these bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

/// What a blob holds. Bound into each blob's authenticated data, so a blob of
/// one kind can never be passed off as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of file content.
    Data = 1,
    /// A directory listing.
    Tree = 2,
    /// A snapshot.
    Snapshot = 3,
    /// An index segment: where the blobs of some packs are.
    Index = 4,
}

impl BlobKind {
    /// From its wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Tree,
            3 => Self::Snapshot,
            4 => Self::Index,
            _ => return None,
        })
    }
    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Tree => "tree",
            Self::Snapshot => "snapshot",
            Self::Index => "index",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = PackId::of(b"hello");
        let parsed: PackId = id.to_hex().parse().unwrap();
        assert_eq!(id, parsed);
        assert!("zz".parse::<PackId>().is_err());
        assert!(BlobKind::from_u8(0).is_none());
        for k in [
            BlobKind::Data,
            BlobKind::Tree,
            BlobKind::Snapshot,
            BlobKind::Index,
        ] {
            assert_eq!(BlobKind::from_u8(k as u8), Some(k));
        }
    }
}
