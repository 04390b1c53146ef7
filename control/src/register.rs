//! The register: which connections each (app, user) has, on which node.
//!
//! In memory for one node (`herald serve`), and on Redis for a cluster
//! (`RedisRegister`, in `cluster::register`), behind one trait. A user may have
//! several devices connected; a push goes to every one of them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use herald_proto::NetworkType;
use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::ConnId;
use serde::{Deserialize, Serialize};

/// One live connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub conn: ConnId,
    pub node: String,
    /// Which run of the node: a connection id means nothing to the node's
    /// next run (after a restart), so the pair names where it lives.
    pub instance: u64,
    pub device_id: String,
    pub network: NetworkType,
    pub connected_at_ms: u64,
}

/// Why the register could not answer or take a change.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Redis did not answer, or refused the command.
    #[error("register unavailable: redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Only room nodes write sessions; a control node reads them.
    #[error("a control node does not register sessions")]
    ReadOnly,
    /// The in-memory register names a node by a 16-bit index.
    #[error("more than 65,536 nodes")]
    TooManyNodes,
}

/// One update to the register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The connection bound (app, user); binding again replaces the entry.
    Add {
        app: AppId,
        user: UserId,
        session: Session,
    },
    /// The connection left (app, user); a connection not there is ignored.
    Remove {
        app: AppId,
        user: UserId,
        conn: ConnId,
    },
}

/// A device's binding of an app: what a remembered timeout is kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceBinding {
    pub app: AppId,
    pub user: UserId,
    pub device_id: String,
}

/// A connection the gateway closed at its heartbeat deadline, kept for the
/// device's next bind of the app (SESSION_TIMED_OUT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimeout {
    pub network: NetworkType,
    /// The heartbeat interval in force on it.
    pub interval_ms: u32,
    /// When it was closed, unix milliseconds.
    pub closed_at_ms: u64,
}

#[async_trait::async_trait]
pub trait Register: Send + Sync {
    /// Applies `changes` in order. They come in batches so that a reconnect
    /// storm costs a networked register one round trip per batch, not one
    /// per connection.
    async fn apply(&self, changes: Vec<Change>) -> Result<(), RegisterError>;
    async fn sessions(&self, app: &str, user: &str) -> Result<Vec<Session>, RegisterError>;
    /// What this node's own sessions come to, per app (none on a node that
    /// only reads a shared register).
    fn online(&self) -> BTreeMap<String, AppOnline>;
    /// Remembers each timeout for `kept_for`, unless its device has another
    /// session of that app and user by now (it reconnected by itself, so it
    /// knows the connection died). Apply the timed-out session's removal
    /// first.
    async fn remember_timeouts(
        &self,
        timeouts: Vec<(DeviceBinding, SessionTimeout)>,
        kept_for: Duration,
    ) -> Result<(), RegisterError>;
    /// Takes (reads and forgets) the timeout remembered for each binding,
    /// in order: what each is told once.
    async fn take_timeouts(
        &self,
        bindings: Vec<DeviceBinding>,
    ) -> Result<Vec<Option<SessionTimeout>>, RegisterError>;
}

/// Timeouts the in-memory register keeps at most: past it the oldest go
/// first (a lost report costs a client one probe more, nothing else).
const TIMEOUTS_KEPT_MAX: usize = 100_000;

/// Remembered timeouts, by `app\0user\0device`.
#[derive(Debug, Default)]
struct Timeouts {
    by_binding: HashMap<Box<str>, (SessionTimeout, Instant)>,
    /// Keys in the order they were remembered, with when each expires:
    /// the front goes first. An entry taken or remembered again since
    /// leaves a stale one here, which expiry skips.
    order: VecDeque<(Box<str>, Instant)>,
}

impl Timeouts {
    fn remember(&mut self, key: Box<str>, timeout: SessionTimeout, expires: Instant, now: Instant) {
        while let Some((front, front_expires)) = self.order.front()
            && (*front_expires <= now || self.order.len() >= TIMEOUTS_KEPT_MAX)
        {
            if self
                .by_binding
                .get(front)
                .is_some_and(|(_, expires)| expires == front_expires)
            {
                self.by_binding.remove(front);
            }
            self.order.pop_front();
        }
        self.order.push_back((key.clone(), expires));
        self.by_binding.insert(key, (timeout, expires));
    }

