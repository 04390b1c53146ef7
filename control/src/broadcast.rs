//! Broadcasts: one message to every user of an app (or to the clients
//! carrying some tags). Stored once per app under the app's broadcast
//! sequence, never once per user; fanned out as one command per shard that
//! carries the BROADCAST frame encoded once, and in a cluster as one publish
//! that every room node hears. A client that was away gets the unexpired
//! broadcasts after the last one it holds when it binds.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use herald_proto::plane::{
    BroadcastMessage, BroadcastMode, BroadcastProgress, ConnId, PushMessage, ShardCommand,
};
use herald_proto::{Frame, encode};
use herald_storage::{
    BROADCASTS_AFTER_LIMIT_MAX, NewBroadcast, StorageError, StoredBroadcast, StoredMessage,
};

use crate::cluster::NodeMessage;
use crate::delivery::{Delivery, unix_ms};

/// How far each broadcast this node fanned out got, kept until it expires.
#[derive(Debug, Default)]
pub struct BroadcastRegistry {
    by_seq: Mutex<HashMap<(String, u64), Tracked>>,
}

#[derive(Debug)]
struct Tracked {
    expires_at_ms: u64,
    progress: Arc<BroadcastProgress>,
    /// What was last reported to the cluster: target, sent, dropped, acked.
    reported: [u64; 4],
}

/// Counts one node adds to a broadcast's cluster-wide progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressDelta {
    pub app: String,
    pub seq: u64,
    pub expires_at_ms: u64,
    /// target, sent, dropped, acked.
    pub added: [u64; 4],
}

/// One broadcast's counts, as the API reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProgressReport {
    pub target: u64,
    pub sent: u64,
    pub dropped: u64,
    pub acked: u64,
}

impl BroadcastRegistry {
    fn track(&self, app: &str, seq: u64, expires_at_ms: u64) -> Arc<BroadcastProgress> {
        let mut by_seq = self.by_seq.lock().expect("broadcast lock");
        by_seq
            .entry((app.to_owned(), seq))
            .or_insert_with(|| Tracked {
                expires_at_ms,
                progress: Arc::default(),
                reported: [0; 4],
            })
            .progress
            .clone()
    }

    fn get(&self, app: &str, seq: u64) -> Option<Arc<BroadcastProgress>> {
        let by_seq = self.by_seq.lock().expect("broadcast lock");
        by_seq
            .get(&(app.to_owned(), seq))
            .map(|tracked| tracked.progress.clone())
    }

    /// What each broadcast's counts grew by since the last call.
    pub fn deltas(&self) -> Vec<ProgressDelta> {
        let mut by_seq = self.by_seq.lock().expect("broadcast lock");
        by_seq
            .iter_mut()
            .filter_map(|((app, seq), tracked)| {
                let now = report(&tracked.progress);
                let added = [0, 1, 2, 3].map(|i| now[i] - tracked.reported[i]);
                tracked.reported = now;
                (added != [0; 4]).then(|| ProgressDelta {
                    app: app.clone(),
                    seq: *seq,
                    expires_at_ms: tracked.expires_at_ms,
                    added,
                })
            })
            .collect()
    }

    /// Forgets broadcasts that expired: nobody gets them any more.
    pub fn forget_expired(&self, now_ms: u64) {
        let mut by_seq = self.by_seq.lock().expect("broadcast lock");
        by_seq.retain(|_, tracked| tracked.expires_at_ms > now_ms);
    }
}

/// A bound connection owed the app's broadcasts after `after`.
pub(crate) struct BroadcastResume {
    pub conn: ConnId,
    pub app: String,
    pub after: u64,
    /// As the `BroadcastCatchUp` said.
    pub owed_up_to: u64,
}

/// target, sent, dropped, acked, read now.
fn report(progress: &BroadcastProgress) -> [u64; 4] {
    [
        progress.target.load(Ordering::Relaxed),
        progress.sent.load(Ordering::Relaxed),
        progress.dropped.load(Ordering::Relaxed),
        progress.acked.load(Ordering::Relaxed),
    ]
}

fn message(stored: &StoredBroadcast) -> BroadcastMessage {
    BroadcastMessage {
        seq: stored.seq,
        message_id: stored.broadcast_id,
        payload: stored.payload.clone(),
        required_tags: stored.required_tags.clone(),
    }
}

