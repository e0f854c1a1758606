//! The coordinator's books in PostgreSQL, through `sqlx`, with embedded
//! migrations: the store for a coordinator that outgrows one SQLite file,
//! or for several coordinator replicas sharing one set of books.
//!
//! Registered as the `postgres` plugin: `pluto-coordinator --db
//! postgres://USER@HOST/DB` opens (and migrates) the books there.
//!
//! Every operation that changes more than one node's row locks those rows
//! first, in id order, so concurrent coordinator replicas neither
//! over-commit a storer nor deadlock each other.

use pluto_plugins_api::sqlint::{
    clamped as int, join_addresses, ordered, split_addresses, unordered,
};
use pluto_plugins_api::{
    async_trait, redact_url, Beta, BooksStore, BooksStoreDescriptor, BooksStoreFuture,
    ManifestRecord, NodeId, NodeRecord, PackId, Recorded, ReplicaRecord, Standing, StoreError,
    PLUGIN_ABI_VERSION,
};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

/// The books in one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgBooks {
    pool: PgPool,
}

fn db_err(context: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Plugin(format!("postgres: {context}: {e}").into())
}

impl PgBooks {
    /// Opens the books at `url` (`postgres://...`), migrating them.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|e| StoreError::BadUrl(redact_url(url), e.to_string()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Plugin(format!("postgres: migrating: {e}").into()))?;
        Ok(Self { pool })
    }
}

fn id32<T>(bytes: &[u8], what: &str, wrap: fn([u8; 32]) -> T) -> Result<T, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(wrap)
        .map_err(|_| StoreError::Corrupt(format!("books hold a {what} of {} bytes", bytes.len())))
}

const NODE_COLUMNS: &str = "id, exchange_key, offer, held, placed, online, last_seen_ms, \
                            registered_ms, online_ms, online_since_ms, \
                            audit_alpha, audit_beta, timeout_alpha, timeout_beta, \
                            uptime_alpha, uptime_beta, passed, failed, timed_out, \
                            speed_bps, speed_at_ms, excluded_ms, held_back";

fn node_row(r: &PgRow) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: id32(r.get::<&[u8], _>(0), "node id", NodeId)?,
        exchange_key: id32(r.get::<&[u8], _>(1), "key", |k| k)?,
        offer: r.get::<i64, _>(2) as u64,
        held: r.get::<i64, _>(3) as u64,
        placed: r.get::<i64, _>(4) as u64,
        online: r.get::<bool, _>(5),
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
            held_back: r.get::<bool, _>(22),
        },
    })
}

/// The reputation track whose alpha is column `at` and beta the next.
fn beta_at(r: &PgRow, at: usize) -> Beta {
    Beta {
        alpha: r.get(at),
        beta: r.get(at + 1),
    }
}

/// Refuses a standing with a NaN in it, as the SQLite books must (they
/// would keep it as NULL), so both stores take the same standings.
fn check_standing(s: &Standing) -> Result<(), StoreError> {
    let tracks = [s.audit, s.timeout, s.uptime];
    if tracks.iter().any(|t| t.alpha.is_nan() || t.beta.is_nan()) {
        return Err(StoreError::OutOfRange(
            "a standing whose reputation is not a number".into(),
        ));
    }
    Ok(())
}

fn replica_row(r: &PgRow) -> Result<ReplicaRecord, StoreError> {
    Ok(ReplicaRecord {
        owner: id32(r.get::<&[u8], _>(0), "node id", NodeId)?,
        pack: id32(r.get::<&[u8], _>(1), "pack id", PackId)?,
        storer: id32(r.get::<&[u8], _>(2), "node id", NodeId)?,
        size: r.get::<i64, _>(3) as u64,
        root: id32(r.get::<&[u8], _>(4), "root", |k| k)?,
    })
}

