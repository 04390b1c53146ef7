//! A broadcast's progress counts: what the API reports for one broadcast,
//! and what one node adds to the cluster-wide counts.

use herald_proto::ids::AppId;

/// How many counts a broadcast's progress has, in the order of
/// [`PROGRESS_FIELDS`].
pub const PROGRESS_COUNTS: usize = 7;

/// The counts' names: fields of the cluster-wide Redis hash, in the order
/// of [`ProgressReport::from_counts`] and [`ProgressDelta::added`].
pub const PROGRESS_FIELDS: [&str; PROGRESS_COUNTS] = [
    "target",
    "sent",
    "dropped",
    "acked",
    "planned",
    "shards_started",
    "shards_finished",
];

/// One broadcast's counts, as the API reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressReport {
    pub target: u64,
    pub sent: u64,
    pub dropped: u64,
    pub acked: u64,
    /// Connections paced fan-outs found it was for when they began.
    pub planned: u64,
    pub shards_started: u64,
    pub shards_finished: u64,
}

impl ProgressReport {
    pub fn from_counts(counts: [u64; PROGRESS_COUNTS]) -> ProgressReport {
        let [
            target,
            sent,
            dropped,
            acked,
            planned,
            shards_started,
            shards_finished,
        ] = counts;
        ProgressReport {
            target,
            sent,
            dropped,
            acked,
            planned,
            shards_started,
            shards_finished,
        }
    }

    /// Some shard has not visited every connection yet (in a cluster, as
    /// the room nodes last reported), or some connection it was for waits
    /// for its inbox to catch up before it gets it.
    pub fn is_going_out(&self) -> bool {
        self.shards_finished < self.shards_started || self.sent + self.dropped < self.target
    }
}

/// Counts one node adds to a broadcast's cluster-wide progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressDelta {
    pub app: AppId,
    pub seq: u64,
    pub expires_at_ms: u64,
    /// In the order of [`PROGRESS_FIELDS`].
    pub added: [u64; PROGRESS_COUNTS],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_goes_out_until_every_shard_finished_and_every_target_got_it() {
        let finished = ProgressReport {
            target: 3,
            sent: 3,
            shards_started: 2,
            shards_finished: 2,
            ..ProgressReport::default()
        };
        assert!(!finished.is_going_out());
        let one_shard_left = ProgressReport {
            shards_finished: 1,
            ..finished
        };
        assert!(one_shard_left.is_going_out());
        let one_owed = ProgressReport {
            sent: 2,
            ..finished
        };
        assert!(one_owed.is_going_out());
        let dropped_counts = ProgressReport {
            sent: 2,
            dropped: 1,
            ..finished
        };
        assert!(!dropped_counts.is_going_out());
    }
}