impl Delivery {
    /// Stores a broadcast, then hands it to every shard of this node and,
    /// in a cluster, to every other room node. Returns once stored.
    /// `mode.rate_per_sec` paces the fan-out: connections a second on this
    /// node, and on each room node in a cluster (the caller splits the
    /// system's pace over them).
    pub async fn broadcast(
        &self,
        app: &str,
        payload: &[u8],
        ttl: Duration,
        required_tags: &[String],
        mode: BroadcastMode,
    ) -> Result<StoredBroadcast, StorageError> {
        let stored = self
            .saver()
            .store_broadcast(NewBroadcast {
                app,
                payload,
                required_tags,
                ttl_ms: ttl.as_millis() as u64,
                now_ms: unix_ms(),
            })
            .await?;
        self.fan_out(app, &stored, mode).await;
        if let Some(remote) = self.remote() {
            let message = NodeMessage::broadcast(app, &stored, mode);
            remote.broadcast(message).await;
        }
        Ok(stored)
    }

    /// One command per shard, all sharing one encoded frame; a paced
    /// broadcast's rate is split evenly over the shards.
    pub(crate) async fn fan_out(&self, app: &str, stored: &StoredBroadcast, mode: BroadcastMode) {
        let progress = self.broadcasts.track(app, stored.seq, stored.expires_at_ms);
        let mut frame = BytesMut::new();
        let encoded = encode(
            &Frame::Broadcast {
                app: app.to_owned(),
                message_id: stored.broadcast_id,
                seq: stored.seq,
                payload: stored.payload.clone(),
            },
            &mut frame,
        );
        if let Err(error) = encoded {
            // The API checked the payload against the protocol's limit.
            tracing::error!(%error, "unencodable broadcast");
            return;
        }
        let frame = frame.freeze();
        let required_tags: Arc<[String]> = stored.required_tags.clone().into();
        let shards = self.shard_senders().len().max(1) as f64;
        for shard in self.shard_senders() {
            let command = ShardCommand::Broadcast {
                app: app.to_owned(),
                seq: stored.seq,
                required_tags: required_tags.clone(),
                frame: frame.clone(),
                progress: progress.clone(),
                mode: BroadcastMode {
                    rate_per_sec: mode.rate_per_sec.map(|rate| rate / shards),
                    ..mode
                },
            };
            // A closed channel means the shard is gone (shutdown).
            let _ = shard.send(command).await;
        }
    }

    /// How far a broadcast got: in a cluster, summed over the room nodes
    /// (as they last reported, every second); else on this node.
    pub async fn broadcast_progress(&self, app: &str, seq: u64) -> Option<ProgressReport> {
        if let Some(remote) = self.remote() {
            return remote.broadcast_progress(app, seq).await;
        }
        self.broadcasts.get(app, seq).map(|progress| {
            let [target, sent, dropped, acked] = report(&progress);
            ProgressReport {
                target,
                sent,
                dropped,
                acked,
            }
        })
    }

    /// What this node's broadcasts got to since the last call, for the
    /// cluster-wide counts.
    pub fn broadcast_deltas(&self) -> Vec<ProgressDelta> {
        self.broadcasts.deltas()
    }

