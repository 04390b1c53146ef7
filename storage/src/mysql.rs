//! The saver over MySQL 8 or MariaDB 10.6+, shared by every control node.
//!
//! Several nodes store into one inbox at once, so the sequence comes from
//! the inbox head's row lock: `INSERT .. ON DUPLICATE KEY UPDATE` raises the
//! head and holds its row until commit, and the next store to that user
//! waits for it. Heads are raised in user order, so two multicasts to
//! overlapping users queue rather than deadlock; InnoDB may still pick a
//! deadlock victim (its gap locks), and the caller retries that.
//!
//! Rows travel in batches: a multicast's heads in one multi-row upsert, its
//! messages in one `INSERT .. SELECT` over `JSON_TABLE`, which carries the
//! shared payload once instead of once per recipient.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Executor, MySql, MySqlPool, QueryBuilder};

use crate::{
    AckCursor, BATCH_ROWS_MAX, BroadcastRow, InboxHead, InboxKey, MessageId, MessageRow,
    NewBroadcast, NewMessage, PURGE_BATCH_ROWS, StorageError, StoreOutcome, StoredBroadcast,
    assign_seqs, delete_in_batches, from_db, new_message_id, recorded_results, results_to_record,
    seqs_needed, stored_broadcast, to_db,
};

/// Connections one node keeps to the database. Each store is a short
/// transaction of a few statements, so this many keep a node's API busy
/// without crowding a server that many nodes share.
pub(crate) const POOL_CONNECTIONS_MAX: u32 = 16;

/// How long a call waits for a connection before it fails as unavailable:
/// the API then answers 503 rather than hold its caller while the database
/// is down.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub(crate) struct MySqlSaver {
    pool: MySqlPool,
}

impl MySqlSaver {
    pub(crate) async fn open(url: &str) -> Result<MySqlSaver, StorageError> {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let options: MySqlConnectOptions = url.parse()?;
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A broken connection fails its statement and is dropped; a
            // ping before every use would double the round trips.
            .test_before_acquire(false)
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
        Ok(MySqlSaver { pool })
    }

