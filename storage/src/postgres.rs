//! The saver over PostgreSQL, shared by every control node.
//!
//! Sequences come from the inbox head's row lock, as on MySQL: the upsert
//! that raises a head holds its row until commit, so concurrent stores to
//! one user from any number of nodes queue on it (READ COMMITTED re-reads
//! the latest head after the wait). Heads are raised in user order, so
//! overlapping multicasts do not deadlock; a deadlock or key race the
//! server still reports is retried by the caller.
//!
//! Batches travel as arrays: one `UNNEST` upsert raises every head of a
//! multicast and returns the new values, one `INSERT .. SELECT` stores its
//! rows with the payload bound once.

use std::collections::BTreeMap;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, PgPool};

use crate::mysql::{ACQUIRE_TIMEOUT, POOL_CONNECTIONS_MAX};
use crate::{
    AckCursor, BATCH_ROWS_MAX, BroadcastRow, InboxHead, InboxKey, MessageId, MessageRow,
    NewBroadcast, NewMessage, PURGE_BATCH_ROWS, StorageError, StoreOutcome, StoredBroadcast,
    assign_seqs, delete_in_batches, from_db, new_message_id, recorded_results, results_to_record,
    seqs_needed, stored_broadcast, to_db,
};

#[derive(Debug, Clone)]
pub(crate) struct PgSaver {
    pool: PgPool,
}

