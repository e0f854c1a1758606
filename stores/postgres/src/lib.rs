//! The coordinator's books in PostgreSQL, through `sqlx`, with embedded
//! migrations: the store for a coordinator that outgrows one SQLite file,
//! or for several coordinator replicas sharing one set of books. The
//! queries are the shared books' ([`pluto_books_sql`]); this crate is their
//! Postgres [`Dialect`], its connection setup and its migrations.
//!
//! Registered as the `postgres` plugin: `pluto-coordinator --db
//! postgres://USER@HOST/DB` opens (and migrates) the books there.
//!
//! Every operation that changes more than one node's row locks those rows
//! first, in id order, so concurrent coordinator replicas neither
//! over-commit a storer nor deadlock each other.

use pluto_books_sql::{Dialect, SqlBooks};
use pluto_plugins_api::{
    redact_url, BooksStore, BooksStoreDescriptor, BooksStoreFuture, NodeId, StoreError,
    PLUGIN_ABI_VERSION,
};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::{Connection, Postgres, Row};

/// How long opening the books waits for the database's first answer.
pub const CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What went wrong opening the books: the network (nothing listening, no
/// route, TLS) is "cannot reach"; the rest (no such database, a refused
/// login) is the server's own word.
fn open_error(url: &str, e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            StoreError::Unreachable(redact_url(url), e.to_string())
        }
        sqlx::Error::Configuration(_) => StoreError::BadUrl(redact_url(url), e.to_string()),
        e => StoreError::Plugin(format!("postgres at {}: {e}", redact_url(url)).into()),
    }
}

/// The books in one PostgreSQL database.
pub type PgBooks = SqlBooks<PgDialect>;

/// PostgreSQL's statements for the books ([`PgBooks`]).
#[derive(Debug, Clone, Copy)]
pub struct PgDialect;

impl Dialect for PgDialect {
    type Db = Postgres;
    const NAME: &'static str = "postgres";
    const GREATEST: &'static str = "GREATEST";
    const PRESENCE_ORDER: &'static str = "seq";

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    /// Opens the books at `url` (`postgres://...`), migrating them. One
    /// connection is tried first, within [`CONNECT_LIMIT`], so a database
    /// that cannot be reached is said at once (the pool would retry for
    /// its whole acquire timeout).
    async fn open(url: &str) -> Result<PgPool, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(redact_url(url), e.to_string()))?;
        match tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect_with(&options)).await {
            Err(_) => {
                return Err(StoreError::Unreachable(
                    redact_url(url),
                    format!("no answer within {} s", CONNECT_LIMIT.as_secs()),
                ))
            }
            Ok(Err(e)) => return Err(open_error(url, e)),
            Ok(Ok(first)) => {
                let _ = first.close().await;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|e| open_error(url, e))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Plugin(format!("postgres: migrating: {e}").into()))?;
        Ok(pool)
    }

    async fn lock_nodes(conn: &mut PgConnection, ids: &[&NodeId]) -> Result<(), sqlx::Error> {
        let ids: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
        sqlx::query("SELECT id FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .fetch_all(conn)
            .await?;
        Ok(())
    }

    async fn mark_silent_offline(
        conn: &mut PgConnection,
        silent_since_ms: i64,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        // One statement: the nodes marked are the nodes logged.
        sqlx::query(
            "WITH gone AS ( \
                 UPDATE nodes SET online = FALSE, \
                     online_ms = online_ms + GREATEST(0, last_seen_ms - online_since_ms) \
                 WHERE online AND last_seen_ms < $1 RETURNING id, last_seen_ms) \
             INSERT INTO presence (node, at_ms, online) \
             SELECT id, last_seen_ms, FALSE FROM gone RETURNING node",
        )
        .bind(silent_since_ms)
        .fetch_all(conn)
        .await
    }

    async fn release_expired(conn: &mut PgConnection, now_ms: i64) -> Result<u64, sqlx::Error> {
        sqlx::query(
            "SELECT id FROM nodes WHERE id IN ( \
                 SELECT storer FROM reservations WHERE expires_ms <= $1 \
                 UNION SELECT owner FROM reservations WHERE expires_ms <= $1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(now_ms)
        .fetch_all(&mut *conn)
        .await?;
        let gone: i64 = sqlx::query(
            "WITH gone AS (DELETE FROM reservations WHERE expires_ms <= $1 \
                 RETURNING owner, storer, size), \
             s AS (UPDATE nodes n SET held = GREATEST(0, n.held - g.total) \
                 FROM (SELECT storer, SUM(size)::BIGINT AS total FROM gone GROUP BY storer) g \
                 WHERE n.id = g.storer), \
             o AS (UPDATE nodes n SET placed = GREATEST(0, n.placed - g.total) \
                 FROM (SELECT owner, SUM(size)::BIGINT AS total FROM gone GROUP BY owner) g \
                 WHERE n.id = g.owner) \
             SELECT COUNT(*) FROM gone",
        )
        .bind(now_ms)
        .fetch_one(conn)
        .await?
        .get(0);
        Ok(gone as u64)
    }

    async fn addresses(pool: &PgPool, ids: &[NodeId]) -> Result<Vec<PgRow>, sqlx::Error> {
        let keys: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
        sqlx::query("SELECT id, online, addresses FROM nodes WHERE id = ANY($1)")
            .bind(&keys)
            .fetch_all(pool)
            .await
    }
}

fn open_url(url: &str) -> BooksStoreFuture {
    let url = url.to_string();
    Box::pin(async move { Ok(Box::new(PgBooks::open(&url).await?) as Box<dyn BooksStore>) })
}

pluto_plugins_api::inventory::submit! {
    BooksStoreDescriptor {
        name: "postgres",
        schemes: &["postgres", "postgresql"],
        abi_version: PLUGIN_ABI_VERSION,
        open: open_url,
    }
}
