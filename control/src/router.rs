//! The router: where commands for connections go. This node's shards each
//! take their connections' commands over a bounded channel; other room
//! nodes are reached through a [`Remote`] (in a cluster, Redis pub/sub).
//! Delivery and broadcasts share one.

use std::sync::Arc;

use herald_proto::plane::{ConnCommand, ConnId, ShardCommand};

use crate::cluster::channel::NodeMessage;
use crate::progress::ProgressReport;
use crate::register::Session;

/// The way to room nodes other than this one. Sending is fire and forget:
/// what it carries is stored already, so a message lost on the way is
/// fetched by the connection's next catch-up, resync or reconnect.
#[async_trait::async_trait]
pub trait Remote: Send + Sync {
    async fn send(&self, node: &str, instance: u64, message: NodeMessage);
    /// Sends to every room node at once (a broadcast).
    async fn broadcast(&self, message: NodeMessage);
    /// A broadcast's progress summed over the room nodes.
    async fn broadcast_progress(&self, app: &str, seq: u64) -> Option<ProgressReport>;
}

/// Where this node runs: the node id and this run of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName {
    pub node: String,
    pub instance: u64,
}

/// This node's shards and its way to the others.
pub struct Router {
    name: NodeName,
    /// This node's shards; none on a control node.
    shards: Vec<async_channel::Sender<ShardCommand>>,
    /// Other room nodes; none when one process is the whole system.
    remote: Option<Arc<dyn Remote>>,
}

impl Router {
    pub fn new(
        name: NodeName,
        shards: Vec<async_channel::Sender<ShardCommand>>,
        remote: Option<Arc<dyn Remote>>,
    ) -> Router {
        Router {
            name,
            shards,
            remote,
        }
    }

    pub fn name(&self) -> &NodeName {
        &self.name
    }

    pub fn shards(&self) -> &[async_channel::Sender<ShardCommand>] {
        &self.shards
    }

    pub fn remote(&self) -> Option<&Arc<dyn Remote>> {
        self.remote.as_ref()
    }

    /// Whether the session's connection lives on this node (and this run).
    pub fn is_local(&self, session: &Session) -> bool {
        session.node == self.name.node && session.instance == self.name.instance
    }

    /// Sends a command to a connection of this node, through its shard.
    pub async fn to_conn(&self, conn: ConnId, command: ConnCommand) {
        // A closed channel means the shard is gone (shutdown): nothing to do.
        if let Some(shard) = self.shards.get(usize::from(conn.shard)) {
            let _ = shard.send(ShardCommand::Conn { conn, command }).await;
        }
    }

    /// Sends a message to another room node's run.
    pub async fn to_node(&self, node: &str, instance: u64, message: NodeMessage) {
        match &self.remote {
            Some(remote) => remote.send(node, instance, message).await,
            // Only a cluster registers other nodes' sessions.
            None => tracing::warn!(node.id = node, "a session on another node, but no cluster"),
        }
    }
}