impl PgSaver {
    pub(crate) async fn open(url: &str) -> Result<PgSaver, StorageError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A broken connection fails its statement and is dropped; a
            // ping before every use would double the round trips.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        tracing::info!("opened PostgreSQL storage");
        Ok(PgSaver { pool })
    }

    pub(crate) async fn store(&self, msg: NewMessage<'_>) -> Result<StoreOutcome, StorageError> {
        let now_ms = to_db(msg.now_ms);
        let expires_at_ms = to_db(msg.now_ms.saturating_add(msg.ttl_ms));
        let mut tx = self.pool.begin().await?;

        if let Some(key) = msg.idempotency_key {
            let recorded: Option<(String, i64)> = sqlx::query_as(
                "SELECT results, expires_at_ms FROM idempotency_keys \
                 WHERE app = $1 AND idem_key = $2 FOR UPDATE",
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
            let users: Vec<&str> = chunk.iter().map(|(user, _)| *user).collect();
            let counts: Vec<i64> = chunk.iter().map(|(_, count)| to_db(*count)).collect();
            // WITH ORDINALITY + ORDER BY raises the heads in user order.
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "INSERT INTO inbox_heads (app, user_id, last_seq) \
                 SELECT $1, r.user_id, r.count \
                 FROM UNNEST($2::text[], $3::bigint[]) WITH ORDINALITY AS r(user_id, count, n) \
                 ORDER BY r.n \
                 ON CONFLICT (app, user_id) DO UPDATE \
                 SET last_seq = inbox_heads.last_seq + excluded.last_seq \
                 RETURNING user_id, last_seq",
            )
            .bind(msg.app)
            .bind(&users)
            .bind(&counts)
            .fetch_all(&mut *tx)
            .await?;
            for (user, last_seq) in rows {
                last_seqs.insert(user, from_db(last_seq, "inbox_heads.last_seq")?);
            }
        }
        let needed: BTreeMap<&str, u64> = needed.into_iter().collect();
        let stored = assign_seqs(msg.users, &needed, &last_seqs, message_id)?;

        for chunk in stored.chunks(BATCH_ROWS_MAX) {
            let users: Vec<&str> = chunk.iter().map(|stored| stored.user.as_str()).collect();
            let seqs: Vec<i64> = chunk.iter().map(|stored| to_db(stored.seq)).collect();
            sqlx::query(
                "INSERT INTO messages \
                 (app, user_id, seq, message_id, payload, created_at_ms, expires_at_ms) \
                 SELECT $1, r.user_id, r.seq, $4, $5, $6, $7 \
                 FROM UNNEST($2::text[], $3::bigint[]) AS r(user_id, seq)",
            )
            .bind(msg.app)
            .bind(&users)
            .bind(&seqs)
            .bind(&message_id.0[..])
            .bind(&msg.payload[..])
            .bind(now_ms)
            .bind(expires_at_ms)
            .execute(&mut *tx)
            .await?;
        }

        if let Some(key) = msg.idempotency_key {
            // Only an expired key is deleted: a live one another node
            // committed since the check above stays, so this insert fails
            // on the primary key and the retry replays that node's result.
            sqlx::query("DELETE FROM idempotency_keys WHERE app = $1 AND idem_key = $2 AND expires_at_ms <= $3")
                .bind(msg.app)
                .bind(key)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO idempotency_keys (app, idem_key, results, expires_at_ms) \
                 VALUES ($1, $2, $3, $4)",
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
             WHERE app = $1 AND user_id = $2 AND seq > $3 AND expires_at_ms > $4 \
             ORDER BY seq LIMIT $5",
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
            let apps: Vec<&str> = chunk.iter().map(|key| key.app.as_str()).collect();
            let users: Vec<&str> = chunk.iter().map(|key| key.user.as_str()).collect();
            let devices: Vec<Option<&str>> =
                chunk.iter().map(|key| key.device_id.as_deref()).collect();
            let rows: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT h.last_seq, c.acked_seq \
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) \
                   WITH ORDINALITY AS r(app, user_id, device_id, n) \
                 LEFT JOIN inbox_heads AS h ON h.app = r.app AND h.user_id = r.user_id \
                 LEFT JOIN device_cursors AS c \
                   ON c.app = r.app AND c.user_id = r.user_id AND c.device_id = r.device_id \
                 ORDER BY r.n",
            )
            .bind(&apps)
            .bind(&users)
            .bind(&devices)
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
            let apps: Vec<&str> = chunk.iter().map(|ack| ack.app).collect();
            let users: Vec<&str> = chunk.iter().map(|ack| ack.user).collect();
            let devices: Vec<&str> = chunk.iter().map(|ack| ack.device_id).collect();
            let seqs: Vec<i64> = chunk.iter().map(|ack| to_db(ack.acked_seq)).collect();
            sqlx::query(
                "INSERT INTO device_cursors \
                 (app, user_id, device_id, acked_seq, updated_at_ms) \
                 SELECT r.app, r.user_id, r.device_id, r.acked_seq, $5 \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) \
                   WITH ORDINALITY AS r(app, user_id, device_id, acked_seq, n) \
                 ORDER BY r.n \
                 ON CONFLICT (app, user_id, device_id) DO UPDATE SET \
                 acked_seq = GREATEST(device_cursors.acked_seq, excluded.acked_seq), \
                 updated_at_ms = GREATEST(device_cursors.updated_at_ms, excluded.updated_at_ms)",
            )
            .bind(&apps)
            .bind(&users)
            .bind(&devices)
            .bind(&seqs)
            .bind(to_db(now_ms))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The database's epoch, written by the first caller (`proposed`).
    pub(crate) async fn storage_epoch(&self, proposed: i64) -> Result<i64, StorageError> {
        sqlx::query(
            "INSERT INTO storage_epoch (id, epoch) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
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
            "UPDATE device_cursors SET acked_seq = $1 \
             WHERE app = $2 AND user_id = $3 AND device_id = $4 AND acked_seq > $1",
        )
        .bind(to_db(ack.acked_seq))
        .bind(ack.app)
        .bind(ack.user)
        .bind(ack.device_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn broadcast_head(&self, app: &str) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT last_seq FROM broadcast_heads WHERE app = $1")
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
        let delete = format!(
            "DELETE FROM {table} WHERE ctid IN \
                 (SELECT ctid FROM {table} WHERE expires_at_ms <= $1 LIMIT $2)"
        );
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
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO broadcast_heads (app, last_seq) VALUES ($1, 1) \
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
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
             WHERE app = $1 AND seq > $2 AND expires_at_ms > $3 ORDER BY seq LIMIT $4",
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
            "SELECT seq, broadcast_id, payload, required_tags, created_at_ms, expires_at_ms FROM broadcasts WHERE app = $1 AND broadcast_id = $2",
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
