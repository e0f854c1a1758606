//! [`BooksStore`] over any [`Dialect`].
//!
//! Every transaction here starts with a write or with
//! [`Dialect::lock_nodes`], so SQLite takes its write lock first and never
//! has to upgrade a read lock (which fails at once, busy timeout or not,
//! when another writer is waiting), and Postgres locks the nodes whose
//! usage changes before reading them.

use super::*;

/// `sqlx::query` on this dialect's database.
fn query<D: Dialect>(
    sql: &str,
) -> sqlx::query::Query<'_, D::Db, <D::Db as Database>::Arguments<'_>> {
    sqlx::query::<D::Db>(sql)
}

// The bounds below (twice: helpers and the trait) are what the books bind
// and read; sqlx's SQLite and Postgres drivers meet them all.

impl<D> SqlBooks<D>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> &'q str: Decode<'q, D::Db> + Type<D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> f64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> bool: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> String: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Vec<u8>: Decode<'q, D::Db> + Type<D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
{
    fn node_row(r: &<D::Db as Database>::Row) -> Result<NodeRecord, StoreError> {
        let beta_at = |at: usize| Beta {
            alpha: r.get(at),
            beta: r.get(at + 1),
        };
        let u64_at = |at: usize| r.get::<i64, _>(at) as u64;
        Ok(NodeRecord {
            id: id32(r.get::<&[u8], _>(0), "node id", NodeId)?,
            exchange_key: id32(r.get::<&[u8], _>(1), "key", |k| k)?,
            offer: u64_at(2),
            held: u64_at(3),
            placed: u64_at(4),
            earned: u64_at(23),
            online: r.get::<bool, _>(5),
            last_seen_ms: u64_at(6),
            registered_ms: u64_at(7),
            online_ms: u64_at(8),
            online_since_ms: u64_at(9),
            standing: Standing {
                audit: beta_at(10),
                timeout: beta_at(12),
                uptime: beta_at(14),
                passed: u64_at(16),
                failed: u64_at(17),
                timed_out: u64_at(18),
                speed_bps: u64_at(19),
                speed_at_ms: u64_at(20),
                excluded_ms: u64_at(21),
                held_back: r.get::<bool, _>(22),
            },
        })
    }

    /// `sql` on one replica, its key bound as `$1` (owner), `$2` (pack)
    /// and `$3` (storer).
    fn on_replica<'q>(
        sql: &'q str,
        owner: &'q NodeId,
        pack: &'q PackId,
        storer: &'q NodeId,
    ) -> sqlx::query::Query<'q, D::Db, <D::Db as Database>::Arguments<'q>> {
        query::<D>(sql)
            .bind(&owner.0[..])
            .bind(&pack.0[..])
            .bind(&storer.0[..])
    }

    /// The replicas whose `column` (owner or storer) is `id`.
    async fn replicas_where(
        &self,
        column: &'static str,
        id: &NodeId,
        what: &'static str,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        query::<D>(&format!(
            "SELECT {REPLICA_COLUMNS} FROM replicas WHERE {column} = $1"
        ))
        .bind(&id.0[..])
        .fetch_all(&self.pool)
        .await
        .map_err(db_err::<D>(what))?
        .iter()
        .map(Self::replica_row)
        .collect()
    }

    fn replica_row(r: &<D::Db as Database>::Row) -> Result<ReplicaRecord, StoreError> {
        Ok(ReplicaRecord {
            owner: id32(r.get::<&[u8], _>(0), "node id", NodeId)?,
            pack: id32(r.get::<&[u8], _>(1), "pack id", PackId)?,
            storer: id32(r.get::<&[u8], _>(2), "node id", NodeId)?,
            size: r.get::<i64, _>(3) as u64,
            root: id32(r.get::<&[u8], _>(4), "root", |k| k)?,
        })
    }

    /// Adds a replica row, recorded at `now_ms`; false when one of that
    /// pack at that storer exists.
    async fn insert_replica(
        conn: &mut <D::Db as Database>::Connection,
        r: &ReplicaRecord,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let done = Self::on_replica(
            "INSERT INTO replicas (owner, pack, storer, size, root, recorded_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &r.owner,
            &r.pack,
            &r.storer,
        )
        .bind(int(r.size))
        .bind(&r.root[..])
        .bind(int(now_ms))
        .execute(conn)
        .await
        .map_err(db_err::<D>("recording a replica"))?;
        Ok(D::rows_affected(&done) == 1)
    }

    /// Takes `size` off `column` (`held` or `placed`) of node `id`, never
    /// below 0.
    async fn take_usage(
        conn: &mut <D::Db as Database>::Connection,
        column: &str,
        id: &NodeId,
        size: i64,
        context: &str,
    ) -> Result<(), StoreError> {
        let greatest = D::GREATEST;
        query::<D>(&format!(
            "UPDATE nodes SET {column} = {greatest}(0, {column} - $1) WHERE id = $2"
        ))
        .bind(size)
        .bind(&id.0[..])
        .execute(conn)
        .await
        .map_err(db_err::<D>(context))?;
        Ok(())
    }
}

