//! What differs between the three engines, and only that: how a node
//! connects, how a statement writes upserts and placeholders, and the two
//! statements that take a batch as one JSON parameter. Everything else is
//! the one implementation in `sql.rs` and `group_commit.rs`.
//!
//! Batches travel as JSON arrays on every engine (`json_each`, `JSON_TABLE`,
//! `json_array_elements`): one bound parameter whatever the batch size, so
//! no statement comes near a placeholder limit, and a multicast's payload
//! is bound once for all its recipients.

use std::borrow::Cow;
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::pool::PoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Database, Executor, MySql, Pool, Postgres, Sqlite};

use crate::StorageError;

/// Connections a node keeps to a networked database. Each store is one
/// statement of a group commit and each read a short one, so this many keep
/// a node's API busy without crowding a server that many nodes share.
const NETWORKED_CONNECTIONS_MAX: u32 = 16;

/// How long a call waits for a connection before it fails as unavailable:
/// the API then answers 503 rather than hold its caller while the database
/// is down.
const NETWORKED_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// SQLite's read pool. Reads are short indexed range scans, so a few
/// connections keep up with the 2-4 cores a typical node has; each costs an
/// open file handle and SQLite's page cache.
const SQLITE_READ_CONNECTIONS_MAX: u32 = 4;

/// Page cache per SQLite read connection, in KiB (SQLite's default is 2,000).
/// Reads are indexed point and range lookups, so a small cache costs little
/// speed; it is part of the region every node allocates at startup.
const SQLITE_PAGE_CACHE_KIB: u32 = 512;

/// The writer's page cache, in KiB. Its working set is the inbox heads and
/// the pages of the messages' primary key that recent stores touched; a
/// page that is not cached is read (from the OS) inside the commit. Its
/// pages come from the region allocated at startup (`sqlite_memory.rs`).
const SQLITE_WRITER_CACHE_KIB: u32 = 16 * 1024;

/// The page caches of one database's connections together, at their
/// bounds: the size of SQLite's page-cache region (`sqlite_memory.rs`).
const SQLITE_PAGE_CACHES_KIB: usize =
    (SQLITE_WRITER_CACHE_KIB + SQLITE_READ_CONNECTIONS_MAX * SQLITE_PAGE_CACHE_KIB) as usize;

/// WAL frames after which a commit folds the WAL back into the database
/// file (SQLite's default is 1,000). Stores to many inboxes touch many
/// pages of the messages' primary key, and a page written again before the
/// checkpoint is copied once: checkpointing a tenth as often copies far
/// fewer pages per store. The WAL grows to about 40 MiB between them.
const SQLITE_CHECKPOINT_FRAMES: u32 = 10_000;

/// Rows SQLite's worker thread hands back before it waits for the caller to
/// take them (sqlx's default is 50). A group commit's upsert returns a row
/// per inbox it raised; with room for all of them the worker never stops
/// half way to wait for the committer's task to be scheduled.
const SQLITE_ROW_BUFFER: usize = 1_024;

/// How long SQLite retries when another process holds the write lock before
/// it fails with SQLITE_BUSY. Within this process writers never contend (one
/// write connection), so this only matters if some other tool opens the file.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a call waits for one of SQLite's pooled connections. Writes
/// queue for the single write connection, so under a storm this is the
/// backpressure point: a caller waiting this long is better told to retry.
const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pools a saver reads and writes through.
#[derive(Debug)]
pub(crate) struct Pools<DB: Database> {
    /// Where every write goes (on SQLite exactly one connection: SQLite
    /// admits one writer at a time, and a pool of one queues writers fairly
    /// instead of letting them race for the lock).
    pub(crate) writer: Pool<DB>,
    /// Where reads go: on SQLite a separate pool, whose reads run beside the
    /// writer in WAL mode; elsewhere the same pool.
    pub(crate) reader: Pool<DB>,
}

