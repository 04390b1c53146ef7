//! Per-address limits on client connections (`[gateway.per_ip]`): at most
//! so many open from one address, and so many new ones a second, with
//! allow-listed networks (a carrier's NAT puts thousands of phones behind
//! one address) exempt.
//!
//! The counts are one table for the whole gateway, not a share per shard.
//! SO_REUSEPORT hashes each connection's address and port to a shard, so one
//! address's connections land on every shard, and unevenly while they are
//! few: a limit of `connections_max / shards` per shard would refuse an
//! address whose third connection happened to land next to its first long
//! before it reached its limit. The table is split into stripes by address
//! so that shards accepting at once seldom wait on each other; a shard
//! takes a stripe's lock once per accept and once per close of a counted
//! connection, never on the path of a frame.
//!
//! An IPv6 client owns at least a /64 and can pick any address in it, so
//! IPv6 addresses are counted by their /64.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use herald_proto::rate::{Rate, TokenBucket};
use ipnet::IpNet;

/// Stripes of the table: enough that a few dozen shards rarely meet.
const STRIPES: usize = 64;

/// `[gateway.per_ip]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PerIpConfig {
    /// Connections open at once from one address; `None`: no limit.
    pub connections_max: Option<u32>,
    /// New connections a second from one address; `None`: no limit.
    pub new_per_sec: Option<Rate>,
    /// Addresses in these networks are neither limited nor counted.
    pub allowed: Vec<IpNet>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address has `connections_max` open.
    Connections,
    /// Its address opened `new_per_sec` (and the burst) already; it may
    /// open another after `wait`.
    Rate { wait: Duration },
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "per_ip_connections",
            Refusal::Rate { .. } => "per_ip_rate",
        }
    }
}

/// One address's use.
#[derive(Debug)]
struct Usage {
    open: u32,
    new: Option<TokenBucket>,
    /// When it last opened a connection: its bucket is full again
    /// `burst / per_sec` later, and the entry can go once nothing is open.
    last_new: Instant,
}

#[derive(Debug)]
pub struct PerIpLimits {
    config: PerIpConfig,
    hasher: RandomState,
    stripes: Box<[Mutex<HashMap<IpAddr, Usage>>]>,
    /// The stripe the next sweep looks at.
    next_sweep: AtomicUsize,
}

impl PerIpLimits {
    pub fn new(config: PerIpConfig) -> PerIpLimits {
        PerIpLimits {
            config,
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            next_sweep: AtomicUsize::new(0),
        }
    }

    /// The key an address is counted under, or `None` if it is exempt.
    pub fn key(&self, peer: IpAddr) -> Option<IpAddr> {
        let peer = peer.to_canonical();
        if self.config.allowed.iter().any(|net| net.contains(&peer)) {
            return None;
        }
        Some(match peer {
            IpAddr::V4(_) => peer,
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        })
    }

