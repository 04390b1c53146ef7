//! How a paced broadcast's rate is shared among the room nodes.

use std::collections::HashMap;

/// A paced broadcast's rate, shared among the room nodes by the
/// connections each held when it was sent (as the node directory last read
/// them), so that every node finishes in about the time the rate implies.
/// A node gets one connection more than it held, so one that has just
/// started still moves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PaceShares(HashMap<String, f64>);

impl PaceShares {
    /// The shares of nodes holding these connections, by node id.
    pub fn from_connections<'a>(nodes: impl IntoIterator<Item = (&'a str, u64)>) -> PaceShares {
        let weighted: Vec<(&str, f64)> = nodes
            .into_iter()
            .map(|(node, connections)| (node, connections as f64 + 1.0))
            .collect();
        let total: f64 = weighted.iter().map(|(_, weight)| weight).sum();
        weighted
            .into_iter()
            .map(|(node, weight)| (node.to_owned(), weight / total))
            .collect()
    }

    /// `node`'s share: as listed; for a node that joined since, what an
    /// even split would give it; all of it when nothing is listed (a
    /// single process, or the directory could not be read).
    pub fn of(&self, node: &str) -> f64 {
        match self.0.get(node) {
            Some(&share) => share,
            None => 1.0 / (self.0.len() + 1) as f64,
        }
    }

    /// Each listed node's share, by node id.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, f64)> {
        self.0.iter().map(|(node, &share)| (node.as_str(), share))
    }
}

impl FromIterator<(String, f64)> for PaceShares {
    fn from_iter<I: IntoIterator<Item = (String, f64)>>(shares: I) -> PaceShares {
        PaceShares(shares.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_broadcast_is_shared_by_connections() {
        let shares = PaceShares::from_connections([("a", 299), ("b", 99), ("c", 0)]);
        // Weights 300, 100 and 1.
        assert!((shares.of("a") - 300.0 / 401.0).abs() < 1e-9);
        assert!((shares.of("b") - 100.0 / 401.0).abs() < 1e-9);
        assert!(shares.of("c") > 0.0, "a node with none still moves");
        let sum: f64 = ["a", "b", "c"].iter().map(|n| shares.of(n)).sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert_eq!(shares.of("new"), 0.25, "a node that joined since");
        assert_eq!(PaceShares::default().of("any"), 1.0, "alone");
    }
}