impl<DB: Database> Clone for Pools<DB> {
    fn clone(&self) -> Pools<DB> {
        Pools {
            writer: self.writer.clone(),
            reader: self.reader.clone(),
        }
    }
}

/// How an upsert merges a column of the row it collides with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Merge {
    /// The stored value plus the inserted one (a head raised by a count).
    Add,
    /// The larger of the two (a cursor that only rises).
    Max,
}

/// One engine's dialect (see the module docs).
pub(crate) trait Dialect: Debug + Send + Sync + 'static {
    type Db: Database;

    /// The engine's name, for logs and metrics.
    const NAME: &'static str;

    /// Group commits one node runs at once. SQLite has one writer; a
    /// networked server syncs several transactions' logs together, so a
    /// node keeps a few in flight.
    const COMMITS_IN_FLIGHT: usize;

    /// How a writing transaction begins.
    const BEGIN: &'static str;

    /// Whether an upsert can return the rows it wrote (`RETURNING`);
    /// without it, the rows are read back inside the transaction, which
    /// holds their locks.
    const UPSERT_RETURNS: bool;

    /// Whether one call may carry several statements, each with its
    /// arguments. On SQLite a call is a round trip to the connection's
    /// worker thread, which on a busy host waits to be scheduled each time,
    /// so a group commit makes two calls: begin and raise the heads, then
    /// insert the rows and commit. MySQL's and PostgreSQL's prepared
    /// statements take one statement a call.
    const MULTI_STATEMENT_CALLS: bool;

    /// What locks the rows a SELECT reads until commit ("" on SQLite, whose
    /// single writer already excludes every other).
    const FOR_UPDATE: &'static str;

    /// `(last_seq, acked_seq)` for each `[app, user, device|null]` of a
    /// JSON array, in the array's order.
    const INBOX_HEADS: &'static str;

    /// A table of `(user_id, seq)` rows from a JSON array of
    /// `[user, seq]` pairs bound at its one `?`.
    const RECIPIENTS: &'static str;

    /// Where set, a group commit raises heads and inserts unicast rows with
    /// statements whose text never changes, each taking the group as one
    /// JSON array, instead of multi-row VALUES whose text changes with the
    /// group's size. sqlx keeps 100 prepared statements a connection, and
    /// on MySQL evicting one sends COM_STMT_CLOSE, which has no answer: the
    /// next statement, written behind it, waits for the server's delayed
    /// ACK (Nagle's algorithm; sqlx does not set TCP_NODELAY), 40 ms a
    /// statement, measured with tcpdump.
    const JSON_GROUP: Option<JsonGroup> = None;

    /// Opens the pools for `target` and brings the schema up to date.
    fn open(target: &str) -> impl Future<Output = Result<Pools<Self::Db>, StorageError>> + Send;

    /// `sql` with its `?` placeholders as the engine writes them.
    fn placeholders(sql: Cow<'static, str>) -> Cow<'static, str> {
        sql
    }

    /// The clause that turns an INSERT into `table` into an upsert on the
    /// unique `keys`, merging each column as given.
    fn on_conflict(table: &str, keys: &str, merges: &[(&str, Merge)]) -> String;

    /// The clause that makes an INSERT on the unique `keys` do nothing
    /// when the row exists.
    fn on_conflict_ignore(keys: &str) -> String {
        format!(" ON CONFLICT ({keys}) DO NOTHING")
    }

    /// A statement deleting at most `?` (the last parameter) rows of
    /// `table` that match `condition` (whose parameters come first).
    fn delete_some(table: &str, condition: &str) -> String;

    /// How many rows a statement changed (each engine's result has its own
    /// type).
    fn rows_affected(result: &<Self::Db as Database>::QueryResult) -> u64;

    /// What to do with the writer before the pools close.
    fn before_close(writer: &Pool<Self::Db>) -> impl Future<Output = ()> + Send {
        let _ = writer;
        async {}
    }
}

