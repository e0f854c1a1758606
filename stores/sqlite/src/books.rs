//! The coordinator's books in SQLite.

use pluto_plugins_api::{
    async_trait, BooksStore, BooksStoreDescriptor, BooksStoreFuture, ManifestRecord, NodeId,
    NodeRecord, PackId, ReplicaRecord, StoreError, PLUGIN_ABI_VERSION,
};
use sqlx::{Row, SqlitePool};

use crate::{connect, db_err, id32, migrate_err};

/// The books in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteBooks {
    pool: SqlitePool,
}

impl SqliteBooks {
    /// Opens the books at `url` (`sqlite:PATH`), creating and migrating them.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = connect(url).await?;
        sqlx::migrate!("./migrations-books")
            .run(&pool)
            .await
            .map_err(migrate_err)?;
        Ok(Self { pool })
    }
}

fn key32(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| StoreError::Corrupt(format!("books hold a key of {} bytes", bytes.len())))
}

fn node_row(r: &sqlx::sqlite::SqliteRow) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: id32(r.get::<&[u8], _>(0), "node", NodeId)?,
        exchange_key: key32(r.get::<&[u8], _>(1))?,
        offer: r.get::<i64, _>(2) as u64,
        held: r.get::<i64, _>(3) as u64,
        placed: r.get::<i64, _>(4) as u64,
        online: r.get::<i64, _>(5) != 0,
        last_seen_ms: r.get::<i64, _>(6) as u64,
    })
}

const NODE_COLUMNS: &str = "id, exchange_key, offer, held, placed, online, last_seen_ms";

