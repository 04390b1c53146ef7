//! herald-storage is the saver: it keeps each (app, user) inbox durable.
//! It allocates per-inbox sequences, stores messages until their TTL ends,
//! hands back what a reconnecting client missed, remembers the highest
//! sequence each device has acked, and records idempotency keys so a retried
//! send is not stored twice. A call that stores reports success only after
//! the commit is durable. It deliberately knows nothing of sockets, HTTP,
//! delivery or fan-out, and it never reads the clock: every call that
//! depends on time takes `now_ms` (unix milliseconds) from the caller.
//!
//! Three engines sit behind one [`Saver`]: SQLite (one embedded file, the
//! default), and MySQL/MariaDB or PostgreSQL for a cluster, where several
//! control nodes write at once. One implementation over sqlx serves all
//! three (`sql.rs`, and `group_commit.rs` for stores); `dialect.rs` holds
//! what really differs. Each engine has its own migrations
//! (`migrations/<engine>`) of the same schema; what the engines must agree
//! on is tested against all three (`tests/saver.rs`). SQLite's page
//! caches take their memory from one region allocated at startup
//! (`sqlite_memory.rs`).

mod dialect;
mod group_commit;
mod sql;
mod sqlite_memory;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
pub use herald_proto::MessageId;
pub use herald_proto::ids::AppId;
pub use herald_proto::plane::Notice;

use dialect::{Dialect, MySqlDialect, PostgresDialect, SqliteDialect};
use sql::SqlSaver;

/// The most messages [`Saver::messages_after`] returns in one call, whatever
/// `limit` asks for, so one call's memory is bounded by this times the
/// payload size limit. Callers page with `after` and the `more` flag.
pub const MESSAGES_AFTER_LIMIT_MAX: u32 = 1_000;

/// Rows deleted per statement by [`Saver::purge_expired`]. Each statement is
/// its own transaction and holds its locks while it runs; 10,000 rows of a
/// few hundred bytes each take some milliseconds, short enough that a queued
/// store is not held up noticeably, and large enough that purging a day's
/// backlog takes few round trips.
pub const PURGE_BATCH_ROWS: u32 = 10_000;

/// Rows one networked statement carries (inbox heads raised, messages
/// inserted, cursors saved, heads read). A multicast to 10,000 users is ten
/// statements rather than 10,000 round trips, and no statement comes near
/// MySQL's 65,535 placeholders or a server's packet limit.
const BATCH_ROWS_MAX: usize = 1_000;

/// Attempts at a transaction the database aborted to break a deadlock or a
/// race on an idempotency key. Either clears on retry (the loser of the race
/// then finds the winner's record); one that keeps failing is reported.
const TRANSACTION_ATTEMPTS_MAX: u32 = 8;

/// Durable per-(app, user) inboxes on one of three engines. Cloning is
/// cheap: clones share the engine's pools.
#[derive(Debug, Clone)]
pub struct Saver {
    engine: Engine,
    commits: Arc<CommitCounters>,
}

/// What the saver has committed of `store` calls: how many calls stored
/// (replays store nothing and are not counted), in how many transactions
/// (a group commit takes several calls).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitCounts {
    pub transactions: u64,
    pub stores: u64,
}

/// How the committers group stores into transactions (see
/// `storage/src/group_commit.rs`), on every engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Calls one transaction takes at most.
    pub stores_max: usize,
    /// Recipients one transaction takes at most (a multicast counts each
    /// of its users). A single call with more is committed alone.
    pub recipients_max: usize,
    /// How long the committer waits for more calls when the first finds
    /// none waiting. Zero: it never waits, and a lone push is committed at
    /// once; the calls that arrive during one commit make up the next group
    /// anyway.
    pub wait: Duration,
}

