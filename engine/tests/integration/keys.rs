use pluto_engine::keys::{KeyError, MasterKey};

#[derive(serde::Deserialize)]
struct Vectors {
    passphrase: String,
    english: Vec<(String, String, String)>,
}

/// The BIP39 reference vectors (English): entropy to words to seed.
#[test]
fn official_bip39_english_vectors() {
    let v: Vectors = serde_json::from_str(include_str!("../data/bip39-english.json")).unwrap();
    assert_eq!(v.english.len(), 24);
    for (entropy, words, seed) in &v.english {
        let e = hex::decode(entropy).unwrap();
        let m = bip39::Mnemonic::from_entropy(&e).unwrap();
        assert_eq!(&m.to_string(), words);
        assert_eq!(hex::encode(m.to_seed(v.passphrase.as_str())), *seed);
        if e.len() == 32 {
            // pluto's own path: 24 words in, the same entropy out, and back.
            let mk = MasterKey::from_mnemonic(words).unwrap();
            assert_eq!(&mk.mnemonic()[..], words);
        } else {
            // Shorter phrases are valid BIP39 but not pluto identities.
            assert!(matches!(
                MasterKey::from_mnemonic(words),
                Err(KeyError::WordCount(_))
            ));
        }
    }
}

#[test]
fn invalid_phrases_say_what_is_wrong() {
    let good = "abandon ".repeat(23) + "art";
    let cases = [
        ("abandon ".repeat(23) + "abandon", "checksum"),
        ("abandon ".repeat(23) + "xyzzy", "word 24"),
        ("abandon ".repeat(11) + "about", "12 words"),
        (String::new(), "0 words"),
    ];
    for (phrase, want) in cases {
        let err = MasterKey::from_mnemonic(&phrase).unwrap_err().to_string();
        assert!(err.contains(want), "{phrase:?}: {err}");
    }
    assert!(MasterKey::from_mnemonic(&format!("  {}\n", good.to_uppercase())).is_ok());
}