/// A group commit's statements that take the group as one JSON array (see
/// [`Dialect::JSON_GROUP`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct JsonGroup {
    /// Raises the head of each `[app, user, count]`, in the array's order,
    /// by its count.
    pub(crate) raise_heads: &'static str,
    /// `(app, user_id, last_seq)` of the head of each `[app, user]`.
    pub(crate) heads: &'static str,
    /// Inserts a message row from each `[app, user, seq, message_id,
    /// payload, created_at_ms, expires_at_ms]`, the id and the payload in
    /// base64.
    pub(crate) insert_unicasts: &'static str,
}

/// The embedded default: one file, WAL mode, every commit synced.
#[derive(Debug)]
pub(crate) struct SqliteDialect;

impl Dialect for SqliteDialect {
    type Db = Sqlite;
    const NAME: &'static str = "sqlite";
    const COMMITS_IN_FLIGHT: usize = 1;
    // IMMEDIATE takes the write lock up front, so the transaction never has
    // to upgrade from a read lock half way (the SQLITE_BUSY trap).
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const UPSERT_RETURNS: bool = true;
    const MULTI_STATEMENT_CALLS: bool = true;
    const FOR_UPDATE: &'static str = "";
    const INBOX_HEADS: &'static str = "SELECT h.last_seq, c.acked_seq FROM json_each(?) AS r \
         LEFT JOIN inbox_heads AS h \
           ON h.app = r.value ->> 0 AND h.user_id = r.value ->> 1 \
         LEFT JOIN device_cursors AS c \
           ON c.app = r.value ->> 0 AND c.user_id = r.value ->> 1 \
          AND c.device_id = r.value ->> 2 \
         ORDER BY r.key";
    const RECIPIENTS: &'static str =
        "(SELECT value ->> 0 AS user_id, value ->> 1 AS seq FROM json_each(?))";

    async fn open(path: &str) -> Result<Pools<Sqlite>, StorageError> {
        crate::sqlite_memory::reserve_page_caches(SQLITE_PAGE_CACHES_KIB);
        let path = Path::new(path);
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL syncs the WAL on every commit, so a store that returned
            // Ok survives a power cut, not only a process crash (NORMAL
            // would lose the last commits on power loss).
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .pragma("cache_size", format!("-{SQLITE_PAGE_CACHE_KIB}"))
            .row_buffer_size(SQLITE_ROW_BUFFER)
            // A group commit's multi-row statements keep a statement journal
            // (to undo one statement alone) that outgrows SQLite's in-memory
            // spill limit; on disk it was a temporary file created, written
            // and deleted every commit.
            .pragma("temp_store", "MEMORY");
        // A ping before each use would be a round trip to the connection's
        // worker thread that tells nothing its statements do not. A SQLite
        // connection does not go stale, so it is kept for the process's
        // life: sqlx's default recycling (idle 10 minutes, at most 30) only
        // threw its page cache away to be read and allocated again.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(SQLITE_ACQUIRE_TIMEOUT)
            .connect_with(
                options
                    .clone()
                    .pragma("cache_size", format!("-{SQLITE_WRITER_CACHE_KIB}"))
                    .pragma("wal_autocheckpoint", SQLITE_CHECKPOINT_FRAMES.to_string()),
            )
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(SQLITE_READ_CONNECTIONS_MAX)
            .test_before_acquire(false)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(SQLITE_ACQUIRE_TIMEOUT)
            .connect_with(options.create_if_missing(false))
            .await?;
        tracing::info!(path = %path.display(), "opened SQLite storage");
        Ok(Pools { writer, reader })
    }

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    fn on_conflict(table: &str, keys: &str, merges: &[(&str, Merge)]) -> String {
        // Two-argument MAX is SQLite's scalar max (GREATEST elsewhere).
        excluded_merges(table, keys, merges, "MAX")
    }

