//! The coordinator's home is its owner's alone: made 0700 with its books
//! and identity 0600, and narrowed at start when other users could read it
//! (the books name every node, its addresses and its placements).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Starts the coordinator until its ready line, stops it; returns stderr.
fn start_and_stop(home: &Path) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = home.parent().unwrap().with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pluto-coordinator"))
        .arg("--home")
        .arg(home)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("pluto-coordinator "), "{line:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn the_home_and_books_are_private_and_narrowed_when_not() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a/coordinator");
    start_and_stop(&home);
    assert_eq!(mode(&home), 0o700);
    for f in ["identity.key", "books.db", "books.db-wal", "books.db-shm"] {
        assert_eq!(mode(&home.join(f)), 0o600, "{f}");
    }

    // Opened up (an earlier version, a careless copy): narrowed at start.
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["books.db", "books.db-wal", "books.db-shm"] {
        std::fs::set_permissions(home.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let log = start_and_stop(&home);
    assert!(log.contains("was open to other users"), "{log}");
    assert_eq!(mode(&home), 0o700);
    for f in ["books.db", "books.db-wal", "books.db-shm"] {
        assert_eq!(mode(&home.join(f)), 0o600, "{f}");
    }

    // An identity others could read is refused: it may have leaked.
    std::fs::set_permissions(
        home.join("identity.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pluto-coordinator"))
        .arg("--home")
        .arg(&home)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}
