//! The saver over sqlx, once for every engine: [`SqlSaver`] runs the same
//! statements on SQLite, MySQL/MariaDB and PostgreSQL, written with the
//! engine's [`Dialect`] where they differ. Stores go through the group
//! committer (`group_commit.rs`); everything else is here.

use std::borrow::Cow;
use std::sync::Arc;

use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments,
    QueryBuilder, Type,
};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::dialect::{Dialect, Merge, Pools};
use crate::group_commit::{Committer, StoreJob};
use crate::{
    AckCursor, AppRow, BATCH_ROWS_MAX, BroadcastRow, CommitCounters, FillStart, GroupCommit,
    InboxHead, InboxKey, MessageId, MessageRow, NewBroadcast, NewMessage, PURGE_BATCH_ROWS,
    StorageError, StoreOutcome, StoredBroadcast, delete_in_batches, from_db, new_message_id,
    stored_broadcast, to_db,
};

/// Stores that may wait for the committers; past this a caller waits to be
/// queued, up to [`STORE_QUEUE_TIMEOUT`].
const STORE_QUEUE_LEN: usize = 4_096;

/// How long a store waits for room in the committers' queue before it fails
/// as unavailable: under a storm a caller waiting this long is better told
/// to retry.
const STORE_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The tables [`SqlSaver::purge_table`] purges.
pub(crate) const PURGED_TABLES: [&str; 3] = ["messages", "idempotency_keys", "broadcasts"];

/// The tables that hold an app's rows, which [`SqlSaver::purge_app`]
/// empties of them.
const APP_TABLES: [&str; 6] = [
    "messages",
    "inbox_heads",
    "device_cursors",
    "idempotency_keys",
    "broadcasts",
    "broadcast_heads",
];

/// Every statement the saver runs with a fixed text, in the engine's
/// dialect; made once when the saver opens.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) messages_after: Arc<str>,
    pub(crate) inbox_heads: Arc<str>,
    /// Locks the key's row until commit where the engine has row locks, so
    /// two nodes storing under one key queue on it.
    pub(crate) read_key: Arc<str>,
    /// Only an expired key is deleted: a live one another node committed
    /// since it was read stays, so recording it again fails on the primary
    /// key and the retry replays that node's result.
    pub(crate) delete_expired_key: Arc<str>,
    pub(crate) record_key: Arc<str>,
    /// Appended to a multi-row INSERT of `(app, user_id, last_seq)` heads:
    /// raises each by the count inserted.
    pub(crate) raise_heads: String,
    /// Appended to a multi-row INSERT of device cursors.
    pub(crate) raise_cursors: String,
    propose_epoch: Arc<str>,
    lower_ack_cursor: Arc<str>,
    /// Counts a fill starting after `redelivery_after` again, or restarts
    /// the count at a new start. `redeliveries` is set first: MySQL
    /// assigns left to right, the others from the old row.
    count_fill_start: Arc<str>,
    first_fill_start: Arc<str>,
    fill_starts: Arc<str>,
    broadcast_head: Arc<str>,
    messages_unexpired: Arc<str>,
    messages_unacked: Arc<str>,
    raise_broadcast_head: Arc<str>,
    insert_broadcast: Arc<str>,
    broadcasts_after: Arc<str>,
    broadcast: Arc<str>,
    purge: [Arc<str>; 3],
    create_app: Arc<str>,
    update_app: Arc<str>,
    mark_app_deleted: Arc<str>,
    delete_app_rows: [Arc<str>; APP_TABLES.len()],
    delete_app: Arc<str>,
}