impl Default for GroupCommit {
    fn default() -> GroupCommit {
        GroupCommit {
            stores_max: 256,
            recipients_max: 10_000,
            wait: Duration::ZERO,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct CommitCounters {
    transactions: AtomicU64,
    stores: AtomicU64,
}

impl CommitCounters {
    pub(crate) fn committed(&self, stores: u64) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.stores.fetch_add(stores, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
enum Engine {
    Sqlite(SqlSaver<SqliteDialect>),
    MySql(SqlSaver<MySqlDialect>),
    Postgres(SqlSaver<PostgresDialect>),
}

/// Runs `$call` on whichever engine `$saver` holds.
macro_rules! on_engine {
    ($saver:expr, $engine:ident => $call:expr) => {
        match &$saver.engine {
            Engine::Sqlite($engine) => $call,
            Engine::MySql($engine) => $call,
            Engine::Postgres($engine) => $call,
        }
    };
}

impl Saver {
    /// Opens the database a URL names and brings its schema up to date:
    /// `sqlite:PATH` (created if missing), `mysql://user:password@host/db`
    /// (MySQL 8 or MariaDB 10.6 and later) or `postgres://user@host/db`.
    pub async fn open(url: &str) -> Result<Saver, StorageError> {
        Saver::open_with(url, GroupCommit::default()).await
    }

    /// [`Saver::open`], its stores committed in groups as `group_commit`
    /// says.
    pub async fn open_with(url: &str, group_commit: GroupCommit) -> Result<Saver, StorageError> {
        let commits = Arc::<CommitCounters>::default();
        // Each engine's committers are spawned here, where the engine is
        // known: their futures are Send for each concrete engine.
        let engine = if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            let (saver, committers) =
                SqlSaver::<SqliteDialect>::open(path, group_commit, commits.clone()).await?;
            committers
                .into_iter()
                .for_each(|c| drop(tokio::spawn(c.run())));
            Engine::Sqlite(saver)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let (saver, committers) =
                SqlSaver::<MySqlDialect>::open(url, group_commit, commits.clone()).await?;
            committers
                .into_iter()
                .for_each(|c| drop(tokio::spawn(c.run())));
            Engine::MySql(saver)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (saver, committers) =
                SqlSaver::<PostgresDialect>::open(url, group_commit, commits.clone()).await?;
            committers
                .into_iter()
                .for_each(|c| drop(tokio::spawn(c.run())));
            Engine::Postgres(saver)
        } else {
            return Err(StorageError::Config(format!(
                "database URL {:?} names no engine Herald knows: \
                 use sqlite:PATH, mysql://... or postgres://...",
                redact(url)
            )));
        };
        Ok(Saver { engine, commits })
    }

    /// Opens (creating if needed) the SQLite database file at `path`, its
    /// stores committed in groups as `group_commit` says.
    pub async fn open_sqlite(
        path: &std::path::Path,
        group_commit: GroupCommit,
    ) -> Result<Saver, StorageError> {
        let path = path.to_str().ok_or_else(|| {
            StorageError::Config(format!("the path {} is not UTF-8", path.display()))
        })?;
        Saver::open_with(&format!("sqlite:{path}"), group_commit).await
    }

    /// What this saver (and its clones) has committed of `store` calls.
    pub fn commit_counts(&self) -> CommitCounts {
        CommitCounts {
            transactions: self.commits.transactions.load(Ordering::Relaxed),
            stores: self.commits.stores.load(Ordering::Relaxed),
        }
    }

    /// Bytes SQLite holds in this process, or `None` on a networked
    /// engine, whose memory is the server's: the region its page caches
    /// take their pages from (`sqlite_memory.rs`), all resident from the
    /// first open, and what it allocated with `malloc` besides
    /// (statements, in-memory journals, pages past the region).
    pub fn engine_memory_bytes(&self) -> Option<u64> {
        match self.engine {
            Engine::Sqlite(_) => {
                // SAFETY: sqlite3_memory_used takes no argument and only
                // reads SQLite's memory statistics (under its own mutex).
                let allocated = unsafe { libsqlite3_sys::sqlite3_memory_used() };
                Some(
                    u64::try_from(allocated).unwrap_or(0)
                        + sqlite_memory::page_cache_region_bytes(),
                )
            }
            _ => None,
        }
    }

    /// The engine's name, for logs and metrics.
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite(_) => SqliteDialect::NAME,
            Engine::MySql(_) => MySqlDialect::NAME,
            Engine::Postgres(_) => PostgresDialect::NAME,
        }
    }

    /// Stores in ONE transaction: for each user allocate the next seq, insert
    /// the message (the same message_id for every user of one call: one
    /// logical message), and, if an idempotency key is given, record the
    /// results (expires at now_ms + ttl_ms). If the key exists and has not
    /// expired, store nothing and return the recorded results with
    /// replayed = true (an expired key is replaced). Durable when it returns Ok.
    ///
    /// A replay returns the first call's results even if this call names
    /// other users or another payload: the key, not the content, identifies
    /// the send. Sequences stay gapless and distinct per inbox however many
    /// nodes store into it at once.
    pub async fn store(&self, msg: NewMessage) -> Result<StoreOutcome, StorageError> {
        // The committers count their groups, and retry them, themselves.
        on_engine!(self, engine => engine.store(msg).await)
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
        let rows = on_engine!(self, engine => engine.messages_after(app, user, after, limit + 1, now_ms).await)?;
        let more = rows.len() > limit as usize;
        let messages = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| row.into_stored(app, user))
            .collect::<Result<Vec<_>, StorageError>>()?;
        Ok((messages, more))
    }

    /// Where each inbox stands, for many inboxes at once: the last sequence
    /// handed out and, when the key names a device, the highest sequence
    /// that device acked. One answer per key, in order.
    ///
    /// Binding clients need both before their first fill; asking for a
    /// batch at once keeps a reconnect storm from becoming one database
    /// round trip per connection.
    pub async fn inbox_heads(&self, keys: &[InboxKey]) -> Result<Vec<InboxHead>, StorageError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let heads = on_engine!(self, engine => engine.inbox_heads(keys).await)?;
        if heads.len() != keys.len() {
            return Err(StorageError::Corrupt(format!(
                "{} inbox heads read for {} keys",
                heads.len(),
                keys.len()
            )));
        }
        Ok(heads)
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
        let acks = highest_per_device(acks);
        on_engine!(self, engine => retried(|| engine.save_acks(&acks, now_ms)).await)
    }

