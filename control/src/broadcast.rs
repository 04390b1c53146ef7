//! Broadcasts: one message to every user of an app (or to the clients
//! carrying some tags). Stored once per app under the app's broadcast
//! sequence, never once per user; fanned out as one command per shard that
//! carries the BROADCAST frame encoded once, and in a cluster as one publish
//! that every room node hears. A client that was away gets the unexpired
//! broadcasts after the last one it holds when it binds.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use herald_proto::ids::AppId;
use herald_proto::plane::{
    BroadcastMessage, BroadcastMode, BroadcastProgress, BroadcastsNext, ConnCommand, ConnId,
    PushMessage, ShardCommand,
};
use herald_proto::{Frame, encode};
use herald_storage::{
    BROADCASTS_AFTER_LIMIT_MAX, NewBroadcast, Saver, StorageError, StoredBroadcast, StoredMessage,
};

use crate::clock::unix_ms;
use crate::cluster::channel::NodeMessage;
use crate::pace::PaceShares;
use crate::progress::{PROGRESS_COUNTS, ProgressDelta, ProgressReport};
use crate::router::Router;

/// How long a storage read's word that an app has no broadcast past some
/// seq is trusted, for binds asking from there on. Broadcasts fanned out
/// here raise it at once; this bounds how stale it is otherwise.
const BROADCAST_HEAD_TRUSTED_FOR: Duration = Duration::from_secs(1);

/// How far each broadcast this node fanned out got, kept until it expires;
/// and where each app's broadcasts end, as far as this node knows.
#[derive(Debug, Default)]
struct BroadcastRegistry {
    /// By app, then by seq: looked up by `&str`, with no key to build.
    tracked: Mutex<HashMap<AppId, HashMap<u64, Tracked>>>,
    heads: Mutex<HashMap<AppId, KnownHead>>,
}

/// No unexpired broadcast of an app was past `seq` when storage was last
/// read, at `read_at`, and none has reached this node since past `seq`
/// (which each one raises).
#[derive(Debug, Clone, Copy)]
struct KnownHead {
    seq: u64,
    /// The last broadcast seq the app handed out, expired or not, as of
    /// that read (raised by the broadcasts that reached this node since).
    /// A client claiming more holds broadcasts storage never gave out.
    last_handed_out: u64,
    /// `None` until a read completes.
    read_at: Option<Instant>,
    /// When a broadcast last reached this node.
    seen_at: Option<Instant>,
}

#[derive(Debug)]
struct Tracked {
    expires_at_ms: u64,
    progress: Arc<BroadcastProgress>,
    /// What was last reported to the cluster (`progress::PROGRESS_FIELDS`).
    reported: [u64; PROGRESS_COUNTS],
}

impl BroadcastRegistry {
    /// The last broadcast seq of `app` handed out, if a recent read (and
    /// the broadcasts since) tell it: binds that hold every broadcast up to
    /// `after` missed none, without reading storage, when a recent read
    /// found nothing past the known head and `after` is at or past it (and
    /// not past the last seq ever handed out, which a reset leaves behind).
    fn holds_everything(&self, app: &str, after: u64, now: Instant) -> Option<u64> {
        let heads = self.heads.lock().expect("broadcast lock");
        let head = heads.get(app)?;
        let recent = head.read_at.is_some_and(|read_at| {
            now.saturating_duration_since(read_at) < BROADCAST_HEAD_TRUSTED_FOR
        });
        (recent && after >= head.seq && after <= head.last_handed_out)
            .then_some(head.last_handed_out)
    }

    /// A complete storage read of `app` after `after`, started at
    /// `read_at`, which found the app's last seq handed out at
    /// `last_handed_out`. It sets the head, except that a broadcast that
    /// reached this node since the read started keeps the head past it.
    /// (Set, not raised: a client claiming a seq past the real head must
    /// not keep every later bind reading.)
    fn read(
        &self,
        app: &AppId,
        after: u64,
        found: &[StoredBroadcast],
        last_handed_out: u64,
        read_at: Instant,
    ) {
        let seq = found
            .last()
            .map_or(after.min(last_handed_out), |last| last.seq);
        let last_handed_out = last_handed_out.max(seq);
        let mut heads = self.heads.lock().expect("broadcast lock");
        let head = heads.entry(app.clone()).or_insert(KnownHead {
            seq,
            last_handed_out,
            read_at: None,
            seen_at: None,
        });
        if head.read_at.is_some_and(|last| read_at < last) {
            return; // a later read already answered
        }
        if head.seen_at.is_some_and(|seen| seen >= read_at) {
            head.seq = head.seq.max(seq);
            head.last_handed_out = head.last_handed_out.max(last_handed_out);
        } else {
            head.seq = seq;
            head.last_handed_out = last_handed_out;
        }
        head.read_at = Some(read_at);
    }