impl Statements {
    fn new<D: Dialect>() -> Statements {
        let sql = |text: &'static str| Arc::<str>::from(D::placeholders(Cow::Borrowed(text)));
        let built = |text: String| Arc::<str>::from(D::placeholders(Cow::Owned(text)));
        let returning = if D::UPSERT_RETURNS {
            " RETURNING last_seq"
        } else {
            ""
        };
        Statements {
            messages_after: sql(
                "SELECT seq, message_id, payload, notice, created_at_ms, expires_at_ms \
                 FROM messages \
                 WHERE app = ? AND user_id = ? AND seq > ? AND expires_at_ms > ? \
                 ORDER BY seq LIMIT ?",
            ),
            inbox_heads: sql(D::INBOX_HEADS),
            read_key: built(format!(
                "SELECT results, expires_at_ms FROM idempotency_keys \
                 WHERE app = ? AND idem_key = ?{}",
                D::FOR_UPDATE
            )),
            delete_expired_key: sql(
                "DELETE FROM idempotency_keys WHERE app = ? AND idem_key = ? AND expires_at_ms <= ?",
            ),
            record_key: sql(
                "INSERT INTO idempotency_keys (app, idem_key, results, expires_at_ms) \
                 VALUES (?, ?, ?, ?)",
            ),
            // The head row survives purges, so a sequence is never reused.
            raise_heads: D::on_conflict("inbox_heads", "app, user_id", &[("last_seq", Merge::Add)]),
            raise_cursors: D::on_conflict(
                "device_cursors",
                "app, user_id, device_id",
                &[("acked_seq", Merge::Max), ("updated_at_ms", Merge::Max)],
            ),
            propose_epoch: built(format!(
                "INSERT INTO storage_epoch (id, epoch) VALUES (1, ?){}",
                D::on_conflict_ignore("id")
            )),
            lower_ack_cursor: sql("UPDATE device_cursors SET acked_seq = ? \
                 WHERE app = ? AND user_id = ? AND device_id = ? AND acked_seq > ?"),
            count_fill_start: sql("UPDATE device_cursors SET \
                 redeliveries = CASE WHEN redelivery_after = ? THEN redeliveries + 1 ELSE 1 END, \
                 redelivery_after = ? \
                 WHERE app = ? AND user_id = ? AND device_id = ?"),
            // A device that never acked has no cursor yet: it starts at 0.
            first_fill_start: built(format!(
                "INSERT INTO device_cursors (app, user_id, device_id, acked_seq, updated_at_ms, \
                 redelivery_after, redeliveries) VALUES (?, ?, ?, 0, ?, ?, 1){}",
                D::on_conflict_ignore("app, user_id, device_id")
            )),
            fill_starts: sql("SELECT redeliveries FROM device_cursors \
                 WHERE app = ? AND user_id = ? AND device_id = ?"),
            broadcast_head: sql("SELECT last_seq FROM broadcast_heads WHERE app = ?"),
            messages_unexpired: sql(
                "SELECT COUNT(*) FROM messages WHERE app = ? AND expires_at_ms > ?",
            ),
            // Past every device's cursor of its user: no device holds it.
            messages_unacked: sql("SELECT COUNT(*) FROM messages m \
                 WHERE m.app = ? AND m.expires_at_ms > ? AND m.seq > COALESCE(\
                 (SELECT MAX(c.acked_seq) FROM device_cursors c \
                 WHERE c.app = m.app AND c.user_id = m.user_id), 0)"),
            raise_broadcast_head: built(format!(
                "INSERT INTO broadcast_heads (app, last_seq) VALUES (?, 1){}{returning}",
                D::on_conflict("broadcast_heads", "app", &[("last_seq", Merge::Add)])
            )),
            insert_broadcast: sql("INSERT INTO broadcasts \
                 (app, seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)"),
            broadcasts_after: sql(
                "SELECT seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms \
                 FROM broadcasts WHERE app = ? AND seq > ? AND expires_at_ms > ? \
                 ORDER BY seq LIMIT ?",
            ),
            broadcast: sql(
                "SELECT seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms \
                 FROM broadcasts WHERE app = ? AND broadcast_id = ?",
            ),
            purge: PURGED_TABLES.map(|table| built(D::delete_some(table, "expires_at_ms <= ?"))),
            create_app: sql(
                "INSERT INTO apps (id, settings, secrets, version, deleted_at_ms) \
                 VALUES (?, ?, ?, 1, 0)",
            ),
            update_app: sql(
                "UPDATE apps SET settings = ?, secrets = ?, version = version + 1 \
                 WHERE id = ? AND version = ? AND deleted_at_ms = 0",
            ),
            mark_app_deleted: sql("UPDATE apps SET deleted_at_ms = ?, version = version + 1 \
                 WHERE id = ? AND deleted_at_ms = 0"),
            delete_app_rows: APP_TABLES.map(|table| built(D::delete_some(table, "app = ?"))),
            delete_app: sql("DELETE FROM apps WHERE id = ? AND deleted_at_ms > 0"),
        }
    }
}

/// A statement's text as sqlx's `query` functions take it (a shared
/// pointer, not a copy).
pub(crate) fn text(statement: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(statement.clone())
}