    fn delete_some(table: &str, condition: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE rowid IN \
             (SELECT rowid FROM {table} WHERE {condition} LIMIT ?)"
        )
    }

    /// Folds the WAL back into the main file so the next open does not
    /// replay it. Best effort: SQLite checkpoints on the last close too, and
    /// the WAL is durable either way.
    async fn before_close(writer: &Pool<Sqlite>) {
        if let Err(error) = writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").await {
            tracing::warn!(%error, "WAL checkpoint on close failed");
        }
    }
}

/// MySQL 8 or MariaDB 10.6+, shared by every node of a cluster.
///
/// The inbox head's row lock orders concurrent stores to one user from any
/// number of nodes: the upsert that raises a head holds its row until
/// commit. Heads are raised in (app, user) order, so two groups raising
/// overlapping heads queue rather than deadlock; InnoDB may still pick a
/// deadlock victim (its gap locks), and the group is retried.
#[derive(Debug)]
pub(crate) struct MySqlDialect;

impl Dialect for MySqlDialect {
    type Db = MySql;
    const NAME: &'static str = "mysql";
    const COMMITS_IN_FLIGHT: usize = 4;
    const BEGIN: &'static str = "BEGIN";
    // MySQL 8 has no RETURNING.
    const UPSERT_RETURNS: bool = false;
    const MULTI_STATEMENT_CALLS: bool = false;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    // JSON_TABLE's columns carry the connection's collation; the joins
    // compare in the tables' binary one.
    const INBOX_HEADS: &'static str = "SELECT h.last_seq, c.acked_seq FROM JSON_TABLE(?, '$[*]' COLUMNS ( \
           n FOR ORDINALITY, app VARCHAR(64) PATH '$[0]', \
           user_id VARCHAR(128) PATH '$[1]', device_id VARCHAR(128) PATH '$[2]')) AS r \
         LEFT JOIN inbox_heads AS h \
           ON h.app = r.app COLLATE utf8mb4_bin \
          AND h.user_id = r.user_id COLLATE utf8mb4_bin \
         LEFT JOIN device_cursors AS c \
           ON c.app = r.app COLLATE utf8mb4_bin \
          AND c.user_id = r.user_id COLLATE utf8mb4_bin \
          AND c.device_id = r.device_id COLLATE utf8mb4_bin \
         ORDER BY r.n";
    const RECIPIENTS: &'static str = "JSON_TABLE(?, '$[*]' COLUMNS ( \
           user_id VARCHAR(128) PATH '$[0]', seq BIGINT PATH '$[1]'))";
    const JSON_GROUP: Option<JsonGroup> = Some(JsonGroup {
        raise_heads: "INSERT INTO inbox_heads (app, user_id, last_seq) \
             SELECT r.app, r.user_id, r.n FROM JSON_TABLE(?, '$[*]' COLUMNS ( \
               app VARCHAR(64) PATH '$[0]', user_id VARCHAR(128) PATH '$[1]', \
               n BIGINT PATH '$[2]')) AS r \
             ON DUPLICATE KEY UPDATE last_seq = last_seq + VALUES(last_seq)",
        heads: "SELECT h.app, h.user_id, h.last_seq FROM JSON_TABLE(?, '$[*]' COLUMNS ( \
               app VARCHAR(64) PATH '$[0]', user_id VARCHAR(128) PATH '$[1]')) AS r \
             JOIN inbox_heads AS h \
               ON h.app = r.app COLLATE utf8mb4_bin \
              AND h.user_id = r.user_id COLLATE utf8mb4_bin",
        insert_unicasts: "INSERT INTO messages \
             (app, user_id, seq, message_id, payload, notice, created_at_ms, expires_at_ms) \
             SELECT r.app, r.user_id, r.seq, FROM_BASE64(r.message_id), FROM_BASE64(r.payload), \
               FROM_BASE64(NULLIF(r.notice, '')), r.created_at_ms, r.expires_at_ms \
             FROM JSON_TABLE(?, '$[*]' COLUMNS ( \
               app VARCHAR(64) PATH '$[0]', user_id VARCHAR(128) PATH '$[1]', \
               seq BIGINT PATH '$[2]', message_id VARCHAR(32) PATH '$[3]', \
               payload LONGTEXT PATH '$[4]', created_at_ms BIGINT PATH '$[5]', \
               expires_at_ms BIGINT PATH '$[6]', notice LONGTEXT PATH '$[7]')) AS r",
    });

