//! Keys: 32 bytes of entropy, shown once as 24 BIP39 English words, from
//! which every key is derived.
//!
//! Derivation, for each [`KeyPurpose`]:
//!
//! ```text
//! seed = BLAKE3.derive_key(context = "pluto v1 key " + purpose, material = entropy)
//! key  = first bytes drawn from ChaCha20Rng::from_seed(seed)
//! ```
//!
//! The context string names pluto, the format version and the purpose, so
//! keys for different purposes are independent, and a future format can
//! change them without colliding. The entropy itself never leaves
//! [`MasterKey`]; nonces never come from it (see [`crate::crypto`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use bip39::{Language, Mnemonic};
use ed25519_dalek::SigningKey;
use pluto_plugins_api::NodeId;
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use zeroize::{Zeroize, Zeroizing};

/// Why a mnemonic or a secrets file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not 24 words.
    #[error("the recovery phrase has {0} words; pluto's has exactly 24")]
    WordCount(usize),
    /// A word outside the BIP39 English list.
    #[error("word {position} ({word:?}) of the recovery phrase is not a BIP39 English word")]
    UnknownWord {
        /// 1-based position.
        position: usize,
        /// The word.
        word: String,
    },
    /// The checksum does not match: a word is wrong or out of order.
    #[error("the recovery phrase's checksum does not match: a word is mistyped or out of order")]
    Checksum,
    /// Any other refusal of the BIP39 decoder.
    #[error("the recovery phrase is not valid: {0}")]
    Invalid(String),
    /// The secrets file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The secrets file is damaged.
    #[error("the secrets file {0} is damaged")]
    Damaged(String),
    /// The secrets file can be read by others.
    #[error("the secrets file {0} is readable by other users; run `chmod 600` on it")]
    Permissions(String),
}

/// What a derived key is for. Each names its own context string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    /// The node's Ed25519 identity.
    NodeIdentity,
    /// AES-256-GCM key for data blobs.
    DataEncryption,
    /// BLAKE3 key for blob ids.
    ChunkIdMac,
    /// AES-256-GCM key for trees, snapshots, index segments and pack headers.
    MetadataEncryption,
    /// Root of the per-replica keys.
    ReplicaKeys,
    /// Key a storer obfuscates what it holds for others with.
    StorageObfuscation,
    /// X25519 secret that messages private to this node are sealed to.
    NodeExchange,
}

impl KeyPurpose {
    /// The BLAKE3 derive_key context.
    pub fn context(self) -> &'static str {
        match self {
            Self::NodeIdentity => "pluto v1 key node-identity ed25519",
            Self::DataEncryption => "pluto v1 key data-encryption aes-256-gcm",
            Self::ChunkIdMac => "pluto v1 key chunk-id blake3-keyed",
            Self::MetadataEncryption => "pluto v1 key metadata-encryption aes-256-gcm",
            Self::ReplicaKeys => "pluto v1 key replica-keys",
            Self::StorageObfuscation => "pluto v1 key storage-obfuscation",
            Self::NodeExchange => "pluto v1 key node-exchange x25519",
        }
    }
}

/// The words of a recovery phrase, lowercased, without the numbers and
/// punctuation written around them, in order (see
/// [`MasterKey::from_mnemonic`]).
fn phrase_words(phrase: &str) -> Vec<String> {
    let numbered = |t: &str| -> (Option<usize>, String) {
        let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let number = t[..digits].parse().ok();
        let word = t[digits..]
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        (number, word)
    };
    // (number written before the word, word)
    let mut words: Vec<(Option<usize>, String)> = Vec::new();
    let mut pending = None;
    for tok in phrase.split_whitespace() {
        let (number, word) = numbered(tok);
        if word.is_empty() {
            // A number alone ("1." "01" "1)") belongs to the next word;
            // punctuation alone ("-") to none.
            if number.is_some() {
                pending = number;
            }
            continue;
        }
        words.push((number.or(pending.take()), word));
    }
    let mut numbers: Vec<usize> = words.iter().filter_map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    let numbered_throughout =
        numbers.len() == words.len() && numbers.iter().copied().eq(1..=words.len());
    if numbered_throughout {
        words.sort_by_key(|(n, _)| *n);
    }
    words.into_iter().map(|(_, w)| w).collect()
}

