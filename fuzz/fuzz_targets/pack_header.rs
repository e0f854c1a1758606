//! The pack trailer and header decoders, on arbitrary bytes (the header's
//! plaintext is what a forged-but-authenticated header could hold).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pluto_engine::pack;

fuzz_target!(|data: &[u8]| {
    let _ = pack::header_len(data, data.len() as u64);
    if let Some((&len, plain)) = data.split_first() {
        let _ = pack::decode_header(plain, u64::from(len) * 1000);
    }
});
