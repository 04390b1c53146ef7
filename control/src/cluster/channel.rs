//! The node channel: what one node tells another, and the Redis pub/sub
//! channels it travels on. A message is a [`NodeMessage`] in a compact
//! binary form: the payload travels as its own bytes, once per message
//! however many connections it names, and decoding input that is not a
//! message this code wrote gives a [`NodeMessageError`], never a panic.
//! A node that meets a kind it does not know (a newer node's) drops that
//! message with `UnknownKind`.
//!
//! The form (integers big-endian; `str` is a u16 length and UTF-8; `bytes`
//! a u32 length and the bytes; `conn` is shard u16, slot u32, generation
//! u32):
//!
//! | message | fields after the format byte (1) and the kind byte |
//! |---|---|
//! | deliver (1) | app `str`, message id 16 bytes, payload `bytes`, u32 count, count x (`conn`, seq u64) |
//! | broadcast (2) | app `str`, seq u64, broadcast id 16 bytes, payload `bytes`, u16 count, count x tag `str`, created at u64 ms, expires at u64 ms, paced u8 (0 or 1) and if 1 the rate f64, low priority u8 (0 or 1), u16 count, count x (node `str`, share f64) |
//! | kick (3) | reason u16, u32 count, count x `conn` |
//! | transient (4) | app `str`, payload `bytes`, u32 count, count x `conn` |
//! | deliver to pull (5) | a deliver's fields, then pull spread u32 ms and hint `str`: a message pushed with `"delivery": "notify"` |
//!
//! A message sent for an API call is wrapped with the call's request id:
//! format byte 2, the id `str`, then the message as above (format 1), so
//! the receiving node logs its part under the same id.

use bytes::{BufMut, Bytes};

use herald_proto::ids::AppId;
use std::sync::Arc;

use herald_proto::plane::{BroadcastMode, ConnId, Notice};
use herald_proto::{GoAwayReason, MessageId};
use herald_storage::StoredBroadcast;

use crate::pace::PaceShares;

/// The channel every room node listens on for broadcasts: one publish
/// reaches them all.
pub const BROADCAST_CHANNEL: &str = "herald:broadcasts";

/// The channel a room node's run listens on.
pub fn delivery_channel(node: &str, instance: u64) -> String {
    format!("herald:deliver:{node}:{instance}")
}

/// The first byte of every message: a node meeting another form (a node of
/// another version) drops the message rather than misread it.
const FORMAT: u8 = 1;

/// The first byte of a message wrapped with a request id.
const FORMAT_TRACED: u8 = 2;

const DELIVER: u8 = 1;
const BROADCAST: u8 = 2;
const KICK: u8 = 3;
const TRANSIENT: u8 = 4;
/// A deliver of a message pushed to be pulled. A kind of its own, so a
/// node that predates it drops it (the binding catches up from storage)
/// rather than misread it.
const DELIVER_NOTICE: u8 = 5;

/// Bytes of one connection id on the wire.
const CONN_LEN: usize = 2 + 4 + 4;

/// What one node tells another over its delivery channel (or, for a
/// broadcast, every room node over theirs).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeMessage {
    /// One stored message for connections of this node: the payload once,
    /// with each connection's sequence.
    Deliver {
        app: AppId,
        message_id: MessageId,
        payload: Bytes,
        /// Set for a message pushed with `"delivery": "notify"`.
        notice: Option<Notice>,
        targets: Vec<(ConnId, u64)>,
    },
    /// A stored broadcast for every room node's connections.
    Broadcast {
        app: AppId,
        stored: StoredBroadcast,
        /// The whole system's pace; each room node takes its share.
        mode: BroadcastMode,
        shares: PaceShares,
    },
    Kick {
        reason: GoAwayReason,
        conns: Vec<ConnId>,
    },
    /// A message pushed with `"store": false` for connections of this
    /// node: never stored, so it has no seq.
    Transient {
        app: AppId,
        payload: Bytes,
        conns: Vec<ConnId>,
    },
}

