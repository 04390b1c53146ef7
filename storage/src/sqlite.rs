//! The saver over one SQLite file.
//!
//! SQLite admits one writer at a time. Rather than let several pooled
//! connections race for the write lock (the loser sleeps in SQLite's busy
//! handler, or fails with SQLITE_BUSY when a read transaction tries to
//! upgrade), every write goes through a pool of exactly one connection,
//! whose queue orders writers fairly. Reads use a separate pool: in WAL mode
//! they run beside the writer without blocking it.
//!
//! Stores are committed in groups. One task, the committer, takes stores
//! from a queue: it starts a transaction with whatever stores are waiting
//! (within the bounds of [`GroupCommit`]), writes them, and commits once:
//! one fsync for the group. By default it does not wait for company: a lone
//! store is committed at once, and the stores that arrive while one commit
//! is being synced make up the next group. Each caller is answered after
//! the commit that made its store durable; a store that fails fails alone
//! (the group is written again with a savepoint around each store, and the
//! failing one rolled back to its own).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Executor, QueryBuilder, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::{
    AckCursor, BATCH_ROWS_MAX, BroadcastRow, CommitCounters, GroupCommit, InboxHead, InboxKey,
    MessageId, MessageRow, NewBroadcast, NewMessage, PURGE_BATCH_ROWS, StorageError, StoreOutcome,
    StoredBroadcast, StoredRef, delete_in_batches, from_db, new_message_id, recorded_results,
    results_to_record, stored_broadcast, to_db,
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

/// Stores that may wait for the committer; past this a caller waits to be
/// queued, up to [`ACQUIRE_TIMEOUT`].
const STORE_QUEUE_LEN: usize = 4_096;

/// The saver over SQLite. Cloning is cheap: clones share the pools and the
/// committer's queue.
#[derive(Debug, Clone)]
pub(crate) struct SqliteSaver {
    /// Exactly one connection: see the module docs.
    writer: SqlitePool,
    reader: SqlitePool,
    /// The committer's queue (see the module docs).
    stores: mpsc::Sender<StoreJob>,
}

/// A store waiting for the committer, and where its answer goes.
#[derive(Debug)]
struct StoreJob {
    msg: OwnedMessage,
    answer: oneshot::Sender<Result<StoreOutcome, StorageError>>,
}

/// A [`NewMessage`] that can wait in the committer's queue.
#[derive(Debug)]
struct OwnedMessage {
    app: String,
    users: Vec<String>,
    payload: Bytes,
    ttl_ms: u64,
    now_ms: u64,
    idempotency_key: Option<String>,
}

impl OwnedMessage {
    fn new(msg: NewMessage<'_>) -> OwnedMessage {
        OwnedMessage {
            app: msg.app.to_owned(),
            users: msg.users.to_vec(),
            payload: msg.payload.clone(),
            ttl_ms: msg.ttl_ms,
            now_ms: msg.now_ms,
            idempotency_key: msg.idempotency_key.map(str::to_owned),
        }
    }

    fn borrow(&self) -> NewMessage<'_> {
        NewMessage {
            app: &self.app,
            users: &self.users,
            payload: &self.payload,
            ttl_ms: self.ttl_ms,
            now_ms: self.now_ms,
            idempotency_key: self.idempotency_key.as_deref(),
        }
    }
}

impl SqliteSaver {
    /// Opens (creating if needed) the SQLite database file at `path`, runs migrations.
    pub(crate) async fn open(
        path: &Path,
        group_commit: GroupCommit,
        commits: Arc<CommitCounters>,
    ) -> Result<SqliteSaver, StorageError> {
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
        let (stores, queue) = mpsc::channel(STORE_QUEUE_LEN);
        tokio::spawn(commit_groups(writer.clone(), queue, group_commit, commits));
        Ok(SqliteSaver {
            writer,
            reader,
            stores,
        })
    }

