//! Group commit, on every engine: stores wait in one queue, and a committer
//! takes whatever is waiting (within the bounds of [`GroupCommit`]), writes
//! it in one transaction of a few multi-row statements, and commits once:
//! one fsync (one round trip to a networked server) for many API calls.
//!
//! By default a committer does not wait for company: a lone store is
//! committed at once, and the stores that arrive while one commit is being
//! synced make up the next group. SQLite runs one committer (it has one
//! writer); a networked engine runs [`Dialect::COMMITS_IN_FLIGHT`], each
//! gathering its group while the others commit.
//!
//! Each caller is answered after the commit that made its store durable.
//! A store that fails fails alone: the group is written again with a
//! savepoint around each store, and the failing one rolled back to its own.
//! A group the database aborted only because of what ran beside it (a
//! deadlock, a race on an idempotency key) is written again whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, QueryBuilder, Type,
};
use tokio::sync::{Mutex, mpsc, oneshot};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::dialect::{Dialect, JsonGroup};
use crate::sql::{Statements, text};
use crate::{
    BATCH_ROWS_MAX, CommitCounters, GroupCommit, NewMessage, StorageError, StoreOutcome, StoredRef,
    TRANSACTION_ATTEMPTS_MAX, from_db, is_transient, new_message_id, recorded_results,
    results_to_record, to_db,
};

/// A store waiting for a committer, and where its answer goes.
#[derive(Debug)]
pub(crate) struct StoreJob {
    pub(crate) msg: NewMessage,
    pub(crate) answer: oneshot::Sender<Result<StoreOutcome, StorageError>>,
}

/// One committer (see the module docs). Runs until every saver clone, and
/// with them the queue's senders, is gone.
#[derive(Debug)]
pub(crate) struct Committer<D: Dialect> {
    pub(crate) writer: Pool<D::Db>,
    pub(crate) sql: Arc<Statements>,
    /// Shared by the engine's committers: the one holding the lock gathers
    /// the next group while the others commit theirs.
    pub(crate) queue: Arc<Mutex<mpsc::Receiver<StoreJob>>>,
    pub(crate) bounds: GroupCommit,
    pub(crate) commits: Arc<CommitCounters>,
}