/// The 32 bytes everything is derived from.
pub struct MasterKey {
    entropy: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Fresh entropy from the operating system.
    pub fn generate() -> Self {
        let mut e = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut e[..]);
        Self { entropy: e }
    }

    /// From raw entropy (tests and recovery).
    pub fn from_entropy(entropy: [u8; 32]) -> Self {
        Self {
            entropy: Zeroizing::new(entropy),
        }
    }

    /// From the 24 words, as `init` shows them or as they were written
    /// down: case, whitespace (spaces, tabs, line breaks) and numbering
    /// around the words ("1. word", "1) word", "01 word", "1.word") are
    /// ignored. When every word carries a number and they number 1 to 24
    /// once each, the words are taken in that order, so a phrase copied
    /// column by column still reads right.
    pub fn from_mnemonic(phrase: &str) -> Result<Self, KeyError> {
        let words = phrase_words(phrase);
        if words.len() != 24 {
            return Err(KeyError::WordCount(words.len()));
        }
        let list = Language::English.word_list();
        for (i, w) in words.iter().enumerate() {
            if list.binary_search(&w.as_str()).is_err() {
                return Err(KeyError::UnknownWord {
                    position: i + 1,
                    word: w.clone(),
                });
            }
        }
        let m = Mnemonic::parse_in_normalized(Language::English, &words.join(" ")).map_err(
            |e| match e {
                bip39::Error::InvalidChecksum => KeyError::Checksum,
                other => KeyError::Invalid(other.to_string()),
            },
        )?;
        let mut raw = m.to_entropy();
        let entropy: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WordCount(words.len()))?;
        raw.zeroize();
        Ok(Self::from_entropy(entropy))
    }

    /// The 24 words.
    pub fn mnemonic(&self) -> Zeroizing<String> {
        // 32 bytes is always a valid BIP39 entropy length.
        let m = Mnemonic::from_entropy_in(Language::English, &self.entropy[..])
            .map(|m| m.to_string())
            .unwrap_or_default();
        Zeroizing::new(m)
    }

    /// The seed of a purpose's generator.
    fn rng(&self, purpose: KeyPurpose) -> ChaCha20Rng {
        ChaCha20Rng::from_seed(blake3::derive_key(purpose.context(), &self.entropy[..]))
    }

    /// 32 key bytes for a purpose.
    pub fn derive(&self, purpose: KeyPurpose) -> Zeroizing<[u8; 32]> {
        let mut k = Zeroizing::new([0u8; 32]);
        self.rng(purpose).fill_bytes(&mut k[..]);
        k
    }

    /// Every key the node uses.
    pub fn keys(&self) -> Keys {
        Keys {
            identity: SigningKey::generate(&mut self.rng(KeyPurpose::NodeIdentity)),
            data: self.derive(KeyPurpose::DataEncryption),
            metadata: self.derive(KeyPurpose::MetadataEncryption),
            chunk_id: self.derive(KeyPurpose::ChunkIdMac),
            replica: self.derive(KeyPurpose::ReplicaKeys),
            obfuscation: self.derive(KeyPurpose::StorageObfuscation),
            exchange: self.derive(KeyPurpose::NodeExchange),
        }
    }

    /// Writes the secrets file, readable by its owner only. Refuses to
    /// overwrite an existing one.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let io = |context: &str| {
            let context = format!("{context} {}", path.display());
            move |source| KeyError::Io { context, source }
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io("creating"))?;
        let body = Zeroizing::new(format!(
            "# pluto secrets: whoever has this file has your backups\nentropy {}\n",
            hex::encode(&self.entropy[..])
        ));
        f.write_all(body.as_bytes()).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))
    }

    /// Reads the secrets file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |context: &str| {
            let context = format!("{context} {}", path.display());
            move |source| KeyError::Io { context, source }
        };
        let meta = fs::metadata(path).map_err(io("reading"))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::Permissions(path.display().to_string()));
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io("reading"))?);
        let damaged = || KeyError::Damaged(path.display().to_string());
        let hex_str = text
            .lines()
            .find_map(|l| l.strip_prefix("entropy "))
            .ok_or_else(damaged)?;
        let mut e = [0u8; 32];
        hex::decode_to_slice(hex_str.trim(), &mut e).map_err(|_| damaged())?;
        Ok(Self::from_entropy(e))
    }
}