#[async_trait]
impl<D> BooksStore for SqlBooks<D>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> &'q str: Decode<'q, D::Db> + Type<D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> f64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> bool: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> String: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Vec<u8>: Decode<'q, D::Db> + Type<D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
{
    async fn register(
        &self,
        id: &NodeId,
        exchange_key: &[u8; 32],
        offer: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let greatest = D::GREATEST;
        query::<D>(&format!(
            "INSERT INTO nodes (id, exchange_key, offer, last_seen_ms, registered_ms) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET exchange_key = excluded.exchange_key, \
                 offer = {greatest}(excluded.offer, nodes.held, nodes.placed), \
                 last_seen_ms = {greatest}(nodes.last_seen_ms, excluded.last_seen_ms)"
        ))
        .bind(&id.0[..])
        .bind(&exchange_key[..])
        .bind(int(offer))
        .bind(int(now_ms))
        .execute(&self.pool)
        .await
        .map_err(db_err::<D>("registering a node"))?;
        Ok(())
    }

    async fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        query::<D>(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"))
            .bind(&id.0[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err::<D>("reading a node"))?
            .as_ref()
            .map(Self::node_row)
            .transpose()
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        query::<D>(&format!("SELECT {NODE_COLUMNS} FROM nodes"))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err::<D>("listing nodes"))?
            .iter()
            .map(Self::node_row)
            .collect()
    }

