//! The coordinator channel's decoders: envelopes (signature checked after
//! decoding), messages, which must re-encode canonically, and placement
//! tickets (checked against a fixed key).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_plugins_api::NodeId;
use pluto_protocol::{Envelope, Message, Ticket};

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::verify(data);
    let _ = Ticket::verify(data, &NodeId([7; 32]));
    if let Ok(m) = Message::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
