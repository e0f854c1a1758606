//! Manifests, which storers take from owners and owners take back from
//! storers: checking one (`verify`) and opening one never panic; a
//! placement that decodes re-encodes to one that decodes the same, and
//! survives sealing and opening.
#![no_main]
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use pluto_engine::crypto::SealKey;
use pluto_engine::manifest::{self, Placement};
use pluto_plugins_api::NodeId;

fuzz_target!(|data: &[u8]| {
    let identity = SigningKey::from_bytes(&[7; 32]);
    let owner = NodeId(identity.verifying_key().to_bytes());
    let key = SealKey::new(&[9; 32]);
    let _ = manifest::verify(&owner, data);
    // A blob that names this owner, whatever its signature.
    if data.len() >= 40 {
        let mut named = data.to_vec();
        named[..8].copy_from_slice(b"PLUTOMF1");
        named[8..40].copy_from_slice(&owner.0);
        assert_eq!(manifest::verify(&owner, &named), None);
        let _ = Placement::open(&owner, &key, &named);
    }
    if let Ok(p) = Placement::decode(data) {
        let again = Placement::decode(&p.encode()).expect("an encoded placement decodes");
        assert_eq!(again, p);
        let blob = p.seal(&identity, &key);
        assert_eq!(manifest::verify(&owner, &blob), Some(p.version));
        assert_eq!(Placement::open(&owner, &key, &blob), Ok(p));
    }
});
