//! `pluto-coordinator --config FILE` with a setting that breaks a rule: the
//! real binary exits non-zero at once, with one line on stderr that names
//! the setting (and never a panic from a task later).

use std::process::{Command, Output};

/// Runs the coordinator on `toml` (and nothing else to do but start).
fn run_with(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, toml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_pluto-coordinator"))
        .arg("--home")
        .arg(dir.path().join("home"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("PLUTO_LOG", "info")
        .output()
        .unwrap()
}

/// Each: the settings written, and the setting the error must name.
const INVALID: &[(&str, &str)] = &[
    // Durations: above 0, at most ten years.
    ("window_ms = 0", "window_ms"),
    ("challenge_ttl_ms = 0", "challenge_ttl_ms"),
    ("heartbeat_ms = 0", "heartbeat_ms"),
    ("reservation_ttl_ms = 0", "reservation_ttl_ms"),
    ("uptime_window_ms = 0", "uptime_window_ms"),
    (
        "presence_keep_ms = 18446744073709551615",
        "presence_keep_ms",
    ),
    ("sweep_ms = 0", "sweep_ms"),
    ("proof_deadline_ms = 0", "proof_deadline_ms"),
    ("audit_every_ms = 0", "audit_every_ms"),
    ("storer_audit_every_ms = 0", "storer_audit_every_ms"),
    ("audit_tick_ms = 0", "audit_tick_ms"),
    ("uptime_sample_ms = 0", "uptime_sample_ms"),
    ("speed_half_life_ms = 0", "speed_half_life_ms"),
    ("offline_grace_ms = 400000000000", "offline_grace_ms"),
    ("standing_every_ms = 0", "standing_every_ms"),
    // Counts and rates: above 0; sizes that fit what they hold.
    ("replay_capacity = 0", "replay_capacity"),
    ("max_challenges = 0", "max_challenges"),
    ("max_copies = 0", "max_copies"),
    ("relay_bytes_per_s = 0", "relay_bytes_per_s"),
    ("relay_burst_bytes = 1000", "relay_burst_bytes"),
    ("answer_cache_bytes = 1000", "answer_cache_bytes"),
    ("audit_bytes = 0", "audit_bytes"),
    ("audit_bytes = 1048576", "audit_bytes"),
    ("max_audits = 0", "max_audits"),
    ("owner_audits_per_s = 0", "owner_audits_per_s"),
    ("owner_audit_burst = 0", "owner_audit_burst"),
    ("max_in_flight = 0", "max_in_flight"),
    ("vetting_bytes = 0", "vetting_bytes"),
    // Scores, forgetting factors, weights.
    ("audit_min = 1.5", "audit_min"),
    ("timeout_min = -0.5", "timeout_min"),
    ("uptime_min = nan", "uptime_min"),
    ("audit_lambda = 0.0", "audit_lambda"),
    ("timeout_lambda = 2.0", "timeout_lambda"),
    ("uptime_lambda = -1.0", "uptime_lambda"),
    ("audit_weight = 0.0", "audit_weight"),
    ("audit_failure_weight = inf", "audit_failure_weight"),
    // Against each other: the tick that panicked the audit task once.
    (
        "audit_tick_ms = 10000\nstorer_audit_every_ms = 5000",
        "audit_tick_ms",
    ),
    ("heartbeat_ms = 1000\nsweep_ms = 5000", "sweep_ms"),
    (
        "proof_deadline_ms = 60000\naudit_every_ms = 30000",
        "proof_deadline_ms",
    ),
    ("uptime_sample_ms = 604800001", "uptime_sample_ms"),
    ("presence_keep_ms = 1000", "presence_keep_ms"),
    // Not numbers at all, or no such setting: the line names it.
    ("audit_tick_ms = -5", "audit_tick_ms"),
    ("audit_tick_ms = \"fast\"", "audit_tick_ms"),
    ("audit_tick = 5000", "audit_tick"),
];

#[test]
fn every_invalid_setting_stops_the_binary_with_one_line_naming_it() {
    // A few at a time: each is a process of its own.
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = INVALID
            .chunks(INVALID.len().div_ceil(4))
            .map(|chunk| {
                s.spawn(move || {
                    let mut failures = Vec::new();
                    for (toml, setting) in chunk {
                        let out = run_with(toml);
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        let lines: Vec<&str> = stderr.lines().collect();
                        let ok = !out.status.success()
                            && out.status.code().is_some()
                            && lines.len() == 1
                            && lines[0].starts_with("pluto-coordinator: ")
                            && lines[0].contains(setting)
                            && !stderr.contains("panicked");
                        if !ok {
                            failures.push(format!(
                                "{toml:?}: exit {:?}, stderr {stderr:?}",
                                out.status
                            ));
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_message_says_what_is_wrong() {
    let out = run_with("audit_tick_ms = 10000\nstorer_audit_every_ms = 5000\n");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("audit_tick_ms = 10000 must not be above storer_audit_every_ms = 5000"),
        "{stderr}"
    );
    let out = run_with("audit_tick_ms = -5\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1 (`audit_tick_ms = -5`)"), "{stderr}");
}

#[test]
fn valid_settings_are_taken() {
    // The binary with valid settings goes on to start; `status` reads the
    // settings, then the (empty) books, and exits 0.
    let dir = tempfile::tempdir().unwrap();
    let books = format!("sqlite:{}", dir.path().join("books.db").display());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(pluto_store_sqlite::SqliteBooks::open(&books))
        .unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        "heartbeat_ms = 1000\nsweep_ms = 500\naudit_tick_ms = 100\nstorer_audit_every_ms = 500\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pluto-coordinator"))
        .arg("--home")
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
