//! The dispatcher: which gateways a client should connect to, in order.
//!
//! The user's home node comes first: rendezvous hashing of (app, user) over
//! the live nodes, so a user keeps landing on the same node while it lives,
//! and only the users of a node that joins or leaves move. The rest follow
//! by load (fewest connections, then least CPU), for failover. Nodes in the
//! client's region, when it names one, come before all others. A
//! draining node is named only when no other node can be.

use std::cmp::Ordering;

use crate::cluster::directory::NodeRecord;

/// The client's network, as `GET /v1/dispatch?net=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Wifi,
    Wired,
    FiveG,
    FourG,
    ThreeG,
    TwoG,
}

impl Net {
    pub fn parse(text: &str) -> Option<Net> {
        Some(match text {
            "wifi" => Net::Wifi,
            "wired" => Net::Wired,
            "5g" => Net::FiveG,
            "4g" => Net::FourG,
            "3g" => Net::ThreeG,
            "2g" => Net::TwoG,
            _ => return None,
        })
    }

    /// Addresses worth handing out: each one a client tries costs it a
    /// connect timeout, which on a slow network is long, so a slow network
    /// gets a short list.
    pub fn addresses_max(self) -> usize {
        match self {
            Net::Wifi | Net::Wired | Net::FiveG | Net::FourG => 8,
            Net::ThreeG | Net::TwoG => 3,
        }
    }
}

/// The gateway addresses for (app, user), best first.
pub fn order(
    nodes: &[&NodeRecord],
    app: &str,
    user: &str,
    region: Option<&str>,
    net: Net,
    transport: &str,
) -> Vec<String> {
    let address = |node: &NodeRecord| match node.gateways.get(transport) {
        Some(address) => Some(address.clone()),
        // A node from before transports has plain TCP only.
        None if transport == "tcp" && node.gateways.is_empty() => Some(node.gateway.clone()),
        None => None,
    };
    let in_region = |node: &NodeRecord| region.is_none_or(|region| node.region == region);
    let reachable: Vec<&NodeRecord> = nodes
        .iter()
        .copied()
        .filter(|node| address(node).is_some())
        .collect();
    // A draining node sends its clients away: sending them back would only
    // add a round trip, unless it is all there is (`herald serve` alone).
    let staying = reachable.iter().any(|node| !node.draining);
    let (mut near, mut far): (Vec<&NodeRecord>, Vec<&NodeRecord>) = reachable
        .into_iter()
        .filter(|node| !(staying && node.draining))
        .partition(|node| in_region(node));
    if near.is_empty() {
        std::mem::swap(&mut near, &mut far);
    }
    let home = near
        .iter()
        .enumerate()
        .max_by_key(|(_, node)| rendezvous_weight(app, user, &node.node))
        .map(|(index, _)| index);
    let mut ordered = Vec::with_capacity(nodes.len());
    if let Some(home) = home {
        ordered.push(near.swap_remove(home));
    }
    near.sort_by(|a, b| by_load(a, b));
    far.sort_by(|a, b| by_load(a, b));
    ordered.extend(near);
    ordered.extend(far);
    ordered
        .into_iter()
        .take(net.addresses_max())
        .filter_map(address)
        .collect()
}

fn by_load(a: &NodeRecord, b: &NodeRecord) -> Ordering {
    a.connections
        .cmp(&b.connections)
        .then(a.cpu_percent.total_cmp(&b.cpu_percent))
        .then_with(|| a.node.cmp(&b.node))
}

