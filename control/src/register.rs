//! The register: which connections each (app, user) has, on which node.
//!
//! In-memory here, behind a trait so that a Redis register can take its
//! place in a cluster. A user may have several devices connected; a push
//! goes to every one of them.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use herald_proto::NetworkType;
use herald_proto::plane::ConnId;

/// One live connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub conn: ConnId,
    pub node: String,
    pub device_id: String,
    pub network: NetworkType,
    pub connected_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("register unavailable: {0}")]
pub struct RegisterError(pub String);

#[async_trait::async_trait]
pub trait Register: Send + Sync {
    async fn add(&self, app: &str, user: &str, session: Session) -> Result<(), RegisterError>;
    async fn remove(&self, app: &str, user: &str, conn: ConnId) -> Result<(), RegisterError>;
    async fn sessions(&self, app: &str, user: &str) -> Result<Vec<Session>, RegisterError>;
}

/// Stripes of the in-memory map, so concurrent API calls for different users
/// rarely wait on one another.
const STRIPES: usize = 16;

type Stripe = Mutex<HashMap<(String, String), Vec<Session>>>;

#[derive(Debug)]
pub struct MemoryRegister {
    stripes: Vec<Stripe>,
}

impl Default for MemoryRegister {
    fn default() -> Self {
        MemoryRegister {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }
}

impl MemoryRegister {
    fn stripe(&self, app: &str, user: &str) -> &Stripe {
        let mut hasher = DefaultHasher::new();
        (app, user).hash(&mut hasher);
        &self.stripes[hasher.finish() as usize % STRIPES]
    }
}

#[async_trait::async_trait]
impl Register for MemoryRegister {
    async fn add(&self, app: &str, user: &str, session: Session) -> Result<(), RegisterError> {
        let mut map = self.stripe(app, user).lock().expect("register lock");
        let sessions = map.entry((app.to_owned(), user.to_owned())).or_default();
        sessions.retain(|s| s.conn != session.conn);
        sessions.push(session);
        Ok(())
    }

    async fn remove(&self, app: &str, user: &str, conn: ConnId) -> Result<(), RegisterError> {
        let mut map = self.stripe(app, user).lock().expect("register lock");
        let key = (app.to_owned(), user.to_owned());
        if let Some(sessions) = map.get_mut(&key) {
            sessions.retain(|s| s.conn != conn);
            if sessions.is_empty() {
                map.remove(&key);
            }
        }
        Ok(())
    }

    async fn sessions(&self, app: &str, user: &str) -> Result<Vec<Session>, RegisterError> {
        let map = self.stripe(app, user).lock().expect("register lock");
        Ok(map
            .get(&(app.to_owned(), user.to_owned()))
            .cloned()
            .unwrap_or_default())
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
            device_id: device.to_owned(),
            network: NetworkType::Wifi,
            connected_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn a_user_may_have_several_devices_and_each_leaves_alone() {
        let register = MemoryRegister::default();
        register
            .add("chat", "alice", session(1, "phone"))
            .await
            .unwrap();
        register
            .add("chat", "alice", session(2, "laptop"))
            .await
            .unwrap();
        register
            .add("chat", "bob", session(3, "phone"))
            .await
            .unwrap();
        assert_eq!(register.sessions("chat", "alice").await.unwrap().len(), 2);
        register
            .remove("chat", "alice", session(1, "phone").conn)
            .await
            .unwrap();
        let left = register.sessions("chat", "alice").await.unwrap();
        assert_eq!(left, [session(2, "laptop")]);
        assert!(register.sessions("news", "alice").await.unwrap().is_empty());
    }
}