    /// The database's epoch: random, written when the first node opens a
    /// new database, the same for every node on it after that. A wiped
    /// database has another, which tells clients that its sequences start
    /// over (HELLO_OK carries it).
    pub async fn storage_epoch(&self) -> Result<u64, StorageError> {
        // Positive, to fit every engine's signed BIGINT.
        let proposed = rand::random::<i64>() & i64::MAX;
        let epoch = on_engine!(self, engine => retried(|| engine.storage_epoch(proposed)).await)?;
        from_db(epoch, "storage_epoch.epoch")
    }

    /// Sets a device's cursor down to `acked_seq` where it is above it: for
    /// a cursor left past its inbox's head by a data reset or restore,
    /// which acks of the inbox's new messages would otherwise never move.
    pub async fn lower_ack_cursor(&self, ack: &AckCursor<'_>) -> Result<(), StorageError> {
        on_engine!(self, engine => retried(|| engine.lower_ack_cursor(ack)).await)
    }

    /// Notes that a bind's fill of the device's inbox starts after
    /// `start.after` and returns how many binds of the device in a row (on
    /// any node) started their fill there, this one included: a device
    /// that never acks the message after it gets it again on every bind.
    /// A device without a cursor gets one at 0.
    pub async fn count_fill_start(
        &self,
        start: &FillStart<'_>,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        let count =
            on_engine!(self, engine => retried(|| engine.count_fill_start(start, now_ms)).await)?;
        from_db(count, "device_cursors.redeliveries")
    }