    /// A client acked broadcasts up to `seq`: counted for that broadcast.
    pub(crate) fn broadcast_acked(&self, app: &str, seq: u64) {
        if let Some(progress) = self.broadcasts.get(app, seq) {
            progress.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The unexpired broadcasts of each app after the lowest point any of
    /// `wanted` (app, after) asks for: one storage read per app, however
    /// many binds a batch holds. An app storage cannot answer for is left
    /// out (its bindings get no broadcasts until they bind again; their
    /// inbox is unaffected).
    pub(crate) async fn read_broadcasts<'a>(
        &self,
        wanted: impl Iterator<Item = (&'a str, u64)>,
    ) -> HashMap<String, Vec<StoredBroadcast>> {
        let mut by_app: HashMap<&str, u64> = HashMap::new();
        for (app, after) in wanted {
            let lowest = by_app.entry(app).or_insert(after);
            *lowest = (*lowest).min(after);
        }
        let mut found = HashMap::new();
        for (app, after) in by_app {
            match self
                .saver()
                .broadcasts_after(app, after, BROADCASTS_AFTER_LIMIT_MAX, unix_ms())
                .await
            {
                Ok(broadcasts) => {
                    found.insert(app.to_owned(), broadcasts);
                }
                Err(error) => tracing::warn!(%error, app.id = app, "reading broadcasts failed"),
            }
        }
        found
    }

    /// Sends bindings the broadcasts they missed (a `BroadcastCatchUp`).
    pub(crate) async fn fill_broadcasts(&self, resumes: Vec<BroadcastResume>) {
        let found = self
            .read_broadcasts(resumes.iter().map(|r| (r.app.as_str(), r.after)))
            .await;
        for resume in resumes {
            let Some(broadcasts) = found.get(&resume.app) else {
                continue;
            };
            let broadcasts = broadcasts
                .iter()
                .filter(|b| b.seq > resume.after)
                .map(message)
                .collect();
            let command = ShardCommand::BroadcastFill {
                conn: resume.conn,
                app: resume.app,
                after: resume.after,
                owed_up_to: resume.owed_up_to,
                broadcasts,
            };
            self.send_to_shard(command, resume.conn).await;
        }
    }

    /// A new binding's first fills: its inbox from `inbox_after` and the
    /// broadcasts it missed, sent in the order they were created, as
    /// alternating `Fill` and `BroadcastFill` commands (each continuing
    /// where the previous one of its kind ended). When the inbox holds more
    /// than this first read, the rest follows by catch-up, after these.
    pub(crate) async fn send_first_fills(&self, first: FirstFills) {
        let FirstFills {
            conn,
            app,
            mut inbox_after,
            messages,
            more,
            mut broadcast_after,
            broadcasts,
        } = first;
        let mut items: Vec<(u64, bool, usize)> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.created_at_ms, false, i))
            .chain(
                broadcasts
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.created_at_ms, true, i)),
            )
            .collect();
        // By creation time; at the same millisecond the inbox goes first.
        items.sort_by_key(|&(at, is_broadcast, i)| (at, is_broadcast, i));
        let mut commands = Vec::new();
        let mut inbox_sent = false;
        let mut broadcasts_sent = false;
        for group in items.chunk_by(|a, b| a.1 == b.1) {
            if group[0].1 {
                let group: Vec<BroadcastMessage> = group
                    .iter()
                    .map(|&(_, _, i)| message(&broadcasts[i]))
                    .collect();
                let after = broadcast_after;
                broadcast_after = group.last().map_or(after, |b| b.seq);
                broadcasts_sent = true;
                commands.push(ShardCommand::BroadcastFill {
                    conn,
                    app: app.clone(),
                    after,
                    owed_up_to: 0,
                    broadcasts: group,
                });
            } else {
                let group: Vec<PushMessage> = group
                    .iter()
                    .map(|&(_, _, i)| {
                        let m = &messages[i];
                        PushMessage {
                            seq: m.seq,
                            message_id: m.message_id,
                            payload: m.payload.clone(),
                        }
                    })
                    .collect();
                let after = inbox_after;
                inbox_after = group.last().map_or(after, |m| m.seq);
                inbox_sent = true;
                commands.push(ShardCommand::Fill {
                    conn,
                    app: app.clone(),
                    after,
                    messages: group,
                    more: false,
                    broadcasts_from: None,
                });
            }
        }
        // Every binding gets both first fills, empty or not: they set where
        // it resumes. `more` belongs on the inbox's last one, and without
        // broadcasts that one is also the first broadcast fill.
        if !inbox_sent {
            commands.push(ShardCommand::Fill {
                conn,
                app: app.clone(),
                after: inbox_after,
                messages: Vec::new(),
                more,
                broadcasts_from: None,
            });
        }
        if let Some(ShardCommand::Fill {
            more: last_more,
            broadcasts_from,
            ..
        }) = commands
            .iter_mut()
            .rev()
            .find(|c| matches!(c, ShardCommand::Fill { .. }))
        {
            *last_more = more;
            if !broadcasts_sent {
                *broadcasts_from = Some(broadcast_after);
            }
        }
        for command in commands {
            self.send_to_shard(command, conn).await;
        }
    }
}

/// What a new binding's first fills are made of.
pub(crate) struct FirstFills {
    pub conn: ConnId,
    pub app: String,
    pub inbox_after: u64,
    pub messages: Vec<StoredMessage>,
    pub more: bool,
    pub broadcast_after: u64,
    pub broadcasts: Vec<StoredBroadcast>,
}