/// A node's weight for a user: the same on every control node (no random
/// seed), spread evenly (FNV-1a, then a 64-bit finalizer).
fn rendezvous_weight(app: &str, user: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        app.as_bytes(),
        b"\0",
        user.as_bytes(),
        b"\0",
        node.as_bytes(),
    ] {
        for &byte in part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // splitmix64's finalizer: FNV alone leaves the high bits poorly mixed.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, region: &str, connections: u64) -> NodeRecord {
        NodeRecord {
            node: name.to_owned(),
            instance: 1,
            gateway: format!("{name}:7070"),
            gateways: [
                ("tcp".to_owned(), format!("{name}:7070")),
                ("wss".to_owned(), format!("wss://{name}:443/v1/connect")),
            ]
            .into(),
            region: region.to_owned(),
            connections,
            cpu_percent: 0.0,
            heartbeat_at_ms: 0,
            apps_online: Default::default(),
            shard_connections: Vec::new(),
            draining: false,
        }
    }

    #[test]
    fn a_draining_node_is_named_only_when_nothing_else_is() {
        let mut nodes = [node("a", "eu", 0), node("b", "eu", 0), node("c", "us", 0)];
        nodes[0].draining = true;
        let all: Vec<&NodeRecord> = nodes.iter().collect();
        for user in 0..100 {
            let list = order(
                &all,
                "chat",
                &format!("user{user}"),
                Some("eu"),
                Net::Wifi,
                "tcp",
            );
            assert_eq!(list, ["b:7070", "c:7070"]);
        }
        for record in &mut nodes {
            record.draining = true;
        }
        let all: Vec<&NodeRecord> = nodes.iter().collect();
        assert_eq!(
            order(&all, "chat", "alice", Some("eu"), Net::Wifi, "tcp").len(),
            3
        );
    }

    #[test]
    fn the_home_node_is_stable_and_the_rest_follow_by_load() {
        let nodes = [
            node("a", "eu", 30),
            node("b", "eu", 10),
            node("c", "eu", 20),
        ];
        let all: Vec<&NodeRecord> = nodes.iter().collect();
        let first = order(&all, "chat", "alice", None, Net::Wifi, "tcp");
        assert_eq!(first.len(), 3);
        // The same answer however the list is ordered.
        let reversed: Vec<&NodeRecord> = nodes.iter().rev().collect();
        assert_eq!(
            order(&reversed, "chat", "alice", None, Net::Wifi, "tcp"),
            first
        );
        // After the home, by load.
        let rest: Vec<&String> = first[1..].iter().collect();
        let mut by_load = rest.clone();
        by_load.sort_by_key(|gateway| {
            nodes
                .iter()
                .find(|n| &&n.gateway == gateway)
                .unwrap()
                .connections
        });
        assert_eq!(rest, by_load);
        // Losing a node other than the home does not move the user.
        for gone in first[1..].iter() {
            let left: Vec<&NodeRecord> = nodes.iter().filter(|n| &n.gateway != gone).collect();
            assert_eq!(
                order(&left, "chat", "alice", None, Net::Wifi, "tcp")[0],
                first[0]
            );
        }
    }

    #[test]
    fn users_spread_over_the_nodes() {
        let nodes = [node("a", "", 0), node("b", "", 0), node("c", "", 0)];
        let all: Vec<&NodeRecord> = nodes.iter().collect();
        let mut homes = std::collections::HashMap::new();
        for user in 0..3_000 {
            let first =
                order(&all, "chat", &format!("user{user}"), None, Net::Wifi, "tcp").remove(0);
            *homes.entry(first).or_insert(0) += 1;
        }
        assert_eq!(homes.len(), 3);
        assert!(homes.values().all(|&n| n > 800), "{homes:?}");
    }

    #[test]
    fn the_region_comes_first_and_slow_networks_get_a_short_list() {
        let nodes: Vec<NodeRecord> = (0..6)
            .map(|i| node(&format!("n{i}"), if i < 2 { "us" } else { "eu" }, i))
            .collect();
        let all: Vec<&NodeRecord> = nodes.iter().collect();
        let list = order(&all, "chat", "bob", Some("us"), Net::Wifi, "tcp");
        assert_eq!(list.len(), 6);
        let mut first_two = list[..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, ["n0:7070", "n1:7070"]);
        assert_eq!(
            order(&all, "chat", "bob", Some("us"), Net::TwoG, "tcp").len(),
            3
        );
        // A region nobody is in: every node is as good.
        assert_eq!(
            order(&all, "chat", "bob", Some("mars"), Net::Wifi, "tcp").len(),
            6
        );
        assert!(order(&[], "chat", "bob", None, Net::Wifi, "tcp").is_empty());
    }

    #[test]
    fn a_transport_gets_that_transports_addresses_of_the_nodes_that_have_it() {
        let mut old = node("old", "eu", 0);
        old.gateways.clear();
        let mut plain = node("plain", "eu", 0);
        plain.gateways.remove("wss");
        let nodes = [node("a", "eu", 5), old, plain];
        let all: Vec<&NodeRecord> = nodes.iter().collect();
        assert_eq!(
            order(&all, "chat", "bob", None, Net::Wifi, "wss"),
            ["wss://a:443/v1/connect"]
        );
        let mut tcp = order(&all, "chat", "bob", None, Net::Wifi, "tcp");
        tcp.sort();
        assert_eq!(tcp, ["a:7070", "old:7070", "plain:7070"]);
        assert!(order(&all, "chat", "bob", None, Net::Wifi, "tls").is_empty());
    }
}
