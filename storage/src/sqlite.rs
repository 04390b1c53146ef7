//! The saver over one SQLite file.
//!
//! SQLite admits one writer at a time. Rather than let several pooled
//! connections race for the write lock (the loser sleeps in SQLite's busy
//! handler, or fails with SQLITE_BUSY when a read transaction tries to
//! upgrade), every write goes through a pool of exactly one connection,
//! whose queue orders writers fairly. Reads use a separate pool: in WAL mode
//! they run beside the writer without blocking it.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Executor, Sqlite, SqlitePool};

use crate::{
    AckCursor, InboxHead, InboxKey, MessageId, NewMessage, StorageError, StoreOutcome,
    StoredMessage, StoredRef, new_message_id,
};

/// Connections in the read pool. Reads are short indexed range scans, so a
/// few connections keep up with the 2-4 cores a typical node has; each costs
/// an open file handle and SQLite's page cache (2 MiB by default).
const READ_CONNECTIONS_MAX: u32 = 4;

/// Page cache per connection, in KiB (SQLite's default is 2,000). Reads are
/// indexed point and range lookups and writes append, so a small cache
/// costs little speed; it is memory every node holds once it is warm.
const PAGE_CACHE_KIB: u32 = 512;

/// How long SQLite retries when another process holds the write lock before
/// it fails with SQLITE_BUSY. Within this process writers never contend (one
/// write connection), so this only matters if some other tool opens the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a call waits for a pooled connection before it fails as
/// unavailable. Writers queue for the single write connection, so under a
/// storm this is the backpressure point: a caller waiting this long is
/// better told to retry than kept waiting.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most messages [`Saver::messages_after`] returns in one call, whatever
/// `limit` asks for, so one call's memory is bounded by this times the
/// payload size limit. Callers page with `after` and the `more` flag.
pub const MESSAGES_AFTER_LIMIT_MAX: u32 = 1_000;

/// Rows deleted per statement by [`Saver::purge_expired`]. Each statement is
/// its own transaction and holds the write lock while it runs; 10,000 rows
/// of a few hundred bytes each take some milliseconds, short enough that a
/// queued store is not held up noticeably, and large enough that purging a
/// day's backlog takes few round trips.
pub const PURGE_BATCH_ROWS: u32 = 10_000;