    /// The last broadcast seq `app` handed out (0: none ever), expired or
    /// not.
    pub async fn broadcast_head(&self, app: &str) -> Result<u64, StorageError> {
        let seq = on_engine!(self, engine => engine.broadcast_head(app).await)?;
        seq.map_or(Ok(0), |seq| from_db(seq, "broadcast_heads.last_seq"))
    }

    /// The app's stored messages (unexpired), and how many of them no
    /// device of their user has acked. Counts every row of the app: for a
    /// stats page, not for every request.
    pub async fn message_counts(
        &self,
        app: &str,
        now_ms: u64,
    ) -> Result<MessageCounts, StorageError> {
        let (stored, unacked) =
            on_engine!(self, engine => engine.message_counts(app, now_ms).await)?;
        Ok(MessageCounts {
            stored: from_db(stored, "COUNT(*)")?,
            unacked: from_db(unacked, "COUNT(*)")?,
        })
    }

    /// Stores a broadcast once for its app under the app's next broadcast
    /// sequence (gapless and distinct with any number of nodes storing).
    /// Durable when it returns Ok.
    pub async fn store_broadcast(
        &self,
        broadcast: NewBroadcast<'_>,
    ) -> Result<StoredBroadcast, StorageError> {
        on_engine!(self, engine => retried(|| engine.store_broadcast(broadcast)).await)
    }

    /// Up to `limit` (capped at [`BROADCASTS_AFTER_LIMIT_MAX`]) unexpired
    /// broadcasts of `app` with seq > after, ascending.
    pub async fn broadcasts_after(
        &self,
        app: &str,
        after: u64,
        limit: u32,
        now_ms: u64,
    ) -> Result<Vec<StoredBroadcast>, StorageError> {
        let limit = limit.min(BROADCASTS_AFTER_LIMIT_MAX);
        let rows =
            on_engine!(self, engine => engine.broadcasts_after(app, after, limit, now_ms).await)?;
        rows.into_iter().map(BroadcastRow::into_stored).collect()
    }

    /// The broadcast of `app` with this id, expired or not (until purged).
    pub async fn broadcast(
        &self,
        app: &str,
        broadcast_id: MessageId,
    ) -> Result<Option<StoredBroadcast>, StorageError> {
        let row = on_engine!(self, engine => engine.broadcast(app, broadcast_id).await)?;
        row.map(BroadcastRow::into_stored).transpose()
    }

    /// Deletes expired messages and idempotency keys; returns how many
    /// messages were deleted.
    ///
    /// Work per statement is bounded: it deletes [`PURGE_BATCH_ROWS`] rows
    /// at a time, each batch its own transaction, and loops until a batch
    /// comes up short, so stores run between batches instead of waiting for
    /// the whole purge.
    pub async fn purge_expired(&self, now_ms: u64) -> Result<u64, StorageError> {
        let mut purged = [0; sql::PURGED_TABLES.len()];
        for (table, purged) in purged.iter_mut().enumerate() {
            *purged = on_engine!(self, engine => engine.purge_table(table, now_ms).await)?;
        }
        let [messages, idempotency_keys, broadcasts] = purged;
        tracing::debug!(
            messages,
            idempotency_keys,
            broadcasts,
            "purged expired rows"
        );
        Ok(messages)
    }

    /// Every app, live or being deleted, by id.
    pub async fn apps(&self) -> Result<Vec<StoredApp>, StorageError> {
        let rows = on_engine!(self, engine => retried(|| engine.apps()).await)?;
        rows.into_iter().map(AppRow::into_stored).collect()
    }

    /// Creates an app at version 1; false if the id is taken (by a live app
    /// or one whose rows are still being deleted).
    pub async fn create_app(
        &self,
        id: &str,
        settings: &str,
        secrets: &str,
    ) -> Result<bool, StorageError> {
        on_engine!(self, engine => engine.create_app(id, settings, secrets).await)
    }

