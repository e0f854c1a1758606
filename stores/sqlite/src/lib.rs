//! pluto's catalog in SQLite, through `sqlx`, with embedded migrations.
//!
//! Registered as the `sqlite` plugin: `sqlite:/path/catalog.db` opens (and
//! creates, and migrates) a catalog. The database runs in WAL mode so a
//! backup and a reader can share it.
//!
//! The same plugin keeps the coordinator's books ([`SqliteBooks`]), in a
//! database of their own with their own migrations.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pluto_plugins_api::StoreError> {
//! let store = pluto_store_sqlite::SqliteMetaStore::open("sqlite:/tmp/catalog.db").await?;
//! # let _ = store; Ok(()) }
//! ```

mod books;

pub use books::SqliteBooks;

use std::str::FromStr;
use std::time::Duration;

use pluto_plugins_api::{
    async_trait, BlobId, BlobKind, BlobLocation, MetaStore, MetaStoreDescriptor, MetaStoreFuture,
    PackId, PackRecord, SnapshotId, SnapshotRecord, StoreError, PLUGIN_ABI_VERSION,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

/// A catalog in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteMetaStore {
    pool: SqlitePool,
}

fn db_err(context: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Plugin(format!("sqlite: {context}: {e}").into())
}

fn id32<T>(bytes: &[u8], what: &str, wrap: fn([u8; 32]) -> T) -> Result<T, StoreError> {
    <[u8; 32]>::try_from(bytes).map(wrap).map_err(|_| {
        StoreError::Corrupt(format!(
            "catalog holds a {what} id of {} bytes",
            bytes.len()
        ))
    })
}

/// Opens a pool on `url` (`sqlite:PATH`), creating the file when needed.
async fn connect(url: &str) -> Result<SqlitePool, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::BadUrl(url.into(), e.to_string()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .map_err(|e| StoreError::Plugin(format!("sqlite: opening {url}: {e}").into()))
}

fn migrate_err(e: sqlx::migrate::MigrateError) -> StoreError {
    StoreError::Plugin(format!("sqlite: migrating: {e}").into())
}

impl SqliteMetaStore {
    /// Opens the catalog at `url` (`sqlite:PATH`), creating and migrating it.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = connect(url).await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(migrate_err)?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl MetaStore for SqliteMetaStore {
    async fn add_pack(&self, pack: &PackRecord) -> Result<(), StoreError> {
        self.add_packs(std::slice::from_ref(pack)).await
    }

    async fn add_packs(&self, packs: &[PackRecord]) -> Result<(), StoreError> {
        // Multi-row inserts: one statement per BATCH blobs, not per blob.
        const BATCH: usize = 256;
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        for pack in packs {
            sqlx::query("INSERT OR IGNORE INTO packs (id, size) VALUES (?, ?)")
                .bind(&pack.id.0[..])
                .bind(pack.size as i64)
                .execute(&mut *tx)
                .await
                .map_err(db_err("adding a pack"))?;
            for chunk in pack.blobs.chunks(BATCH) {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "INSERT OR IGNORE INTO blobs (kind, id, pack, offset, length, raw_length) ",
                );
                q.push_values(chunk, |mut row, b| {
                    row.push_bind(b.kind as u8 as i64)
                        .push_bind(&b.id.0[..])
                        .push_bind(&b.pack.0[..])
                        .push_bind(b.offset as i64)
                        .push_bind(b.length as i64)
                        .push_bind(b.raw_length as i64);
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("adding blobs"))?;
            }
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn packs(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        let rows = sqlx::query("SELECT id, size FROM packs")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing packs"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    id32(r.get::<&[u8], _>(0), "pack", PackId)?,
                    r.get::<i64, _>(1) as u64,
                ))
            })
            .collect()
    }

    async fn blobs(&self) -> Result<Vec<BlobLocation>, StoreError> {
        let rows = sqlx::query("SELECT kind, id, pack, offset, length, raw_length FROM blobs")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing blobs"))?;
        rows.iter()
            .map(|r| {
                let kind = r.get::<i64, _>(0);
                Ok(BlobLocation {
                    kind: u8::try_from(kind)
                        .ok()
                        .and_then(BlobKind::from_u8)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown blob kind {kind}")))?,
                    id: id32(r.get::<&[u8], _>(1), "blob", BlobId)?,
                    pack: id32(r.get::<&[u8], _>(2), "pack", PackId)?,
                    offset: r.get::<i64, _>(3) as u64,
                    length: r.get::<i64, _>(4) as u32,
                    raw_length: r.get::<i64, _>(5) as u32,
                })
            })
            .collect()
    }

    async fn remove_pack(&self, id: &PackId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM packs WHERE id = ?")
            .bind(&id.0[..])
            .execute(&self.pool)
            .await
            .map_err(db_err("removing a pack"))?;
        Ok(())
    }

    async fn add_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "INSERT OR REPLACE INTO snapshots (id, time_ns, host, paths, tags, parent, tree) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id.0[..])
        .bind(s.time_ns)
        .bind(&s.host)
        .bind(json(&s.paths))
        .bind(json(&s.tags))
        .bind(s.parent.as_ref().map(|p| p.0.to_vec()))
        .bind(&s.tree.0[..])
        .execute(&self.pool)
        .await
        .map_err(db_err("adding a snapshot"))?;
        Ok(())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, time_ns, host, paths, tags, parent, tree FROM snapshots \
             ORDER BY time_ns, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("listing snapshots"))?;
        let list = |s: &str| -> Result<Vec<String>, StoreError> {
            serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("snapshot list: {e}")))
        };
        rows.iter()
            .map(|r| {
                Ok(SnapshotRecord {
                    id: id32(r.get::<&[u8], _>(0), "snapshot", SnapshotId)?,
                    time_ns: r.get(1),
                    host: r.get(2),
                    paths: list(r.get(3))?,
                    tags: list(r.get(4))?,
                    parent: r
                        .get::<Option<&[u8]>, _>(5)
                        .map(|p| id32(p, "snapshot", SnapshotId))
                        .transpose()?,
                    tree: id32(r.get::<&[u8], _>(6), "tree", BlobId)?,
                })
            })
            .collect()
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(&id.0[..])
            .execute(&self.pool)
            .await
            .map_err(db_err("removing a snapshot"))?;
        Ok(())
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT value FROM kv WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err("reading a value"))?;
        Ok(row.map(|r| r.get::<Vec<u8>, _>(0)))
    }

    async fn set_value(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(db_err("writing a value"))?;
        Ok(())
    }

    async fn clear(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        for table in ["blobs", "packs", "snapshots"] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await
                .map_err(db_err("clearing"))?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    /// Closing the pool checkpoints the write-ahead log into the database
    /// file and removes it.
    async fn close(&self) {
        self.pool.close().await;
    }
}

fn open_url(url: &str) -> MetaStoreFuture {
    let url = url.to_string();
    Box::pin(async move { Ok(Box::new(SqliteMetaStore::open(&url).await?) as Box<dyn MetaStore>) })
}

pluto_plugins_api::inventory::submit! {
    MetaStoreDescriptor {
        name: "sqlite",
        schemes: &["sqlite"],
        abi_version: PLUGIN_ABI_VERSION,
        open: open_url,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The suite every catalog plugin passes; it also reopens a catalog,
    /// which runs the migrations again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meta_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        pluto_plugins_api::testkit::meta_store_conformance(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let url = format!(
                "sqlite:{}",
                dir.path().join(format!("catalog{i}.db")).display()
            );
            async move { url }
        })
        .await;
    }
}
