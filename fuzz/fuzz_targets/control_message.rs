//! The coordinator channel's decoders: envelopes (signature checked after
//! decoding) and messages, which must re-encode canonically.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_protocol::{Envelope, Message};

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::verify(data);
    if let Ok(m) = Message::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
