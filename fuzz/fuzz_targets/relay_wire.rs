//! The relay transport's payloads, as they arrive from the coordinator
//! (which anybody can make carry anything), and the plaintext of a sealed
//! packet (which only the authenticated peer chooses): every decoder never
//! panics, agrees with the generic `decode`, and what decodes re-encodes to
//! the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_transport_relay::wire::{self, Hello, Kind, Payload, Plain, Welcome};

fuzz_target!(|data: &[u8]| {
    let header = wire::header(data);
    let any = wire::decode(data);
    if any.is_ok() {
        assert!(header.is_ok());
    }
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(h.encode(), data);
        assert_eq!(any, Ok(Payload::Hello(h)));
    }
    if let Ok(w) = Welcome::decode(data) {
        assert_eq!(w.encode(), data);
        assert_eq!(any, Ok(Payload::Welcome(w)));
    }
    if let Ok((sid, pn)) = wire::sealed_header(data) {
        let mut out = Vec::new();
        wire::put_sealed_header(&mut out, &sid, pn);
        assert_eq!(out, data[..wire::SEALED_HEADER_LEN]);
        assert_eq!(any, Ok(Payload::Sealed(sid, pn)));
    }
    if let (Ok(h), Ok(p)) = (&header, &any) {
        let kind = match p {
            Payload::Hello(_) => Kind::Hello,
            Payload::Welcome(_) => Kind::Welcome,
            Payload::Sealed(..) => Kind::Sealed,
        };
        assert_eq!(h.kind, kind);
    }
    // The same bytes as a decrypted plaintext.
    if let Ok((plain, data_at)) = Plain::decode(data) {
        assert!(plain.sacks.len() <= wire::MAX_SACKS);
        assert_eq!(plain.encoded_len(), data_at.start);
        assert_eq!(data_at.end, data.len());
        let mut out = Vec::new();
        plain.encode_into(&mut out);
        out.extend_from_slice(&data[data_at]);
        assert_eq!(out, data);
    }
});