/// Locks the rows of these nodes, in id order (the one order every
/// transaction here uses, so two never wait for each other in a circle).
async fn lock_nodes(tx: &mut Transaction<'_, Postgres>, ids: &[&NodeId]) -> Result<(), StoreError> {
    let ids: Vec<Vec<u8>> = ids.iter().map(|i| i.0.to_vec()).collect();
    sqlx::query("SELECT id FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err("locking nodes"))?;
    Ok(())
}

/// Adds a replica row; false when one of that pack at that storer exists.
async fn insert_replica(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    r: &ReplicaRecord,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO replicas (owner, pack, storer, size, root) VALUES ($1, $2, $3, $4, $5) \
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
impl BooksStore for PgBooks {
    async fn register(
        &self,
        id: &NodeId,
        exchange_key: &[u8; 32],
        offer: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (id, exchange_key, offer, last_seen_ms, registered_ms) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET exchange_key = EXCLUDED.exchange_key, \
                 offer = GREATEST(EXCLUDED.offer, nodes.held, nodes.placed), \
                 last_seen_ms = GREATEST(nodes.last_seen_ms, EXCLUDED.last_seen_ms)",
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
        sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"))
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
        // A window of the id index from a random point, wrapping around
        // (ids are public keys, so uniformly spread; cheaper than random()).
        let start: [u8; 32] = rand::random();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for cmp in [">=", "<"] {
            let want = limit - out.len() as i64;
            if want <= 0 {
                break;
            }
            let rows = sqlx::query(&format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE id {cmp} $1 AND offer - held >= $2 \
                     AND excluded_ms = 0 AND NOT held_back \
                 ORDER BY id LIMIT $3"
            ))
            .bind(&start[..])
            .bind(int(size))
            .bind(want)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("finding candidates"))?;
            for r in &rows {
                out.push(node_row(r)?);
            }
        }
        out.sort_by_key(|n| !n.online);
        Ok(out)
    }

    async fn set_offer(&self, id: &NodeId, offer: u64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE nodes SET offer = $1 WHERE id = $2 AND held <= $1 AND placed <= $1",
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
        let was = sqlx::query("SELECT online FROM nodes WHERE id = $1 FOR UPDATE")
            .bind(&id.0[..])
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err("recording presence"))?
            .map(|r| r.get::<bool, _>(0));
        let Some(was) = was else {
            return Ok(());
        };
        if was != online {
            sqlx::query("INSERT INTO presence (node, at_ms, online) VALUES ($1, $2, $3)")
                .bind(&id.0[..])
                .bind(int(now_ms))
                .bind(online)
                .execute(&mut *tx)
                .await
                .map_err(db_err("recording presence"))?;
        }
        sqlx::query(
            "UPDATE nodes SET \
                 online_ms = online_ms + CASE WHEN online AND NOT $2 \
                     THEN GREATEST(0, $3 - online_since_ms) ELSE 0 END, \
                 online_since_ms = CASE WHEN NOT online AND $2 THEN $3 ELSE online_since_ms END, \
                 online = $2, last_seen_ms = GREATEST(last_seen_ms, $3) \
             WHERE id = $1",
        )
        .bind(&id.0[..])
        .bind(online)
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
        let rows = sqlx::query(
            "WITH gone AS ( \
                 UPDATE nodes SET online = FALSE, \
                     online_ms = online_ms + GREATEST(0, last_seen_ms - online_since_ms) \
                 WHERE online AND last_seen_ms < $1 RETURNING id, last_seen_ms) \
             INSERT INTO presence (node, at_ms, online) \
             SELECT id, last_seen_ms, FALSE FROM gone RETURNING node",
        )
        .bind(int(silent_since_ms))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("marking silent nodes"))?;
        let mut ids = rows
            .iter()
            .map(|r| id32(r.get::<&[u8], _>(0), "node id", NodeId))
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
            "SELECT at_ms, online FROM presence WHERE node = $1 AND at_ms >= \
                 (SELECT COALESCE(MAX(at_ms), 0) FROM presence WHERE node = $1 AND at_ms <= $2) \
             ORDER BY at_ms, seq",
        )
        .bind(&id.0[..])
        .bind(int(from_ms))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("reading presence"))?
        .iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<bool, _>(1)))
        .collect())
    }

    async fn prune_presence(&self, before_ms: u64) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "DELETE FROM presence p WHERE at_ms < $1 AND EXISTS ( \
                 SELECT 1 FROM presence q WHERE q.node = p.node AND q.at_ms < $1 \
                 AND (q.at_ms, q.seq) > (p.at_ms, p.seq))",
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
        lock_nodes(&mut tx, &[owner, storer]).await?;
        let storer_ok =
            sqlx::query("UPDATE nodes SET held = held + $1 WHERE id = $2 AND offer - held >= $1")
                .bind(int(size))
                .bind(&storer.0[..])
                .execute(&mut *tx)
                .await
                .map_err(db_err("reserving space"))?
                .rows_affected()
                == 1;
        let owner_ok = storer_ok
            && sqlx::query(
                "UPDATE nodes SET placed = placed + $1 WHERE id = $2 AND offer - placed >= $1",
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
            "INSERT INTO reservations (owner, storer, size, expires_ms) VALUES ($1, $2, $3, $4)",
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
        sqlx::query(
            "SELECT id FROM nodes WHERE id IN ( \
                 SELECT storer FROM reservations WHERE expires_ms <= $1 \
                 UNION SELECT owner FROM reservations WHERE expires_ms <= $1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(int(now_ms))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err("releasing reservations"))?;
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
        .bind(int(now_ms))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err("releasing reservations"))?
        .get(0);
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(gone as u64)
    }

    async fn record_replica(&self, r: &ReplicaRecord) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        lock_nodes(&mut tx, &[&r.owner, &r.storer]).await?;
        let inserted = insert_replica(&mut tx, r).await?;
        if !inserted {
            let kept = sqlx::query(
                "SELECT owner, pack, storer, size, root FROM replicas \
                 WHERE owner = $1 AND pack = $2 AND storer = $3",
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
        let reserved = sqlx::query(
            "DELETE FROM reservations WHERE id = (SELECT id FROM reservations \
                 WHERE owner = $1 AND storer = $2 AND size >= $3 \
                 ORDER BY size, expires_ms, id LIMIT 1) \
             RETURNING size",
        )
        .bind(&r.owner.0[..])
        .bind(&r.storer.0[..])
        .bind(int(r.size))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err("recording a replica"))?
        .map(|row| row.get::<i64, _>(0));
        let Some(reserved) = reserved else {
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(Recorded::NoReservation);
        };
        let surplus = reserved - int(r.size);
        if surplus > 0 {
            for (column, party) in [("held", &r.storer), ("placed", &r.owner)] {
                sqlx::query(&format!(
                    "UPDATE nodes SET {column} = GREATEST(0, {column} - $1) WHERE id = $2"
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
        sqlx::query(
            "INSERT INTO nodes (id, exchange_key, offer, last_seen_ms, registered_ms) \
             VALUES ($1, $2, 0, $3, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&r.owner.0[..])
        .bind(&[0u8; 32][..])
        .bind(int(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err("restoring a replica"))?;
        lock_nodes(&mut tx, &[&r.owner, &r.storer]).await?;
        let inserted = insert_replica(&mut tx, r).await?;
        if !inserted {
            tx.rollback().await.map_err(db_err("rollback"))?;
            return Ok(false);
        }
        for (column, party) in [("held", &r.storer), ("placed", &r.owner)] {
            sqlx::query(&format!(
                "UPDATE nodes SET {column} = {column} + $1 WHERE id = $2"
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
        sqlx::query("UPDATE nodes SET addresses = $1 WHERE id = $2")
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
        let keys: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
        let rows = sqlx::query("SELECT id, online, addresses FROM nodes WHERE id = ANY($1)")
            .bind(&keys)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("reading addresses"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    id32(r.get::<&[u8], _>(0), "node", NodeId)?,
                    r.get::<bool, _>(1),
                    split_addresses(r.get::<&str, _>(2)),
                ))
            })
            .collect()
    }

    async fn replicas_of(&self, owner: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        sqlx::query("SELECT owner, pack, storer, size, root FROM replicas WHERE owner = $1")
            .bind(&owner.0[..])
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing replicas"))?
            .iter()
            .map(replica_row)
            .collect()
    }

    async fn replicas_held_by(&self, storer: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        sqlx::query("SELECT owner, pack, storer, size, root FROM replicas WHERE storer = $1")
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
            "INSERT INTO manifests (node, version, blob) VALUES ($1, $2, $3) \
             ON CONFLICT (node) DO UPDATE SET version = EXCLUDED.version, blob = EXCLUDED.blob \
             WHERE manifests.version < EXCLUDED.version",
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
            sqlx::query("SELECT version, blob FROM manifests WHERE node = $1")
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
            "UPDATE nodes SET audit_alpha = $1, audit_beta = $2, timeout_alpha = $3, \
                 timeout_beta = $4, uptime_alpha = $5, uptime_beta = $6, passed = $7, \
                 failed = $8, timed_out = $9, speed_bps = $10, speed_at_ms = $11, \
                 excluded_ms = $12, held_back = $13 \
             WHERE id = $14",
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
        .bind(s.held_back)
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
             WHERE owner = $1 AND pack = $2 AND storer = $3",
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
        lock_nodes(&mut tx, &[owner, storer]).await?;
        let size = sqlx::query(
            "DELETE FROM replicas WHERE owner = $1 AND pack = $2 AND storer = $3 RETURNING size",
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
                "UPDATE nodes SET {column} = GREATEST(0, {column} - $1) WHERE id = $2"
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
            "UPDATE replicas SET lost_ms = CASE WHEN lost_ms = 0 THEN $4 ELSE lost_ms END \
             WHERE owner = $1 AND pack = $2 AND storer = $3",
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
            "SELECT pack, storer FROM replicas WHERE owner = $1 AND lost_ms > 0 \
             ORDER BY pack, storer",
        )
        .bind(&owner.0[..])
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("listing lost replicas"))?
        .iter()
        .map(|r| {
            Ok((
                id32(r.get::<&[u8], _>(0), "pack id", PackId)?,
                id32(r.get::<&[u8], _>(1), "node id", NodeId)?,
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
            "SELECT 1 FROM replicas WHERE owner = $1 AND pack = $2 AND storer = $3 AND lost_ms > 0",
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
                    id32(r.get::<&[u8], _>(0), "node id", NodeId)?,
                    r.get::<i64, _>(1) as u64,
                ))
            })
            .collect()
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