    /// A broadcast reached this node: binds from before it must read it.
    fn saw(&self, app: &AppId, seq: u64) {
        let now = Instant::now();
        let mut heads = self.heads.lock().expect("broadcast lock");
        let head = heads.entry(app.clone()).or_insert(KnownHead {
            seq,
            last_handed_out: seq,
            read_at: None,
            seen_at: None,
        });
        head.seq = head.seq.max(seq);
        head.last_handed_out = head.last_handed_out.max(seq);
        head.seen_at = Some(now);
    }

    fn track(&self, app: &AppId, seq: u64, expires_at_ms: u64) -> Arc<BroadcastProgress> {
        self.saw(app, seq);
        let mut tracked = self.tracked.lock().expect("broadcast lock");
        tracked
            .entry(app.clone())
            .or_default()
            .entry(seq)
            .or_insert_with(|| Tracked {
                expires_at_ms,
                progress: Arc::default(),
                reported: [0; PROGRESS_COUNTS],
            })
            .progress
            .clone()
    }

    fn get(&self, app: &str, seq: u64) -> Option<Arc<BroadcastProgress>> {
        let tracked = self.tracked.lock().expect("broadcast lock");
        tracked
            .get(app)?
            .get(&seq)
            .map(|tracked| tracked.progress.clone())
    }

    /// What each broadcast's counts grew by since the last call.
    fn deltas(&self) -> Vec<ProgressDelta> {
        let mut tracked = self.tracked.lock().expect("broadcast lock");
        tracked
            .iter_mut()
            .flat_map(|(app, by_seq)| {
                by_seq.iter_mut().filter_map(|(seq, tracked)| {
                    let now = report(&tracked.progress);
                    let added: [u64; PROGRESS_COUNTS] =
                        std::array::from_fn(|i| now[i] - tracked.reported[i]);
                    tracked.reported = now;
                    (added != [0; PROGRESS_COUNTS]).then(|| ProgressDelta {
                        app: app.clone(),
                        seq: *seq,
                        expires_at_ms: tracked.expires_at_ms,
                        added,
                    })
                })
            })
            .collect()
    }

    /// Forgets broadcasts that expired: nobody gets them any more.
    fn forget_expired(&self, now_ms: u64) {
        let mut tracked = self.tracked.lock().expect("broadcast lock");
        for by_seq in tracked.values_mut() {
            by_seq.retain(|_, tracked| tracked.expires_at_ms > now_ms);
        }
        tracked.retain(|_, by_seq| !by_seq.is_empty());
    }
}

/// What [`Broadcasts::read`] found of one app.
#[derive(Debug, Default)]
pub(crate) struct AppBroadcasts {
    /// The last broadcast seq the app handed out, expired or not.
    pub last_handed_out: u64,
    /// The unexpired broadcasts after the point read from, ascending.
    pub unexpired: Vec<StoredBroadcast>,
}

/// The counts read now, in the order of `progress::PROGRESS_FIELDS`.
fn report(progress: &BroadcastProgress) -> [u64; PROGRESS_COUNTS] {
    [
        &progress.target,
        &progress.sent,
        &progress.dropped,
        &progress.acked,
        &progress.planned,
        &progress.shards_started,
        &progress.shards_finished,
    ]
    .map(|count| count.load(Ordering::Relaxed))
}

fn message(stored: &StoredBroadcast) -> BroadcastMessage {
    BroadcastMessage {
        seq: stored.seq,
        message_id: stored.broadcast_id,
        payload: stored.payload.clone(),
        required_tags: stored.required_tags.clone(),
    }
}

/// A node's broadcasts: storing and fanning out, the fills that bring a
/// binding the broadcasts it missed, and what this node knows of each
/// app's broadcasts and of each one's progress.
pub struct Broadcasts {
    router: Arc<Router>,
    saver: Saver,
    registry: BroadcastRegistry,
}

impl Broadcasts {
    pub fn new(router: Arc<Router>, saver: Saver) -> Broadcasts {
        Broadcasts {
            router,
            saver,
            registry: BroadcastRegistry::default(),
        }
    }

