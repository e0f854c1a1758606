//! The coordinator's books ([`BooksStore`]) in SQL, written once for every
//! database sqlx drives: the queries, the transactions and the row decoding
//! live here; a store plugin supplies a [`Dialect`] for its database (its
//! connection setup and migrations, and the few statements whose shape
//! differs) and registers `SqlBooks<ItsDialect>` as its books.
//!
//! ```ignore
//! // A store crate (pluto-store-sqlite, pluto-store-postgres) supplies its
//! // dialect and names its books:
//! pub struct SqliteDialect;
//! impl pluto_books_sql::Dialect for SqliteDialect { /* open, hooks */ }
//! pub type SqliteBooks = pluto_books_sql::SqlBooks<SqliteDialect>;
//!
//! // The coordinator opens them (or by URL, through the plugin registry):
//! let books = SqliteBooks::open("sqlite:/var/lib/pluto/books.db").await?;
//! ```
//!
//! No features; the books are tested by the store crates, each running the
//! books conformance suite (`pluto_plugins_api::testkit`) on its database.
//!
//! # Why generics over `sqlx::Database`
//!
//! As sqlx's drivers share sqlx-core, [`SqlBooks`] is generic over the
//! database: the same code is monomorphised for each driver, so SQLite keeps
//! its native types and Postgres its arrays, and this crate links no driver.
//! The price is one list of bounds (what the books bind and read, see
//! [`SqlBooks`]'s impls), written twice. sqlx's `Any` driver was the other
//! way: one type, but every row copied into `AnyValue`s, no arrays, and
//! drivers installed in global state. A macro stamping one body per database
//! would have hidden the shared code from the type checker until expanded.
//!
//! # What a dialect supplies, and what it need not
//!
//! - Placeholders: none; the SQL here numbers them (`$1`), which Postgres
//!   takes and sqlx-sqlite binds by number too.
//! - Integers: every u64 is stored as an i64 by [`pluto_plugins_api::sqlint`]
//!   (sizes and times clamped, manifest versions order-preserving), the same
//!   for every database. Flags are bound and read as `bool`: a Postgres
//!   `BOOLEAN`, a SQLite `INTEGER` holding 0 or 1.
//! - Upserts use `ON CONFLICT ... DO UPDATE SET c = excluded.c` and
//!   removals `RETURNING`, which both databases speak.
//! - [`Dialect::open`]: connection setup and migrations.
//! - [`Dialect::rows_affected`]: sqlx has no trait for it.
//! - [`Dialect::GREATEST`]: the n-ary maximum (`MAX` or `GREATEST`).
//! - [`Dialect::PRESENCE_ORDER`]: the presence log's insertion order.
//! - [`Dialect::lock_nodes`]: row locks where the database has them
//!   (Postgres takes them in id order; SQLite's first write locks it all).
//! - [`Dialect::mark_silent_offline`], [`Dialect::release_expired`]: one
//!   statement with data-modifying CTEs where the database has them, a
//!   sequence under the write lock where not.
//! - [`Dialect::addresses`]: one query over an array, or one per node.

use std::fmt;
use std::future::Future;

use pluto_plugins_api::sqlint::{
    clamped as int, join_addresses, ordered, split_addresses, unordered,
};
use pluto_plugins_api::{
    async_trait, Beta, BooksStore, ManifestRecord, NodeId, NodeRecord, OwnerLimits, PackId,
    Recorded, ReplicaMarks, ReplicaRecord, Standing, StoreError,
};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};