    fn take(&mut self, key: &str, now: Instant) -> Option<SessionTimeout> {
        let (timeout, expires) = self.by_binding.remove(key)?;
        (expires > now).then_some(timeout)
    }
}

fn binding_key(binding: &DeviceBinding) -> Box<str> {
    let mut names = key(&binding.app, &binding.user);
    names.push('\0');
    names.push_str(&binding.device_id);
    names.into_boxed_str()
}

/// An app's sessions on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppOnline {
    pub connections: u64,
    /// Users with at least one session here.
    pub users: u64,
}

/// Stripes of the in-memory table, so concurrent API calls for different
/// users rarely wait on one another.
const STRIPES: usize = 16;

/// One session as the in-memory register keeps it: every byte here is
/// multiplied by every connection of the node, so the names share one
/// exact-size allocation and the node is an index into a table of names.
#[derive(Debug)]
struct Entry {
    /// `app\0user\0device`. App and user ids cannot hold a NUL (they are
    /// checked), so the first two splits are unambiguous.
    names: Box<str>,
    conn: ConnId,
    node: u16,
    network: NetworkType,
    connected_at_ms: u64,
}

impl Entry {
    /// `app\0user`: what entries are looked up and hashed by.
    fn key(&self) -> &str {
        let app_end = self
            .names
            .find('\0')
            .expect("names hold app\\0user\\0device");
        let user_end = app_end
            + 1
            + self.names[app_end + 1..]
                .find('\0')
                .expect("names hold app\\0user\\0device");
        &self.names[..user_end]
    }

    fn device_id(&self) -> &str {
        &self.names[self.key().len() + 1..]
    }
}

/// The lookup key "app\0user".
fn key(app: &str, user: &str) -> String {
    let mut key = String::with_capacity(app.len() + 1 + user.len());
    key.push_str(app);
    key.push('\0');
    key.push_str(user);
    key
}

/// A user's sessions are the entries whose key matches: nearly always one,
/// sometimes a few devices. They share a hash, so they sit side by side.
#[derive(Debug, Default)]
struct Stripe {
    table: HashTable<Entry>,
}

#[derive(Debug)]
pub struct MemoryRegister {
    stripes: Vec<Mutex<Stripe>>,
    hasher: RandomState,
    /// Node names and instances, indexed by `Entry::node`.
    nodes: Mutex<Vec<(String, u64)>>,
    /// Kept as entries come and go, so reading it costs no walk.
    online: Mutex<BTreeMap<String, AppOnline>>,
    timeouts: Mutex<Timeouts>,
}

impl Default for MemoryRegister {
    fn default() -> Self {
        MemoryRegister {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            nodes: Mutex::default(),
            online: Mutex::default(),
            timeouts: Mutex::default(),
        }
    }
}

impl MemoryRegister {
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn stripe(&self, hash: u64) -> &Mutex<Stripe> {
        // The table uses the low bits of the hash; the stripe takes the top.
        &self.stripes[(hash >> 60) as usize % STRIPES]
    }

    fn node_index(&self, node: &str, instance: u64) -> Result<u16, RegisterError> {
        let mut nodes = self.nodes.lock().expect("register lock");
        if let Some(index) = nodes
            .iter()
            .position(|known| known.0 == node && known.1 == instance)
        {
            return Ok(index as u16);
        }
        let index = u16::try_from(nodes.len()).map_err(|_| RegisterError::TooManyNodes)?;
        nodes.push((node.to_owned(), instance));
        Ok(index)
    }

    fn session(&self, entry: &Entry) -> Session {
        let (node, instance) =
            self.nodes.lock().expect("register lock")[usize::from(entry.node)].clone();
        Session {
            conn: entry.conn,
            node,
            instance,
            device_id: entry.device_id().to_owned(),
            network: entry.network,
            connected_at_ms: entry.connected_at_ms,
        }
    }

    fn add(&self, app: &str, user: &str, session: Session) -> Result<(), RegisterError> {
        let mut names = key(app, user);
        let hash = self.hash(&names);
        names.push('\0');
        names.push_str(&session.device_id);
        let entry = Entry {
            names: names.into_boxed_str(),
            conn: session.conn,
            node: self.node_index(&session.node, session.instance)?,
            network: session.network,
            connected_at_ms: session.connected_at_ms,
        };
        let mut stripe = self.stripe(hash).lock().expect("register lock");
        let key = entry.key();
        match stripe
            .table
            .find_mut(hash, |e| e.conn == entry.conn && e.key() == key)
        {
            // Binding the same connection again replaces its entry.
            Some(existing) => *existing = entry,
            None => {
                let new_user = !stripe.table.iter_hash(hash).any(|e| e.key() == key);
                stripe
                    .table
                    .insert_unique(hash, entry, |e| self.hash(e.key()));
                let mut online = self.online.lock().expect("register lock");
                let counts = online.entry(app.to_owned()).or_default();
                counts.connections += 1;
                counts.users += u64::from(new_user);
            }
        }
        Ok(())
    }

