//! Heartbeat probing: the client looks for the longest interval its
//! network's NAT lets an idle connection live, and remembers it.
//!
//! After `healthy_before_probe` answered PINGs at an interval, the interval
//! held: it is remembered, and the client proposes one `step` longer
//! (HEARTBEAT; the server answers the interval in force, clamped to its
//! range). When a connection goes silent (no PONG to a PING: the NAT
//! dropped the idle flow), or is lost while a PING is out (a NAT that
//! resets forgotten flows), the interval in force failed: the client falls
//! back to the last one that held and does not probe above it for `hold`.
//! What was learned is kept per network type, and per carrier or Wi-Fi
//! network id when the application supplies one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_proto::NetworkType;
use serde::{Deserialize, Serialize};

/// The shortest interval a failure falls back to: below it, heartbeats
/// would cost more than the connection is worth.
const INTERVAL_MIN: Duration = Duration::from_secs(1);

/// How the client probes for a longer heartbeat interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatProbe {
    /// How much longer each probe tries.
    pub step: Duration,
    /// PINGs answered at an interval before it counts as held and the next
    /// probe starts (at least 1).
    pub healthy_before_probe: u32,
    /// After a failed interval, no probe above the one that held for this
    /// long.
    pub hold: Duration,
    /// The carrier or Wi-Fi network the device is on (an operator code, a
    /// hashed SSID...), if the application knows it: NATs differ between
    /// them, so each has its own learned interval.
    pub network_id: Option<String>,
    /// A JSON file the learned intervals are read from at start and
    /// written to when they change; without it they live in memory only.
    /// A file that cannot be read is started over.
    pub store: Option<PathBuf>,
}

/// What was learned for one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Learned {
    /// The longest interval that held, in milliseconds.
    held_ms: u64,
    /// No probe above `held_ms` before this instant (unix milliseconds).
    hold_until_ms: u64,
}

/// The probing state of one client: what it learned, and where the
/// current connection stands.
#[derive(Debug)]
pub(crate) struct HeartbeatLearner {
    probe: HeartbeatProbe,
    /// `network type` or `network type/network id`.
    key: String,
    learned: HashMap<String, Learned>,
    /// The interval the current connection pings at.
    in_force: Duration,
    /// A proposal the server has not answered yet.
    proposed: Option<Duration>,
    /// PINGs answered at `in_force` since it was set or last counted.
    answered: u32,
    /// The server clamped a proposal below what was asked: its maximum for
    /// this connection, above which probing is pointless.
    server_max: Option<Duration>,
}

impl HeartbeatLearner {
    pub(crate) fn new(probe: HeartbeatProbe, network: NetworkType) -> HeartbeatLearner {
        let key = match &probe.network_id {
            Some(id) => format!("{}/{id}", network.as_str()),
            None => network.as_str().to_owned(),
        };
        let learned = probe.store.as_deref().map(load).unwrap_or_default();
        HeartbeatLearner {
            probe,
            key,
            learned,
            in_force: Duration::ZERO,
            proposed: None,
            answered: 0,
            server_max: None,
        }
    }

    /// A connection's handshake is done, pinging at the server's start
    /// interval. Returns the interval to propose: the one learned for this
    /// network, if it differs.
    pub(crate) fn connected(&mut self, server_interval: Duration) -> Option<Duration> {
        self.in_force = server_interval;
        self.answered = 0;
        self.server_max = None;
        let held = self
            .learned
            .get(&self.key)
            .map(|l| Duration::from_millis(l.held_ms))?;
        (held != server_interval).then(|| self.propose(held))
    }

    /// The server answered a proposal with the interval in force.
    pub(crate) fn set(&mut self, interval: Duration) {
        if self.proposed.take().is_some_and(|asked| interval < asked) {
            self.server_max = Some(interval);
        }
        self.in_force = interval;
        self.answered = 0;
    }

    /// A PING was answered. Returns a longer interval to propose, when the
    /// current one has held long enough and probing is allowed.
    pub(crate) fn ping_answered(&mut self) -> Option<Duration> {
        self.answered += 1;
        if self.answered < self.probe.healthy_before_probe.max(1) || self.proposed.is_some() {
            return None;
        }
        self.answered = 0;
        let now_ms = unix_ms();
        let entry = self.learned.entry(self.key.clone()).or_insert(Learned {
            held_ms: 0,
            hold_until_ms: 0,
        });
        let in_force_ms = as_ms(self.in_force);
        if entry.held_ms != in_force_ms {
            entry.held_ms = in_force_ms;
            self.save();
        }
        let entry = self.learned[&self.key];
        let next = self.in_force + self.probe.step;
        let capped = self.server_max.is_some_and(|max| next > max);
        let held_back = now_ms < entry.hold_until_ms && next > Duration::from_millis(entry.held_ms);
        (!capped && !held_back).then(|| self.propose(next))
    }