    /// Stores a broadcast, then hands it to every shard of this node and,
    /// in a cluster, to every other room node. Returns once stored.
    /// `mode.rate_per_sec` paces the fan-out: connections a second in the
    /// whole system, of which each room node takes its share.
    pub async fn broadcast(
        &self,
        app: &AppId,
        payload: &[u8],
        ttl: Duration,
        required_tags: &[String],
        mode: BroadcastMode,
        shares: &PaceShares,
    ) -> Result<StoredBroadcast, StorageError> {
        let stored = self
            .saver
            .store_broadcast(NewBroadcast {
                app,
                payload,
                required_tags,
                ttl_ms: ttl.as_millis() as u64,
                now_ms: unix_ms(),
            })
            .await?;
        self.fan_out(app, &stored, self.node_pace(mode, shares))
            .await;
        if let Some(remote) = self.router.remote() {
            let message = NodeMessage::Broadcast {
                app: app.clone(),
                stored: stored.clone(),
                mode,
                shares: shares.clone(),
            };
            remote.broadcast(message).await;
        }
        Ok(stored)
    }

    /// This node's part of a broadcast whose pace is the whole system's.
    pub(crate) fn node_pace(&self, mode: BroadcastMode, shares: &PaceShares) -> BroadcastMode {
        let share = shares.of(&self.router.name().node);
        BroadcastMode {
            rate_per_sec: mode.rate_per_sec.map(|rate| rate * share),
            ..mode
        }
    }