    /// Replaces a live app's settings and secrets if it is still at
    /// `version` (the one the caller read); false otherwise: the caller
    /// reads again and decides again, so no change overwrites another.
    pub async fn update_app(
        &self,
        id: &str,
        settings: &str,
        secrets: &str,
        version: u64,
    ) -> Result<bool, StorageError> {
        let version = to_db(version);
        on_engine!(self, engine => retried(|| engine.update_app(id, settings, secrets, version)).await)
    }

    /// Marks a live app deleted; false if there is no live app `id`. Its
    /// rows stay until [`Saver::purge_app`].
    pub async fn mark_app_deleted(&self, id: &str, now_ms: u64) -> Result<bool, StorageError> {
        on_engine!(self, engine => retried(|| engine.mark_app_deleted(id, now_ms)).await)
    }

    /// Deletes every row (messages, inboxes, cursors, keys, broadcasts) of
    /// an app marked deleted, [`PURGE_BATCH_ROWS`] at a time so stores run
    /// between batches, then the app itself, which frees its id; returns
    /// how many rows. Run again after a failure or a restart, it goes on
    /// where it stopped.
    pub async fn purge_app(&self, id: &str) -> Result<u64, StorageError> {
        on_engine!(self, engine => engine.purge_app(id).await)
    }

    /// Cheap round trip (SELECT 1) for readiness checks.
    pub async fn ping(&self) -> Result<(), StorageError> {
        on_engine!(self, engine => engine.ping().await)
    }

    /// Closes the pools once the calls in flight finish; calls made
    /// afterwards fail as unavailable. Every clone shares the pools, so this
    /// closes them all.
    pub async fn close(&self) {
        on_engine!(self, engine => engine.close().await)
    }
}

/// Runs a transaction again while the database aborts it as a deadlock
/// victim, a serialization failure or the loser of a unique-key race, with
/// a short random pause so the contenders do not collide again in step.
async fn retried<T, F, Fut>(mut attempt: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(StorageError::Unavailable(error))
                if is_transient(&error) && tries < TRANSACTION_ATTEMPTS_MAX =>
            {
                tracing::debug!(%error, tries, "retrying an aborted transaction");
                tries += 1;
                let pause_ms = rand::random_range(1..=5u64 << tries.min(6));
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            }
            outcome => return outcome,
        }
    }
}

/// Runs `delete_batch` (one statement deleting at most [`PURGE_BATCH_ROWS`]
/// rows) until it deletes fewer than a full batch; returns the total.
async fn delete_in_batches<F, Fut>(mut delete_batch: F) -> Result<u64, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StorageError>>,
{
    let mut deleted_total = 0;
    loop {
        let deleted = delete_batch().await?;
        deleted_total += deleted;
        if deleted < u64::from(PURGE_BATCH_ROWS) {
            return Ok(deleted_total);
        }
    }
}

/// Whether the database aborted a statement only because of what ran beside
/// it: a deadlock (SQLSTATE 40001 on MySQL, 40P01 on PostgreSQL), a
/// serialization failure (40001) or a unique-key race (23000/23505).
fn is_transient(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(error) = error else {
        return false;
    };
    if error.kind() == sqlx::error::ErrorKind::UniqueViolation {
        return true;
    }
    matches!(error.code().as_deref(), Some("40001" | "40P01"))
}

/// One cursor per device, the highest: PostgreSQL refuses an upsert that
/// touches a row twice, and sorted rows lock in one order on every node,
/// which keeps two flushes from deadlocking.
fn highest_per_device<'a>(acks: &[AckCursor<'a>]) -> Vec<AckCursor<'a>> {
    let mut highest: BTreeMap<(&str, &str, &str), AckCursor<'a>> = BTreeMap::new();
    for ack in acks {
        highest
            .entry((ack.app, ack.user, ack.device_id))
            .and_modify(|kept| kept.acked_seq = kept.acked_seq.max(ack.acked_seq))
            .or_insert(*ack);
    }
    highest.into_values().collect()
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// One row of `apps`; the same shape on every engine.
#[derive(sqlx::FromRow)]
struct AppRow {
    id: String,
    settings: String,
    secrets: String,
    version: i64,
    deleted_at_ms: i64,
}