/// The saver on one engine. Cloning is cheap: clones share the pools, the
/// statements and the committers' queue.
#[derive(Debug)]
pub(crate) struct SqlSaver<D: Dialect> {
    pools: Pools<D::Db>,
    sql: Arc<Statements>,
    stores: mpsc::Sender<StoreJob>,
}

impl<D: Dialect> Clone for SqlSaver<D> {
    fn clone(&self) -> SqlSaver<D> {
        SqlSaver {
            pools: self.pools.clone(),
            sql: self.sql.clone(),
            stores: self.stores.clone(),
        }
    }
}

impl<D: Dialect> SqlSaver<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    <D::Db as Database>::Arguments: IntoArguments<D::Db>,
    i64: for<'q> Encode<'q, D::Db> + Type<D::Db> + for<'r> Decode<'r, D::Db>,
    String: for<'q> Encode<'q, D::Db> + Type<D::Db> + for<'r> Decode<'r, D::Db>,
    for<'a> &'a str: Encode<'a, D::Db> + Type<D::Db>,
    for<'a> &'a [u8]: Encode<'a, D::Db> + Type<D::Db>,
    Option<Vec<u8>>: for<'q> Encode<'q, D::Db> + Type<D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'r> MessageRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> BroadcastRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AppRow: FromRow<'r, <D::Db as Database>::Row>,
{
    /// Opens the database `target` names for dialect `D`, and returns the
    /// saver and its committers, which the caller spawns (each runs until
    /// every clone of the saver is gone).
    pub(crate) async fn open(
        target: &str,
        group_commit: GroupCommit,
        commits: Arc<CommitCounters>,
    ) -> Result<(SqlSaver<D>, Vec<Committer<D>>), StorageError> {
        let pools = D::open(target).await?;
        let sql = Arc::new(Statements::new::<D>());
        let (stores, queue) = mpsc::channel(STORE_QUEUE_LEN);
        let queue = Arc::new(Mutex::new(queue));
        let committers = (0..D::COMMITS_IN_FLIGHT)
            .map(|_| Committer {
                writer: pools.writer.clone(),
                sql: sql.clone(),
                queue: queue.clone(),
                bounds: group_commit,
                commits: commits.clone(),
            })
            .collect();
        Ok((SqlSaver { pools, sql, stores }, committers))
    }

    /// See [`crate::Saver::store`]: queued for the committers, answered
    /// once the group it was committed in is durable.
    pub(crate) async fn store(&self, msg: NewMessage) -> Result<StoreOutcome, StorageError> {
        let (answer, answered) = oneshot::channel();
        let job = StoreJob { msg, answer };
        match tokio::time::timeout(STORE_QUEUE_TIMEOUT, self.stores.send(job)).await {
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
        Ok(sqlx::query_as(text(&self.sql.messages_after))
            .bind(app)
            .bind(user)
            .bind(to_db(after))
            .bind(to_db(now_ms))
            .bind(i64::from(limit))
            .fetch_all(&self.pools.reader)
            .await?)
    }

    /// See [`crate::Saver::inbox_heads`]: one statement per
    /// [`BATCH_ROWS_MAX`] keys, the keys as one JSON array of
    /// `[app, user, device|null]`.
    pub(crate) async fn inbox_heads(
        &self,
        keys: &[InboxKey],
    ) -> Result<Vec<InboxHead>, StorageError> {
        let mut heads = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH_ROWS_MAX) {
            let batch = serde_json::to_string(
                &chunk
                    .iter()
                    .map(|key| (&key.app, &key.user, &key.device_id))
                    .collect::<Vec<_>>(),
            )
            .expect("strings serialize");
            let rows: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(text(&self.sql.inbox_heads))
                .bind(batch)
                .fetch_all(&self.pools.reader)
                .await?;
            for (last_seq, acked_seq) in rows {
                heads.push(InboxHead::from_db(last_seq, acked_seq)?);
            }
        }
        Ok(heads)
    }

    /// `acks` holds one cursor per device, sorted (see `Saver::save_acks`):
    /// PostgreSQL refuses an upsert that touches a row twice, and sorted
    /// rows lock in one order on every node.
    pub(crate) async fn save_acks(
        &self,
        acks: &[AckCursor<'_>],
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.pools.writer.begin_with(D::BEGIN).await?;
        for chunk in acks.chunks(BATCH_ROWS_MAX) {
            let mut upsert = QueryBuilder::<D::Db>::new(
                "INSERT INTO device_cursors \
                 (app, user_id, device_id, acked_seq, updated_at_ms) ",
            );
            upsert.push_values(chunk, |mut row, ack| {
                row.push_bind(ack.app)
                    .push_bind(ack.user)
                    .push_bind(ack.device_id)
                    .push_bind(to_db(ack.acked_seq))
                    .push_bind(to_db(now_ms));
            });
            upsert.push(&self.sql.raise_cursors);
            upsert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The database's epoch, written by the first caller (`proposed`).
    pub(crate) async fn storage_epoch(&self, proposed: i64) -> Result<i64, StorageError> {
        sqlx::query(text(&self.sql.propose_epoch))
            .bind(proposed)
            .execute(&self.pools.writer)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT epoch FROM storage_epoch WHERE id = 1")
                .fetch_one(&self.pools.writer)
                .await?,
        )
    }

    /// See [`crate::Saver::count_fill_start`]: in one transaction, so two
    /// binds of the device on two nodes count one after the other.
    pub(crate) async fn count_fill_start(
        &self,
        start: &FillStart<'_>,
        now_ms: u64,
    ) -> Result<i64, StorageError> {
        let after = to_db(start.after);
        let mut tx = self.pools.writer.begin_with(D::BEGIN).await?;
        let updated = sqlx::query(text(&self.sql.count_fill_start))
            .bind(after)
            .bind(after)
            .bind(start.app)
            .bind(start.user)
            .bind(start.device_id)
            .execute(&mut *tx)
            .await?;
        if D::rows_affected(&updated) == 0 {
            sqlx::query(text(&self.sql.first_fill_start))
                .bind(start.app)
                .bind(start.user)
                .bind(start.device_id)
                .bind(to_db(now_ms))
                .bind(after)
                .execute(&mut *tx)
                .await?;
        }
        let count = sqlx::query_scalar(text(&self.sql.fill_starts))
            .bind(start.app)
            .bind(start.user)
            .bind(start.device_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(count)
    }

    /// Sets a device's cursor down to `acked_seq` if it is above it.
    pub(crate) async fn lower_ack_cursor(&self, ack: &AckCursor<'_>) -> Result<(), StorageError> {
        sqlx::query(text(&self.sql.lower_ack_cursor))
            .bind(to_db(ack.acked_seq))
            .bind(ack.app)
            .bind(ack.user)
            .bind(ack.device_id)
            .bind(to_db(ack.acked_seq))
            .execute(&self.pools.writer)
            .await?;
        Ok(())
    }

    pub(crate) async fn broadcast_head(&self, app: &str) -> Result<Option<i64>, StorageError> {
        Ok(sqlx::query_scalar(text(&self.sql.broadcast_head))
            .bind(app)
            .fetch_optional(&self.pools.reader)
            .await?)
    }

    /// The app's unexpired messages, and those of them no device acked.
    pub(crate) async fn message_counts(
        &self,
        app: &str,
        now_ms: u64,
    ) -> Result<(i64, i64), StorageError> {
        let mut counts = [0; 2];
        for (count, query) in counts
            .iter_mut()
            .zip([&self.sql.messages_unexpired, &self.sql.messages_unacked])
        {
            *count = sqlx::query_scalar(text(query))
                .bind(app)
                .bind(to_db(now_ms))
                .fetch_one(&self.pools.reader)
                .await?;
        }
        Ok((counts[0], counts[1]))
    }

    /// Deletes expired rows of `PURGED_TABLES[table]` in batches; returns
    /// how many.
    pub(crate) async fn purge_table(&self, table: usize, now_ms: u64) -> Result<u64, StorageError> {
        delete_in_batches(|| async {
            let deleted = sqlx::query(text(&self.sql.purge[table]))
                .bind(to_db(now_ms))
                .bind(i64::from(PURGE_BATCH_ROWS))
                .execute(&self.pools.writer)
                .await?;
            Ok(D::rows_affected(&deleted))
        })
        .await
    }

    /// Raises the app's broadcast head (its row lock orders concurrent
    /// broadcasts of the app) and stores the broadcast under it.
    pub(crate) async fn store_broadcast(
        &self,
        broadcast: NewBroadcast<'_>,
    ) -> Result<StoredBroadcast, StorageError> {
        let mut tx = self.pools.writer.begin_with(D::BEGIN).await?;
        let raise = sqlx::query_scalar(text(&self.sql.raise_broadcast_head)).bind(broadcast.app);
        let seq: i64 = if D::UPSERT_RETURNS {
            raise.fetch_one(&mut *tx).await?
        } else {
            raise.fetch_optional(&mut *tx).await?;
            // This transaction holds the row just raised, so what it reads
            // back is its own value.
            sqlx::query_scalar(text(&self.sql.broadcast_head))
                .bind(broadcast.app)
                .fetch_one(&mut *tx)
                .await?
        };
        let seq = from_db(seq, "broadcast_heads.last_seq")?;
        let id = new_message_id(broadcast.now_ms);
        let stored = stored_broadcast(&broadcast, seq, id);
        let tags = serde_json::to_string(broadcast.required_tags).expect("strings serialize");
        sqlx::query(text(&self.sql.insert_broadcast))
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
        Ok(sqlx::query_as(text(&self.sql.broadcasts_after))
            .bind(app)
            .bind(to_db(after))
            .bind(to_db(now_ms))
            .bind(i64::from(limit))
            .fetch_all(&self.pools.reader)
            .await?)
    }

    pub(crate) async fn broadcast(
        &self,
        app: &str,
        broadcast_id: MessageId,
    ) -> Result<Option<BroadcastRow>, StorageError> {
        Ok(sqlx::query_as(text(&self.sql.broadcast))
            .bind(app)
            .bind(&broadcast_id.0[..])
            .fetch_optional(&self.pools.reader)
            .await?)
    }

    /// On the read pool: every node reads the apps every second, and on
    /// SQLite the writer is the group committer's.
    pub(crate) async fn apps(&self) -> Result<Vec<AppRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT id, settings, secrets, version, deleted_at_ms FROM apps ORDER BY id",
        )
        .fetch_all(&self.pools.reader)
        .await?)
    }

    /// Whether the app was created (false: the id is taken).
    pub(crate) async fn create_app(
        &self,
        id: &str,
        settings: &str,
        secrets: &str,
    ) -> Result<bool, StorageError> {
        // Not an upsert that ignores the row: MySQL counts a row found as
        // affected, so only the unique key's refusal tells the two apart.
        let created = sqlx::query(text(&self.sql.create_app))
            .bind(id)
            .bind(settings)
            .bind(secrets)
            .execute(&self.pools.writer)
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Whether the live app was at `version` and is now changed.
    pub(crate) async fn update_app(
        &self,
        id: &str,
        settings: &str,
        secrets: &str,
        version: i64,
    ) -> Result<bool, StorageError> {
        let updated = sqlx::query(text(&self.sql.update_app))
            .bind(settings)
            .bind(secrets)
            .bind(id)
            .bind(version)
            .execute(&self.pools.writer)
            .await?;
        Ok(D::rows_affected(&updated) == 1)
    }

    /// Whether a live app was marked deleted.
    pub(crate) async fn mark_app_deleted(
        &self,
        id: &str,
        now_ms: u64,
    ) -> Result<bool, StorageError> {
        let marked = sqlx::query(text(&self.sql.mark_app_deleted))
            .bind(to_db(now_ms))
            .bind(id)
            .execute(&self.pools.writer)
            .await?;
        Ok(D::rows_affected(&marked) == 1)
    }

    /// Deletes the rows of an app marked deleted, a batch at a time, then
    /// the app; returns how many rows.
    pub(crate) async fn purge_app(&self, id: &str) -> Result<u64, StorageError> {
        let mut deleted_total = 0;
        for statement in &self.sql.delete_app_rows {
            deleted_total += delete_in_batches(|| async {
                let deleted = sqlx::query(text(statement))
                    .bind(id)
                    .bind(i64::from(PURGE_BATCH_ROWS))
                    .execute(&self.pools.writer)
                    .await?;
                Ok(D::rows_affected(&deleted))
            })
            .await?;
        }
        sqlx::query(text(&self.sql.delete_app))
            .bind(id)
            .execute(&self.pools.writer)
            .await?;
        Ok(deleted_total)
    }

    /// Uses the read pool, so on SQLite a long queue of writers does not
    /// make a readiness check time out while the database is healthy.
    pub(crate) async fn ping(&self) -> Result<(), StorageError> {
        self.pools.reader.execute("SELECT 1").await?;
        Ok(())
    }

    /// Closes the pools once the calls in flight finish.
    pub(crate) async fn close(&self) {
        if self.pools.writer.is_closed() {
            return;
        }
        self.pools.reader.close().await;
        D::before_close(&self.pools.writer).await;
        self.pools.writer.close().await;
    }
}
