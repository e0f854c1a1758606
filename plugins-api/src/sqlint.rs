//! Encodings every SQL store plugin needs: u64 values in databases that
//! store signed 64-bit integers, and address lists in one text column.

/// A size or time as i64: values above `i64::MAX` are clamped, never wrapped.
pub fn clamped(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A u64 that must keep its order across the whole range (manifest
/// versions): flipping the top bit maps u64 order onto i64 order.
pub fn ordered(v: u64) -> i64 {
    (v ^ (1 << 63)) as i64
}

/// The inverse of [`ordered`].
pub fn unordered(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

/// A node's addresses in one text column (addresses hold no newline: the
/// protocol's decoder and the coordinator refuse such).
pub fn join_addresses(addresses: &[String]) -> String {
    addresses.join("\n")
}

/// The inverse of [`join_addresses`].
pub fn split_addresses(column: &str) -> Vec<String> {
    column
        .split('\n')
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_keep_their_order() {
        let vs = [0, 1, 2, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX];
        for w in vs.windows(2) {
            assert!(ordered(w[0]) < ordered(w[1]));
        }
        for v in vs {
            assert_eq!(unordered(ordered(v)), v);
        }
        assert_eq!(clamped(u64::MAX), i64::MAX);
        assert_eq!(clamped(7), 7);
    }
}