    /// One command per shard, all sharing one encoded frame; a paced
    /// broadcast's rate is split evenly over the shards.
    pub(crate) async fn fan_out(&self, app: &AppId, stored: &StoredBroadcast, mode: BroadcastMode) {
        let progress = self.registry.track(app, stored.seq, stored.expires_at_ms);
        let mut frame = BytesMut::new();
        let encoded = encode(
            &Frame::Broadcast {
                app: app.to_string(),
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
        let shards = self.router.shards().len().max(1) as f64;
        progress
            .shards_started
            .fetch_add(self.router.shards().len() as u64, Ordering::Relaxed);
        for shard in self.router.shards() {
            let command = ShardCommand::Broadcast {
                app: app.clone(),
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
    pub async fn progress(&self, app: &str, seq: u64) -> Option<ProgressReport> {
        if let Some(remote) = self.router.remote() {
            return remote.broadcast_progress(app, seq).await;
        }
        self.registry
            .get(app, seq)
            .map(|progress| ProgressReport::from_counts(report(&progress)))
    }

    /// The app's unexpired broadcasts, and how many of them are still
    /// going out (`ProgressReport::is_going_out`).
    pub async fn in_progress(&self, app: &AppId) -> (u64, u64) {
        let unexpired = self
            .read(std::iter::once((app, 0)))
            .await
            .remove(&**app)
            .unwrap_or_default()
            .unexpired;
        let mut fanning_out = 0;
        for broadcast in &unexpired {
            if let Some(progress) = self.progress(app, broadcast.seq).await
                && progress.is_going_out()
            {
                fanning_out += 1;
            }
        }
        (unexpired.len() as u64, fanning_out)
    }

    /// What this node's broadcasts got to since the last call, for the
    /// cluster-wide counts.
    pub fn deltas(&self) -> Vec<ProgressDelta> {
        self.registry.deltas()
    }

    /// Forgets the progress of broadcasts that expired.
    pub fn forget_expired(&self, now_ms: u64) {
        self.registry.forget_expired(now_ms);
    }

    /// A client acked broadcasts up to `seq`: counted for that broadcast.
    pub(crate) fn acked(&self, app: &str, seq: u64) {
        if let Some(progress) = self.registry.get(app, seq) {
            progress.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The unexpired broadcasts of each app after the lowest point any of
    /// `wanted` (app, after) asks for, and the app's last seq handed out:
    /// one storage read per app, however many binds a batch holds. An app
    /// storage cannot answer for is left out (its bindings get no
    /// broadcasts until they bind again; their inbox is unaffected).
    pub(crate) async fn read<'a>(
        &self,
        wanted: impl Iterator<Item = (&'a AppId, u64)>,
    ) -> HashMap<AppId, AppBroadcasts> {
        let mut by_app: HashMap<&AppId, u64> = HashMap::new();
        for (app, after) in wanted {
            let lowest = by_app.entry(app).or_insert(after);
            *lowest = (*lowest).min(after);
        }
        let mut found = HashMap::new();
        for (app, after) in by_app {
            // In a reconnect storm nearly every client holds the latest
            // broadcast: one read a second per app then answers them all.
            let now = Instant::now();
            if let Some(last_handed_out) = self.registry.holds_everything(app, after, now) {
                let none = AppBroadcasts {
                    last_handed_out,
                    unexpired: Vec::new(),
                };
                found.insert(app.clone(), none);
                continue;
            }
            // The head first: the broadcasts read after it may pass it,
            // never fall short of it.
            let read = async {
                let last_handed_out = self.saver.broadcast_head(app).await?;
                let unexpired = self
                    .saver
                    .broadcasts_after(app, after, BROADCASTS_AFTER_LIMIT_MAX, unix_ms())
                    .await?;
                let last_handed_out = unexpired
                    .last()
                    .map_or(last_handed_out, |b| b.seq.max(last_handed_out));
                Ok::<_, StorageError>(AppBroadcasts {
                    last_handed_out,
                    unexpired,
                })
            };
            match read.await {
                Ok(read) => {
                    if read.unexpired.len() < BROADCASTS_AFTER_LIMIT_MAX as usize {
                        let AppBroadcasts {
                            last_handed_out,
                            unexpired,
                        } = &read;
                        self.registry
                            .read(app, after, unexpired, *last_handed_out, now);
                    }
                    found.insert(app.clone(), read);
                }
                Err(error) => tracing::warn!(%error, app.id = %app, "reading broadcasts failed"),
            }
        }
        found
    }

    /// Sends a binding the broadcasts of `app` after `after` it missed
    /// (the answer to a `BroadcastCatchUp`).
    pub(crate) async fn fill(&self, conn: ConnId, app: AppId, after: u64) {
        let found = self.read(std::iter::once((&app, after))).await;
        let Some(read) = found.get(&*app) else {
            return;
        };
        let broadcasts = read
            .unexpired
            .iter()
            .filter(|b| b.seq > after)
            .map(message)
            .collect();
        let command = ConnCommand::BroadcastFill {
            app,
            after,
            broadcasts,
            next: BroadcastsNext::Live,
        };
        self.router.to_conn(conn, command).await;
    }

    /// A batch of fills answering for a binding's inbox and broadcasts
    /// (its first fills, or a catch-up that asked for broadcasts): the
    /// inbox window read and the broadcasts it missed, sent in the order
    /// they were created, as alternating `Fill` and `BroadcastFill`
    /// commands (each continuing where the previous one of its kind ended).
    /// When the inbox holds more than the window, only the broadcasts
    /// created up to its last message go now; the rest come with the
    /// catch-ups that follow, in their place.
    pub(crate) async fn send_fills(&self, fills: Fills) {
        let Fills {
            conn,
            app,
            mut inbox_after,
            messages,
            more,
            mut broadcast_after,
            broadcasts,
        } = fills;
        let window_end_ms = match messages.last() {
            Some(last) if more => last.created_at_ms,
            _ => u64::MAX,
        };
        let mut items: Vec<(u64, bool, usize)> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.created_at_ms, false, i))
            .chain(
                broadcasts
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.created_at_ms <= window_end_ms)
                    .map(|(i, b)| (b.created_at_ms, true, i)),
            )
            .collect();
        // By creation time; at the same millisecond the inbox goes first.
        items.sort_by_key(|&(at, is_broadcast, i)| (at, is_broadcast, i));
        let mut commands = Vec::new();
        for group in items.chunk_by(|a, b| a.1 == b.1) {
            if group[0].1 {
                let group: Vec<BroadcastMessage> = group
                    .iter()
                    .map(|&(_, _, i)| message(&broadcasts[i]))
                    .collect();
                let after = broadcast_after;
                broadcast_after = group.last().map_or(after, |b| b.seq);
                commands.push(ConnCommand::BroadcastFill {
                    app: app.clone(),
                    after,
                    broadcasts: group,
                    next: BroadcastsNext::Continue,
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
                            notice: m.notice.clone(),
                        }
                    })
                    .collect();
                let after = inbox_after;
                inbox_after = group.last().map_or(after, |m| m.seq);
                commands.push(ConnCommand::Fill {
                    app: app.clone(),
                    after,
                    messages: group,
                    more: false,
                    broadcasts_from: None,
                });
            }
        }
        // The inbox's last fill carries `more` (a first fill is sent even
        // when empty: it sets where the binding resumes), and the batch's
        // last command says how it ends for broadcasts.
        let last_fill = commands
            .iter()
            .rposition(|c| matches!(c, ConnCommand::Fill { .. }));
        match last_fill {
            Some(at) => {
                if let ConnCommand::Fill {
                    more: last_more, ..
                } = &mut commands[at]
                {
                    *last_more = more;
                }
            }
            None => commands.push(ConnCommand::Fill {
                app: app.clone(),
                after: inbox_after,
                messages: Vec::new(),
                more,
                broadcasts_from: None,
            }),
        }
        let next = if more {
            BroadcastsNext::WithInbox
        } else {
            BroadcastsNext::Live
        };
        match commands.last_mut() {
            Some(ConnCommand::BroadcastFill {
                next: last_next, ..
            }) => *last_next = next,
            Some(ConnCommand::Fill {
                broadcasts_from, ..
            }) => *broadcasts_from = Some(broadcast_after),
            _ => unreachable!("a batch ends with a fill"),
        }
        for command in commands {
            self.router.to_conn(conn, command).await;
        }
    }
}

/// What a batch of fills is made of.
pub(crate) struct Fills {
    pub conn: ConnId,
    pub app: AppId,
    pub inbox_after: u64,
    pub messages: Vec<StoredMessage>,
    pub more: bool,
    pub broadcast_after: u64,
    pub broadcasts: Vec<StoredBroadcast>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_skip_the_read_only_while_a_recent_read_covers_them() {
        let registry = BroadcastRegistry::default();
        let chat = AppId::from("chat");
        let t0 = Instant::now();
        assert_eq!(
            registry.holds_everything("chat", 9, t0),
            None,
            "nothing read yet"
        );
        registry.read(&chat, 2, &[stored(3), stored(5)], 5, t0);
        assert_eq!(registry.holds_everything("chat", 5, t0), Some(5));
        assert_eq!(
            registry.holds_everything("chat", 4, t0),
            None,
            "it misses 5"
        );
        assert_eq!(
            registry.holds_everything("chat", 6, t0),
            None,
            "6 was never handed out"
        );
        registry.saw(&chat, 6);
        assert_eq!(
            registry.holds_everything("chat", 5, t0),
            None,
            "6 came since"
        );
        assert_eq!(registry.holds_everything("chat", 6, t0), Some(6));
        let later = t0 + BROADCAST_HEAD_TRUSTED_FOR;
        assert_eq!(
            registry.holds_everything("chat", 6, later),
            None,
            "read again"
        );
        assert_eq!(registry.holds_everything("news", 0, t0), None, "per app");
    }

    #[test]
    fn a_broadcast_seen_during_a_read_keeps_the_head_past_it() {
        let registry = BroadcastRegistry::default();
        let chat = AppId::from("chat");
        let started = Instant::now();
        registry.saw(&chat, 7);
        // The read began before 7 was stored, so it lacks it.
        registry.read(&chat, 0, &[stored(5)], 5, started);
        assert_eq!(registry.holds_everything("chat", 5, Instant::now()), None);
        assert_eq!(
            registry.holds_everything("chat", 7, Instant::now()),
            Some(7)
        );
    }

    #[test]
    fn a_client_claiming_a_seq_past_the_head_does_not_keep_others_reading() {
        let registry = BroadcastRegistry::default();
        let chat = AppId::from("chat");
        let t0 = Instant::now();
        registry.read(&chat, 1_000_000, &[], 5, t0);
        assert_eq!(
            registry.holds_everything("chat", 1_000_000, t0),
            None,
            "past the last seq handed out: a reset, read again"
        );
        assert_eq!(registry.holds_everything("chat", 5, t0), Some(5));
        registry.read(&chat, 4, &[stored(5)], 5, t0 + Duration::from_millis(1));
        assert_eq!(
            registry.holds_everything("chat", 5, t0 + Duration::from_millis(2)),
            Some(5)
        );
    }

    fn stored(seq: u64) -> StoredBroadcast {
        StoredBroadcast {
            seq,
            broadcast_id: herald_proto::MessageId([seq as u8; 16]),
            payload: bytes::Bytes::from_static(b"b"),
            required_tags: Vec::new(),
            created_at_ms: seq,
            expires_at_ms: u64::MAX,
        }
    }
}
