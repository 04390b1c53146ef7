//! Cluster mode on Redis: the connection ([`connection`]), the directory
//! of live room nodes built from each one's liveness record
//! ([`directory`]), the register every node shares ([`register`]), and the
//! node channel that carries deliveries and broadcasts to room nodes
//! ([`channel`]). What drives them from above is in `link`: a room node's
//! heartbeat and subscription, publishing to room nodes, and the broadcast
//! progress hash. Nothing here imports delivery or broadcasts.
//!
//! Keys (every key of one user shares the hash tag `{app:user}`, so Redis
//! Cluster keeps them on one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `herald:{app:user}:sessions` | hash | field `instance\|conn\|node`, value `network\|connected_at_ms\|device` |
//! | `herald:{nodes}:node:<node>` | string, TTL [`directory::LIVENESS_TTL`] | the node's [`directory::NodeRecord`] (JSON) |
//! | `herald:{nodes}:live` | sorted set | node ids by last heartbeat (ms) |
//! | `herald:{app}:broadcast:<seq>` | hash | a broadcast's progress counts, summed over the room nodes |
//! | channel `herald:deliver:<node>:<instance>` | pub/sub | [`channel::NodeMessage`]s (binary) |
//! | channel `herald:broadcasts` | pub/sub | broadcasts for every room node |
//!
//! A session counts only while its node's liveness record names the same
//! instance: entries of a node that died or restarted are ignored, and
//! removed by whoever reads them. A room node re-registers every session it
//! holds whenever it finds its record gone (Redis restarted, or the node was
//! cut off past the TTL), and asks its connections to re-check storage,
//! since deliveries in that gap found nobody.

pub mod channel;
pub mod connection;
pub mod directory;
pub mod register;
