//! Index segment decoding: never panics; what decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_engine::index::{decode_segment, encode_segment};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_segment(data) {
        assert_eq!(encode_segment(&p), data);
    }
});