    fn stripe(&self, key: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Usage>> {
        let index = self.hasher.hash_one(key) as usize % self.stripes.len();
        // A shard that panicked holding the lock left counts that are
        // still counts.
        self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection from `key` (see [`key`](Self::key)), or
    /// says why it must be turned away (then it is not counted).
    pub fn admit(&self, key: IpAddr, now: Instant) -> Result<(), Refusal> {
        let mut stripe = self.stripe(key);
        let usage = stripe.entry(key).or_insert_with(|| Usage {
            open: 0,
            new: self
                .config
                .new_per_sec
                .map(|rate| TokenBucket::new(rate, now)),
            last_new: now,
        });
        if self
            .config
            .connections_max
            .is_some_and(|max| usage.open >= max)
        {
            return Err(Refusal::Connections);
        }
        if let Some(bucket) = &mut usage.new
            && let Err(wait) = bucket.take(1, now)
        {
            return Err(Refusal::Rate { wait });
        }
        usage.open += 1;
        usage.last_new = now;
        Ok(())
    }

    /// A connection [`admit`](Self::admit) counted has closed.
    pub fn release(&self, key: IpAddr, now: Instant) {
        let mut stripe = self.stripe(key);
        if let Some(usage) = stripe.get_mut(&key) {
            usage.open = usage.open.saturating_sub(1);
            if self.is_spent(usage, now) {
                stripe.remove(&key);
            }
        }
    }

    /// Drops the entries of one stripe that hold nothing any more:
    /// addresses with no connection open and a full bucket. Each shard
    /// calls it on its tick, so every stripe is looked at every
    /// `STRIPES / shards` ticks.
    pub fn sweep(&self, now: Instant) {
        let index = self.next_sweep.fetch_add(1, Ordering::Relaxed) % self.stripes.len();
        let mut stripe = self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stripe.retain(|_, usage| !self.is_spent(usage, now));
    }

    /// Nothing open, and a bucket that would be full by now.
    fn is_spent(&self, usage: &Usage, now: Instant) -> bool {
        let refill = usage.new.as_ref().map_or(Duration::ZERO, |bucket| {
            let rate = bucket.rate();
            Duration::from_secs_f64(f64::from(rate.burst) / rate.per_sec)
        });
        usage.open == 0 && now.saturating_duration_since(usage.last_new) >= refill
    }

    /// Addresses with an entry now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.stripes
            .iter()
            .map(|stripe| stripe.lock().expect("not poisoned").len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections_max: Option<u32>, new_per_sec: Option<Rate>) -> PerIpLimits {
        PerIpLimits::new(PerIpConfig {
            connections_max,
            new_per_sec,
            allowed: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn counts_each_address_up_to_its_limit() {
        let limits = limits(Some(2), None);
        let now = Instant::now();
        let a = limits.key(ip("192.0.2.1")).unwrap();
        let b = limits.key(ip("192.0.2.2")).unwrap();
        limits.admit(a, now).unwrap();
        limits.admit(a, now).unwrap();
        assert_eq!(limits.admit(a, now), Err(Refusal::Connections));
        limits.admit(b, now).unwrap();
        limits.release(a, now);
        limits.admit(a, now).unwrap();
    }

    #[test]
    fn limits_new_connections_a_second() {
        let limits = limits(
            None,
            Some(Rate {
                per_sec: 2.0,
                burst: 2,
            }),
        );
        let now = Instant::now();
        let a = limits.key(ip("192.0.2.1")).unwrap();
        limits.admit(a, now).unwrap();
        limits.admit(a, now).unwrap();
        assert_eq!(
            limits.admit(a, now),
            Err(Refusal::Rate {
                wait: Duration::from_millis(500)
            })
        );
        limits.admit(a, now + Duration::from_millis(500)).unwrap();
    }

    #[test]
    fn allow_listed_networks_are_exempt_and_ipv6_counts_by_its_64() {
        let limits = limits(Some(1), None);
        assert_eq!(limits.key(ip("10.1.2.3")), None);
        assert_eq!(limits.key(ip("::ffff:10.1.2.3")), None);
        assert_eq!(limits.key(ip("2001:db8::1")), None);
        assert_eq!(
            limits.key(ip("2001:db9:0:1::5")),
            limits.key(ip("2001:db9:0:1:ffff::9"))
        );
        assert_ne!(
            limits.key(ip("2001:db9:0:1::5")),
            limits.key(ip("2001:db9:0:2::5"))
        );
        assert_eq!(limits.key(ip("::ffff:192.0.2.1")), Some(ip("192.0.2.1")));
    }

    #[test]
    fn forgets_an_address_once_it_holds_nothing() {
        let limits = limits(
            Some(5),
            Some(Rate {
                per_sec: 1.0,
                burst: 2,
            }),
        );
        let now = Instant::now();
        let a = limits.key(ip("192.0.2.1")).unwrap();
        limits.admit(a, now).unwrap();
        limits.release(a, now);
        // Its bucket is not full yet: closing at once does not reset it.
        assert_eq!(limits.tracked(), 1);
        for _ in 0..STRIPES {
            limits.sweep(now + Duration::from_secs(1));
        }
        assert_eq!(limits.tracked(), 1);
        for _ in 0..STRIPES {
            limits.sweep(now + Duration::from_secs(2));
        }
        assert_eq!(limits.tracked(), 0);
    }
}
