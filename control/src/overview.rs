//! What the admin page shows (`GET /v1/admin/overview`): the live room
//! nodes with their connections per shard, each app's sessions and counters,
//! and each app's latest broadcasts with their progress.
//!
//! The counters are cumulative and this node's own (the page turns them
//! into rates by differencing two readings); sessions and node load come
//! from the room nodes' heartbeats in a cluster, and from this process's
//! gateway and register when it is the whole system (`herald serve`).

use std::collections::BTreeMap;
use std::sync::Arc;

use herald_storage::StorageError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::apps::Apps;
use crate::clock::unix_ms;
use crate::cluster::directory::{LoadProbe, NodeDirectory};
use crate::delivery::Delivery;
use crate::metrics::AppTotals;
use crate::progress::ProgressReport;
use crate::register::{AppOnline, RegisterError};

/// An app's latest unexpired broadcasts the overview shows, newest last.
/// Finished ones stay in view until newer ones push them out, so a
/// broadcast that ended between two refreshes is still seen at 100%.
const RECENT_BROADCASTS: u32 = 5;

/// Where the overview is read from.
pub struct OverviewSources {
    pub delivery: Arc<Delivery>,
    pub directory: Arc<NodeDirectory>,
    /// This process's gateway, when it holds the only one (the fixed node
    /// record knows no load).
    pub local_load: Option<LoadProbe>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    pub generated_at_ms: u64,
    /// By node id.
    pub nodes: Vec<NodeView>,
    /// By app id.
    pub apps: Vec<AppView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub region: String,
    pub connections: u64,
    pub cpu_percent: f64,
    /// Connections by gateway shard (empty when the node does not say).
    pub shard_connections: Vec<u64>,
    pub heartbeat_at_ms: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppView {
    pub id: String,
    pub online_connections: u64,
    pub online_users: u64,
    /// This node's counters since it started.
    pub totals: AppTotals,
    /// Webhook calls given up on this node, by reason.
    pub webhook_gave_up: BTreeMap<&'static str, u64>,
    pub broadcasts: Vec<BroadcastView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BroadcastView {
    pub broadcast_id: String,
    pub seq: u64,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub target: u64,
    pub sent: u64,
    pub dropped: u64,
    pub acked: u64,
    /// Connections its paced fan-out was for when it began (0 unpaced).
    pub planned: u64,
    /// Some shard is still fanning it out, or some connection waits for it.
    pub in_progress: bool,
    /// How far it got, 0 to 100: 100 only once it is no longer in progress.
    pub percent: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum OverviewError {
    #[error(transparent)]
    Directory(#[from] RegisterError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Reads the overview now.
pub async fn gather(sources: &OverviewSources, apps: &Apps) -> Result<Overview, OverviewError> {
    let live = sources.directory.live().await?;
    let shared = sources.directory.is_shared();
    let mut nodes: Vec<NodeView> = live
        .values()
        .map(|record| NodeView {
            id: record.node.clone(),
            region: record.region.clone(),
            connections: record.connections,
            cpu_percent: record.cpu_percent,
            shard_connections: record.shard_connections.clone(),
            heartbeat_at_ms: record.heartbeat_at_ms,
        })
        .collect();
    if let (false, Some(probe)) = (shared, &sources.local_load) {
        let load = probe();
        for node in &mut nodes {
            node.connections = load.connections;
            node.cpu_percent = load.cpu_percent;
            node.shard_connections = load.shard_connections.clone();
            node.heartbeat_at_ms = unix_ms();
        }
    }
    nodes.sort_unstable_by(|a, b| a.id.cmp(&b.id));

    let delivery = &sources.delivery;
    let online: BTreeMap<String, AppOnline> = if shared {
        let mut sum = BTreeMap::<String, AppOnline>::new();
        for (app, node) in live.values().flat_map(|record| &record.apps_online) {
            let total = sum.entry(app.clone()).or_default();
            total.connections += node.connections;
            total.users += node.users;
        }
        sum
    } else {
        delivery.register().online()
    };
    let mut totals = delivery.metrics().app_totals();
    let mut gave_up: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for (app, reason, count) in delivery.coordinator().gave_up_counts() {
        *gave_up
            .entry(app)
            .or_default()
            .entry(reason.as_str())
            .or_default() += count;
    }

    let table = apps.table();
    let mut ids: Vec<&str> = table.keys().map(|id| &**id).collect();
    ids.sort_unstable();
    let mut views = Vec::with_capacity(ids.len());
    for id in ids {
        let app_online = online.get(id).copied().unwrap_or_default();
        views.push(AppView {
            id: id.to_owned(),
            online_connections: app_online.connections,
            online_users: app_online.users,
            totals: totals.remove(id).unwrap_or_default(),
            webhook_gave_up: gave_up.remove(id).unwrap_or_default(),
            broadcasts: recent_broadcasts(delivery, id).await?,
        });
    }
    Ok(Overview {
        generated_at_ms: unix_ms(),
        nodes,
        apps: views,
    })
}

/// The app's latest unexpired broadcasts and how far each got.
async fn recent_broadcasts(
    delivery: &Delivery,
    app: &str,
) -> Result<Vec<BroadcastView>, StorageError> {
    let saver = delivery.saver();
    let head = saver.broadcast_head(app).await?;
    let recent = saver
        .broadcasts_after(
            app,
            head.saturating_sub(u64::from(RECENT_BROADCASTS)),
            RECENT_BROADCASTS,
            unix_ms(),
        )
        .await?;
    let mut views = Vec::with_capacity(recent.len());
    for broadcast in recent {
        let progress = delivery
            .broadcasts()
            .progress(app, broadcast.seq)
            .await
            .unwrap_or_default();
        views.push(BroadcastView {
            broadcast_id: broadcast.broadcast_id.to_string(),
            seq: broadcast.seq,
            created_at_ms: broadcast.created_at_ms,
            expires_at_ms: broadcast.expires_at_ms,
            target: progress.target,
            sent: progress.sent,
            dropped: progress.dropped,
            acked: progress.acked,
            planned: progress.planned,
            in_progress: progress.is_going_out(),
            percent: percent_done(&progress),
        });
    }
    Ok(views)
}

/// Sent or dropped out of what it is for: the connections planned (a paced
/// fan-out counts its target only as it goes) or its target so far,
/// whichever is more. Below 100 while it is going out, however many were
/// sent (a connection that bound since may still be owed it).
fn percent_done(progress: &ProgressReport) -> u8 {
    if !progress.is_going_out() {
        return 100;
    }
    let done = progress.sent + progress.dropped;
    let of = progress.planned.max(progress.target).max(1);
    (done.saturating_mul(100) / of).min(99) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_broadcast_is_measured_against_its_planned_connections() {
        let paced = ProgressReport {
            target: 3,
            sent: 3,
            planned: 12,
            shards_started: 2,
            ..ProgressReport::default()
        };
        assert_eq!(percent_done(&paced), 25);
        let nearly = ProgressReport {
            target: 12,
            sent: 12,
            shards_finished: 1,
            ..paced
        };
        assert_eq!(percent_done(&nearly), 99, "one shard is still going");
        let done = ProgressReport {
            shards_finished: 2,
            ..nearly
        };
        assert_eq!(percent_done(&done), 100);
        let unpaced_nobody = ProgressReport {
            shards_started: 2,
            shards_finished: 2,
            ..ProgressReport::default()
        };
        assert_eq!(percent_done(&unpaced_nobody), 100);
    }
}