    /// Every session held, as (app, user, session): what a room node
    /// writes again to a register that lost its data.
    pub fn all(&self) -> Vec<(AppId, UserId, Session)> {
        let mut all = Vec::new();
        for stripe in &self.stripes {
            let stripe = stripe.lock().expect("register lock");
            for entry in stripe.table.iter() {
                let (app, user) = entry.key().split_once('\0').expect("key holds app\0user");
                all.push((AppId::from(app), UserId::from(user), self.session(entry)));
            }
        }
        all
    }

    /// Whether the device has a session of the binding's app and user.
    fn has_device_session(&self, binding: &DeviceBinding) -> bool {
        let key = key(&binding.app, &binding.user);
        let hash = self.hash(&key);
        let stripe = self.stripe(hash).lock().expect("register lock");
        stripe
            .table
            .iter_hash(hash)
            .any(|e| e.key() == key && e.device_id() == binding.device_id)
    }

    fn remove(&self, app: &str, user: &str, conn: ConnId) {
        let key = key(app, user);
        let hash = self.hash(&key);
        let mut stripe = self.stripe(hash).lock().expect("register lock");
        if let Ok(found) = stripe
            .table
            .find_entry(hash, |e| e.conn == conn && e.key() == key)
        {
            found.remove();
            let user_left = !stripe.table.iter_hash(hash).any(|e| e.key() == key);
            let mut online = self.online.lock().expect("register lock");
            if let Some(counts) = online.get_mut(app) {
                counts.connections -= 1;
                counts.users -= u64::from(user_left);
                if counts.connections == 0 {
                    online.remove(app);
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Register for MemoryRegister {
    async fn apply(&self, changes: Vec<Change>) -> Result<(), RegisterError> {
        for change in changes {
            match change {
                Change::Add { app, user, session } => self.add(&app, &user, session)?,
                Change::Remove { app, user, conn } => self.remove(&app, &user, conn),
            }
        }
        Ok(())
    }

    async fn sessions(&self, app: &str, user: &str) -> Result<Vec<Session>, RegisterError> {
        let key = key(app, user);
        let hash = self.hash(&key);
        let stripe = self.stripe(hash).lock().expect("register lock");
        Ok(stripe
            .table
            .iter_hash(hash)
            .filter(|e| e.key() == key)
            .map(|e| self.session(e))
            .collect())
    }

    fn online(&self) -> BTreeMap<String, AppOnline> {
        self.online.lock().expect("register lock").clone()
    }

    async fn remember_timeouts(
        &self,
        timeouts: Vec<(DeviceBinding, SessionTimeout)>,
        kept_for: Duration,
    ) -> Result<(), RegisterError> {
        let now = Instant::now();
        for (binding, timeout) in timeouts {
            if self.has_device_session(&binding) {
                continue;
            }
            self.timeouts.lock().expect("register lock").remember(
                binding_key(&binding),
                timeout,
                now + kept_for,
                now,
            );
        }
        Ok(())
    }

    async fn take_timeouts(
        &self,
        bindings: Vec<DeviceBinding>,
    ) -> Result<Vec<Option<SessionTimeout>>, RegisterError> {
        let now = Instant::now();
        let mut timeouts = self.timeouts.lock().expect("register lock");
        Ok(bindings
            .iter()
            .map(|binding| timeouts.take(&binding_key(binding), now))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(slot: u32, device: &str) -> Session {
        Session {
            conn: ConnId {
                shard: 0,
                slot,
                generation: 0,
            },
            node: "n1".to_owned(),
            instance: 7,
            device_id: device.to_owned(),
            network: NetworkType::Wifi,
            connected_at_ms: 1,
        }
    }

    fn add(slot: u32, device: &str, user: &str) -> Change {
        Change::Add {
            app: AppId::from("chat"),
            user: UserId::from(user),
            session: session(slot, device),
        }
    }

    fn remove(slot: u32, user: &str) -> Change {
        Change::Remove {
            app: AppId::from("chat"),
            user: UserId::from(user),
            conn: session(slot, "").conn,
        }
    }

    #[tokio::test]
    async fn online_counts_connections_and_users_as_they_come_and_go() {
        let register = MemoryRegister::default();
        let chat = |connections, users| {
            BTreeMap::from([("chat".to_owned(), AppOnline { connections, users })])
        };
        register
            .apply(vec![
                add(1, "phone", "alice"),
                add(2, "laptop", "alice"),
                add(3, "phone", "bob"),
                // The same connection bound again is still one.
                add(3, "phone", "bob"),
            ])
            .await
            .unwrap();
        assert_eq!(register.online(), chat(3, 2));
        register.apply(vec![remove(1, "alice")]).await.unwrap();
        assert_eq!(register.online(), chat(2, 2));
        // Removing what is not there changes nothing.
        register.apply(vec![remove(1, "alice")]).await.unwrap();
        register
            .apply(vec![remove(2, "alice"), remove(3, "bob")])
            .await
            .unwrap();
        assert_eq!(register.online(), BTreeMap::new());
    }

    #[tokio::test]
    async fn a_user_may_have_several_devices_and_each_leaves_alone() {
        let register = MemoryRegister::default();
        register
            .apply(vec![
                add(1, "phone", "alice"),
                add(2, "laptop", "alice"),
                add(3, "phone", "bob"),
            ])
            .await
            .unwrap();
        assert_eq!(register.sessions("chat", "alice").await.unwrap().len(), 2);
        register.apply(vec![remove(1, "alice")]).await.unwrap();
        let left = register.sessions("chat", "alice").await.unwrap();
        assert_eq!(left, [session(2, "laptop")]);
        register
            .apply(vec![add(2, "laptop", "alice")])
            .await
            .unwrap();
        assert_eq!(
            register.sessions("chat", "alice").await.unwrap(),
            [session(2, "laptop")],
            "adding the same connection again replaces it"
        );
        let mut all = register.all();
        all.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            all,
            [
                (
                    AppId::from("chat"),
                    UserId::from("alice"),
                    session(2, "laptop")
                ),
                (
                    AppId::from("chat"),
                    UserId::from("bob"),
                    session(3, "phone")
                ),
            ]
        );
        register.apply(vec![remove(2, "alice")]).await.unwrap();
        assert!(register.sessions("chat", "alice").await.unwrap().is_empty());
        assert!(register.sessions("news", "alice").await.unwrap().is_empty());
    }

    #[test]
    fn remembered_timeouts_are_bounded_and_the_oldest_go_first() {
        let mut timeouts = Timeouts::default();
        let timeout = SessionTimeout {
            network: NetworkType::Wifi,
            interval_ms: 120_000,
            closed_at_ms: 1,
        };
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        for i in 0..=TIMEOUTS_KEPT_MAX {
            timeouts.remember(format!("chat\0u{i}\0d").into(), timeout, later, now);
        }
        assert_eq!(timeouts.by_binding.len(), TIMEOUTS_KEPT_MAX);
        assert_eq!(timeouts.take("chat\0u0\0d", now), None, "the oldest went");
        assert_eq!(timeouts.take("chat\0u1\0d", now), Some(timeout));
        // Remembered again later: the first entry's expiry leaves the
        // second one in place.
        let soon = now + Duration::from_millis(1);
        timeouts.remember("chat\0again\0d".into(), timeout, soon, now);
        timeouts.remember("chat\0again\0d".into(), timeout, later, now);
        timeouts.remember("chat\0next\0d".into(), timeout, later, soon);
        assert_eq!(timeouts.take("chat\0again\0d", soon), Some(timeout));
        assert_eq!(timeouts.take("chat\0next\0d", later), None, "expired");
    }

    #[tokio::test]
    async fn a_batch_applies_in_order() {
        let register = MemoryRegister::default();
        // Bound, closed and bound again (a quick reconnect that reused the
        // slot) within one batch: only the last binding stays.
        register
            .apply(vec![
                add(1, "phone", "alice"),
                remove(1, "alice"),
                add(1, "phone", "alice"),
                add(2, "phone", "bob"),
                remove(2, "bob"),
            ])
            .await
            .unwrap();
        assert_eq!(
            register.sessions("chat", "alice").await.unwrap(),
            [session(1, "phone")]
        );
        assert!(register.sessions("chat", "bob").await.unwrap().is_empty());
    }
}
