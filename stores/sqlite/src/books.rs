//! The coordinator's books in SQLite.

use pluto_plugins_api::sqlint::{
    clamped as int, join_addresses, ordered, split_addresses, unordered,
};
use pluto_plugins_api::{
    async_trait, Beta, BooksStore, BooksStoreDescriptor, BooksStoreFuture, ManifestRecord, NodeId,
    NodeRecord, PackId, Recorded, ReplicaRecord, Standing, StoreError, PLUGIN_ABI_VERSION,
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
        registered_ms: r.get::<i64, _>(7) as u64,
        online_ms: r.get::<i64, _>(8) as u64,
        online_since_ms: r.get::<i64, _>(9) as u64,
        standing: Standing {
            audit: beta_at(r, 10),
            timeout: beta_at(r, 12),
            uptime: beta_at(r, 14),
            passed: r.get::<i64, _>(16) as u64,
            failed: r.get::<i64, _>(17) as u64,
            timed_out: r.get::<i64, _>(18) as u64,
            speed_bps: r.get::<i64, _>(19) as u64,
            speed_at_ms: r.get::<i64, _>(20) as u64,
            excluded_ms: r.get::<i64, _>(21) as u64,
            held_back: r.get::<i64, _>(22) != 0,
        },
    })
}

/// The reputation track whose alpha is column `at` and beta the next.
fn beta_at(r: &sqlx::sqlite::SqliteRow, at: usize) -> Beta {
    Beta {
        alpha: r.get(at),
        beta: r.get(at + 1),
    }
}

const NODE_COLUMNS: &str = "id, exchange_key, offer, held, placed, online, last_seen_ms, \
                            registered_ms, online_ms, online_since_ms, \
                            audit_alpha, audit_beta, timeout_alpha, timeout_beta, \
                            uptime_alpha, uptime_beta, passed, failed, timed_out, \
                            speed_bps, speed_at_ms, excluded_ms, held_back";

/// Refuses a standing with a NaN in it: SQLite would keep it as NULL.
fn check_standing(s: &Standing) -> Result<(), StoreError> {
    let tracks = [s.audit, s.timeout, s.uptime];
    if tracks.iter().any(|t| t.alpha.is_nan() || t.beta.is_nan()) {
        return Err(StoreError::OutOfRange(
            "a standing whose reputation is not a number".into(),
        ));
    }
    Ok(())
}

fn replica_row(r: &sqlx::sqlite::SqliteRow) -> Result<ReplicaRecord, StoreError> {
    Ok(ReplicaRecord {
        owner: id32(r.get::<&[u8], _>(0), "node", NodeId)?,
        pack: id32(r.get::<&[u8], _>(1), "pack", PackId)?,
        storer: id32(r.get::<&[u8], _>(2), "node", NodeId)?,
        size: r.get::<i64, _>(3) as u64,
        root: key32(r.get::<&[u8], _>(4))?,
    })
}

// Every transaction below starts with a write, so SQLite takes its write
// lock first and a transaction never has to upgrade a read lock (which
// fails at once, busy timeout or not, when another writer is waiting).

