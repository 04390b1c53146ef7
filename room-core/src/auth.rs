//! Token checks for BIND, over the gateway's table of apps: their token
//! secrets (with a rotation's grace) and their connection limits.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::{GatewayApp, TokenSecret};
use herald_proto::server::{Authenticated, Authenticator, BindRejection};
use herald_proto::{BindErrorCode, TokenError, verify_token_with_any};

/// An app as one shard checks BINDs for it.
#[derive(Debug)]
struct AppAuth {
    secrets: Vec<TokenSecret>,
    max_connections: Option<u32>,
    bound: Arc<AtomicU32>,
}

/// Each shard builds its own, so token checks share nothing but the
/// process's count of each app's bindings (not even the reference counts
/// of the app ids its bindings point at).
#[derive(Debug, Default)]
pub struct AppSecrets {
    /// The app id is shared with every binding of the app.
    apps: HashMap<AppId, AppAuth>,
}

impl AppSecrets {
    pub fn new(apps: &[GatewayApp]) -> AppSecrets {
        let mut table = AppSecrets::default();
        table.replace(apps);
        table
    }

    /// Makes `apps` the table; returns the apps that left it. An app that
    /// stays keeps its `AppId`, which its bindings share.
    pub fn replace(&mut self, apps: &[GatewayApp]) -> Vec<AppId> {
        let mut old = std::mem::take(&mut self.apps);
        for app in apps {
            let id = match old.remove_entry(app.id.as_str()) {
                Some((id, _)) => id,
                None => AppId::from(app.id.as_str()),
            };
            self.apps.insert(
                id,
                AppAuth {
                    secrets: app.token_secrets.clone(),
                    max_connections: app.max_connections,
                    bound: app.bound.clone(),
                },
            );
        }
        old.into_keys().collect()
    }

    /// A binding of `app` ended (UNBIND, or its connection closed).
    pub fn released(&self, app: &str) {
        if let Some(auth) = self.apps.get(app) {
            // Never below zero: a binding made before this count existed
            // (the app deleted and made again) may end after.
            let _ = auth
                .bound
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }
}

impl Authenticator for AppSecrets {
    fn authenticate(&self, app: &str, token: &str) -> Result<Authenticated, BindRejection> {
        let Some((shared_app, auth)) = self.apps.get_key_value(app) else {
            return Err(BindRejection {
                code: BindErrorCode::UNKNOWN_APP,
                message: format!("no app {app:?} on this server"),
            });
        };
        // Token expiry and a secret's grace are wall-clock time, unlike
        // connection deadlines.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let now_ms = now.as_millis() as u64;
        let secrets = auth
            .secrets
            .iter()
            .filter(|secret| secret.retires_at_ms.is_none_or(|at| at > now_ms))
            .map(|secret| secret.secret.as_slice());
        let claims = match verify_token_with_any(secrets, app, token, now.as_secs()) {
            Ok(claims) => claims,
            Err(error) => {
                return Err(BindRejection {
                    code: error.bind_error_code(),
                    message: match error {
                        TokenError::Expired => "token expired".to_owned(),
                        TokenError::WrongApp => format!("token was not issued for app {app:?}"),
                        TokenError::BadSignature => "token signature does not match".to_owned(),
                        TokenError::Malformed => "token is malformed".to_owned(),
                    },
                });
            }
        };
        let max = auth.max_connections.unwrap_or(u32::MAX);
        if auth
            .bound
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(BindRejection {
                code: BindErrorCode::TOO_MANY_CONNECTIONS,
                message: format!("app {app:?} has its {max} connections bound on this gateway"),
            });
        }
        Ok(Authenticated {
            app: shared_app.clone(),
            user: UserId::from(claims.user),
        })
    }
}
