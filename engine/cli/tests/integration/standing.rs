//! What the coordinator and the nodes say about a node, and that they say
//! it the same way: `pluto-coordinator status` and `pluto peers` agree on
//! uptime (one definition, in percent, "new" until there is a record),
//! print sizes and speeds in IEC units (raw numbers in `--json`), and an
//! offline storer is never matched. `pluto-coordinator status` names what
//! is wrong when its books are missing or cannot be reached.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::common::*;
use super::exchange::{corpus, Net};
use super::network::{coordinator_bin, free_port};

/// `pluto-coordinator ARGS` (global options may come after the subcommand).
fn coordinator(args: &[&str]) -> Command {
    let mut c = Command::new(coordinator_bin());
    c.args(args).env_remove("PLUTO_COORDINATOR_HOME");
    c
}

/// Runs and expects exit 1 with one `pluto-coordinator:` line holding `want`.
fn refused(cmd: &mut Command, want: &str) -> Run {
    let r = run(cmd);
    assert_eq!(r.code, 1, "{cmd:?}: {} / {}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {}", r.stderr);
    assert!(lines[0].starts_with("pluto-coordinator: "), "{}", r.stderr);
    assert!(lines[0].contains(want), "{:?} lacks {want:?}", lines[0]);
    r
}

#[test]
fn coordinator_status_names_missing_or_unreachable_books() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("no-such-home");
    let books = home.join("books.db");
    // A missing home: the path is named, and nothing is created.
    let home_arg = home.display().to_string();
    for args in [
        vec!["status", "--home", &home_arg],
        vec!["--home", &home_arg, "status", "--json"],
    ] {
        let r = refused(&mut coordinator(&args), "no books at");
        assert!(
            r.stderr.contains(&books.display().to_string()),
            "{}",
            r.stderr
        );
        assert!(!home.exists(), "status created {}", home.display());
    }
    // A Postgres where nothing listens: said at once, as unreachable.
    let url = format!("postgres://postgres@127.0.0.1:{}/test", free_port());
    let t = Instant::now();
    let r = refused(
        &mut coordinator(&["status", "--db", &url]),
        "cannot reach the database at postgres://postgres@127.0.0.1:",
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert!(!r.stderr.contains("bad store URL"), "{}", r.stderr);
}

/// The coordinator's `--config` argument, as it was started.
fn config_of(net: &Net) -> String {
    let args = &net.coordinator.args;
    let at = args.iter().position(|a| a == "--config").unwrap();
    args[at + 1].clone()
}

/// `pluto-coordinator status --json` (options after the subcommand), as
/// one object per node id.
fn status_json(net: &Net) -> serde_json::Map<String, serde_json::Value> {
    let home = net.coordinator.home.display().to_string();
    let config = config_of(net);
    let r = json(&ok(&mut coordinator(&[
        "status", "--json", "--home", &home, "--config", &config,
    ])));
    r.as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), n.clone()))
        .collect()
}

fn status_table(net: &Net) -> String {
    let home = net.coordinator.home.display().to_string();
    let config = config_of(net);
    ok(&mut coordinator(&[
        "status", "--home", &home, "--config", &config,
    ]))
    .stdout
}

fn node_id(home: &Path) -> String {
    json(&ok(pluto(home).args(["--json", "status"])))["node_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The table row of the node whose id starts with `short`.
fn row<'a>(table: &'a str, short: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(short))
        .unwrap_or_else(|| panic!("no row for {short}: {table}"))
}

