//! Numbers for people, the same in every pluto binary: sizes and speeds in
//! IEC units (KiB, MiB, ...), fractions as percent. Machine output
//! (`--json`) carries the raw numbers instead.

/// Bytes as B, KiB, MiB, GiB, TiB, PiB (two decimals above bytes).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A speed in bytes per second, as `bytes/s`; "-" for none measured (0).
pub fn rate(bytes_per_second: u64) -> String {
    if bytes_per_second == 0 {
        "-".to_string()
    } else {
        format!("{}/s", bytes(bytes_per_second))
    }
}

/// A fraction (0..=1) as a percent with one decimal; "new" when there is
/// no record yet (None).
pub fn percent(fraction: Option<f64>) -> String {
    match fraction {
        Some(f) if f.is_finite() => format!("{:.1}%", (f * 100.0).clamp(0.0, 100.0)),
        Some(_) => "-".to_string(),
        None => "new".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_speeds_and_percents() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.00 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 + 512 * 1024), "5.50 MiB");
        assert_eq!(bytes(u64::MAX), "16384.00 PiB");
        assert_eq!(rate(0), "-");
        assert_eq!(rate(2 * 1024 * 1024), "2.00 MiB/s");
        assert_eq!(percent(Some(0.0924)), "9.2%");
        assert_eq!(percent(Some(1.0)), "100.0%");
        assert_eq!(percent(Some(1.5)), "100.0%");
        assert_eq!(percent(Some(f64::NAN)), "-");
        assert_eq!(percent(None), "new");
    }
}
