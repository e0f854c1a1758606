//! The external services tests need, found through environment variables.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The URL in the environment variable `var` (else `default`), once
/// something answers at its host and port. When nothing does, panics with
/// one line naming the variable to set, so a test run without the service
/// fails saying what is missing instead of failing somewhere inside.
pub fn service_url(var: &str, default: &str) -> String {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let reached = host_port
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut addrs| {
            let mut last = "no address".to_string();
            for a in addrs.by_ref() {
                match TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(last)
        });
    if let Err(e) = reached {
        panic!(
            "{var}: nothing answers at {host_port} ({e}); start the service there or set \
             {var} to where it runs (README.md, \"Run the tests\")"
        );
    }
    url
}

/// A service that logs in, found as [`service_url`] finds it:
/// `SCHEME://USER:PASSWORD@HOST:PORT` in `var`. Its host and port (as
/// `HOST:PORT`), user name and password; panics with one line naming the
/// variable when the URL carries no login.
pub fn service_login(var: &str, default: &str) -> (String, String, String) {
    let url = service_url(var, default);
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let Some((login, host_port)) = rest.split_once('@') else {
        panic!("{var}: {url} carries no USER:PASSWORD@ (README.md, \"Run the tests\")");
    };
    let (user, password) = login.split_once(':').unwrap_or((login, ""));
    (
        host_port.trim_end_matches('/').to_string(),
        user.to_string(),
        password.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_service_names_the_variable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let var = "PLUTO_TEST_NOTHING_HERE_URL";
        let url = format!("mqtt://user@127.0.0.1:{port}/prefix");
        std::env::set_var(var, &url);
        let why = std::panic::catch_unwind(|| service_url(var, "mqtt://127.0.0.1:1"))
            .unwrap_err()
            .downcast::<String>()
            .unwrap();
        assert!(
            why.starts_with(var) && why.contains(&format!("127.0.0.1:{port}")),
            "{why}"
        );
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("postgres://u@{}/db", open.local_addr().unwrap());
        std::env::set_var(var, &url);
        assert_eq!(service_url(var, "x"), url);
    }
}
