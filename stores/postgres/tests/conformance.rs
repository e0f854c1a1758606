//! The books conformance suite on the machine's PostgreSQL
//! (`PLUTO_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`),
//! each check in a database of its own, dropped afterwards.

use std::sync::{Arc, Mutex};

use sqlx::postgres::PgPoolOptions;
// Linking the plugin registers it.
use pluto_store_postgres as _;

fn base_url() -> String {
    pluto_plugins_api::testkit::service_url(
        "PLUTO_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

/// The base URL with another database name.
fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let cut = head
        .rfind('/')
        .filter(|&i| i > head.find("://").map_or(0, |s| s + 2));
    match cut {
        Some(i) => format!("{}/{db}{query}", &head[..i]),
        None => format!("{head}/{db}{query}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_conformance() {
    let base = base_url();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {base} (PLUTO_TEST_POSTGRES_URL): {e}"));
    // Databases a failed run left behind (one still in use by a run going
    // on now refuses to be dropped, and is left alone).
    let stale: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'pluto_books_%'")
            .fetch_all(&admin)
            .await
            .unwrap();
    for db in stale {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
            .execute(&admin)
            .await;
    }
    let prefix = format!("pluto_books_{:08x}", rand::random::<u32>());
    let created = Arc::new(Mutex::new(Vec::new()));
    pluto_plugins_api::testkit::books_conformance(|| {
        let (admin, created, base) = (admin.clone(), created.clone(), base.clone());
        let db = {
            let mut c = created.lock().unwrap();
            let db = format!("{prefix}_{}", c.len());
            c.push(db.clone());
            db
        };
        async move {
            sqlx::query(&format!("CREATE DATABASE {db}"))
                .execute(&admin)
                .await
                .unwrap();
            with_database(&base, &db)
        }
    })
    .await;
    let created = created.lock().unwrap().clone();
    for db in created {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
    }
}

#[test]
fn database_names_are_swapped_in_urls() {
    assert_eq!(
        with_database("postgres://u@h:5432/test", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u@h:5432/test?sslmode=disable", "x"),
        "postgres://u@h:5432/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}