/// What a database's store plugin supplies to [`SqlBooks`]: how to open and
/// migrate its books, and the statements that cannot be written once.
///
/// Every hook runs inside the transaction the operation holds (`conn` is
/// that transaction's connection) unless it takes the pool.
pub trait Dialect: fmt::Debug + Send + Sync + 'static {
    /// The sqlx database.
    type Db: Database;
    /// Names the database in error messages (`sqlite: reading a node: ...`).
    const NAME: &'static str;
    /// The function that gives the greatest of its arguments.
    const GREATEST: &'static str;
    /// The column of `presence` that orders changes logged at the same
    /// millisecond (in the order they were logged).
    const PRESENCE_ORDER: &'static str;

    /// How many rows a statement changed (sqlx has no trait for it).
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;

    /// Connects to `url` and migrates the books there.
    fn open(url: &str) -> impl Future<Output = Result<Pool<Self::Db>, StoreError>> + Send;

    /// Locks the rows of these nodes until the transaction ends, in id
    /// order (the one order every transaction uses, so two never wait for
    /// each other in a circle). Nothing where a transaction's first write
    /// already locks the whole database.
    fn lock_nodes<'a>(
        conn: &'a mut <Self::Db as Database>::Connection,
        ids: &'a [&'a NodeId],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;

    /// Marks offline every online node last heard from before
    /// `silent_since_ms`, adding its online stretch (to its last-seen time)
    /// to `online_ms` and logging it offline at its last-seen time. Returns
    /// one row per node, its id in column 0.
    fn mark_silent_offline<'a>(
        conn: &'a mut <Self::Db as Database>::Connection,
        silent_since_ms: i64,
    ) -> impl Future<Output = Result<Vec<<Self::Db as Database>::Row>, sqlx::Error>> + Send + 'a;

    /// Deletes the reservations expiring at or before `now_ms`, taking their
    /// sizes off their storers' `held` and their owners' `placed` (never
    /// below 0). Returns how many were deleted.
    fn release_expired<'a>(
        conn: &'a mut <Self::Db as Database>::Connection,
        now_ms: i64,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'a;

    /// `SELECT id, online, addresses FROM nodes` for the registered ones
    /// among `ids`.
    fn addresses<'a>(
        pool: &'a Pool<Self::Db>,
        ids: &'a [NodeId],
    ) -> impl Future<Output = Result<Vec<<Self::Db as Database>::Row>, sqlx::Error>> + Send + 'a;
}

/// The books in one database of dialect `D`.
pub struct SqlBooks<D: Dialect> {
    pool: Pool<D::Db>,
}

impl<D: Dialect> fmt::Debug for SqlBooks<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlBooks")
            .field("dialect", &D::NAME)
            .field("pool", &self.pool)
            .finish()
    }
}

impl<D: Dialect> Clone for SqlBooks<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
        }
    }
}

fn db_err<D: Dialect>(context: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Plugin(format!("{}: {context}: {e}", D::NAME).into())
}

fn id32<T>(bytes: &[u8], what: &str, wrap: fn([u8; 32]) -> T) -> Result<T, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(wrap)
        .map_err(|_| StoreError::Corrupt(format!("books hold a {what} of {} bytes", bytes.len())))
}

/// Refuses a standing with a NaN in it: SQLite would keep it as NULL, and
/// every database takes the same standings.
fn check_standing(s: &Standing) -> Result<(), StoreError> {
    let tracks = [s.audit, s.timeout, s.uptime];
    if tracks.iter().any(|t| t.alpha.is_nan() || t.beta.is_nan()) {
        return Err(StoreError::OutOfRange(
            "a standing whose reputation is not a number".into(),
        ));
    }
    Ok(())
}

const NODE_COLUMNS: &str = "id, exchange_key, offer, held, placed, online, last_seen_ms, \
                            registered_ms, online_ms, online_since_ms, \
                            audit_alpha, audit_beta, timeout_alpha, timeout_beta, \
                            uptime_alpha, uptime_beta, passed, failed, timed_out, \
                            speed_bps, speed_at_ms, excluded_ms, held_back, earned";

const REPLICA_COLUMNS: &str = "owner, pack, storer, size, root";

impl<D: Dialect> SqlBooks<D> {
    /// Opens the books at `url`, migrating them ([`Dialect::open`]).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            pool: D::open(url).await?,
        })
    }
}

mod books;