/// An app as stored: its settings and secrets are the control plane's JSON,
/// which storage keeps and never reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredApp {
    pub id: String,
    pub settings: String,
    pub secrets: String,
    /// Rises with every change.
    pub version: u64,
    /// When the app was deleted, while its rows are being deleted.
    pub deleted_at_ms: Option<u64>,
}

impl AppRow {
    fn into_stored(self) -> Result<StoredApp, StorageError> {
        Ok(StoredApp {
            version: from_db(self.version, "apps.version")?,
            deleted_at_ms: match self.deleted_at_ms {
                0 => None,
                at => Some(from_db(at, "apps.deleted_at_ms")?),
            },
            id: self.id,
            settings: self.settings,
            secrets: self.secrets,
        })
    }
}

/// One row of `messages` as [`Saver::messages_after`] selects it; the same
/// shape on every engine.
#[derive(sqlx::FromRow)]
struct MessageRow {
    seq: i64,
    message_id: Vec<u8>,
    payload: Vec<u8>,
    notice: Option<Vec<u8>>,
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
        let notice = match self.notice {
            None => None,
            Some(column) => Some(notice_from_column(&column).ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "message {} of app {app:?} user {user:?} has a malformed notice",
                    self.seq
                ))
            })?),
        };
        Ok(StoredMessage {
            seq: from_db(self.seq, "messages.seq")?,
            message_id,
            payload: Bytes::from(self.payload),
            notice,
            created_at_ms: from_db(self.created_at_ms, "messages.created_at_ms")?,
            expires_at_ms: from_db(self.expires_at_ms, "messages.expires_at_ms")?,
        })
    }
}