/// Why bytes from the channel are not a node message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeMessageError {
    #[error("the message ends early")]
    Truncated,
    #[error("message format {0}, not {FORMAT}: a node of another version")]
    UnknownFormat(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("a text field is not UTF-8")]
    NotUtf8,
    #[error("a flag is {0}, not 0 or 1")]
    BadFlag(u8),
    #[error("{0} bytes past the message's end")]
    TrailingBytes(usize),
}

impl NodeMessage {
    /// The message in the channel's binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload_len());
        out.put_u8(FORMAT);
        match self {
            NodeMessage::Deliver {
                app,
                message_id,
                payload,
                notice,
                targets,
            } => {
                out.put_u8(if notice.is_some() {
                    DELIVER_NOTICE
                } else {
                    DELIVER
                });
                put_str(&mut out, app);
                out.put_slice(&message_id.0);
                put_bytes(&mut out, payload);
                out.put_u32(count_u32(targets.len()));
                for (conn, seq) in targets {
                    put_conn(&mut out, *conn);
                    out.put_u64(*seq);
                }
                if let Some(notice) = notice {
                    out.put_u32(notice.pull_spread_ms);
                    put_str(&mut out, &notice.hint);
                }
            }
            NodeMessage::Broadcast {
                app,
                stored,
                mode,
                shares,
            } => {
                out.put_u8(BROADCAST);
                put_str(&mut out, app);
                out.put_u64(stored.seq);
                out.put_slice(&stored.broadcast_id.0);
                put_bytes(&mut out, &stored.payload);
                out.put_u16(count_u16(stored.required_tags.len()));
                for tag in &stored.required_tags {
                    put_str(&mut out, tag);
                }
                out.put_u64(stored.created_at_ms);
                out.put_u64(stored.expires_at_ms);
                match mode.rate_per_sec {
                    Some(rate) => {
                        out.put_u8(1);
                        out.put_f64(rate);
                    }
                    None => out.put_u8(0),
                }
                out.put_u8(u8::from(mode.low_priority));
                out.put_u16(count_u16(shares.iter().len()));
                for (node, share) in shares.iter() {
                    put_str(&mut out, node);
                    out.put_f64(share);
                }
            }
            NodeMessage::Kick { reason, conns } => {
                out.put_u8(KICK);
                out.put_u16(reason.0);
                out.put_u32(count_u32(conns.len()));
                for conn in conns {
                    put_conn(&mut out, *conn);
                }
            }
            NodeMessage::Transient {
                app,
                payload,
                conns,
            } => {
                out.put_u8(TRANSIENT);
                put_str(&mut out, app);
                put_bytes(&mut out, payload);
                out.put_u32(count_u32(conns.len()));
                for conn in conns {
                    put_conn(&mut out, *conn);
                }
            }
        }
        out
    }

    /// The message in the channel's binary form, wrapped with the request
    /// id of the API call it is sent for, if any.
    pub fn encode_traced(&self, request_id: Option<&str>) -> Vec<u8> {
        let Some(request_id) = request_id else {
            return self.encode();
        };
        let message = self.encode();
        let mut out = Vec::with_capacity(3 + request_id.len() + message.len());
        out.put_u8(FORMAT_TRACED);
        put_str(&mut out, request_id);
        out.extend_from_slice(&message);
        out
    }

    /// Reads a message, wrapped with a request id or not.
    pub fn decode_traced(bytes: &[u8]) -> Result<(Option<String>, NodeMessage), NodeMessageError> {
        if bytes.first() != Some(&FORMAT_TRACED) {
            return Ok((None, NodeMessage::decode(bytes)?));
        }
        let mut input = Reader(&bytes[1..]);
        let request_id = input.str()?.to_owned();
        Ok((Some(request_id), NodeMessage::decode(input.0)?))
    }

    /// Reads a message in the channel's binary form.
    pub fn decode(bytes: &[u8]) -> Result<NodeMessage, NodeMessageError> {
        let mut input = Reader(bytes);
        let format = input.u8()?;
        if format != FORMAT {
            return Err(NodeMessageError::UnknownFormat(format));
        }
        let message = match input.u8()? {
            kind @ (DELIVER | DELIVER_NOTICE) => {
                let app = AppId::from(input.str()?);
                let message_id = MessageId(input.array()?);
                let payload = input.bytes()?;
                let count = input.count_u32(CONN_LEN + 8)?;
                let mut targets = Vec::with_capacity(count);
                for _ in 0..count {
                    targets.push((input.conn()?, input.u64()?));
                }
                let notice = if kind == DELIVER_NOTICE {
                    Some(Notice {
                        pull_spread_ms: input.u32()?,
                        hint: Arc::from(input.str()?),
                    })
                } else {
                    None
                };
                NodeMessage::Deliver {
                    app,
                    message_id,
                    payload,
                    notice,
                    targets,
                }
            }
            BROADCAST => {
                let app = AppId::from(input.str()?);
                let seq = input.u64()?;
                let broadcast_id = MessageId(input.array()?);
                let payload = input.bytes()?;
                let tags = input.count_u16(2)?;
                let required_tags = (0..tags)
                    .map(|_| input.str().map(str::to_owned))
                    .collect::<Result<_, _>>()?;
                let created_at_ms = input.u64()?;
                let expires_at_ms = input.u64()?;
                let rate_per_sec = match input.flag()? {
                    true => Some(input.f64()?),
                    false => None,
                };
                let low_priority = input.flag()?;
                let nodes = input.count_u16(2 + 8)?;
                let shares = (0..nodes)
                    .map(|_| Ok((input.str()?.to_owned(), input.f64()?)))
                    .collect::<Result<_, _>>()?;
                NodeMessage::Broadcast {
                    app,
                    stored: StoredBroadcast {
                        seq,
                        broadcast_id,
                        payload,
                        required_tags,
                        created_at_ms,
                        expires_at_ms,
                    },
                    mode: BroadcastMode {
                        rate_per_sec,
                        low_priority,
                    },
                    shares,
                }
            }
            KICK => {
                let reason = GoAwayReason(input.u16()?);
                let count = input.count_u32(CONN_LEN)?;
                let mut conns = Vec::with_capacity(count);
                for _ in 0..count {
                    conns.push(input.conn()?);
                }
                NodeMessage::Kick { reason, conns }
            }
            TRANSIENT => {
                let app = AppId::from(input.str()?);
                let payload = input.bytes()?;
                let count = input.count_u32(CONN_LEN)?;
                let mut conns = Vec::with_capacity(count);
                for _ in 0..count {
                    conns.push(input.conn()?);
                }
                NodeMessage::Transient {
                    app,
                    payload,
                    conns,
                }
            }
            kind => return Err(NodeMessageError::UnknownKind(kind)),
        };
        match input.0.len() {
            0 => Ok(message),
            left => Err(NodeMessageError::TrailingBytes(left)),
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            NodeMessage::Deliver { payload, .. } => payload.len(),
            NodeMessage::Broadcast { stored, .. } => stored.payload.len(),
            NodeMessage::Kick { .. } => 0,
            NodeMessage::Transient { payload, .. } => payload.len(),
        }
    }
}