/// Every key a node uses, derived from its [`MasterKey`].
pub struct Keys {
    /// Ed25519 identity.
    pub identity: SigningKey,
    /// Data blob encryption.
    pub data: Zeroizing<[u8; 32]>,
    /// Metadata blob and pack header encryption.
    pub metadata: Zeroizing<[u8; 32]>,
    /// Blob id MAC.
    pub chunk_id: Zeroizing<[u8; 32]>,
    /// Root of per-replica keys.
    pub replica: Zeroizing<[u8; 32]>,
    /// Storage obfuscation.
    pub obfuscation: Zeroizing<[u8; 32]>,
    /// X25519 secret for messages private to this node.
    pub exchange: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(node {})", self.node_id().short())
    }
}

impl Keys {
    /// The node's public identity.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    /// The id of a blob with this plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> pluto_plugins_api::BlobId {
        pluto_plugins_api::BlobId(*blake3::keyed_hash(&self.chunk_id, plaintext).as_bytes())
    }
    /// The password of this node's account on brokers that keep accounts
    /// (Mosquitto's dynamic security plugin): derived from the identity,
    /// so a node restored from its words logs in with the same one.
    pub fn broker_password(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(
            "pluto v1 broker password",
            &self.identity.to_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins every derived key for one fixed entropy. If this test changes,
    /// existing backups can no longer be read: bump the format version instead.
    #[test]
    fn golden_derivation() {
        let mk = MasterKey::from_entropy([7u8; 32]);
        let k = mk.keys();
        let got = [
            hex::encode(k.identity.to_bytes()),
            hex::encode(k.node_id().0),
            hex::encode(*k.data),
            hex::encode(*k.metadata),
            hex::encode(*k.chunk_id),
            hex::encode(*k.replica),
            hex::encode(*k.obfuscation),
            hex::encode(*k.exchange),
        ];
        let want = GOLDEN;
        assert_eq!(got, want, "derived keys changed: {got:#?}");
        assert_eq!(
            &mk.mnemonic()[..],
            "alpha deal scrub asthma idea logic bright thought alpha deal scrub asthma idea logic \
             bright thought alpha deal scrub asthma idea logic bright truly",
        );
    }

    const GOLDEN: [&str; 8] = [
        // identity secret
        "542f1fa0808f628bcb5d221a4727e60397b331cf2152451ee02ee3a58fa57a60",
        // node id
        "8b464f4d366c0980e6d36cbd540140a134db5c2769794cbfdc75e8b267a4f324",
        // data
        "fd200b57bac5db52a7000c353ec28469e1e0a8d066e05e1e642f7902caf7cc4b",
        // metadata
        "9216d59321eeedc03f04b28dff7cf5814bc1d4550027b8151ab09f69a669514a",
        // chunk id
        "8ac5fa8ab997527a50cb237598dfb3b48f8b350e1e77b00060c38acf64080330",
        // replica
        "8b70850c8581861bcdc6b3b38bedc0e2669a2b8975cd4d3a10c737a32f6b3dfc",
        // obfuscation
        "451dc793cadb0fbbbc63824278a32c25b4bf7adb0bb26faec87e7514cbe70087",
        // exchange
        "e0cf3ff51983e720b5a15201f2581fcfbb5a1235d5c85ad96c2b192d6a83c051",
    ];

    #[test]
    fn purposes_are_independent() {
        let mk = MasterKey::from_entropy([1u8; 32]);
        let k = mk.keys();
        let all = [
            &k.data,
            &k.metadata,
            &k.chunk_id,
            &k.replica,
            &k.obfuscation,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a[..], b[..]);
            }
        }
    }

    #[test]
    fn mnemonic_round_trip_and_refusals() {
        let mk = MasterKey::generate();
        let words = mk.mnemonic();
        let back = MasterKey::from_mnemonic(&words.to_uppercase()).unwrap();
        assert_eq!(back.entropy[..], mk.entropy[..]);

        let mut list: Vec<&str> = words.split(' ').collect();
        assert!(matches!(
            MasterKey::from_mnemonic(&list[..12].join(" ")),
            Err(KeyError::WordCount(12))
        ));
        let saved = list[3];
        list[3] = "notaword";
        assert!(matches!(
            MasterKey::from_mnemonic(&list.join(" ")),
            Err(KeyError::UnknownWord { position: 4, .. })
        ));
        list[3] = saved;
        list.swap(0, 1);
        if list[0] != list[1] {
            // Swapping two different words breaks the checksum (or, rarely, not).
            match MasterKey::from_mnemonic(&list.join(" ")) {
                Err(KeyError::Checksum) | Ok(_) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        // A fixed phrase whose last word is wrong.
        let bad = "abandon ".repeat(23) + "abandon";
        assert!(matches!(
            MasterKey::from_mnemonic(&bad),
            Err(KeyError::Checksum)
        ));
        let good = "abandon ".repeat(23) + "art";
        assert!(MasterKey::from_mnemonic(&good).is_ok());
    }

    #[test]
    fn numbering_and_whitespace_around_the_words_are_ignored() {
        let mk = MasterKey::generate();
        let words = mk.mnemonic();
        let list: Vec<&str> = words.split(' ').collect();
        let numbered = |f: &dyn Fn(usize, &str) -> String, sep: &str| {
            list.iter()
                .enumerate()
                .map(|(i, w)| f(i + 1, w))
                .collect::<Vec<_>>()
                .join(sep)
        };
        let forms = [
            // As init shows it: six to a line, "{:>2}. {:<9}".
            list.chunks(6)
                .enumerate()
                .map(|(r, line)| {
                    let cells: Vec<String> = line
                        .iter()
                        .enumerate()
                        .map(|(j, w)| format!("{:>2}. {:<9}", r * 6 + j + 1, w))
                        .collect();
                    format!("  {}\n", cells.join(" "))
                })
                .collect::<String>(),
            numbered(&|i, w| format!("{i}) {w}"), "\n"),
            numbered(&|i, w| format!("{i:02} {w}"), "\t"),
            numbered(&|i, w| format!("{i}.{w}"), "  "),
            numbered(&|i, w| format!("{i}: {}", w.to_uppercase()), "\r\n"),
            format!("\n\t{}\n\n", list.join(" \n ")),
        ];
        for form in &forms {
            let back = MasterKey::from_mnemonic(form).unwrap_or_else(|e| panic!("{e}: {form}"));
            assert_eq!(back.entropy[..], mk.entropy[..], "{form}");
        }
        // Numbered throughout: the numbers give the order (copied by columns).
        let mut by_columns: Vec<String> = (0..12)
            .flat_map(|r| [r, r + 12])
            .map(|i| format!("{}. {}", i + 1, list[i]))
            .collect();
        let back = MasterKey::from_mnemonic(&by_columns.join("  ")).unwrap();
        assert_eq!(back.entropy[..], mk.entropy[..]);
        // Numbered, but a word is wrong: still refused.
        by_columns[5] = "6. notaword".into();
        assert!(matches!(
            MasterKey::from_mnemonic(&by_columns.join(" ")),
            Err(KeyError::UnknownWord { .. })
        ));
        let bad = (1..=24)
            .map(|i| format!("{i}. abandon"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(matches!(
            MasterKey::from_mnemonic(&bad),
            Err(KeyError::Checksum)
        ));
        assert!(matches!(
            MasterKey::from_mnemonic(&numbered(&|i, w| format!("{i}. {w}"), " ")[..200]),
            Err(KeyError::WordCount(_)) | Err(KeyError::UnknownWord { .. })
        ));
    }

    #[test]
    fn secrets_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets");
        let mk = MasterKey::generate();
        mk.save(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(mk.save(&p).is_err(), "never overwrites");
        let back = MasterKey::load(&p).unwrap();
        assert_eq!(back.entropy[..], mk.entropy[..]);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(MasterKey::load(&p), Err(KeyError::Permissions(_))));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "entropy zz\n").unwrap();
        assert!(matches!(MasterKey::load(&p), Err(KeyError::Damaged(_))));
    }
}