    /// The connection went silent while pinging at the interval in force:
    /// the NAT dropped it. Falls back to the last interval that held (one
    /// step down if that one failed) and holds probing there.
    pub(crate) fn failed(&mut self) {
        let failed = self.in_force;
        let held = self
            .learned
            .get(&self.key)
            .map(|l| Duration::from_millis(l.held_ms))
            .filter(|held| *held < failed)
            .unwrap_or_else(|| failed.saturating_sub(self.probe.step))
            .max(INTERVAL_MIN);
        self.learned.insert(
            self.key.clone(),
            Learned {
                held_ms: as_ms(held),
                hold_until_ms: unix_ms() + as_ms(self.probe.hold),
            },
        );
        self.proposed = None;
        self.save();
    }

    /// A proposal is out and unanswered.
    pub(crate) fn awaiting_answer(&self) -> bool {
        self.proposed.is_some()
    }

    /// The interval learned for the current network, if any.
    #[cfg(test)]
    fn learned(&self) -> Option<Duration> {
        self.learned
            .get(&self.key)
            .map(|l| Duration::from_millis(l.held_ms))
    }

    fn propose(&mut self, interval: Duration) -> Duration {
        self.proposed = Some(interval);
        interval
    }

    /// Writes the learned intervals to the store, if there is one. A
    /// write that fails loses nothing but the memory across a restart.
    fn save(&self) {
        if let Some(path) = &self.probe.store
            && let Ok(text) = serde_json::to_string_pretty(&self.learned)
        {
            let _ = std::fs::write(path, text);
        }
    }
}

fn load(path: &Path) -> HashMap<String, Learned> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, as_ms)
}

fn as_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(store: Option<PathBuf>) -> HeartbeatProbe {
        HeartbeatProbe {
            step: Duration::from_secs(10),
            healthy_before_probe: 2,
            hold: Duration::from_secs(3600),
            network_id: Some("carrier-a".to_owned()),
            store,
        }
    }

    const SECS_30: Duration = Duration::from_secs(30);
    const SECS_40: Duration = Duration::from_secs(40);
    const SECS_50: Duration = Duration::from_secs(50);

    #[test]
    fn probes_after_healthy_pings_and_falls_back_on_failure() {
        let mut learner = HeartbeatLearner::new(probe(None), NetworkType::Cellular4g);
        assert_eq!(learner.connected(SECS_30), None, "nothing learned yet");
        assert_eq!(learner.ping_answered(), None);
        assert_eq!(learner.ping_answered(), Some(SECS_40));
        assert_eq!(learner.learned(), Some(SECS_30));
        learner.set(SECS_40);
        learner.ping_answered();
        assert_eq!(learner.ping_answered(), Some(SECS_50));
        learner.set(SECS_50);
        // 50 s was too long for the NAT.
        learner.failed();
        assert_eq!(learner.learned(), Some(SECS_40));
        // The next connection asks for what held, and probes no higher.
        assert_eq!(learner.connected(SECS_30), Some(SECS_40));
        learner.set(SECS_40);
        for _ in 0..6 {
            assert_eq!(learner.ping_answered(), None);
        }
    }

    #[test]
    fn a_clamped_answer_stops_the_probing() {
        let mut learner = HeartbeatLearner::new(probe(None), NetworkType::Wifi);
        learner.connected(SECS_30);
        learner.ping_answered();
        assert_eq!(learner.ping_answered(), Some(SECS_40));
        learner.set(Duration::from_secs(35));
        for _ in 0..6 {
            assert_eq!(learner.ping_answered(), None);
        }
        assert_eq!(learner.learned(), Some(Duration::from_secs(35)));
    }

    #[test]
    fn an_interval_that_held_before_and_fails_now_steps_down() {
        let mut learner = HeartbeatLearner::new(probe(None), NetworkType::Wifi);
        learner.connected(SECS_40);
        learner.ping_answered();
        learner.ping_answered();
        learner.set(SECS_40);
        learner.failed();
        assert_eq!(learner.learned(), Some(SECS_30));
    }

    #[test]
    fn learned_intervals_outlive_the_client_in_the_store_per_network() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("heartbeat.json");
        let mut learner = HeartbeatLearner::new(probe(Some(store.clone())), NetworkType::Wifi);
        learner.connected(SECS_30);
        learner.ping_answered();
        learner.ping_answered();
        learner.set(SECS_40);
        learner.failed();
        let again = HeartbeatLearner::new(probe(Some(store.clone())), NetworkType::Wifi);
        assert_eq!(again.learned(), Some(SECS_30));
        let other_carrier = HeartbeatLearner::new(
            HeartbeatProbe {
                network_id: Some("carrier-b".to_owned()),
                ..probe(Some(store.clone()))
            },
            NetworkType::Wifi,
        );
        assert_eq!(other_carrier.learned(), None);
        let other_type = HeartbeatLearner::new(probe(Some(store)), NetworkType::Cellular4g);
        assert_eq!(other_type.learned(), None);
    }
}