/// Ids, tags and node ids are checked far below 64 KiB (app and node ids
/// at 64 bytes, tags at `TAG_LEN_MAX`).
fn put_str(out: &mut Vec<u8>, text: &str) {
    out.put_u16(u16::try_from(text.len()).expect("ids and tags are short"));
    out.put_slice(text.as_bytes());
}

/// Payloads are checked against the protocol's limit, far below 4 GiB.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32(u32::try_from(bytes.len()).expect("payloads are below 4 GiB"));
    out.put_slice(bytes);
}

fn put_conn(out: &mut Vec<u8>, conn: ConnId) {
    out.put_u16(conn.shard);
    out.put_u32(conn.slot);
    out.put_u32(conn.generation);
}

/// A message names at most the connections of one node.
fn count_u32(count: usize) -> u32 {
    u32::try_from(count).expect("a node holds fewer than 2^32 connections")
}

/// Tags per broadcast and room nodes are few (`TAGS_PER_BIND_MAX`, a
/// cluster's size).
fn count_u16(count: usize) -> u16 {
    u16::try_from(count).expect("tags and nodes are few")
}

/// The bytes of a message not read yet; every read checks they suffice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], NodeMessageError> {
        if self.0.len() < len {
            return Err(NodeMessageError::Truncated);
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], NodeMessageError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, NodeMessageError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, NodeMessageError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, NodeMessageError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, NodeMessageError> {
        self.array().map(u64::from_be_bytes)
    }

    fn f64(&mut self) -> Result<f64, NodeMessageError> {
        self.array().map(f64::from_be_bytes)
    }

    fn flag(&mut self) -> Result<bool, NodeMessageError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(NodeMessageError::BadFlag(other)),
        }
    }

    fn str(&mut self) -> Result<&'a str, NodeMessageError> {
        let len = usize::from(self.u16()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| NodeMessageError::NotUtf8)
    }

    fn bytes(&mut self) -> Result<Bytes, NodeMessageError> {
        let len = self.u32()? as usize;
        self.take(len).map(Bytes::copy_from_slice)
    }

    fn conn(&mut self) -> Result<ConnId, NodeMessageError> {
        Ok(ConnId {
            shard: self.u16()?,
            slot: self.u32()?,
            generation: self.u32()?,
        })
    }

    /// A u32 count of entries of at least `entry_len` bytes each, refused
    /// when the input cannot hold that many: a forged count allocates
    /// nothing.
    fn count_u32(&mut self, entry_len: usize) -> Result<usize, NodeMessageError> {
        let count = self.u32()? as usize;
        self.fits(count, entry_len)
    }

    fn count_u16(&mut self, entry_len: usize) -> Result<usize, NodeMessageError> {
        let count = usize::from(self.u16()?);
        self.fits(count, entry_len)
    }

    fn fits(&self, count: usize, entry_len: usize) -> Result<usize, NodeMessageError> {
        match count.checked_mul(entry_len) {
            Some(len) if len <= self.0.len() => Ok(count),
            _ => Err(NodeMessageError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns() -> [ConnId; 2] {
        [
            ConnId {
                shard: 0,
                slot: 1,
                generation: 2,
            },
            ConnId {
                shard: 1,
                slot: 5,
                generation: u32::MAX,
            },
        ]
    }

    fn examples() -> Vec<NodeMessage> {
        let [a, b] = conns();
        vec![
            NodeMessage::Deliver {
                app: AppId::from("chat"),
                message_id: MessageId([7; 16]),
                payload: Bytes::from_static(b"hello"),
                notice: None,
                targets: vec![(a, 10), (b, u64::MAX)],
            },
            NodeMessage::Deliver {
                app: AppId::from("chat"),
                message_id: MessageId([8; 16]),
                payload: Bytes::from_static(b"a long body"),
                notice: Some(Notice {
                    pull_spread_ms: 30_000,
                    hint: Arc::from("new mail"),
                }),
                targets: vec![(a, 11)],
            },
            NodeMessage::Deliver {
                app: AppId::from("\u{e9}"),
                message_id: MessageId([0; 16]),
                payload: Bytes::new(),
                notice: None,
                targets: Vec::new(),
            },
            NodeMessage::Broadcast {
                app: AppId::from("news"),
                stored: StoredBroadcast {
                    seq: 9,
                    broadcast_id: MessageId([3; 16]),
                    payload: Bytes::from_static(b"\0\xffall"),
                    required_tags: vec!["vip".to_owned(), "eu".to_owned()],
                    created_at_ms: 1_764_000_000_000,
                    expires_at_ms: u64::MAX,
                },
                mode: BroadcastMode {
                    rate_per_sec: Some(1_000.5),
                    low_priority: true,
                },
                shares: PaceShares::from_connections([("room-1", 1), ("room-2", 3)]),
            },
            NodeMessage::Broadcast {
                app: AppId::from("news"),
                stored: StoredBroadcast {
                    seq: 1,
                    broadcast_id: MessageId([1; 16]),
                    payload: Bytes::from_static(b"b"),
                    required_tags: Vec::new(),
                    created_at_ms: 0,
                    expires_at_ms: 1,
                },
                mode: BroadcastMode::default(),
                shares: PaceShares::default(),
            },
            NodeMessage::Kick {
                reason: GoAwayReason::KICKED,
                conns: conns().to_vec(),
            },
            NodeMessage::Transient {
                app: AppId::from("chat"),
                payload: Bytes::from_static(b"typing"),
                conns: conns().to_vec(),
            },
        ]
    }

    #[test]
    fn every_message_comes_back_whole() {
        for message in examples() {
            let encoded = message.encode();
            assert_eq!(NodeMessage::decode(&encoded), Ok(message));
        }
    }

    #[test]
    fn a_request_id_travels_with_its_message_and_is_optional() {
        for message in examples() {
            let traced = message.encode_traced(Some("req-7"));
            assert_eq!(
                NodeMessage::decode_traced(&traced),
                Ok((Some("req-7".to_owned()), message.clone()))
            );
            let plain = message.encode_traced(None);
            assert_eq!(plain, message.encode());
            assert_eq!(NodeMessage::decode_traced(&plain), Ok((None, message)));
            for len in 0..traced.len() {
                assert_eq!(
                    NodeMessage::decode_traced(&traced[..len]),
                    Err(NodeMessageError::Truncated),
                    "cut at {len}"
                );
            }
        }
    }

    #[test]
    fn a_delivery_carries_its_payload_once_as_it_is() {
        let payload = b"a payload that names many connections";
        let message = NodeMessage::Deliver {
            app: AppId::from("chat"),
            message_id: MessageId([7; 16]),
            payload: Bytes::from_static(payload),
            notice: None,
            targets: (0..100)
                .map(|slot| {
                    (
                        ConnId {
                            shard: 0,
                            slot,
                            generation: 0,
                        },
                        1,
                    )
                })
                .collect(),
        };
        let encoded = message.encode();
        let found = encoded
            .windows(payload.len())
            .filter(|window| window == payload)
            .count();
        assert_eq!(found, 1);
        // Format and kind, app, id, payload, count, 100 connections and seqs.
        assert_eq!(encoded.len(), 2 + 6 + 16 + 4 + payload.len() + 4 + 100 * 18);
    }

    #[test]
    fn every_cut_of_a_message_is_refused_without_a_panic() {
        for message in examples() {
            let encoded = message.encode();
            for len in 0..encoded.len() {
                assert_eq!(
                    NodeMessage::decode(&encoded[..len]),
                    Err(NodeMessageError::Truncated),
                    "{message:?} cut at {len}"
                );
            }
            let mut longer = encoded.clone();
            longer.push(0);
            assert_eq!(
                NodeMessage::decode(&longer),
                Err(NodeMessageError::TrailingBytes(1))
            );
        }
    }

    #[test]
    fn bad_input_gets_a_typed_error() {
        assert_eq!(
            NodeMessage::decode(b"{\"kind\":\"kick\"}"),
            Err(NodeMessageError::UnknownFormat(b'{'))
        );
        assert_eq!(
            NodeMessage::decode(&[FORMAT, 9]),
            Err(NodeMessageError::UnknownKind(9))
        );
        // A kick naming four billion connections in a few bytes.
        let forged = [FORMAT, KICK, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0];
        assert_eq!(
            NodeMessage::decode(&forged),
            Err(NodeMessageError::Truncated)
        );
        let mut not_utf8 = examples()[0].encode();
        not_utf8[4] = 0xff; // the app id's first byte
        assert_eq!(
            NodeMessage::decode(&not_utf8),
            Err(NodeMessageError::NotUtf8)
        );
        let mut bad_flag = examples()[4].encode();
        let low_priority_at = bad_flag.len() - 2 - 1;
        bad_flag[low_priority_at] = 2;
        assert_eq!(
            NodeMessage::decode(&bad_flag),
            Err(NodeMessageError::BadFlag(2))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A fixed pseudo-random walk over many inputs, some near a valid
        // message (one byte changed), some noise.
        let valid: Vec<Vec<u8>> = examples().iter().map(NodeMessage::encode).collect();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut input = valid[round % valid.len()].clone();
            let at = next() as usize % input.len();
            input[at] = next() as u8;
            let _ = NodeMessage::decode(&input);
            let noise: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let _ = NodeMessage::decode(&noise);
        }
    }
}