impl<D: Dialect> Committer<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    <D::Db as Database>::Arguments: IntoArguments<D::Db>,
    i64: for<'q> Encode<'q, D::Db> + Type<D::Db> + for<'r> Decode<'r, D::Db>,
    String: for<'q> Encode<'q, D::Db> + Type<D::Db> + for<'r> Decode<'r, D::Db>,
    for<'a> &'a str: Encode<'a, D::Db> + Type<D::Db>,
    for<'a> &'a [u8]: Encode<'a, D::Db> + Type<D::Db>,
    Option<Vec<u8>>: for<'q> Encode<'q, D::Db> + Type<D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
{
    pub(crate) async fn run(self) {
        let mut group = Vec::with_capacity(self.bounds.stores_max);
        while self.gather(&mut group).await {
            match self.commit_retried(&group).await {
                Ok(outcomes) => {
                    let stored = outcomes
                        .iter()
                        .filter(|outcome| outcome.as_ref().is_ok_and(|outcome| !outcome.replayed))
                        .count();
                    self.commits.committed(stored as u64);
                    for (job, outcome) in group.drain(..).zip(outcomes) {
                        // A caller that gave up waiting no longer listens;
                        // its store is durable all the same.
                        let _ = job.answer.send(outcome);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, stores = group.len(), "a group commit failed");
                    let reason = error.to_string();
                    for job in group.drain(..) {
                        let _ =
                            job.answer
                                .send(Err(StorageError::Unavailable(sqlx::Error::Protocol(
                                    format!("the group commit failed: {reason}"),
                                ))));
                    }
                }
            }
        }
    }

    /// Fills `group` with the next stores to commit together; false once
    /// the queue is closed and empty.
    async fn gather(&self, group: &mut Vec<StoreJob>) -> bool {
        let mut queue = self.queue.lock().await;
        let Some(first) = queue.recv().await else {
            return false;
        };
        let waited_until = tokio::time::Instant::now() + self.bounds.wait;
        let mut recipients = first.msg.users.len();
        group.push(first);
        while group.len() < self.bounds.stores_max && recipients < self.bounds.recipients_max {
            let next = match queue.try_recv() {
                Ok(next) => next,
                Err(mpsc::error::TryRecvError::Empty) if !self.bounds.wait.is_zero() => {
                    match tokio::time::timeout_at(waited_until, queue.recv()).await {
                        Ok(Some(next)) => next,
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            recipients += next.msg.users.len();
            group.push(next);
        }
        true
    }

    /// [`Committer::commit`], again while the database aborts the group
    /// because of what ran beside it, with a short random pause so the
    /// contenders do not collide again in step.
    async fn commit_retried(
        &self,
        group: &[StoreJob],
    ) -> Result<Vec<Result<StoreOutcome, StorageError>>, StorageError> {
        let mut tries = 1;
        loop {
            match self.commit(group).await {
                Err(StorageError::Unavailable(error))
                    if is_transient(&error) && tries < TRANSACTION_ATTEMPTS_MAX =>
                {
                    tracing::debug!(%error, tries, "retrying an aborted group commit");
                    tries += 1;
                    let pause_ms = rand::random_range(1..=5u64 << tries.min(6));
                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// Writes `group` in one transaction and commits: the outcome of each
    /// store, or an error that fails the whole group (nothing of it was
    /// committed).
    ///
    /// Stores rarely fail (the API checks its input first), so the group is
    /// written first as a whole; only if that fails is the transaction
    /// rolled back and the group written again with each store in a
    /// savepoint of its own, so that the failing one is undone alone.
    async fn commit(
        &self,
        group: &[StoreJob],
    ) -> Result<Vec<Result<StoreOutcome, StorageError>>, StorageError> {
        let keyless = group.iter().all(|job| job.msg.idempotency_key.is_none());
        let error = if keyless && D::MULTI_STATEMENT_CALLS {
            // The transaction's BEGIN and COMMIT travel in the calls that
            // write the rows (see `Dialect::MULTI_STATEMENT_CALLS`).
            let mut conn = self.writer.acquire().await?;
            match self
                .write_rows(&mut conn, group, Transaction::InCalls)
                .await
            {
                Ok(outcomes) => return Ok(outcomes.into_iter().map(Ok).collect()),
                Err(error) => {
                    // Undoes what the calls began; with nothing begun
                    // (the first call failed before BEGIN ran, or COMMIT
                    // already rolled back) there is nothing to undo.
                    let _ = conn.execute("ROLLBACK").await;
                    error
                }
            }
        } else {
            let mut tx = self.writer.begin_with(D::BEGIN).await?;
            let written = if keyless {
                self.write_rows(&mut tx, group, Transaction::Open).await
            } else {
                self.write_stores(&mut tx, group).await
            };
            match written {
                Ok(outcomes) => {
                    tx.commit().await?;
                    return Ok(outcomes.into_iter().map(Ok).collect());
                }
                Err(error) => {
                    if !matches!(&error, StorageError::Unavailable(error) if is_transient(error)) {
                        tx.rollback().await?;
                    }
                    error
                }
            }
        };
        match error {
            StorageError::Unavailable(error) if is_transient(&error) => {
                return Err(StorageError::Unavailable(error));
            }
            error if group.len() == 1 => return Ok(vec![Err(error)]),
            _ => {}
        }
        let mut tx = self.writer.begin_with(D::BEGIN).await?;
        let mut outcomes = Vec::with_capacity(group.len());
        for job in group {
            tx.execute("SAVEPOINT store").await?;
            let outcome = self.write_stores(&mut tx, std::slice::from_ref(job)).await;
            match outcome {
                Ok(mut outcome) => outcomes.push(Ok(outcome.remove(0))),
                // MySQL rolls back the whole transaction of a deadlock
                // victim: the group starts over.
                Err(StorageError::Unavailable(error)) if is_transient(&error) => {
                    return Err(StorageError::Unavailable(error));
                }
                Err(error) => {
                    tx.execute("ROLLBACK TO SAVEPOINT store").await?;
                    outcomes.push(Err(error));
                }
            }
            tx.execute("RELEASE SAVEPOINT store").await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// A group with idempotency keys, store by store, so that a key used twice
    /// in the group finds the first use's record: for a key already recorded
    /// (by an earlier group, another node, or earlier in this group) and not
    /// expired, the recorded results, writing nothing.
    async fn write_stores(
        &self,
        tx: &mut <D::Db as Database>::Connection,
        group: &[StoreJob],
    ) -> Result<Vec<StoreOutcome>, StorageError> {
        let mut outcomes = Vec::with_capacity(group.len());
        for job in group {
            let msg = &job.msg;
            let Some(key) = msg.idempotency_key.as_deref() else {
                outcomes.extend(
                    self.write_rows(tx, std::slice::from_ref(job), Transaction::Open)
                        .await?,
                );
                continue;
            };
            let now_ms = to_db(msg.now_ms);
            let recorded: Option<(String, i64)> = sqlx::query_as(text(&self.sql.read_key))
                .bind(&*msg.app)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some((results, key_expires_at_ms)) = recorded
                && key_expires_at_ms > now_ms
            {
                outcomes.push(StoreOutcome {
                    stored: recorded_results(&results, &msg.app, key)?,
                    replayed: true,
                });
                continue;
            }
            let mut written = self
                .write_rows(tx, std::slice::from_ref(job), Transaction::Open)
                .await?;
            let outcome = written.remove(0);
            sqlx::query(text(&self.sql.delete_expired_key))
                .bind(&*msg.app)
                .bind(key)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query(text(&self.sql.record_key))
                .bind(&*msg.app)
                .bind(key)
                .bind(results_to_record(&outcome.stored)?)
                .bind(to_db(msg.expires_at_ms()))
                .execute(&mut *tx)
                .await?;
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Stores without idempotency keys, in a few multi-row statements rather
    /// than statements per recipient: one upsert of the inbox heads that raises
    /// each by the number of messages the group brings it, in (app, user)
    /// order, which every node locks heads in, so concurrent groups queue
    /// rather than deadlock; then the message rows, unicasts many to a
    /// statement and each multicast with its payload bound once. Each inbox's
    /// new seqs are handed out in the group's order.
    async fn write_rows(
        &self,
        conn: &mut <D::Db as Database>::Connection,
        group: &[StoreJob],
        transaction: Transaction,
    ) -> Result<Vec<StoreOutcome>, StorageError> {
        // Per inbox, how many messages the group brings it, in lock order.
        let mut counts: Vec<((&str, &str), i64)> = {
            let mut counts: HashMap<(&str, &str), i64> = HashMap::new();
            for job in group {
                for user in &job.msg.users {
                    *counts.entry((&*job.msg.app, user.as_str())).or_default() += 1;
                }
            }
            counts.into_iter().collect()
        };
        counts.sort_unstable();
        let heads = match D::JSON_GROUP {
            Some(json) => Self::raised_heads_json(conn, &counts, json).await?,
            None => {
                let mut calls = Calls::new(D::MULTI_STATEMENT_CALLS);
                if transaction == Transaction::InCalls {
                    calls.statement().push(D::BEGIN);
                }
                for chunk in counts.chunks(BATCH_ROWS_MAX) {
                    self.push_raise_heads(calls.statement(), chunk);
                }
                self.raised_heads(conn, calls, &counts).await?
            }
        };
        // What comes back need not be in the rows' order: match by inbox.
        let mut returned: HashMap<String, HashMap<String, i64>> = HashMap::new();
        for (app, user, last_seq) in heads {
            returned.entry(app).or_default().insert(user, last_seq);
        }
        // Per inbox, the next seq to hand out.
        let mut next_seqs: HashMap<(&str, &str), i64> = HashMap::with_capacity(counts.len());
        for &((app, user), count) in &counts {
            let last_seq = returned
                .get(app)
                .and_then(|users| users.get(user))
                .ok_or_else(|| {
                    StorageError::Corrupt(format!("no inbox head came back for {app}/{user}"))
                })?;
            next_seqs.insert((app, user), last_seq - count + 1);
        }
        let mut outcomes = Vec::with_capacity(group.len());
        for job in group {
            let message_id = new_message_id(job.msg.now_ms);
            let mut stored = Vec::with_capacity(job.msg.users.len());
            for user in &job.msg.users {
                let next = next_seqs
                    .get_mut(&(&*job.msg.app, user.as_str()))
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
        let mut calls = Calls::new(D::MULTI_STATEMENT_CALLS);
        let mut unicasts: Vec<(&NewMessage, &StoredRef)> = Vec::new();
        for (job, outcome) in group.iter().zip(&outcomes) {
            match outcome.stored.as_slice() {
                [one] => unicasts.push((&job.msg, one)),
                many => {
                    for chunk in many.chunks(BATCH_ROWS_MAX) {
                        Self::push_fan_out(calls.statement(), &job.msg, chunk);
                    }
                }
            }
        }
        match D::JSON_GROUP {
            Some(json) => {
                for rows in unicast_arrays(&unicasts) {
                    sqlx::query(json.insert_unicasts)
                        .bind(rows)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            None => {
                for chunk in unicasts.chunks(BATCH_ROWS_MAX) {
                    Self::push_unicasts(calls.statement(), chunk);
                }
            }
        }
        if transaction == Transaction::InCalls {
            calls.statement().push("COMMIT");
        }
        for mut call in calls.calls {
            call.build().execute(&mut *conn).await?;
        }
        Ok(outcomes)
    }

    /// Appends the upsert that raises each inbox head of `counts` by its
    /// count, returning the heads' new values where the engine can.
    fn push_raise_heads(
        &self,
        statement: &mut QueryBuilder<D::Db>,
        counts: &[((&str, &str), i64)],
    ) {
        statement.push("INSERT INTO inbox_heads (app, user_id, last_seq) ");
        statement.push_values(counts, |mut row, ((app, user), count)| {
            row.push_bind(*app).push_bind(*user).push_bind(*count);
        });
        statement.push(&self.sql.raise_heads);
        if D::UPSERT_RETURNS {
            statement.push(" RETURNING app, user_id, last_seq");
        }
    }

    /// [`Dialect::JSON_GROUP`]'s way to raise the heads of `counts`: one
    /// statement raises them all, one reads them back.
    async fn raised_heads_json(
        conn: &mut <D::Db as Database>::Connection,
        counts: &[((&str, &str), i64)],
        json: JsonGroup,
    ) -> Result<Vec<(String, String, i64)>, StorageError> {
        let raise = serde_json::to_string(
            &counts
                .iter()
                .map(|&((app, user), count)| (app, user, count))
                .collect::<Vec<_>>(),
        )
        .expect("strings and numbers serialize");
        sqlx::query(json.raise_heads)
            .bind(raise)
            .execute(&mut *conn)
            .await?;
        let inboxes =
            serde_json::to_string(&counts.iter().map(|&(inbox, _)| inbox).collect::<Vec<_>>())
                .expect("strings serialize");
        Ok(sqlx::query_as(json.heads)
            .bind(inboxes)
            .fetch_all(&mut *conn)
            .await?)
    }

    /// Runs the heads' upserts (`calls`); returns every head's new
    /// `(app, user_id, last_seq)` of `counts`, in no particular order.
    async fn raised_heads(
        &self,
        conn: &mut <D::Db as Database>::Connection,
        calls: Calls<D::Db>,
        counts: &[((&str, &str), i64)],
    ) -> Result<Vec<(String, String, i64)>, StorageError> {
        let mut heads = Vec::with_capacity(counts.len());
        for mut call in calls.calls {
            if D::UPSERT_RETURNS {
                heads.extend(call.build_query_as().fetch_all(&mut *conn).await?);
            } else {
                call.build().execute(&mut *conn).await?;
            }
        }
        if D::UPSERT_RETURNS {
            return Ok(heads);
        }
        // This transaction holds every row just raised, so what it reads back
        // is its own value.
        for chunk in counts.chunks(BATCH_ROWS_MAX) {
            let mut read =
                QueryBuilder::<D::Db>::new("SELECT app, user_id, last_seq FROM inbox_heads WHERE ");
            let mut inboxes = read.separated(" OR ");
            for ((app, user), _) in chunk {
                inboxes.push("(app = ");
                inboxes.push_bind_unseparated(*app);
                inboxes.push_unseparated(" AND user_id = ");
                inboxes.push_bind_unseparated(*user);
                inboxes.push_unseparated(")");
            }
            heads.extend(read.build_query_as().fetch_all(&mut *conn).await?);
        }
        Ok(heads)
    }

    /// Appends an INSERT of unicast message rows, many to a statement.
    fn push_unicasts(statement: &mut QueryBuilder<D::Db>, unicasts: &[(&NewMessage, &StoredRef)]) {
        statement.push(
            "INSERT INTO messages \
             (app, user_id, seq, message_id, payload, notice, created_at_ms, expires_at_ms) ",
        );
        statement.push_values(unicasts, |mut row, (msg, stored)| {
            row.push_bind(&*msg.app)
                .push_bind(stored.user.as_str())
                .push_bind(to_db(stored.seq))
                .push_bind(&stored.message_id.0[..])
                .push_bind(&msg.payload[..])
                .push_bind(msg.notice_column())
                .push_bind(to_db(msg.now_ms))
                .push_bind(to_db(msg.expires_at_ms()));
        });
    }

    /// Appends the INSERT of `recipients` of a multicast: their rows from a
    /// JSON array (`Dialect::RECIPIENTS`), the payload bound once.
    fn push_fan_out(
        statement: &mut QueryBuilder<D::Db>,
        msg: &NewMessage,
        recipients: &[StoredRef],
    ) {
        let Some(first) = recipients.first() else {
            return;
        };
        let (before_array, after_array) = D::RECIPIENTS
            .split_once('?')
            .expect("RECIPIENTS binds its array at a `?`");
        let array = serde_json::to_string(
            &recipients
                .iter()
                .map(|stored| (stored.user.as_str(), stored.seq))
                .collect::<Vec<_>>(),
        )
        .expect("strings and numbers serialize");
        statement
            .push(
                "INSERT INTO messages \
                 (app, user_id, seq, message_id, payload, notice, created_at_ms, expires_at_ms) \
                 SELECT ",
            )
            .push_bind(&*msg.app)
            .push(", r.user_id, r.seq, ")
            .push_bind(&first.message_id.0[..])
            .push(", ")
            .push_bind(&msg.payload[..])
            .push(", ")
            .push_bind(msg.notice_column())
            .push(", ")
            .push_bind(to_db(msg.now_ms))
            .push(", ")
            .push_bind(to_db(msg.expires_at_ms()))
            .push(" FROM ")
            .push(before_array)
            .push_bind(array)
            .push(after_array)
            .push(" AS r");
    }
}

/// Bytes of payload one [`Dialect::JSON_GROUP`] insert carries at most, in
/// base64: well inside MySQL's smallest default `max_allowed_packet` (16 MiB
/// on MariaDB).
const JSON_PAYLOAD_BYTES_MAX: usize = 4 << 20;

/// `unicasts` as the JSON arrays of [`JsonGroup::insert_unicasts`], as many
/// rows to an array as [`BATCH_ROWS_MAX`] and [`JSON_PAYLOAD_BYTES_MAX`]
/// allow.
fn unicast_arrays(unicasts: &[(&NewMessage, &StoredRef)]) -> Vec<String> {
    let mut arrays = Vec::new();
    let mut rows = Vec::new();
    let mut payload_bytes = 0;
    for (msg, stored) in unicasts {
        let payload = BASE64.encode(&msg.payload);
        if !rows.is_empty()
            && (rows.len() == BATCH_ROWS_MAX
                || payload_bytes + payload.len() > JSON_PAYLOAD_BYTES_MAX)
        {
            arrays.push(serde_json::to_string(&rows).expect("strings and numbers serialize"));
            rows.clear();
            payload_bytes = 0;
        }
        payload_bytes += payload.len();
        rows.push((
            &*msg.app,
            stored.user.as_str(),
            stored.seq,
            BASE64.encode(stored.message_id.0),
            payload,
            msg.now_ms,
            msg.expires_at_ms(),
            // JSON_TABLE reads "" as the empty string, which NULLIF makes NULL.
            msg.notice_column()
                .map_or_else(String::new, |column| BASE64.encode(column)),
        ));
    }
    if !rows.is_empty() {
        arrays.push(serde_json::to_string(&rows).expect("strings and numbers serialize"));
    }
    arrays
}

/// Whether a group's writes run inside a transaction the caller opened, or
/// begin and commit one themselves within their calls (see
/// [`Dialect::MULTI_STATEMENT_CALLS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transaction {
    Open,
    InCalls,
}

/// Statements to run: each its own call, or where the engine takes several
/// statements a call, all of them in one.
struct Calls<DB: Database> {
    calls: Vec<QueryBuilder<DB>>,
    multi_statement: bool,
}

impl<DB: Database> Calls<DB> {
    fn new(multi_statement: bool) -> Self {
        Calls {
            calls: Vec::new(),
            multi_statement,
        }
    }

    /// Where the next statement is written: a call of its own, or the end
    /// of the one call, after a separator.
    fn statement(&mut self) -> &mut QueryBuilder<DB> {
        match self.calls.last_mut() {
            Some(call) if self.multi_statement => {
                call.push("; ");
            }
            _ => self.calls.push(QueryBuilder::new("")),
        }
        self.calls
            .last_mut()
            .expect("a call was made above if none was open")
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::MessageId;

    fn unicast(payload_bytes: usize) -> (NewMessage, StoredRef) {
        let msg = NewMessage {
            app: "app".into(),
            users: vec!["u".to_string()],
            payload: Bytes::from(vec![7u8; payload_bytes]),
            ttl_ms: 1,
            now_ms: 1,
            idempotency_key: None,
            notice: None,
        };
        let stored = StoredRef {
            user: "u".to_string(),
            seq: 1,
            message_id: MessageId([0; 16]),
        };
        (msg, stored)
    }

    fn rows_per_array(unicasts: &[(NewMessage, StoredRef)]) -> Vec<usize> {
        let unicasts: Vec<_> = unicasts.iter().map(|(msg, stored)| (msg, stored)).collect();
        unicast_arrays(&unicasts)
            .iter()
            .map(|array| {
                serde_json::from_str::<Vec<serde_json::Value>>(array)
                    .expect("a JSON array")
                    .len()
            })
            .collect()
    }

    #[test]
    fn unicast_arrays_split_at_the_row_bound() {
        let unicasts: Vec<_> = (0..BATCH_ROWS_MAX + 1).map(|_| unicast(10)).collect();
        assert_eq!(rows_per_array(&unicasts), [BATCH_ROWS_MAX, 1]);
    }

    #[test]
    fn unicast_arrays_split_at_the_payload_bound() {
        // Three payloads of 1.5 MiB are 2 MiB each in base64: two fit.
        let unicasts: Vec<_> = (0..3).map(|_| unicast(3 << 19)).collect();
        assert_eq!(rows_per_array(&unicasts), [2, 1]);
        // One payload past the bound still goes, alone.
        assert_eq!(rows_per_array(&[unicast(JSON_PAYLOAD_BYTES_MAX)]), [1]);
    }
}