/// Durable per-(app, user) inboxes. Cloning is cheap: clones share the pools.
#[derive(Debug, Clone)]
pub struct Saver {
    /// Exactly one connection: see the module docs.
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Saver {
    /// Opens (creating if needed) the SQLite database file at `path`, runs migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Saver, StorageError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL syncs the WAL on every commit, so a store that returned
            // Ok survives a power cut, not only a process crash (NORMAL
            // would lose the last commits on power loss).
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("cache_size", format!("-{PAGE_CACHE_KIB}"));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.create_if_missing(false))
            .await?;
        tracing::info!(path = %path.display(), "opened SQLite storage");
        Ok(Saver { writer, reader })
    }

    /// Stores in ONE transaction: for each user allocate the next seq, insert
    /// the message (the same message_id for every user of one call — one
    /// logical message), and, if an idempotency key is given, record the
    /// results (expires at now_ms + ttl_ms). If the key exists and has not
    /// expired, store nothing and return the recorded results with
    /// replayed = true (an expired key is replaced). Durable when it returns Ok.
    ///
    /// A replay returns the first call's results even if this call names
    /// other users or another payload: the key, not the content, identifies
    /// the send.
    pub async fn store(&self, msg: NewMessage<'_>) -> Result<StoreOutcome, StorageError> {
        let now_ms = to_db(msg.now_ms);
        let expires_at_ms = to_db(msg.now_ms.saturating_add(msg.ttl_ms));
        // IMMEDIATE takes the write lock up front, so the transaction never
        // has to upgrade from a read lock half way (the SQLITE_BUSY trap).
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;

        if let Some(key) = msg.idempotency_key {
            let recorded: Option<(String, i64)> = sqlx::query_as(
                "SELECT results, expires_at_ms FROM idempotency_keys \
                 WHERE app = ? AND idem_key = ?",
            )
            .bind(msg.app)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((results, key_expires_at_ms)) = recorded
                && key_expires_at_ms > now_ms
            {
                tx.rollback().await?;
                let stored = serde_json::from_str(&results).map_err(|error| {
                    StorageError::Corrupt(format!(
                        "idempotency key {key:?} of app {:?} records unreadable results: {error}",
                        msg.app
                    ))
                })?;
                return Ok(StoreOutcome {
                    stored,
                    replayed: true,
                });
            }
        }

        let message_id = new_message_id(msg.now_ms);
        let mut stored = Vec::with_capacity(msg.users.len());
        for user in msg.users {
            // The head row survives purges, so a sequence is never reused.
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO inbox_heads (app, user_id, last_seq) VALUES (?, ?, 1) \
                 ON CONFLICT (app, user_id) DO UPDATE SET last_seq = inbox_heads.last_seq + 1 \
                 RETURNING last_seq",
            )
            .bind(msg.app)
            .bind(user.as_str())
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO messages \
                 (app, user_id, seq, message_id, payload, created_at_ms, expires_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(msg.app)
            .bind(user.as_str())
            .bind(seq)
            .bind(&message_id.0[..])
            .bind(msg.payload)
            .bind(now_ms)
            .bind(expires_at_ms)
            .execute(&mut *tx)
            .await?;
            stored.push(StoredRef {
                user: user.clone(),
                seq: from_db(seq, "inbox_heads.last_seq")?,
                message_id,
            });
        }

        if let Some(key) = msg.idempotency_key {
            let results = serde_json::to_string(&stored).map_err(|error| {
                StorageError::Corrupt(format!("cannot encode store results: {error}"))
            })?;
            // Delete-then-insert replaces an expired key portably (no
            // dialect-specific upsert); a live key returned above.
            sqlx::query("DELETE FROM idempotency_keys WHERE app = ? AND idem_key = ?")
                .bind(msg.app)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO idempotency_keys (app, idem_key, results, expires_at_ms) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(msg.app)
            .bind(key)
            .bind(results)
            .bind(expires_at_ms)
            .execute(&mut *tx)
            .await?;
        }

        tx.commit().await?;
        Ok(StoreOutcome {
            stored,
            replayed: false,
        })
    }

    /// Up to `limit` unexpired messages of (app, user) with seq > after,
    /// ascending; bool = more unexpired messages exist beyond those returned.
    ///
    /// `limit` is capped at [`MESSAGES_AFTER_LIMIT_MAX`]. A message is
    /// expired once `now_ms >= expires_at_ms`.
    pub async fn messages_after(
        &self,
        app: &str,
        user: &str,
        after: u64,
        limit: u32,
        now_ms: u64,
    ) -> Result<(Vec<StoredMessage>, bool), StorageError> {
        let limit = limit.min(MESSAGES_AFTER_LIMIT_MAX);
        // One row past the limit tells whether more exist without a COUNT.
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT seq, message_id, payload, created_at_ms, expires_at_ms FROM messages \
             WHERE app = ? AND user_id = ? AND seq > ? AND expires_at_ms > ? \
             ORDER BY seq LIMIT ?",
        )
        .bind(app)
        .bind(user)
        .bind(to_db(after))
        .bind(to_db(now_ms))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await?;

        let more = rows.len() > limit as usize;
        let messages = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| row.into_stored(app, user))
            .collect::<Result<Vec<_>, StorageError>>()?;
        Ok((messages, more))
    }

    /// Where each inbox stands, for many inboxes in one statement: the last
    /// sequence handed out and, when the key names a device, the highest
    /// sequence that device acked. One answer per key, in order.
    ///
    /// Binding clients need both before their first fill; asking for a
    /// batch at once keeps a reconnect storm from becoming one database
    /// round trip per connection.
    pub async fn inbox_heads(&self, keys: &[InboxKey]) -> Result<Vec<InboxHead>, StorageError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // The batch travels as one JSON array of [app, user, device|null]:
        // SQLite has no array parameters, and json_each keeps it one statement.
        let batch = serde_json::to_string(
            &keys
                .iter()
                .map(|key| {
                    (
                        key.app.as_str(),
                        key.user.as_str(),
                        key.device_id.as_deref(),
                    )
                })
                .collect::<Vec<_>>(),
        )
        .expect("strings serialize");
        let rows: Vec<(i64, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT r.key, h.last_seq, c.acked_seq FROM json_each(?) AS r \
             LEFT JOIN inbox_heads AS h \
               ON h.app = r.value ->> 0 AND h.user_id = r.value ->> 1 \
             LEFT JOIN device_cursors AS c \
               ON c.app = r.value ->> 0 AND c.user_id = r.value ->> 1 \
              AND c.device_id = r.value ->> 2 \
             ORDER BY r.key",
        )
        .bind(batch)
        .fetch_all(&self.reader)
        .await?;
        if rows.len() != keys.len() {
            return Err(StorageError::Corrupt(format!(
                "{} inbox heads read for {} keys",
                rows.len(),
                keys.len()
            )));
        }
        rows.into_iter()
            .map(|(_, last_seq, acked_seq)| {
                Ok(InboxHead {
                    last_seq: last_seq
                        .map(|seq| from_db(seq, "inbox_heads.last_seq"))
                        .transpose()?
                        .unwrap_or(0),
                    acked_seq: acked_seq
                        .map(|seq| from_db(seq, "device_cursors.acked_seq"))
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Raises each cursor to acked_seq (never lowers) in one transaction.
    /// `now_ms` for updated_at.
    ///
    /// `updated_at_ms` records the last ack seen from the device even when
    /// it did not raise the cursor: it says the device is alive.
    pub async fn save_acks(&self, acks: &[AckCursor<'_>], now_ms: u64) -> Result<(), StorageError> {
        if acks.is_empty() {
            return Ok(());
        }
        let now_ms = to_db(now_ms);
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        for ack in acks {
            // Two-argument MAX is SQLite's scalar max (GREATEST elsewhere).
            sqlx::query(
                "INSERT INTO device_cursors \
                 (app, user_id, device_id, acked_seq, updated_at_ms) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (app, user_id, device_id) DO UPDATE SET \
                 acked_seq = MAX(device_cursors.acked_seq, excluded.acked_seq), \
                 updated_at_ms = MAX(device_cursors.updated_at_ms, excluded.updated_at_ms)",
            )
            .bind(ack.app)
            .bind(ack.user)
            .bind(ack.device_id)
            .bind(to_db(ack.acked_seq))
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes expired messages and idempotency keys; returns how many
    /// messages were deleted.
    ///
    /// Work per statement is bounded: it deletes [`PURGE_BATCH_ROWS`] rows
    /// at a time, each batch its own transaction, and loops until a batch
    /// comes up short. Stores queued for the write connection run between
    /// batches, so a large backlog slows them a little instead of stalling
    /// them for the whole purge.
    pub async fn purge_expired(&self, now_ms: u64) -> Result<u64, StorageError> {
        let messages = self
            .purge_in_batches(
                "DELETE FROM messages WHERE rowid IN \
                 (SELECT rowid FROM messages WHERE expires_at_ms <= ? LIMIT ?)",
                now_ms,
            )
            .await?;
        let idempotency_keys = self
            .purge_in_batches(
                "DELETE FROM idempotency_keys WHERE rowid IN \
                 (SELECT rowid FROM idempotency_keys WHERE expires_at_ms <= ? LIMIT ?)",
                now_ms,
            )
            .await?;
        tracing::debug!(messages, idempotency_keys, "purged expired rows");
        Ok(messages)
    }

    /// Runs `delete` (binding `now_ms` and [`PURGE_BATCH_ROWS`]) until it
    /// deletes fewer than a full batch; returns the rows deleted in total.
    async fn purge_in_batches(
        &self,
        delete: &'static str,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        let mut deleted_total = 0;
        loop {
            let deleted = sqlx::query(delete)
                .bind(to_db(now_ms))
                .bind(i64::from(PURGE_BATCH_ROWS))
                .execute(&self.writer)
                .await?
                .rows_affected();
            deleted_total += deleted;
            if deleted < u64::from(PURGE_BATCH_ROWS) {
                return Ok(deleted_total);
            }
        }
    }

    /// Cheap round trip (SELECT 1) for readiness checks.
    ///
    /// It uses the read pool, so a long queue of writers does not make the
    /// check time out while the database is healthy.
    pub async fn ping(&self) -> Result<(), StorageError> {
        self.reader.execute("SELECT 1").await?;
        Ok(())
    }

    /// Closes the pool cleanly (checkpoint WAL).
    ///
    /// Waits for calls in flight to finish; calls made afterwards fail as
    /// unavailable. Every clone shares the pools, so this closes them all.
    pub async fn close(&self) {
        if self.writer.is_closed() {
            return;
        }
        self.reader.close().await;
        // Fold the WAL back into the main file so the next open does not
        // replay it. Best effort: SQLite checkpoints on the last close too,
        // and the WAL is durable either way.
        if let Err(error) = checkpoint(&self.writer).await {
            tracing::warn!(%error, "WAL checkpoint on close failed");
        }
        self.writer.close().await;
    }
}

/// One row of `messages` as [`Saver::messages_after`] selects it.
#[derive(sqlx::FromRow)]
struct MessageRow {
    seq: i64,
    message_id: Vec<u8>,
    payload: Vec<u8>,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl MessageRow {
    fn into_stored(self, app: &str, user: &str) -> Result<StoredMessage, StorageError> {
        let message_id = <[u8; 16]>::try_from(self.message_id.as_slice())
            .map(MessageId)
            .map_err(|_| {
                StorageError::Corrupt(format!(
                    "message {} of app {app:?} user {user:?} has a {}-byte id",
                    self.seq,
                    self.message_id.len()
                ))
            })?;
        Ok(StoredMessage {
            seq: from_db(self.seq, "messages.seq")?,
            message_id,
            payload: Bytes::from(self.payload),
            created_at_ms: from_db(self.created_at_ms, "messages.created_at_ms")?,
            expires_at_ms: from_db(self.expires_at_ms, "messages.expires_at_ms")?,
        })
    }
}

async fn checkpoint(writer: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query::<Sqlite>("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(writer)
        .await?;
    Ok(())
}

/// Converts a u64 to the i64 SQL stores. Sequences and unix milliseconds
/// never come near i64::MAX; an input that does (a huge TTL or `after`)
/// saturates, which keeps its meaning ("never expires", "nothing after").
fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Converts a stored i64 back to u64; a negative value means the row was not
/// written by this crate.
fn from_db(value: i64, column: &str) -> Result<u64, StorageError> {
    u64::try_from(value)
        .map_err(|_| StorageError::Corrupt(format!("{column} holds negative value {value}")))
}
