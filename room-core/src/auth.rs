//! Token checks for BIND, over the gateway's table of app secrets.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use herald_proto::ids::{AppId, UserId};
use herald_proto::server::{Authenticated, Authenticator, BindRejection};
use herald_proto::{BindErrorCode, TokenError, verify_token};

/// Each shard builds its own, so token checks share nothing (not even the
/// reference counts of the app ids its bindings point at).
#[derive(Debug, Default)]
pub struct AppSecrets {
    /// The app id is shared with every binding of the app.
    secrets: HashMap<AppId, Vec<u8>>,
}

impl AppSecrets {
    pub fn new(apps: impl IntoIterator<Item = (String, Vec<u8>)>) -> AppSecrets {
        AppSecrets {
            secrets: apps
                .into_iter()
                .map(|(app, secret)| (AppId::from(app), secret))
                .collect(),
        }
    }
}

impl Authenticator for AppSecrets {
    fn authenticate(&self, app: &str, token: &str) -> Result<Authenticated, BindRejection> {
        let Some((shared_app, secret)) = self.secrets.get_key_value(app) else {
            return Err(BindRejection {
                code: BindErrorCode::UNKNOWN_APP,
                message: format!("no app {app:?} on this server"),
            });
        };
        // Token expiry is wall-clock time, unlike connection deadlines.
        let now_unix_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match verify_token(secret, app, token, now_unix_secs) {
            Ok(claims) => Ok(Authenticated {
                app: shared_app.clone(),
                user: UserId::from(claims.user),
            }),
            Err(error) => Err(BindRejection {
                code: error.bind_error_code(),
                message: match error {
                    TokenError::Expired => "token expired".to_owned(),
                    TokenError::WrongApp => format!("token was not issued for app {app:?}"),
                    TokenError::BadSignature => "token signature does not match".to_owned(),
                    TokenError::Malformed => "token is malformed".to_owned(),
                },
            }),
        }
    }
}