    /// See [`crate::Saver::store`]: queued for the committer, answered
    /// once the group it was committed in is durable.
    pub(crate) async fn store(&self, msg: NewMessage<'_>) -> Result<StoreOutcome, StorageError> {
        let (answer, answered) = oneshot::channel();
        let job = StoreJob {
            msg: OwnedMessage::new(msg),
            answer,
        };
        match tokio::time::timeout(ACQUIRE_TIMEOUT, self.stores.send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(StorageError::Unavailable(sqlx::Error::PoolClosed)),
            Err(_) => return Err(StorageError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
        answered
            .await
            .unwrap_or(Err(StorageError::Unavailable(sqlx::Error::PoolClosed)))
    }

    /// Up to `limit` unexpired rows of (app, user) with seq > after, ascending.
    pub(crate) async fn messages_after(
        &self,
        app: &str,
        user: &str,
        after: u64,
        limit: u32,
        now_ms: u64,
    ) -> Result<Vec<MessageRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT seq, message_id, payload, created_at_ms, expires_at_ms FROM messages \
             WHERE app = ? AND user_id = ? AND seq > ? AND expires_at_ms > ? \
             ORDER BY seq LIMIT ?",
        )
        .bind(app)
        .bind(user)
        .bind(to_db(after))
        .bind(to_db(now_ms))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?)
    }

    /// See [`crate::Saver::inbox_heads`]: one statement over a JSON array.
    pub(crate) async fn inbox_heads(
        &self,
        keys: &[InboxKey],
    ) -> Result<Vec<InboxHead>, StorageError> {
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
        rows.into_iter()
            .map(|(_, last_seq, acked_seq)| InboxHead::from_db(last_seq, acked_seq))
            .collect()
    }

    /// See [`crate::Saver::save_acks`].
    pub(crate) async fn save_acks(
        &self,
        acks: &[AckCursor<'_>],
        now_ms: u64,
    ) -> Result<(), StorageError> {
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

    /// The database's epoch, written by the first caller (`proposed`).
    pub(crate) async fn storage_epoch(&self, proposed: i64) -> Result<i64, StorageError> {
        sqlx::query("INSERT OR IGNORE INTO storage_epoch (id, epoch) VALUES (1, ?)")
            .bind(proposed)
            .execute(&self.writer)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT epoch FROM storage_epoch WHERE id = 1")
                .fetch_one(&self.writer)
                .await?,
        )
    }

    /// Sets a device's cursor down to `acked_seq` if it is above it.
    pub(crate) async fn lower_ack_cursor(&self, ack: &AckCursor<'_>) -> Result<(), StorageError> {
        sqlx::query(
            "UPDATE device_cursors SET acked_seq = ? \
             WHERE app = ? AND user_id = ? AND device_id = ? AND acked_seq > ?",
        )
        .bind(to_db(ack.acked_seq))
        .bind(ack.app)
        .bind(ack.user)
        .bind(ack.device_id)
        .bind(to_db(ack.acked_seq))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub(crate) async fn broadcast_head(&self, app: &str) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT last_seq FROM broadcast_heads WHERE app = ?")
                .bind(app)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// Deletes expired rows of `table` in batches; returns how many.
    pub(crate) async fn purge_table(
        &self,
        table: &'static str,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        let delete = format!(
            "DELETE FROM {table} WHERE rowid IN \
             (SELECT rowid FROM {table} WHERE expires_at_ms <= ? LIMIT ?)"
        );
        delete_in_batches(|| async {
            Ok(sqlx::query(AssertSqlSafe(delete.as_str()))
                .bind(to_db(now_ms))
                .bind(i64::from(PURGE_BATCH_ROWS))
                .execute(&self.writer)
                .await?
                .rows_affected())
        })
        .await
    }

    pub(crate) async fn store_broadcast(
        &self,
        broadcast: NewBroadcast<'_>,
    ) -> Result<StoredBroadcast, StorageError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO broadcast_heads (app, last_seq) VALUES (?, 1) \
             ON CONFLICT (app) DO UPDATE SET last_seq = broadcast_heads.last_seq + 1 \
             RETURNING last_seq",
        )
        .bind(broadcast.app)
        .fetch_one(&mut *tx)
        .await?;
        let seq = from_db(seq, "broadcast_heads.last_seq")?;
        let id = new_message_id(broadcast.now_ms);
        let stored = stored_broadcast(&broadcast, seq, id);
        let tags = serde_json::to_string(broadcast.required_tags).expect("strings serialize");
        sqlx::query(
            "INSERT INTO broadcasts \
             (app, seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(broadcast.app)
        .bind(to_db(seq))
        .bind(&id.0[..])
        .bind(broadcast.payload)
        .bind(tags)
        .bind(to_db(stored.created_at_ms))
        .bind(to_db(stored.expires_at_ms))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub(crate) async fn broadcasts_after(
        &self,
        app: &str,
        after: u64,
        limit: u32,
        now_ms: u64,
    ) -> Result<Vec<BroadcastRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms FROM broadcasts \
             WHERE app = ? AND seq > ? AND expires_at_ms > ? ORDER BY seq LIMIT ?",
        )
        .bind(app)
        .bind(to_db(after))
        .bind(to_db(now_ms))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?)
    }

    pub(crate) async fn broadcast(
        &self,
        app: &str,
        broadcast_id: MessageId,
    ) -> Result<Option<BroadcastRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms FROM broadcasts WHERE app = ? AND broadcast_id = ?",
        )
        .bind(app)
        .bind(&broadcast_id.0[..])
        .fetch_optional(&self.reader)
        .await?)
    }

    /// Uses the read pool, so a long queue of writers does not make a
    /// readiness check time out while the database is healthy.
    pub(crate) async fn ping(&self) -> Result<(), StorageError> {
        self.reader.execute("SELECT 1").await?;
        Ok(())
    }

    /// Closes both pools, folding the WAL back into the main file first.
    pub(crate) async fn close(&self) {
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

async fn checkpoint(writer: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query::<Sqlite>("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(writer)
        .await?;
    Ok(())
}

/// The committer (see the module docs): runs until every saver clone, and
/// with them the queue's senders, is gone.
async fn commit_groups(
    writer: SqlitePool,
    mut queue: mpsc::Receiver<StoreJob>,
    bounds: GroupCommit,
    commits: Arc<CommitCounters>,
) {
    let mut group: Vec<StoreJob> = Vec::with_capacity(bounds.stores_max);
    while let Some(first) = queue.recv().await {
        let waited_until = tokio::time::Instant::now() + bounds.wait;
        let mut users = first.msg.users.len();
        group.push(first);
        while group.len() < bounds.stores_max && users < bounds.recipients_max {
            let next = match queue.try_recv() {
                Ok(next) => next,
                Err(mpsc::error::TryRecvError::Empty) if !bounds.wait.is_zero() => {
                    match tokio::time::timeout_at(waited_until, queue.recv()).await {
                        Ok(Some(next)) => next,
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            users += next.msg.users.len();
            group.push(next);
        }
        match commit_group(&writer, &group).await {
            Ok(outcomes) => {
                let stored = outcomes
                    .iter()
                    .filter(|outcome| outcome.as_ref().is_ok_and(|outcome| !outcome.replayed))
                    .count();
                commits.committed(stored as u64);
                for (job, outcome) in group.drain(..).zip(outcomes) {
                    // A caller that gave up waiting no longer listens; its
                    // store is durable all the same.
                    let _ = job.answer.send(outcome);
                }
            }
            Err(error) => {
                tracing::warn!(%error, stores = group.len(), "a group commit failed");
                let reason = error.to_string();
                for job in group.drain(..) {
                    let _ = job
                        .answer
                        .send(Err(StorageError::Unavailable(sqlx::Error::Protocol(
                            format!("the group commit failed: {reason}"),
                        ))));
                }
            }
        }
    }
}

/// Writes `group` in one transaction and commits: the outcome of each
/// store, or an error that fails the whole group (nothing of it was
/// committed).
///
/// Stores rarely fail (the API checks its input first), so the group is
/// written first as a whole; only if that fails is the transaction rolled
/// back and the group written again with each store in a savepoint of its
/// own, so that the failing one is undone alone. The savepoints cost two
/// more statements a store, each a round trip to SQLite's worker thread.
async fn commit_group(
    writer: &SqlitePool,
    group: &[StoreJob],
) -> Result<Vec<Result<StoreOutcome, StorageError>>, StorageError> {
    // IMMEDIATE takes the write lock up front, so the transaction never
    // has to upgrade from a read lock half way (the SQLITE_BUSY trap).
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let written = if group.iter().all(|job| job.msg.idempotency_key.is_none()) {
        write_rows(&mut tx, group).await
    } else {
        write_stores(&mut tx, group).await
    };
    if let Ok(outcomes) = written {
        tx.commit().await?;
        return Ok(outcomes.into_iter().map(Ok).collect());
    }
    tx.rollback().await?;
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        sqlx::query("SAVEPOINT store").execute(&mut *tx).await?;
        let outcome = store_in(&mut tx, job.msg.borrow()).await;
        if outcome.is_err() {
            sqlx::query("ROLLBACK TO store").execute(&mut *tx).await?;
        }
        sqlx::query("RELEASE store").execute(&mut *tx).await?;
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// A group with idempotency keys, store by store, so that a key used twice
/// in the group finds the first use's record.
async fn write_stores(
    tx: &mut SqliteConnection,
    group: &[StoreJob],
) -> Result<Vec<StoreOutcome>, StorageError> {
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        outcomes.push(store_in(tx, job.msg.borrow()).await?);
    }
    Ok(outcomes)
}

/// A group without idempotency keys, in a few multi-row statements rather
/// than two statements a recipient (each statement is a round trip to
/// SQLite's worker thread): one upsert of the inbox heads that raises each
/// by the number of messages the group brings it and returns the new head,
/// then the message rows. Each inbox's new seqs are handed out in the
/// group's order.
async fn write_rows(
    tx: &mut SqliteConnection,
    group: &[StoreJob],
) -> Result<Vec<StoreOutcome>, StorageError> {
    // Per inbox, how many messages the group brings it.
    let mut counts: HashMap<(&str, &str), i64> = HashMap::new();
    for job in group {
        for user in &job.msg.users {
            *counts
                .entry((job.msg.app.as_str(), user.as_str()))
                .or_default() += 1;
        }
    }
    let counts: Vec<((&str, &str), i64)> = counts.into_iter().collect();
    // Per inbox, the next seq to hand out.
    let mut next_seqs: HashMap<(&str, &str), i64> = HashMap::with_capacity(counts.len());
    for chunk in counts.chunks(BATCH_ROWS_MAX) {
        let mut raise =
            QueryBuilder::<Sqlite>::new("INSERT INTO inbox_heads (app, user_id, last_seq) ");
        raise.push_values(chunk, |mut row, ((app, user), count)| {
            row.push_bind(*app).push_bind(*user).push_bind(*count);
        });
        // The head row survives purges, so a sequence is never reused.
        raise.push(
            " ON CONFLICT (app, user_id) DO UPDATE \
             SET last_seq = inbox_heads.last_seq + excluded.last_seq \
             RETURNING app, user_id, last_seq",
        );
        let heads: Vec<(String, String, i64)> = raise.build_query_as().fetch_all(&mut *tx).await?;
        // RETURNING's order is not the rows' order: match by inbox.
        let mut returned: HashMap<String, HashMap<String, i64>> = HashMap::new();
        for (app, user, last_seq) in heads {
            returned.entry(app).or_default().insert(user, last_seq);
        }
        for &((app, user), count) in chunk {
            let last_seq = returned
                .get(app)
                .and_then(|users| users.get(user))
                .ok_or_else(|| {
                    StorageError::Corrupt(format!("no inbox head came back for {app}/{user}"))
                })?;
            next_seqs.insert((app, user), last_seq - count + 1);
        }
    }
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        let message_id = new_message_id(job.msg.now_ms);
        let mut stored = Vec::with_capacity(job.msg.users.len());
        for user in &job.msg.users {
            let next = next_seqs
                .get_mut(&(job.msg.app.as_str(), user.as_str()))
                .expect("every recipient's inbox was raised above");
            stored.push(StoredRef {
                user: user.clone(),
                seq: from_db(*next, "inbox_heads.last_seq")?,
                message_id,
            });
            *next += 1;
        }
        outcomes.push(StoreOutcome {
            stored,
            replayed: false,
        });
    }
    let rows: Vec<(&OwnedMessage, &StoredRef)> = group
        .iter()
        .zip(&outcomes)
        .flat_map(|(job, outcome)| outcome.stored.iter().map(move |stored| (&job.msg, stored)))
        .collect();
    for chunk in rows.chunks(BATCH_ROWS_MAX) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO messages \
             (app, user_id, seq, message_id, payload, created_at_ms, expires_at_ms) ",
        );
        insert.push_values(chunk, |mut row, (msg, stored)| {
            row.push_bind(msg.app.as_str())
                .push_bind(stored.user.as_str())
                .push_bind(to_db(stored.seq))
                .push_bind(&stored.message_id.0[..])
                .push_bind(&msg.payload[..])
                .push_bind(to_db(msg.now_ms))
                .push_bind(to_db(msg.now_ms.saturating_add(msg.ttl_ms)));
        });
        insert.build().execute(&mut *tx).await?;
    }
    Ok(outcomes)
}

/// One store inside the committer's transaction: for each user the next
/// seq and the message row, and the idempotency key's record; or, for a key
/// already recorded (by an earlier group, or earlier in this one) and not
/// expired, the recorded results, writing nothing.
async fn store_in(
    tx: &mut SqliteConnection,
    msg: NewMessage<'_>,
) -> Result<StoreOutcome, StorageError> {
    let now_ms = to_db(msg.now_ms);
    let expires_at_ms = to_db(msg.now_ms.saturating_add(msg.ttl_ms));
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
            let stored = recorded_results(&results, msg.app, key)?;
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
        .bind(&msg.payload[..])
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
        let results = results_to_record(&stored)?;
        // Delete-then-insert replaces an expired key portably (no
        // dialect-specific upsert); a live key returned above.
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE app = ? AND idem_key = ? AND expires_at_ms <= ?",
        )
        .bind(msg.app)
        .bind(key)
        .bind(now_ms)
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
    Ok(StoreOutcome {
        stored,
        replayed: false,
    })
}