/// SQLite stores i64: larger values are clamped, never wrapped.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl BooksStore for SqliteBooks {
    async fn register(
        &self,
        id: &NodeId,
        exchange_key: &[u8; 32],
        offer: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (id, exchange_key, offer, last_seen_ms, registered_ms) \
             VALUES (?1, ?2, ?3, ?4, ?4) \
             ON CONFLICT (id) DO UPDATE SET exchange_key = ?2, \
                 offer = MAX(?3, held, placed), last_seen_ms = ?4",
        )
        .bind(&id.0[..])
        .bind(&exchange_key[..])
        .bind(int(offer))
        .bind(int(now_ms))
        .execute(&self.pool)
        .await
        .map_err(db_err("registering a node"))?;
        Ok(())
    }

    async fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?"))
            .bind(&id.0[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err("reading a node"))?
            .as_ref()
            .map(node_row)
            .transpose()
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes"))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing nodes"))?
            .iter()
            .map(node_row)
            .collect()
    }

    async fn candidates(&self, size: u64, limit: usize) -> Result<Vec<NodeRecord>, StoreError> {
        // A window of the id index from a random point (wrapping around):
        // node ids are public keys, so uniformly spread, and the cost does
        // not grow with the number of nodes as ORDER BY random() does.
        let start: [u8; 32] = rand::random();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for (cmp, bound) in [(">=", &start[..]), ("<", &start[..])] {
            let want = limit - out.len() as i64;
            if want <= 0 {
                break;
            }
            let rows = sqlx::query(&format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE id {cmp} ?1 AND offer - held >= ?2 \
                 ORDER BY id LIMIT ?3"
            ))
            .bind(bound)
            .bind(int(size))
            .bind(want)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("finding candidates"))?;
            for r in &rows {
                out.push(node_row(r)?);
            }
        }
        // Online nodes first; the caller shuffles within each group.
        out.sort_by_key(|n| !n.online);
        Ok(out)
    }

    async fn set_offer(&self, id: &NodeId, offer: u64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE nodes SET offer = ?1 WHERE id = ?2 AND held <= ?1 AND placed <= ?1",
        )
        .bind(int(offer))
        .bind(&id.0[..])
        .execute(&self.pool)
        .await
        .map_err(db_err("changing an offer"))?;
        Ok(r.rows_affected() == 1)
    }

    async fn presence(&self, id: &NodeId, online: bool, now_ms: u64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        sqlx::query(
            "UPDATE nodes SET online = ?1, last_seen_ms = MAX(last_seen_ms, ?2) WHERE id = ?3",
        )
        .bind(i64::from(online))
        .bind(int(now_ms))
        .bind(&id.0[..])
        .execute(&mut *tx)
        .await
        .map_err(db_err("recording presence"))?;
        sqlx::query("INSERT INTO presence (node, at_ms, online) VALUES (?, ?, ?)")
            .bind(&id.0[..])
            .bind(int(now_ms))
            .bind(i64::from(online))
            .execute(&mut *tx)
            .await
            .map_err(db_err("recording presence"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn reserve(
        &self,
        owner: &NodeId,
        storer: &NodeId,
        size: u64,
    ) -> Result<bool, StoreError> {
        if owner == storer {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        // Each UPDATE checks and takes the space under SQLite's write lock,
        // so concurrent reservations can never over-commit.
        let storer_ok =
            sqlx::query("UPDATE nodes SET held = held + ?1 WHERE id = ?2 AND offer - held >= ?1")
                .bind(int(size))
                .bind(&storer.0[..])
                .execute(&mut *tx)
                .await
                .map_err(db_err("reserving space"))?
                .rows_affected()
                == 1;
        let owner_ok = storer_ok
            && sqlx::query(
                "UPDATE nodes SET placed = placed + ?1 WHERE id = ?2 AND offer - placed >= ?1",
            )
            .bind(int(size))
            .bind(&owner.0[..])
            .execute(&mut *tx)
            .await
            .map_err(db_err("reserving quota"))?
            .rows_affected()
                == 1;
        if owner_ok {
            tx.commit().await.map_err(db_err("commit"))?;
        } else {
            tx.rollback().await.map_err(db_err("rollback"))?;
        }
        Ok(owner_ok)
    }

    async fn record_replica(&self, r: &ReplicaRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO replicas (owner, pack, storer, size, root) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&r.owner.0[..])
        .bind(&r.pack.0[..])
        .bind(&r.storer.0[..])
        .bind(int(r.size))
        .bind(&r.root[..])
        .execute(&self.pool)
        .await
        .map_err(db_err("recording a replica"))?;
        Ok(())
    }

    async fn replicas_of(&self, owner: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        sqlx::query("SELECT owner, pack, storer, size, root FROM replicas WHERE owner = ?")
            .bind(&owner.0[..])
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing replicas"))?
            .iter()
            .map(|r| {
                Ok(ReplicaRecord {
                    owner: id32(r.get::<&[u8], _>(0), "node", NodeId)?,
                    pack: id32(r.get::<&[u8], _>(1), "pack", PackId)?,
                    storer: id32(r.get::<&[u8], _>(2), "node", NodeId)?,
                    size: r.get::<i64, _>(3) as u64,
                    root: key32(r.get::<&[u8], _>(4))?,
                })
            })
            .collect()
    }

    async fn put_manifest(
        &self,
        id: &NodeId,
        version: u64,
        blob: &[u8],
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO manifests (node, version, blob) VALUES (?1, ?2, ?3) \
             ON CONFLICT (node) DO UPDATE SET version = ?2, blob = ?3 WHERE version < ?2",
        )
        .bind(&id.0[..])
        .bind(int(version))
        .bind(blob)
        .execute(&self.pool)
        .await
        .map_err(db_err("keeping a manifest"))?;
        Ok(r.rows_affected() == 1)
    }

    async fn manifest(&self, id: &NodeId) -> Result<Option<ManifestRecord>, StoreError> {
        Ok(
            sqlx::query("SELECT version, blob FROM manifests WHERE node = ?")
                .bind(&id.0[..])
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err("reading a manifest"))?
                .map(|r| ManifestRecord {
                    version: r.get::<i64, _>(0) as u64,
                    blob: r.get(1),
                }),
        )
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
    use super::*;

    async fn books() -> (tempfile::TempDir, Box<dyn BooksStore>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("books.db").display());
        let b = pluto_plugins_api::open_books_store(&url).await.unwrap();
        (dir, b)
    }

    #[tokio::test]
    async fn offers_reservations_and_manifests() {
        let (_dir, b) = books().await;
        let (a, s) = (NodeId([1; 32]), NodeId([2; 32]));
        b.register(&a, &[9; 32], 100, 1).await.unwrap();
        b.register(&s, &[8; 32], 50, 1).await.unwrap();
        assert!(!b.reserve(&a, &a, 1).await.unwrap(), "never on oneself");
        assert!(b.reserve(&a, &s, 30).await.unwrap());
        assert!(
            !b.reserve(&a, &s, 30).await.unwrap(),
            "storer would be over-committed"
        );
        assert!(b.reserve(&a, &s, 20).await.unwrap());
        let sn = b.node(&s).await.unwrap().unwrap();
        assert_eq!((sn.offer, sn.held), (50, 50));
        assert_eq!(b.node(&a).await.unwrap().unwrap().placed, 50);
        assert!(
            !b.set_offer(&s, 10).await.unwrap(),
            "cannot offer less than held"
        );
        assert!(b.set_offer(&s, 60).await.unwrap());
        // Re-registering keeps usage and never lowers the offer below it.
        b.register(&s, &[7; 32], 5, 2).await.unwrap();
        let sn = b.node(&s).await.unwrap().unwrap();
        assert_eq!((sn.offer, sn.held, sn.exchange_key), (50, 50, [7; 32]));

        assert!(b.put_manifest(&a, 2, b"v2").await.unwrap());
        assert!(
            !b.put_manifest(&a, 2, b"again").await.unwrap(),
            "same version refused"
        );
        assert!(
            !b.put_manifest(&a, 1, b"old").await.unwrap(),
            "older version refused"
        );
        assert_eq!(b.manifest(&a).await.unwrap().unwrap().blob, b"v2");

        let r = ReplicaRecord {
            owner: a,
            pack: PackId([3; 32]),
            storer: s,
            size: 30,
            root: [4; 32],
        };
        b.record_replica(&r).await.unwrap();
        assert_eq!(b.replicas_of(&a).await.unwrap(), vec![r]);
        b.presence(&s, true, 10).await.unwrap();
        assert!(b.node(&s).await.unwrap().unwrap().online);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reservations_never_over_commit() {
        let (dir, b) = books().await;
        let storer = NodeId([0xff; 32]);
        b.register(&storer, &[0; 32], 1000, 0).await.unwrap();
        let url = format!("sqlite:{}", dir.path().join("books.db").display());
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                // Each asker on a connection pool of its own, as separate
                // coordinator replicas would be.
                let b = SqliteBooks::open(&url).await.unwrap();
                let owner = NodeId([i; 32]);
                b.register(&owner, &[0; 32], 1000, 0).await.unwrap();
                let mut got = 0u64;
                for _ in 0..10 {
                    if b.reserve(&owner, &storer, 7).await.unwrap() {
                        got += 7;
                    }
                }
                got
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let s = b.node(&storer).await.unwrap().unwrap();
        assert_eq!(s.held, total);
        assert!(s.held <= s.offer, "{} held of {}", s.held, s.offer);
        assert!(
            s.offer - s.held < 7,
            "all space that could be used was used"
        );
    }
}