    async fn open(url: &str) -> Result<Pools<MySql>, StorageError> {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let options: MySqlConnectOptions = url.parse()?;
        let pool = networked_pool::<MySql>()
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // READ COMMITTED takes no gap locks on plain reads and
                    // fewer on writes: fewer deadlocks between nodes.
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/mysql").run(&pool).await?;
        tracing::info!("opened MySQL storage");
        Ok(Pools {
            writer: pool.clone(),
            reader: pool,
        })
    }

    fn rows_affected(result: &sqlx::mysql::MySqlQueryResult) -> u64 {
        result.rows_affected()
    }

    fn on_conflict(_table: &str, _keys: &str, merges: &[(&str, Merge)]) -> String {
        let set: Vec<String> = merges
            .iter()
            .map(|(column, merge)| match merge {
                Merge::Add => format!("{column} = {column} + VALUES({column})"),
                Merge::Max => format!("{column} = GREATEST({column}, VALUES({column}))"),
            })
            .collect();
        format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
    }

    fn on_conflict_ignore(keys: &str) -> String {
        let first = keys.split(',').next().unwrap_or(keys).trim();
        format!(" ON DUPLICATE KEY UPDATE {first} = {first}")
    }

    fn delete_some(table: &str, condition: &str) -> String {
        format!("DELETE FROM {table} WHERE {condition} LIMIT ?")
    }
}

/// PostgreSQL, shared by every node of a cluster. Row locks order
/// concurrent stores as on MySQL (READ COMMITTED re-reads the latest head
/// after the wait).
#[derive(Debug)]
pub(crate) struct PostgresDialect;

impl Dialect for PostgresDialect {
    type Db = Postgres;
    const NAME: &'static str = "postgres";
    const COMMITS_IN_FLIGHT: usize = 4;
    const BEGIN: &'static str = "BEGIN";
    const UPSERT_RETURNS: bool = true;
    const MULTI_STATEMENT_CALLS: bool = false;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const INBOX_HEADS: &'static str = "SELECT h.last_seq, c.acked_seq \
         FROM json_array_elements(?::json) WITH ORDINALITY AS r(value, n) \
         LEFT JOIN inbox_heads AS h \
           ON h.app = r.value ->> 0 AND h.user_id = r.value ->> 1 \
         LEFT JOIN device_cursors AS c \
           ON c.app = r.value ->> 0 AND c.user_id = r.value ->> 1 \
          AND c.device_id = r.value ->> 2 \
         ORDER BY r.n";
    const RECIPIENTS: &'static str = "(SELECT e ->> 0 AS user_id, (e ->> 1)::bigint AS seq \
         FROM json_array_elements(?::json) AS e)";

    async fn open(url: &str) -> Result<Pools<Postgres>, StorageError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = networked_pool::<Postgres>().connect_with(options).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        tracing::info!("opened PostgreSQL storage");
        Ok(Pools {
            writer: pool.clone(),
            reader: pool,
        })
    }

    /// `?` becomes `$1`, `$2`, ... in order. No statement of this crate has
    /// a `?` inside a literal.
    fn placeholders(sql: Cow<'static, str>) -> Cow<'static, str> {
        let mut numbered = String::with_capacity(sql.len() + 16);
        for (n, piece) in sql.split('?').enumerate() {
            if n > 0 {
                numbered.push('$');
                numbered.push_str(&n.to_string());
            }
            numbered.push_str(piece);
        }
        Cow::Owned(numbered)
    }

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }

    fn on_conflict(table: &str, keys: &str, merges: &[(&str, Merge)]) -> String {
        excluded_merges(table, keys, merges, "GREATEST")
    }

    fn delete_some(table: &str, condition: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE ctid IN \
             (SELECT ctid FROM {table} WHERE {condition} LIMIT ?)"
        )
    }
}