    async fn candidates(&self, size: u64, limit: usize) -> Result<Vec<NodeRecord>, StoreError> {
        // A window of the id index from a random point (wrapping around):
        // node ids are public keys, so uniformly spread, and the cost does
        // not grow with the number of nodes as ORDER BY random() does.
        let start: [u8; 32] = rand::random();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for cmp in [">=", "<"] {
            let want = limit - out.len() as i64;
            if want <= 0 {
                break;
            }
            let rows = query::<D>(&format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE id {cmp} $1 AND offer - held >= $2 \
                     AND online AND excluded_ms = 0 AND NOT held_back \
                 ORDER BY id LIMIT $3"
            ))
            .bind(&start[..])
            .bind(int(size))
            .bind(want)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err::<D>("finding candidates"))?;
            for r in &rows {
                out.push(Self::node_row(r)?);
            }
        }
        Ok(out)
    }

    async fn set_offer(&self, id: &NodeId, offer: u64) -> Result<bool, StoreError> {
        let r =
            query::<D>("UPDATE nodes SET offer = $1 WHERE id = $2 AND held <= $1 AND placed <= $1")
                .bind(int(offer))
                .bind(&id.0[..])
                .execute(&self.pool)
                .await
                .map_err(db_err::<D>("changing an offer"))?;
        Ok(D::rows_affected(&r) == 1)
    }

    async fn presence(&self, id: &NodeId, online: bool, now_ms: u64) -> Result<(), StoreError> {
        let greatest = D::GREATEST;
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        D::lock_nodes(&mut tx, &[id])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        query::<D>(
            "INSERT INTO presence (node, at_ms, online) \
             SELECT id, $2, $3 FROM nodes WHERE id = $1 AND online <> $3",
        )
        .bind(&id.0[..])
        .bind(int(now_ms))
        .bind(online)
        .execute(&mut *tx)
        .await
        .map_err(db_err::<D>("recording presence"))?;
        query::<D>(&format!(
            "UPDATE nodes SET \
                 online_ms = online_ms + CASE WHEN online AND NOT $2 \
                     THEN {greatest}(0, $3 - online_since_ms) ELSE 0 END, \
                 online_since_ms = CASE WHEN NOT online AND $2 THEN $3 ELSE online_since_ms END, \
                 online = $2, \
                 last_seen_ms = CASE WHEN $2 THEN {greatest}(last_seen_ms, $3) \
                     ELSE last_seen_ms END \
             WHERE id = $1"
        ))
        .bind(&id.0[..])
        .bind(online)
        .bind(int(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err::<D>("recording presence"))?;
        tx.commit().await.map_err(db_err::<D>("commit"))
    }

    async fn mark_silent_offline(
        &self,
        silent_since_ms: u64,
        _now_ms: u64,
    ) -> Result<Vec<NodeId>, StoreError> {
        // A silent node is taken to have left when it was last heard from.
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        let rows = D::mark_silent_offline(&mut tx, int(silent_since_ms))
            .await
            .map_err(db_err::<D>("marking silent nodes"))?;
        tx.commit().await.map_err(db_err::<D>("commit"))?;
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
        let order = D::PRESENCE_ORDER;
        Ok(query::<D>(&format!(
            "SELECT at_ms, online FROM presence WHERE node = $1 AND at_ms >= \
                 (SELECT COALESCE(MAX(at_ms), 0) FROM presence WHERE node = $1 AND at_ms <= $2) \
             ORDER BY at_ms, {order}"
        ))
        .bind(&id.0[..])
        .bind(int(from_ms))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err::<D>("reading presence"))?
        .iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<bool, _>(1)))
        .collect())
    }

    async fn prune_presence(&self, before_ms: u64) -> Result<u64, StoreError> {
        let order = D::PRESENCE_ORDER;
        let r = query::<D>(&format!(
            "DELETE FROM presence AS p WHERE at_ms < $1 AND EXISTS ( \
                 SELECT 1 FROM presence q WHERE q.node = p.node AND q.at_ms < $1 \
                 AND (q.at_ms, q.{order}) > (p.at_ms, p.{order}))"
        ))
        .bind(int(before_ms))
        .execute(&self.pool)
        .await
        .map_err(db_err::<D>("pruning presence"))?;
        Ok(D::rows_affected(&r))
    }

    async fn reserve(
        &self,
        owner: &NodeId,
        storer: &NodeId,
        size: u64,
        expires_ms: u64,
        limits: OwnerLimits,
    ) -> Result<bool, StoreError> {
        if owner == storer {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        D::lock_nodes(&mut tx, &[owner, storer])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        // Each UPDATE checks and takes the space under the lock, so
        // concurrent reservations can never over-commit.
        let space =
            query::<D>("UPDATE nodes SET held = held + $1 WHERE id = $2 AND offer - held >= $1")
                .bind(int(size))
                .bind(&storer.0[..])
                .execute(&mut *tx)
                .await
                .map_err(db_err::<D>("reserving space"))?;
        if D::rows_affected(&space) != 1 {
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(false);
        }
        // The owner's quota, worked out here (under the write lock the
        // UPDATE above took, and the nodes' locks) rather than in SQL, where
        // grant + earned could overflow.
        let quota = query::<D>("SELECT offer, placed, earned FROM nodes WHERE id = $1")
            .bind(&owner.0[..])
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err::<D>("reading a quota"))?
            .map(|r| {
                let at = |i: usize| r.get::<i64, _>(i).max(0) as u64;
                (at(0).min(limits.grant.saturating_add(at(2))), at(1))
            });
        let pending = query::<D>("SELECT COUNT(*) FROM reservations WHERE owner = $1")
            .bind(&owner.0[..])
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err::<D>("counting reservations"))?
            .get::<i64, _>(0)
            .max(0) as u64;
        match quota {
            Some((may, placed))
                if placed.saturating_add(size) <= may && pending < limits.max_reservations => {}
            _ => {
                tx.rollback().await.map_err(db_err::<D>("rollback"))?;
                return Ok(false);
            }
        }
        let owner_ok = {
            let quota = query::<D>("UPDATE nodes SET placed = placed + $1 WHERE id = $2")
                .bind(int(size))
                .bind(&owner.0[..])
                .execute(&mut *tx)
                .await
                .map_err(db_err::<D>("reserving quota"))?;
            D::rows_affected(&quota) == 1
        };
        if !owner_ok {
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(false);
        }
        query::<D>(
            "INSERT INTO reservations (owner, storer, size, expires_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&owner.0[..])
        .bind(&storer.0[..])
        .bind(int(size))
        .bind(int(expires_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err::<D>("reserving space"))?;
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(true)
    }

    async fn release_expired(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        let gone = D::release_expired(&mut tx, int(now_ms))
            .await
            .map_err(db_err::<D>("releasing reservations"))?;
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(gone)
    }

    async fn record_replica(&self, r: &ReplicaRecord, now_ms: u64) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        D::lock_nodes(&mut tx, &[&r.owner, &r.storer])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        if !Self::insert_replica(&mut tx, r, now_ms).await? {
            let kept = Self::on_replica(
                &format!(
                    "SELECT {REPLICA_COLUMNS} FROM replicas \
                 WHERE owner = $1 AND pack = $2 AND storer = $3"
                ),
                &r.owner,
                &r.pack,
                &r.storer,
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err::<D>("recording a replica"))?;
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(match kept.as_ref().map(Self::replica_row).transpose()? {
                Some(k) if k == *r => Recorded::Again,
                _ => Recorded::Conflict,
            });
        }
        let reserved = query::<D>(
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
        .map_err(db_err::<D>("recording a replica"))?
        .map(|row| row.get::<i64, _>(0));
        let Some(reserved) = reserved else {
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(Recorded::NoReservation);
        };
        let surplus = reserved - int(r.size);
        if surplus > 0 {
            for (column, party) in [("held", &r.storer), ("placed", &r.owner)] {
                Self::take_usage(&mut tx, column, party, surplus, "recording a replica").await?;
            }
        }
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(Recorded::New)
    }

    async fn restore_replica(&self, r: &ReplicaRecord, now_ms: u64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        // The owner first, so that its row is there to be locked.
        query::<D>(
            "INSERT INTO nodes (id, exchange_key, offer, last_seen_ms, registered_ms) \
             VALUES ($1, $2, 0, $3, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&r.owner.0[..])
        .bind(&[0u8; 32][..])
        .bind(int(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err::<D>("restoring a replica"))?;
        D::lock_nodes(&mut tx, &[&r.owner, &r.storer])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        // Recorded now: the storer reports holding it now, so a delete
        // signed before cannot release it.
        if !Self::insert_replica(&mut tx, r, now_ms).await? {
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(false);
        }
        // Never beyond what the storer offers: a report is no way to hold
        // more than that.
        let room =
            query::<D>("UPDATE nodes SET held = held + $1 WHERE id = $2 AND offer - held >= $1")
                .bind(int(r.size))
                .bind(&r.storer.0[..])
                .execute(&mut *tx)
                .await
                .map_err(db_err::<D>("restoring a replica"))?;
        if D::rows_affected(&room) != 1 {
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(false);
        }
        query::<D>("UPDATE nodes SET placed = placed + $1 WHERE id = $2")
            .bind(int(r.size))
            .bind(&r.owner.0[..])
            .execute(&mut *tx)
            .await
            .map_err(db_err::<D>("restoring a replica"))?;
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(true)
    }

    async fn set_addresses(&self, id: &NodeId, addresses: &[String]) -> Result<(), StoreError> {
        query::<D>("UPDATE nodes SET addresses = $1 WHERE id = $2")
            .bind(join_addresses(addresses))
            .bind(&id.0[..])
            .execute(&self.pool)
            .await
            .map_err(db_err::<D>("keeping addresses"))?;
        Ok(())
    }

    async fn addresses(
        &self,
        ids: &[NodeId],
    ) -> Result<Vec<(NodeId, bool, Vec<String>)>, StoreError> {
        D::addresses(&self.pool, ids)
            .await
            .map_err(db_err::<D>("reading addresses"))?
            .iter()
            .map(|r| {
                Ok((
                    id32(r.get::<&[u8], _>(0), "node id", NodeId)?,
                    r.get::<bool, _>(1),
                    split_addresses(r.get::<&str, _>(2)),
                ))
            })
            .collect()
    }

    async fn replicas_of(&self, owner: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.replicas_where("owner", owner, "listing replicas")
            .await
    }

    async fn replicas_held_by(&self, storer: &NodeId) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.replicas_where("storer", storer, "listing held replicas")
            .await
    }

    async fn put_manifest(
        &self,
        id: &NodeId,
        version: u64,
        blob: &[u8],
    ) -> Result<bool, StoreError> {
        let r = query::<D>(
            "INSERT INTO manifests (node, version, blob) VALUES ($1, $2, $3) \
             ON CONFLICT (node) DO UPDATE SET version = excluded.version, blob = excluded.blob \
             WHERE manifests.version < excluded.version",
        )
        .bind(&id.0[..])
        .bind(ordered(version))
        .bind(blob)
        .execute(&self.pool)
        .await
        .map_err(db_err::<D>("keeping a manifest"))?;
        Ok(D::rows_affected(&r) == 1)
    }

    async fn manifest(&self, id: &NodeId) -> Result<Option<ManifestRecord>, StoreError> {
        Ok(
            query::<D>("SELECT version, blob FROM manifests WHERE node = $1")
                .bind(&id.0[..])
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err::<D>("reading a manifest"))?
                .map(|r| ManifestRecord {
                    version: unordered(r.get::<i64, _>(0)),
                    blob: r.get(1),
                }),
        )
    }

    async fn set_standing(&self, id: &NodeId, standing: &Standing) -> Result<bool, StoreError> {
        check_standing(standing)?;
        let s = standing;
        let r = query::<D>(
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
        .map_err(db_err::<D>("keeping a standing"))?;
        Ok(D::rows_affected(&r) == 1)
    }

    async fn replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<Option<ReplicaRecord>, StoreError> {
        Self::on_replica(
            &format!(
                "SELECT {REPLICA_COLUMNS} FROM replicas \
             WHERE owner = $1 AND pack = $2 AND storer = $3"
            ),
            owner,
            pack,
            storer,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err::<D>("reading a replica"))?
        .as_ref()
        .map(Self::replica_row)
        .transpose()
    }

    async fn drop_replica(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        D::lock_nodes(&mut tx, &[owner, storer])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        let gone = Self::on_replica(
            "DELETE FROM replicas WHERE owner = $1 AND pack = $2 AND storer = $3 \
             RETURNING size, proven_ms, lost_ms",
            owner,
            pack,
            storer,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err::<D>("dropping a replica"))?
        .map(|row| {
            (
                row.get::<i64, _>(0),
                row.get::<i64, _>(1) > 0 && row.get::<i64, _>(2) == 0,
            )
        });
        let Some((size, earned)) = gone else {
            tx.rollback().await.map_err(db_err::<D>("rollback"))?;
            return Ok(false);
        };
        for (column, party) in [("held", storer), ("placed", owner)] {
            Self::take_usage(&mut tx, column, party, size, "dropping a replica").await?;
        }
        if earned {
            Self::take_usage(&mut tx, "earned", storer, size, "dropping a replica").await?;
        }
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(true)
    }

    async fn mark_lost(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        D::lock_nodes(&mut tx, &[owner, storer])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        // The first time it was found lost stays (0 means "not lost"); the
        // write comes first, so SQLite takes its write lock at once.
        let newly = Self::on_replica(
            "UPDATE replicas SET lost_ms = $4 \
             WHERE owner = $1 AND pack = $2 AND storer = $3 AND lost_ms = 0 \
             RETURNING size, proven_ms",
            owner,
            pack,
            storer,
        )
        .bind(int(now_ms.max(1)))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err::<D>("marking a replica lost"))?
        .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)));
        let found = match newly {
            Some((size, proven_ms)) => {
                if proven_ms > 0 {
                    Self::take_usage(&mut tx, "earned", storer, size, "marking a replica lost")
                        .await?;
                }
                true
            }
            None => Self::on_replica(
                "SELECT 1 FROM replicas WHERE owner = $1 AND pack = $2 AND storer = $3",
                owner,
                pack,
                storer,
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err::<D>("marking a replica lost"))?
            .is_some(),
        };
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(found)
    }

    async fn mark_proven(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err::<D>("begin"))?;
        D::lock_nodes(&mut tx, &[storer])
            .await
            .map_err(db_err::<D>("locking nodes"))?;
        // The first pass counts (the write first, for SQLite's lock).
        let newly = Self::on_replica(
            "UPDATE replicas SET proven_ms = $4 \
             WHERE owner = $1 AND pack = $2 AND storer = $3 AND lost_ms = 0 AND proven_ms = 0 \
             RETURNING size",
            owner,
            pack,
            storer,
        )
        .bind(int(now_ms.max(1)))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err::<D>("marking a replica proven"))?
        .map(|r| r.get::<i64, _>(0));
        let found = match newly {
            Some(size) => {
                query::<D>("UPDATE nodes SET earned = earned + $1 WHERE id = $2")
                    .bind(size)
                    .bind(&storer.0[..])
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err::<D>("marking a replica proven"))?;
                true
            }
            None => Self::on_replica(
                "SELECT 1 FROM replicas \
                 WHERE owner = $1 AND pack = $2 AND storer = $3 AND lost_ms = 0",
                owner,
                pack,
                storer,
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err::<D>("marking a replica proven"))?
            .is_some(),
        };
        tx.commit().await.map_err(db_err::<D>("commit"))?;
        Ok(found)
    }

    async fn replica_marked(
        &self,
        owner: &NodeId,
        pack: &PackId,
        storer: &NodeId,
    ) -> Result<Option<(ReplicaRecord, ReplicaMarks)>, StoreError> {
        Self::on_replica(
            &format!(
                "SELECT {REPLICA_COLUMNS}, recorded_ms, lost_ms FROM replicas \
                 WHERE owner = $1 AND pack = $2 AND storer = $3"
            ),
            owner,
            pack,
            storer,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err::<D>("reading a replica"))?
        .map(|r| {
            let at = |i: usize| r.get::<i64, _>(i).max(0) as u64;
            let marks = ReplicaMarks {
                recorded_ms: at(5),
                lost_ms: at(6),
            };
            Ok((Self::replica_row(&r)?, marks))
        })
        .transpose()
    }

    async fn lost_replicas(&self, owner: &NodeId) -> Result<Vec<(PackId, NodeId)>, StoreError> {
        query::<D>(
            "SELECT pack, storer FROM replicas WHERE owner = $1 AND lost_ms > 0 \
             ORDER BY pack, storer",
        )
        .bind(&owner.0[..])
        .fetch_all(&self.pool)
        .await
        .map_err(db_err::<D>("listing lost replicas"))?
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
        Ok(Self::on_replica(
            "SELECT 1 FROM replicas WHERE owner = $1 AND pack = $2 AND storer = $3 AND lost_ms > 0",
            owner,
            pack,
            storer,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err::<D>("reading a replica"))?
        .is_some())
    }

    async fn storers(&self) -> Result<Vec<(NodeId, u64)>, StoreError> {
        query::<D>("SELECT storer, COUNT(*) FROM replicas GROUP BY storer")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err::<D>("listing storers"))?
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