    pub(crate) async fn store(&self, msg: NewMessage<'_>) -> Result<StoreOutcome, StorageError> {
        let now_ms = to_db(msg.now_ms);
        let expires_at_ms = to_db(msg.now_ms.saturating_add(msg.ttl_ms));
        let mut tx = self.pool.begin().await?;

        if let Some(key) = msg.idempotency_key {
            let recorded: Option<(String, i64)> = sqlx::query_as(
                "SELECT results, expires_at_ms FROM idempotency_keys \
                 WHERE app = ? AND idem_key = ? FOR UPDATE",
            )
            .bind(msg.app)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((results, key_expires_at_ms)) = recorded
                && key_expires_at_ms > now_ms
            {
                tx.rollback().await?;
                return Ok(StoreOutcome {
                    stored: recorded_results(&results, msg.app, key)?,
                    replayed: true,
                });
            }
        }

        let message_id = new_message_id(msg.now_ms);
        let needed = seqs_needed(msg.users);
        let needed: Vec<(&str, u64)> = needed.into_iter().collect();
        let mut last_seqs = BTreeMap::new();
        for chunk in needed.chunks(BATCH_ROWS_MAX) {
            let mut raise =
                QueryBuilder::<MySql>::new("INSERT INTO inbox_heads (app, user_id, last_seq) ");
            raise.push_values(chunk, |mut row, (user, count)| {
                row.push_bind(msg.app)
                    .push_bind(*user)
                    .push_bind(to_db(*count));
            });
            raise.push(" ON DUPLICATE KEY UPDATE last_seq = last_seq + VALUES(last_seq)");
            raise.build().execute(&mut *tx).await?;

            // This transaction holds every row just raised, so what it reads
            // back is its own value.
            let mut read = QueryBuilder::<MySql>::new(
                "SELECT user_id, last_seq FROM inbox_heads WHERE app = ",
            );
            read.push_bind(msg.app).push(" AND user_id IN (");
            let mut users = read.separated(", ");
            for (user, _) in chunk {
                users.push_bind(*user);
            }
            read.push(")");
            let rows: Vec<(String, i64)> = read.build_query_as().fetch_all(&mut *tx).await?;
            for (user, last_seq) in rows {
                last_seqs.insert(user, from_db(last_seq, "inbox_heads.last_seq")?);
            }
        }
        let needed: BTreeMap<&str, u64> = needed.into_iter().collect();
        let stored = assign_seqs(msg.users, &needed, &last_seqs, message_id)?;

        for chunk in stored.chunks(BATCH_ROWS_MAX) {
            let recipients = serde_json::to_string(
                &chunk
                    .iter()
                    .map(|stored| (stored.user.as_str(), stored.seq))
                    .collect::<Vec<_>>(),
            )
            .expect("strings and numbers serialize");
            sqlx::query(
                "INSERT INTO messages \
                 (app, user_id, seq, message_id, payload, created_at_ms, expires_at_ms) \
                 SELECT ?, r.user_id, r.seq, ?, ?, ?, ? FROM JSON_TABLE(?, '$[*]' COLUMNS ( \
                   user_id VARCHAR(128) PATH '$[0]', seq BIGINT PATH '$[1]')) AS r",
            )
            .bind(msg.app)
            .bind(&message_id.0[..])
            .bind(&msg.payload[..])
            .bind(now_ms)
            .bind(expires_at_ms)
            .bind(recipients)
            .execute(&mut *tx)
            .await?;
        }

        if let Some(key) = msg.idempotency_key {
            // Only an expired key is deleted: a live one another node
            // committed since the check above stays, so this insert fails
            // on the primary key and the retry replays that node's result.
            sqlx::query("DELETE FROM idempotency_keys WHERE app = ? AND idem_key = ? AND expires_at_ms <= ?")
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
            .bind(results_to_record(&stored)?)
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
        .fetch_all(&self.pool)
        .await?)
    }

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
            // JSON_TABLE's columns carry the connection's collation; the
            // joins compare in the tables' binary one.
            let rows: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT h.last_seq, c.acked_seq FROM JSON_TABLE(?, '$[*]' COLUMNS ( \
                   n FOR ORDINALITY, app VARCHAR(64) PATH '$[0]', \
                   user_id VARCHAR(128) PATH '$[1]', device_id VARCHAR(128) PATH '$[2]')) AS r \
                 LEFT JOIN inbox_heads AS h \
                   ON h.app = r.app COLLATE utf8mb4_bin \
                  AND h.user_id = r.user_id COLLATE utf8mb4_bin \
                 LEFT JOIN device_cursors AS c \
                   ON c.app = r.app COLLATE utf8mb4_bin \
                  AND c.user_id = r.user_id COLLATE utf8mb4_bin \
                  AND c.device_id = r.device_id COLLATE utf8mb4_bin \
                 ORDER BY r.n",
            )
            .bind(batch)
            .fetch_all(&self.pool)
            .await?;
            for (last_seq, acked_seq) in rows {
                heads.push(InboxHead::from_db(last_seq, acked_seq)?);
            }
        }
        Ok(heads)
    }

    /// `acks` holds one cursor per device, sorted (see `Saver::save_acks`).
    pub(crate) async fn save_acks(
        &self,
        acks: &[AckCursor<'_>],
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        for chunk in acks.chunks(BATCH_ROWS_MAX) {
            let mut upsert = QueryBuilder::<MySql>::new(
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
            upsert.push(
                " ON DUPLICATE KEY UPDATE \
                 acked_seq = GREATEST(acked_seq, VALUES(acked_seq)), \
                 updated_at_ms = GREATEST(updated_at_ms, VALUES(updated_at_ms))",
            );
            upsert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The database's epoch, written by the first caller (`proposed`).
    pub(crate) async fn storage_epoch(&self, proposed: i64) -> Result<i64, StorageError> {
        sqlx::query("INSERT IGNORE INTO storage_epoch (id, epoch) VALUES (1, ?)")
            .bind(proposed)
            .execute(&self.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT epoch FROM storage_epoch WHERE id = 1")
                .fetch_one(&self.pool)
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn broadcast_head(&self, app: &str) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT last_seq FROM broadcast_heads WHERE app = ?")
                .bind(app)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Deletes expired rows of `table` in batches; returns how many.
    pub(crate) async fn purge_table(
        &self,
        table: &'static str,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        let delete = format!("DELETE FROM {table} WHERE expires_at_ms <= ? LIMIT ?");
        delete_in_batches(|| async {
            Ok(sqlx::query(AssertSqlSafe(delete.as_str()))
                .bind(to_db(now_ms))
                .bind(i64::from(PURGE_BATCH_ROWS))
                .execute(&self.pool)
                .await?
                .rows_affected())
        })
        .await
    }

    pub(crate) async fn store_broadcast(
        &self,
        broadcast: NewBroadcast<'_>,
    ) -> Result<StoredBroadcast, StorageError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO broadcast_heads (app, last_seq) VALUES (?, 1) \
             ON DUPLICATE KEY UPDATE last_seq = last_seq + 1",
        )
        .bind(broadcast.app)
        .execute(&mut *tx)
        .await?;
        let seq: i64 = sqlx::query_scalar("SELECT last_seq FROM broadcast_heads WHERE app = ?")
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
        .fetch_all(&self.pool)
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
        .fetch_optional(&self.pool)
        .await?)
    }

    pub(crate) async fn ping(&self) -> Result<(), StorageError> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}
