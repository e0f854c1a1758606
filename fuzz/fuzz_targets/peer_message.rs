//! What two nodes say over a link (`PeerMsg`, read by storers from owners
//! and by owners from storers): decoding never panics, and what decodes
//! re-encodes to the same bytes (the format has one encoding per message).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_engine::exchange::PeerMsg;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = PeerMsg::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
