//! herald-storage is the saver: it keeps each (app, user) inbox durable.
//! It allocates per-inbox sequences, stores messages until their TTL ends,
//! hands back what a reconnecting client missed, remembers the highest
//! sequence each device has acked, and records idempotency keys so a retried
//! send is not stored twice. A call that stores reports success only after
//! the commit is durable. It deliberately knows nothing of sockets, HTTP,
//! delivery or fan-out, and it never reads the clock: every call that
//! depends on time takes `now_ms` (unix milliseconds) from the caller.
//!
//! SQLite (one embedded file) is the only backend so far; the schema and
//! queries stay simple so MySQL, PostgreSQL and Redis can follow.

mod sqlite;

use bytes::Bytes;
pub use herald_proto::MessageId;

pub use sqlite::{MESSAGES_AFTER_LIMIT_MAX, PURGE_BATCH_ROWS, Saver};

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
    /// A stored value breaks an invariant this crate keeps (a negative
    /// sequence, a message id that is not 16 bytes, unreadable JSON).
    #[error("storage holds invalid data: {0}")]
    Corrupt(String),
}

/// One message to store in the inbox of every user in `users` (unicast = one user).
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub app: &'a str,
    /// Recipients, in the order `StoreOutcome::stored` reports them. A user
    /// listed twice gets two sequences (same message id); the caller is
    /// expected to de-duplicate.
    pub users: &'a [String],
    pub payload: &'a [u8],
    /// How long the message (and the idempotency key, if any) is kept.
    pub ttl_ms: u64,
    /// Unix milliseconds; time is passed in so tests control it.
    pub now_ms: u64,
    pub idempotency_key: Option<&'a str>,
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

/// Where one inbox stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxHead {
    /// The last sequence handed out (0: nothing was ever stored). Nothing
    /// after it exists, so a reader at or past it has nothing to read.
    pub last_seq: u64,
    /// The device's highest ack, if the key named a device that ever acked.
    pub acked_seq: Option<u64>,
}

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