/// Adds a replica row; false when one of that pack at that storer exists.
async fn insert_replica(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    r: &ReplicaRecord,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO replicas (owner, pack, storer, size, root) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&r.owner.0[..])
    .bind(&r.pack.0[..])
    .bind(&r.storer.0[..])
    .bind(int(r.size))
    .bind(&r.root[..])
    .execute(&mut **tx)
    .await
    .map_err(db_err("recording a replica"))?
    .rows_affected()
        == 1)
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
                 offer = MAX(?3, held, placed), last_seen_ms = MAX(last_seen_ms, ?4)",
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
                     AND excluded_ms = 0 AND held_back = 0 \
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
            "INSERT INTO presence (node, at_ms, online) \
             SELECT id, ?2, ?3 FROM nodes WHERE id = ?1 AND online != ?3",
        )
        .bind(&id.0[..])
        .bind(int(now_ms))
        .bind(i64::from(online))
        .execute(&mut *tx)
        .await
        .map_err(db_err("recording presence"))?;
        sqlx::query(
            "UPDATE nodes SET \
                 online_ms = online_ms + CASE WHEN online = 1 AND ?2 = 0 \
                     THEN MAX(0, ?3 - online_since_ms) ELSE 0 END, \
                 online_since_ms = CASE WHEN online = 0 AND ?2 = 1 THEN ?3 ELSE online_since_ms END, \
                 online = ?2, last_seen_ms = MAX(last_seen_ms, ?3) \
             WHERE id = ?1",
        )
        .bind(&id.0[..])
        .bind(i64::from(online))
        .bind(int(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err("recording presence"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn mark_silent_offline(
        &self,
        silent_since_ms: u64,
        _now_ms: u64,
    ) -> Result<Vec<NodeId>, StoreError> {
        // A silent node is taken to have left when it was last heard from.
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        sqlx::query(
            "INSERT INTO presence (node, at_ms, online) \
             SELECT id, last_seen_ms, 0 FROM nodes WHERE online = 1 AND last_seen_ms < ?1",
        )
        .bind(int(silent_since_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err("marking silent nodes"))?;
        let rows = sqlx::query(
            "UPDATE nodes SET online = 0, \
                 online_ms = online_ms + MAX(0, last_seen_ms - online_since_ms) \
             WHERE online = 1 AND last_seen_ms < ?1 RETURNING id",
        )
        .bind(int(silent_since_ms))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err("marking silent nodes"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        let mut ids = rows
            .iter()
            .map(|r| id32(r.get::<&[u8], _>(0), "node", NodeId))
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    async fn presence_log(
        &self,
        id: &NodeId,
        from_ms: u64,
    ) -> Result<Vec<(u64, bool)>, StoreError> {
        Ok(sqlx::query(
            "SELECT at_ms, online FROM presence WHERE node = ?1 AND at_ms >= \
                 (SELECT COALESCE(MAX(at_ms), 0) FROM presence WHERE node = ?1 AND at_ms <= ?2) \
             ORDER BY at_ms, rowid",
        )
        .bind(&id.0[..])
        .bind(int(from_ms))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("reading presence"))?
        .iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) != 0))
        .collect())
    }

    async fn prune_presence(&self, before_ms: u64) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "DELETE FROM presence AS p WHERE at_ms < ?1 AND EXISTS ( \
                 SELECT 1 FROM presence q WHERE q.node = p.node AND q.at_ms < ?1 \
                 AND (q.at_ms > p.at_ms OR (q.at_ms = p.at_ms AND q.rowid > p.rowid)))",
        )
        .bind(int(before_ms))
        .execute(&self.pool)
        .await
        .map_err(db_err("pruning presence"))?;
        Ok(r.rows_affected())
    }

    async fn reserve(
        &self,
        owner: &NodeId,
        storer: &NodeId,
        size: u64,
        expires_ms: u64,
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
        if !owner_ok {
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO reservations (owner, storer, size, expires_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(&owner.0[..])
        .bind(&storer.0[..])
        .bind(int(size))
        .bind(int(expires_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err("reserving space"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(true)
    }

    async fn release_expired(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        for (column, party) in [("held", "storer"), ("placed", "owner")] {
            sqlx::query(&format!(
                "UPDATE nodes SET {column} = MAX(0, {column} - (SELECT SUM(size) FROM reservations \
                     WHERE {party} = nodes.id AND expires_ms <= ?1)) \
                 WHERE id IN (SELECT {party} FROM reservations WHERE expires_ms <= ?1)"
            ))
            .bind(int(now_ms))
            .execute(&mut *tx)
            .await
            .map_err(db_err("releasing reservations"))?;
        }
        let gone = sqlx::query("DELETE FROM reservations WHERE expires_ms <= ?1")
            .bind(int(now_ms))
            .execute(&mut *tx)
            .await
            .map_err(db_err("releasing reservations"))?
            .rows_affected();
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(gone)
    }

    async fn record_replica(&self, r: &ReplicaRecord) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        let inserted = insert_replica(&mut tx, r).await?;
        if !inserted {
            let kept = sqlx::query(
                "SELECT owner, pack, storer, size, root FROM replicas \
                 WHERE owner = ? AND pack = ? AND storer = ?",
            )
            .bind(&r.owner.0[..])
            .bind(&r.pack.0[..])
            .bind(&r.storer.0[..])
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err("recording a replica"))?;
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(match kept.as_ref().map(replica_row).transpose()? {
                Some(k) if k == *r => Recorded::Again,
                _ => Recorded::Conflict,
            });
        }
        let reservation = sqlx::query(
            "DELETE FROM reservations WHERE id = (SELECT id FROM reservations \
                 WHERE owner = ?1 AND storer = ?2 AND size >= ?3 ORDER BY size, expires_ms, id LIMIT 1) \
             RETURNING size",
        )
        .bind(&r.owner.0[..])
        .bind(&r.storer.0[..])
        .bind(int(r.size))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err("recording a replica"))?;
        let Some(reserved) = reservation.map(|row| row.get::<i64, _>(0)) else {
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(Recorded::NoReservation);
        };
        let surplus = reserved - int(r.size);
        if surplus > 0 {
            for (column, party) in [("held", &r.storer), ("placed", &r.owner)] {
                sqlx::query(&format!(
                    "UPDATE nodes SET {column} = MAX(0, {column} - ?1) WHERE id = ?2"
                ))
                .bind(surplus)
                .bind(&party.0[..])
                .execute(&mut *tx)
                .await
                .map_err(db_err("recording a replica"))?;
            }
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(Recorded::New)
    }

    async fn restore_replica(&self, r: &ReplicaRecord, now_ms: u64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        let inserted = insert_replica(&mut tx, r).await?;
        if !inserted {
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO nodes (id, exchange_key, offer, last_seen_ms, registered_ms) \
             VALUES (?1, ?2, 0, ?3, ?3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&r.owner.0[..])
        .bind(&[0u8; 32][..])
        .bind(int(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err("restoring a replica"))?;
        for (column, party) in [("held", &r.storer), ("placed", &r.owner)] {
            sqlx::query(&format!(
                "UPDATE nodes SET {column} = {column} + ?1 WHERE id = ?2"
            ))
            .bind(int(r.size))
            .bind(&party.0[..])
            .execute(&mut *tx)
            .await
            .map_err(db_err("restoring a replica"))?;
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(true)
    }

    async fn set_addresses(&self, id: &NodeId, addresses: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET addresses = ?1 WHERE id = ?2")
            .bind(join_addresses(addresses))
            .bind(&id.0[..])
            .execute(&self.pool)
            .await
            .map_err(db_err("keeping addresses"))?;
        Ok(())
    }

    async fn addresses(
        &self,
        ids: &[NodeId],
    ) -> Result<Vec<(NodeId, bool, Vec<String>)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query("SELECT online, addresses FROM nodes WHERE id = ?")
                .bind(&id.0[..])
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err("reading addresses"))?;
            if let Some(r) = row {
                out.push((
                    *id,
                    r.get::<i64, _>(0) != 0,
                    split_addresses(r.get::<&str, _>(1)),
                ));
            }
        }
        Ok(out)
    }

    async fn replicas_of(&self, owner: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        sqlx::query("SELECT owner, pack, storer, size, root FROM replicas WHERE owner = ?")
            .bind(&owner.0[..])
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing replicas"))?
            .iter()
            .map(replica_row)
            .collect()
    }

    async fn replicas_held_by(&self, storer: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        sqlx::query("SELECT owner, pack, storer, size, root FROM replicas WHERE storer = ?")
            .bind(&storer.0[..])
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing held replicas"))?
            .iter()
            .map(replica_row)
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
        .bind(ordered(version))
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
                    version: unordered(r.get::<i64, _>(0)),
                    blob: r.get(1),
                }),
        )
    }

    async fn set_standing(&self, id: &NodeId, standing: &Standing) -> Result<bool, StoreError> {
        check_standing(standing)?;
        let s = standing;
        let r = sqlx::query(
            "UPDATE nodes SET audit_alpha = ?1, audit_beta = ?2, timeout_alpha = ?3, \
                 timeout_beta = ?4, uptime_alpha = ?5, uptime_beta = ?6, passed = ?7, \
                 failed = ?8, timed_out = ?9, speed_bps = ?10, speed_at_ms = ?11, \
                 excluded_ms = ?12, held_back = ?13 \
             WHERE id = ?14",
        )
        .bind(s.audit.alpha)
        .bind(s.audit.beta)
        .bind(s.timeout.alpha)
        .bind(s.timeout.beta)
        .bind(s.uptime.alpha)
        .bind(s.uptime.beta)
        .bind(int(s.passed))
        .bind(int(s.failed))
        .bind(int(s.timed_out))
        .bind(int(s.speed_bps))
        .bind(int(s.speed_at_ms))
        .bind(int(s.excluded_ms))
        .bind(i64::from(s.held_back))
        .bind(&id.0[..])
        .execute(&self.pool)
        .await
        .map_err(db_err("keeping a standing"))?;
        Ok(r.rows_affected() == 1)
    }

    async fn replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<Option<ReplicaRecord>, StoreError> {
        sqlx::query(
            "SELECT owner, pack, storer, size, root FROM replicas \
             WHERE owner = ? AND pack = ? AND storer = ?",
        )
        .bind(&owner.0[..])
        .bind(&pack.0[..])
        .bind(&storer.0[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err("reading a replica"))?
        .as_ref()
        .map(replica_row)
        .transpose()
    }

    async fn drop_replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        let size = sqlx::query(
            "DELETE FROM replicas WHERE owner = ? AND pack = ? AND storer = ? RETURNING size",
        )
        .bind(&owner.0[..])
        .bind(&pack.0[..])
        .bind(&storer.0[..])
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err("dropping a replica"))?
        .map(|row| row.get::<i64, _>(0));
        let Some(size) = size else {
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(false);
        };
        for (column, party) in [("held", storer), ("placed", owner)] {
            sqlx::query(&format!(
                "UPDATE nodes SET {column} = MAX(0, {column} - ?1) WHERE id = ?2"
            ))
            .bind(size)
            .bind(&party.0[..])
            .execute(&mut *tx)
            .await
            .map_err(db_err("dropping a replica"))?;
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(true)
    }

    async fn mark_lost(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        // The first time it was found lost stays; 0 would mean "not lost".
        let r = sqlx::query(
            "UPDATE replicas SET lost_ms = CASE WHEN lost_ms = 0 THEN ?4 ELSE lost_ms END \
             WHERE owner = ?1 AND pack = ?2 AND storer = ?3",
        )
        .bind(&owner.0[..])
        .bind(&pack.0[..])
        .bind(&storer.0[..])
        .bind(int(now_ms.max(1)))
        .execute(&self.pool)
        .await
        .map_err(db_err("marking a replica lost"))?;
        Ok(r.rows_affected() == 1)
    }

    async fn lost_replicas(&self, owner: &NodeId) -> Result<Vec<(PackId, NodeId)>, StoreError> {
        sqlx::query(
            "SELECT pack, storer FROM replicas WHERE owner = ? AND lost_ms > 0 \
             ORDER BY pack, storer",
        )
        .bind(&owner.0[..])
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("listing lost replicas"))?
        .iter()
        .map(|r| {
            Ok((
                id32(r.get::<&[u8], _>(0), "pack", PackId)?,
                id32(r.get::<&[u8], _>(1), "node", NodeId)?,
            ))
        })
        .collect()
    }

    async fn is_lost(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "SELECT 1 FROM replicas WHERE owner = ? AND pack = ? AND storer = ? AND lost_ms > 0",
        )
        .bind(&owner.0[..])
        .bind(&pack.0[..])
        .bind(&storer.0[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err("reading a replica"))?
        .is_some())
    }

    async fn storers(&self) -> Result<Vec<(NodeId, u64)>, StoreError> {
        sqlx::query("SELECT storer, COUNT(*) FROM replicas GROUP BY storer")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing storers"))?
            .iter()
            .map(|r| {
                Ok((
                    id32(r.get::<&[u8], _>(0), "node", NodeId)?,
                    r.get::<i64, _>(1) as u64,
                ))
            })
            .collect()
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