/// One row of `broadcasts`; the same shape on every engine.
#[derive(sqlx::FromRow)]
struct BroadcastRow {
    seq: i64,
    broadcast_id: Vec<u8>,
    payload: Vec<u8>,
    required_tags: String,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl BroadcastRow {
    fn into_stored(self) -> Result<StoredBroadcast, StorageError> {
        let broadcast_id = <[u8; 16]>::try_from(self.broadcast_id.as_slice())
            .map(MessageId)
            .map_err(|_| StorageError::Corrupt(format!("broadcast {} has a bad id", self.seq)))?;
        let required_tags = serde_json::from_str(&self.required_tags).map_err(|error| {
            StorageError::Corrupt(format!(
                "broadcast {} has unreadable tags: {error}",
                self.seq
            ))
        })?;
        Ok(StoredBroadcast {
            seq: from_db(self.seq, "broadcasts.seq")?,
            broadcast_id,
            payload: Bytes::from(self.payload),
            required_tags,
            created_at_ms: from_db(self.created_at_ms, "broadcasts.created_at_ms")?,
            expires_at_ms: from_db(self.expires_at_ms, "broadcasts.expires_at_ms")?,
        })
    }
}

/// What a newly stored broadcast reads back as.
fn stored_broadcast(broadcast: &NewBroadcast<'_>, seq: u64, id: MessageId) -> StoredBroadcast {
    StoredBroadcast {
        seq,
        broadcast_id: id,
        payload: Bytes::copy_from_slice(broadcast.payload),
        required_tags: broadcast.required_tags.to_vec(),
        created_at_ms: broadcast.now_ms,
        expires_at_ms: broadcast.now_ms.saturating_add(broadcast.ttl_ms),
    }
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

/// Decodes the results an idempotency key recorded.
fn recorded_results(results: &str, app: &str, key: &str) -> Result<Vec<StoredRef>, StorageError> {
    serde_json::from_str(results).map_err(|error| {
        StorageError::Corrupt(format!(
            "idempotency key {key:?} of app {app:?} records unreadable results: {error}"
        ))
    })
}

/// Encodes results for an idempotency key to record.
fn results_to_record(stored: &[StoredRef]) -> Result<String, StorageError> {
    serde_json::to_string(stored)
        .map_err(|error| StorageError::Corrupt(format!("cannot encode store results: {error}")))
}

/// Why a storage call failed. Every variant comes from storage; only
/// `Unavailable` can succeed on retry.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be reached or refused the statement (I/O
    /// error, busy past its timeout, pool closed, ...).
    #[error("storage unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    /// The schema could not be brought up to date when opening.
    #[error("storage migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL or settings cannot work.
    #[error("storage configuration: {0}")]
    Config(String),
    /// A stored value breaks an invariant this crate keeps (a negative
    /// sequence, a message id that is not 16 bytes, unreadable JSON).
    #[error("storage holds invalid data: {0}")]
    Corrupt(String),
}

/// One message to store in the inbox of every user in `users` (unicast = one user).
///
/// Owned, and moved into the committers' queue: the app id is the caller's
/// shared `AppId`, the payload the `Bytes` the API parsed, and the user list
/// the one the API built, so queueing a store copies none of them.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub app: AppId,
    /// Recipients, in the order `StoreOutcome::stored` reports them. A user
    /// listed twice gets two sequences (same message id); the caller is
    /// expected to de-duplicate.
    pub users: Vec<String>,
    pub payload: Bytes,
    /// How long the message (and the idempotency key, if any) is kept.
    pub ttl_ms: u64,
    /// Unix milliseconds; time is passed in so tests control it.
    pub now_ms: u64,
    pub idempotency_key: Option<String>,
    /// Set for a push with `"delivery": "notify"`.
    pub notice: Option<Notice>,
}

impl NewMessage {
    fn expires_at_ms(&self) -> u64 {
        self.now_ms.saturating_add(self.ttl_ms)
    }

    /// The `notice` column's value.
    fn notice_column(&self) -> Option<Vec<u8>> {
        self.notice.as_ref().map(|notice| {
            let mut column = Vec::with_capacity(4 + notice.hint.len());
            column.extend_from_slice(&notice.pull_spread_ms.to_be_bytes());
            column.extend_from_slice(notice.hint.as_bytes());
            column
        })
    }
}

/// A `notice` column's value read back.
fn notice_from_column(column: &[u8]) -> Option<Notice> {
    let (spread, hint) = column.split_first_chunk::<4>()?;
    Some(Notice {
        pull_spread_ms: u32::from_be_bytes(*spread),
        hint: Arc::from(std::str::from_utf8(hint).ok()?),
    })
}

/// Where one recipient's copy of a message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredRef {
    pub user: String,
    pub seq: u64,
    #[serde(with = "message_id_hex")]
    pub message_id: MessageId,
}

/// The result of [`Saver::store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOutcome {
    /// One entry per user, in the order of `NewMessage::users`.
    pub stored: Vec<StoredRef>,
    /// True when the idempotency key was seen within its TTL: nothing new
    /// was stored and `stored` is the first call's result.
    pub replayed: bool,
}

/// A message read back from an inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub message_id: MessageId,
    pub payload: Bytes,
    /// Set when it was pushed with `"delivery": "notify"`.
    pub notice: Option<Notice>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// One inbox to look up with [`Saver::inbox_heads`], and the device whose
/// ack cursor to read with it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxKey {
    pub app: String,
    pub user: String,
    pub device_id: Option<String>,
}

/// An app's messages, as `Saver::message_counts` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageCounts {
    /// Stored and not expired.
    pub stored: u64,
    /// Of those, the ones past every ack cursor of their user's devices.
    pub unacked: u64,
}

