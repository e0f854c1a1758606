//! The coordinator's books in SQLite: the SQLite [`Dialect`] of the shared
//! books ([`pluto_books_sql`]), with the books' own migrations.
//!
//! SQLite has no row locks: a transaction's first write takes the
//! database's write lock, and every books transaction starts with one, so
//! concurrent coordinator tasks never over-commit a storer.

use pluto_books_sql::{Dialect, SqlBooks};
use pluto_plugins_api::{
    BooksStore, BooksStoreDescriptor, BooksStoreFuture, NodeId, StoreError, PLUGIN_ABI_VERSION,
};
use sqlx::sqlite::{SqliteConnection, SqliteQueryResult, SqliteRow};
use sqlx::{Sqlite, SqlitePool};

use crate::{connect, migrate_err};

/// The books in one SQLite file.
pub type SqliteBooks = SqlBooks<SqliteDialect>;

/// SQLite's statements for the books ([`SqliteBooks`]).
#[derive(Debug, Clone, Copy)]
pub struct SqliteDialect;

impl Dialect for SqliteDialect {
    type Db = Sqlite;
    const NAME: &'static str = "sqlite";
    const GREATEST: &'static str = "MAX";
    const PRESENCE_ORDER: &'static str = "rowid";

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    /// Opens the books at `url` (`sqlite:PATH`), creating and migrating them.
    async fn open(url: &str) -> Result<SqlitePool, StoreError> {
        let pool = connect(url).await?;
        sqlx::migrate!("./migrations-books")
            .run(&pool)
            .await
            .map_err(migrate_err)?;
        Ok(pool)
    }

    async fn lock_nodes(_: &mut SqliteConnection, _: &[&NodeId]) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn mark_silent_offline(
        conn: &mut SqliteConnection,
        silent_since_ms: i64,
    ) -> Result<Vec<SqliteRow>, sqlx::Error> {
        sqlx::query(
            "INSERT INTO presence (node, at_ms, online) \
             SELECT id, last_seen_ms, 0 FROM nodes WHERE online = 1 AND last_seen_ms < $1",
        )
        .bind(silent_since_ms)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE nodes SET online = 0, \
                 online_ms = online_ms + MAX(0, last_seen_ms - online_since_ms) \
             WHERE online = 1 AND last_seen_ms < $1 RETURNING id",
        )
        .bind(silent_since_ms)
        .fetch_all(conn)
        .await
    }

    async fn release_expired(conn: &mut SqliteConnection, now_ms: i64) -> Result<u64, sqlx::Error> {
        for (column, party) in [("held", "storer"), ("placed", "owner")] {
            sqlx::query(&format!(
                "UPDATE nodes SET {column} = MAX(0, {column} - (SELECT SUM(size) FROM reservations \
                     WHERE {party} = nodes.id AND expires_ms <= $1)) \
                 WHERE id IN (SELECT {party} FROM reservations WHERE expires_ms <= $1)"
            ))
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
        }
        Ok(
            sqlx::query("DELETE FROM reservations WHERE expires_ms <= $1")
                .bind(now_ms)
                .execute(conn)
                .await?
                .rows_affected(),
        )
    }

    async fn addresses(pool: &SqlitePool, ids: &[NodeId]) -> Result<Vec<SqliteRow>, sqlx::Error> {
        // One lookup by primary key per id, in the order asked.
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query("SELECT id, online, addresses FROM nodes WHERE id = $1")
                .bind(&id.0[..])
                .fetch_optional(pool)
                .await?;
            rows.extend(row);
        }
        Ok(rows)
    }
}

fn open_url(url: &str) -> BooksStoreFuture {
    let url = url.to_string();
    Box::pin(async move { Ok(Box::new(SqliteBooks::open(&url).await?) as Box<dyn BooksStore>) })
}

pluto_plugins_api::inventory::submit! {
    BooksStoreDescriptor {
        name: "sqlite",
        schemes: &["sqlite"],
        abi_version: PLUGIN_ABI_VERSION,
        open: open_url,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn books_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        pluto_plugins_api::testkit::books_conformance(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let url = format!(
                "sqlite:{}",
                dir.path().join(format!("books{i}.db")).display()
            );
            async move { url }
        })
        .await;
    }
}
