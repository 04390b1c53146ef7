//! A broadcast's progress counts: what the API reports for one broadcast,
//! and what one node adds to the cluster-wide counts.

use herald_proto::ids::AppId;

/// One broadcast's counts, as the API reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressReport {
    pub target: u64,
    pub sent: u64,
    pub dropped: u64,
    pub acked: u64,
}

/// Counts one node adds to a broadcast's cluster-wide progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressDelta {
    pub app: AppId,
    pub seq: u64,
    pub expires_at_ms: u64,
    /// target, sent, dropped, acked.
    pub added: [u64; 4],
}