/// Where one inbox stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxHead {
    /// The last sequence handed out (0: nothing was ever stored). Nothing
    /// after it exists, so a reader at or past it has nothing to read.
    pub last_seq: u64,
    /// The device's highest ack, if the key named a device that ever acked.
    pub acked_seq: Option<u64>,
}

impl InboxHead {
    /// From the columns as read: a missing head is an inbox never stored
    /// into, a missing cursor a device that never acked.
    fn from_db(last_seq: Option<i64>, acked_seq: Option<i64>) -> Result<InboxHead, StorageError> {
        Ok(InboxHead {
            last_seq: last_seq
                .map(|seq| from_db(seq, "inbox_heads.last_seq"))
                .transpose()?
                .unwrap_or(0),
            acked_seq: acked_seq
                .map(|seq| from_db(seq, "device_cursors.acked_seq"))
                .transpose()?,
        })
    }
}

/// A broadcast to store: once for the app, whoever it reaches.
#[derive(Debug, Clone, Copy)]
pub struct NewBroadcast<'a> {
    pub app: &'a str,
    pub payload: &'a [u8],
    /// Only clients carrying every one of these tags get it; empty: all.
    pub required_tags: &'a [String],
    pub ttl_ms: u64,
    pub now_ms: u64,
}

/// A stored broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBroadcast {
    /// The app's broadcast sequence: 1, 2, ... per app, never reused.
    pub seq: u64,
    pub broadcast_id: MessageId,
    pub payload: Bytes,
    pub required_tags: Vec<String>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// The most broadcasts [`Saver::broadcasts_after`] returns in one call.
pub const BROADCASTS_AFTER_LIMIT_MAX: u32 = 1_000;

/// A device's ack: it holds every message of (app, user) up to `acked_seq`.
/// Borrowed: a flush after a push to everyone writes one per device, and
/// copying every name for it would double the flush's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckCursor<'a> {
    pub app: &'a str,
    pub user: &'a str,
    pub device_id: &'a str,
    pub acked_seq: u64,
}

/// Where a bind's first fill of a device's inbox starts: after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillStart<'a> {
    pub app: &'a str,
    pub user: &'a str,
    pub device_id: &'a str,
    pub after: u64,
}

/// Makes a new message id: the low 6 bytes of `now_ms` big-endian, so ids
/// sort roughly by creation time (that covers dates until the year 10889),
/// then 10 random bytes, so two ids made in the same millisecond collide
/// with negligible probability (80 bits).
pub(crate) fn new_message_id(now_ms: u64) -> MessageId {
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
    id[6..].copy_from_slice(&rand::random::<[u8; 10]>());
    MessageId(id)
}

/// Serializes a [`MessageId`] as its 32 hex digits, the form clients and
/// logs see, rather than as an array of 16 numbers.
mod message_id_hex {
    use super::MessageId;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(crate) fn serialize<S: Serializer>(id: &MessageId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MessageId, D::Error> {
        let hex = String::deserialize(d)?;
        hex.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_starts_with_the_time() {
        let id = new_message_id(0x0102_0304_0506);
        assert_eq!(id.0[..6], [1, 2, 3, 4, 5, 6]);
        assert_ne!(
            new_message_id(0x0102_0304_0506).0[6..],
            id.0[6..],
            "80 random bits repeated"
        );
    }

    #[test]
    fn stored_ref_json_carries_the_id_as_hex() {
        let stored = StoredRef {
            user: "u1".into(),
            seq: 7,
            message_id: MessageId([0xab; 16]),
        };
        let json = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            json,
            r#"{"user":"u1","seq":7,"message_id":"abababababababababababababababab"}"#
        );
        assert_eq!(serde_json::from_str::<StoredRef>(&json).unwrap(), stored);
        assert!(
            serde_json::from_str::<StoredRef>(r#"{"user":"u1","seq":7,"message_id":"zz"}"#)
                .is_err()
        );
    }
}