/// The pool settings of a networked engine.
fn networked_pool<DB: Database>() -> PoolOptions<DB> {
    PoolOptions::new()
        .max_connections(NETWORKED_CONNECTIONS_MAX)
        .acquire_timeout(NETWORKED_ACQUIRE_TIMEOUT)
        // A broken connection fails its statement and is dropped; a ping
        // before every use would double the round trips.
        .test_before_acquire(false)
}

/// `ON CONFLICT .. DO UPDATE` with the `excluded` row, as SQLite and
/// PostgreSQL write it; `max` names the two-argument maximum.
fn excluded_merges(table: &str, keys: &str, merges: &[(&str, Merge)], max: &str) -> String {
    let set: Vec<String> = merges
        .iter()
        .map(|(column, merge)| match merge {
            Merge::Add => format!("{column} = {table}.{column} + excluded.{column}"),
            Merge::Max => format!("{column} = {max}({table}.{column}, excluded.{column})"),
        })
        .collect();
    format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", set.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group written in one call begins its transaction in the heads'
    /// call, which the JSON statements do not make.
    #[test]
    fn json_groups_are_not_written_in_one_call() {
        assert!(!(SqliteDialect::JSON_GROUP.is_some() && SqliteDialect::MULTI_STATEMENT_CALLS));
        assert!(!(MySqlDialect::JSON_GROUP.is_some() && MySqlDialect::MULTI_STATEMENT_CALLS));
        assert!(!(PostgresDialect::JSON_GROUP.is_some() && PostgresDialect::MULTI_STATEMENT_CALLS));
    }

    #[test]
    fn recipients_bind_their_array_at_one_placeholder() {
        for recipients in [
            SqliteDialect::RECIPIENTS,
            MySqlDialect::RECIPIENTS,
            PostgresDialect::RECIPIENTS,
        ] {
            assert_eq!(recipients.matches('?').count(), 1, "{recipients}");
        }
    }

    #[test]
    fn postgres_numbers_the_placeholders_in_order() {
        assert_eq!(
            PostgresDialect::placeholders("SELECT a FROM t WHERE b = ? AND c > ? LIMIT ?".into()),
            "SELECT a FROM t WHERE b = $1 AND c > $2 LIMIT $3"
        );
        assert_eq!(PostgresDialect::placeholders("SELECT 1".into()), "SELECT 1");
    }

    #[test]
    fn upserts_merge_as_each_engine_writes_it() {
        let merges = [("last_seq", Merge::Add), ("updated_at_ms", Merge::Max)];
        assert_eq!(
            SqliteDialect::on_conflict("t", "app, user_id", &merges),
            " ON CONFLICT (app, user_id) DO UPDATE SET last_seq = t.last_seq + excluded.last_seq, \
             updated_at_ms = MAX(t.updated_at_ms, excluded.updated_at_ms)"
        );
        assert_eq!(
            MySqlDialect::on_conflict("t", "app, user_id", &merges),
            " ON DUPLICATE KEY UPDATE last_seq = last_seq + VALUES(last_seq), \
             updated_at_ms = GREATEST(updated_at_ms, VALUES(updated_at_ms))"
        );
        assert_eq!(
            MySqlDialect::on_conflict_ignore("id"),
            " ON DUPLICATE KEY UPDATE id = id"
        );
        assert_eq!(
            PostgresDialect::on_conflict_ignore("id"),
            " ON CONFLICT (id) DO NOTHING"
        );
    }
}
