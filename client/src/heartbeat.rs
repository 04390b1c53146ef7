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
//! The server may also say, on the next connection, that it closed the
//! previous one at its heartbeat deadline (SESSION_TIMED_OUT): the pings
//! stopped arriving, so a loss the client could not explain counts the
//! same way, for the interval the server names.
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

/// One connection, as far as explaining its loss goes.
#[derive(Debug, Clone, Copy)]
struct ConnectionRecord {
    /// When its handshake finished, unix milliseconds.
    started_ms: u64,
    /// Its loss is explained (counted as a failure, or the server said why
    /// with GOAWAY): a later report of its timeout changes nothing.
    explained: bool,
}

/// The probing state of one client: what it learned, and where the
/// current connection stands.
#[derive(Debug)]
pub(crate) struct HeartbeatLearner {
    probe: HeartbeatProbe,
    network: NetworkType,
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
    current: Option<ConnectionRecord>,
    /// The connection before the current one: what a SESSION_TIMED_OUT on
    /// the current one is about.
    previous: Option<ConnectionRecord>,
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
            network,
            key,
            learned,
            in_force: Duration::ZERO,
            proposed: None,
            answered: 0,
            server_max: None,
            current: None,
            previous: None,
        }
    }

    /// A connection's handshake is done, pinging at the server's start
    /// interval. Returns the interval to propose: the one learned for this
    /// network, if it differs.
    pub(crate) fn connected(&mut self, server_interval: Duration) -> Option<Duration> {
        self.in_force = server_interval;
        self.answered = 0;
        self.server_max = None;
        self.proposed = None;
        self.previous = self.current.replace(ConnectionRecord {
            started_ms: unix_ms(),
            explained: false,
        });
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
        self.explained();
        self.fail_at(self.in_force);
        self.proposed = None;
    }

    /// The server said why the current connection ends (GOAWAY).
    pub(crate) fn explained(&mut self) {
        if let Some(current) = &mut self.current {
            current.explained = true;
        }
    }

    /// The server closed the previous connection at its heartbeat deadline
    /// `closed_ago` ago, while it pinged at `interval` on `network`. If
    /// that connection's loss was not explained already and the report is
    /// about it (not about one from before it), the interval failed.
    /// Returns the interval to propose now, when the current connection's
    /// is above what is left to hold.
    pub(crate) fn previous_timed_out(
        &mut self,
        network: NetworkType,
        interval: Duration,
        closed_ago: Duration,
    ) -> Option<Duration> {
        let previous = self.previous.as_mut()?;
        let closed_at_ms = unix_ms().saturating_sub(as_ms(closed_ago));
        if previous.explained || closed_at_ms < previous.started_ms || network != self.network {
            return None;
        }
        previous.explained = true;
        let held = self.fail_at(interval);
        let pinging_at = self.proposed.unwrap_or(self.in_force);
        (pinging_at > held).then(|| self.propose(held))
    }

    /// Counts `failed` as an interval the NAT did not keep: falls back to
    /// the last one that held below it (one step down if none did) and
    /// holds probing there. Returns that interval.
    fn fail_at(&mut self, failed: Duration) -> Duration {
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
        self.save();
        held
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
    fn a_timeout_the_server_reports_counts_for_an_unexplained_loss_only() {
        let mut learner = HeartbeatLearner::new(probe(None), NetworkType::Wifi);
        let report = |learner: &mut HeartbeatLearner, network, interval| {
            learner.previous_timed_out(network, interval, Duration::ZERO)
        };
        // The first connection: nothing before it to report about.
        learner.connected(SECS_30);
        assert_eq!(report(&mut learner, NetworkType::Wifi, SECS_30), None);
        learner.ping_answered();
        assert_eq!(learner.ping_answered(), Some(SECS_40));
        learner.set(SECS_40);
        // Lost without a PING out; the next connection starts at 30 s (what
        // held), and the server says the 40 s one timed out.
        assert_eq!(learner.connected(SECS_30), None);
        assert_eq!(
            report(&mut learner, NetworkType::Cellular4g, SECS_40),
            None,
            "another network type"
        );
        assert_eq!(report(&mut learner, NetworkType::Wifi, SECS_40), None);
        assert_eq!(learner.learned(), Some(SECS_30));
        learner.ping_answered();
        assert_eq!(learner.ping_answered(), None, "no probe above 30 s for now");
        // Reported once per lost connection.
        learner.failed();
        assert_eq!(learner.learned(), Some(Duration::from_secs(20)));
        learner.connected(SECS_30);
        assert_eq!(
            report(&mut learner, NetworkType::Wifi, SECS_30),
            None,
            "that loss was counted already"
        );
        assert_eq!(learner.learned(), Some(Duration::from_secs(20)));
    }

    #[test]
    fn a_reported_timeout_of_the_interval_in_force_moves_the_current_connection_down() {
        let mut learner = HeartbeatLearner::new(probe(None), NetworkType::Wifi);
        learner.connected(SECS_30);
        learner.ping_answered();
        learner.ping_answered();
        learner.set(SECS_40);
        learner.ping_answered();
        learner.ping_answered();
        learner.set(SECS_50);
        learner.ping_answered();
        learner.ping_answered();
        // 50 s held once; the next connection starts there, and hears that
        // the last one timed out at 50 s after all.
        assert_eq!(learner.connected(SECS_30), Some(SECS_50));
        learner.set(SECS_50);
        assert_eq!(
            learner.previous_timed_out(NetworkType::Wifi, SECS_50, Duration::ZERO),
            Some(SECS_40)
        );
        assert_eq!(learner.learned(), Some(SECS_40));
    }

    #[test]
    fn a_report_about_a_connection_before_the_last_changes_nothing() {
        let mut learner = HeartbeatLearner::new(probe(None), NetworkType::Wifi);
        learner.connected(SECS_30);
        std::thread::sleep(Duration::from_millis(20));
        learner.connected(SECS_30);
        // Closed an hour ago: before the previous connection began.
        let an_hour = Duration::from_secs(3600);
        assert_eq!(
            learner.previous_timed_out(NetworkType::Wifi, SECS_30, an_hour),
            None
        );
        assert_eq!(learner.learned(), None);
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