#[test]
fn uptime_and_units_read_the_same_everywhere() {
    // One uptime sample lasts 4 s here, so "new" turns into a number soon.
    let net = Net::start_with(2, &[], "uptime_sample_ms = 4000\n");
    let (owner, _) = net.owner("owner");
    let data = net.path("data");
    corpus(&data);
    ok(pluto(&owner).args(["-q", "backup"]).arg(&data));
    let storer = node_id(&net.storers[0].0);

    // Too new for a record: "new" on both sides, null in JSON.
    let peers = json(&ok(pluto(&owner).args(["--json", "peers"])));
    let p = (peers["peers"].as_array().unwrap().iter())
        .find(|p| p["id"] == storer.as_str())
        .unwrap_or_else(|| panic!("{storer} is not a peer: {peers}"));
    assert!(p["uptime"].is_null(), "{p}");
    assert!(
        p["bytes_held"].as_u64().unwrap() > 0,
        "raw bytes in JSON: {p}"
    );
    let table = ok(pluto(&owner).arg("peers")).stdout;
    assert!(row(&table, &storer[..16]).contains(" new "), "{table}");
    let status = status_json(&net);
    assert!(status[&storer]["uptime"].is_null(), "{}", status[&storer]);
    assert_eq!(status[&storer]["offer"], 256 << 20, "raw bytes in JSON");
    let table = status_table(&net);
    let line = row(&table, &storer[..8]);
    assert!(line.contains(" new "), "{table}");
    assert!(line.contains("256.00 MiB"), "IEC units: {table}");
    assert!(
        !line.contains("KB/s") && !line.contains("268435456"),
        "{table}"
    );

    // Once a sample has passed: a percent, the same on both sides (up to
    // the moments they were asked at).
    std::thread::sleep(Duration::from_secs(5));
    let peers = json(&ok(pluto(&owner).args(["--json", "peers"])));
    let p = (peers["peers"].as_array().unwrap().iter())
        .find(|p| p["id"] == storer.as_str())
        .unwrap();
    let seen_by_owner = p["uptime"].as_f64().unwrap_or_else(|| panic!("{p}"));
    let seen_by_coordinator = status_json(&net)[&storer]["uptime"].as_f64().unwrap();
    assert!(seen_by_owner > 0.5 && seen_by_owner <= 1.0, "{p}");
    assert!((seen_by_owner - seen_by_coordinator).abs() < 0.05);
    let table = ok(pluto(&owner).arg("peers")).stdout;
    let by_owner = percent_in(row(&table, &storer[..16]));
    let table = status_table(&net);
    let by_coordinator = percent_in(row(&table, &storer[..8]));
    assert!((by_owner - seen_by_owner * 100.0).abs() < 5.0, "{table}");
    assert!((by_owner - by_coordinator).abs() < 5.0, "{table}");
}

/// The one percent figure in a table row.
fn percent_in(line: &str) -> f64 {
    let words: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.ends_with('%'))
        .collect();
    assert_eq!(words.len(), 1, "one percent in {line:?}");
    words[0].trim_end_matches('%').parse().unwrap()
}

#[test]
fn an_offline_storer_is_never_matched() {
    let mut net = Net::start_with(2, &[], "");
    let (owner, _) = net.owner("owner");
    let (up, down) = (node_id(&net.storers[0].0), node_id(&net.storers[1].0));
    net.storers[1].1.kill();
    // The coordinator sees it go (the broker's will, or the sweep).
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(&net)[&down]["online"] != false {
        assert!(Instant::now() < deadline, "{down} still online");
        std::thread::sleep(Duration::from_millis(250));
    }
    let table = status_table(&net);
    assert!(row(&table, &down[..8]).contains(" no "), "{table}");
    for _ in 0..10 {
        let m = json(&ok(
            pluto(&owner).args(["--json", "match", "1M", "--copies", "1"])
        ));
        let storers: Vec<&str> = (m["storers"].as_array().unwrap().iter())
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(storers, [up.as_str()], "{m}");
    }
    // With no storer online there is no match, said as such.
    net.storers[0].1.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(&net)[&up]["online"] != false {
        assert!(Instant::now() < deadline, "{up} still online");
        std::thread::sleep(Duration::from_millis(250));
    }
    let r = run(pluto(&owner).args(["match", "1M", "--copies", "1"]));
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("no storer online"), "{}", r.stderr);
}
