//! The register: which connections each (app, user) has, on which node.
//!
//! In memory for one node (`herald serve`), and on Redis for a cluster
//! (`RedisRegister`, in `cluster::register`), behind one trait. A user may have
//! several devices connected; a push goes to every one of them.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

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
}

impl Default for MemoryRegister {
    fn default() -> Self {
        MemoryRegister {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            nodes: Mutex::default(),
            online: Mutex::default(),
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
