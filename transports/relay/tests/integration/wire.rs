//! The payload codec never panics on bytes from the network, and what it
//! encodes it decodes.

use proptest::prelude::*;

use pluto_transport_relay::wire::{self, Hello, Plain, SegmentHeader, Welcome};

proptest! {
    #[test]
    fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = wire::decode(&bytes);
        let _ = Plain::decode(&bytes);
        let _ = Hello::decode(&bytes);
        let _ = Welcome::decode(&bytes);
    }

    #[test]
    fn bytes_behind_a_valid_header_decode_without_panicking(
        kind in 0u8..5,
        sid in any::<[u8; 16]>(),
        rest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut p = vec![wire::VERSION, kind];
        p.extend_from_slice(&sid);
        p.extend_from_slice(&rest);
        if let Ok(wire::Payload::Sealed(s, _)) = wire::decode(&p) {
            prop_assert_eq!(s, sid);
        }
        let _ = Plain::decode(&rest);
    }

    #[test]
    fn plaintext_headers_round_trip(
        flags in 0u8..4,
        ack in any::<u64>(),
        max_data in any::<u64>(),
        sacks in proptest::collection::vec((0u64..1 << 40, 1u64..1000), 0..=wire::MAX_SACKS),
        segment in proptest::option::of((any::<u64>(), any::<u64>(), 0u8..2)),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let plain = Plain {
            flags,
            ack,
            max_data,
            sacks: sacks.into_iter().map(|(s, n)| (s, s + n)).collect(),
            segment: segment.map(|(seq, offset, flags)| SegmentHeader { seq, offset, flags }),
        };
        let mut enc = Vec::new();
        plain.encode_into(&mut enc);
        prop_assert_eq!(enc.len(), plain.encoded_len());
        if plain.segment.is_some() {
            enc.extend_from_slice(&data);
        }
        let (back, range) = Plain::decode(&enc).unwrap();
        prop_assert_eq!(&back, &plain);
        if plain.segment.is_some() {
            prop_assert_eq!(&enc[range], &data[..]);
        } else {
            prop_assert!(range.is_empty());
        }
    }

    #[test]
    fn handshake_messages_round_trip(
        sid in any::<[u8; 16]>(),
        a in any::<[u8; 32]>(),
        b in any::<[u8; 32]>(),
        e in any::<[u8; 32]>(),
        s in proptest::collection::vec(any::<u8>(), 64),
    ) {
        let signature: [u8; 64] = s.try_into().unwrap();
        let h = Hello { sid, initiator: a, responder: b, ephemeral: e, signature };
        prop_assert_eq!(wire::decode(&h.encode()).unwrap(), wire::Payload::Hello(h.clone()));
        let w = Welcome { sid, ephemeral: e, signature };
        prop_assert_eq!(wire::decode(&w.encode()).unwrap(), wire::Payload::Welcome(w));
    }
}
