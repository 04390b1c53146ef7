//! Apps at runtime: the table every API call, token check and webhook call
//! reads, kept from the database's `apps` table.
//!
//! The admin API changes an app in the database first and then reloads
//! the table; so does every other node, when told (a publish, in a
//! cluster) or on its periodic reload. A reload keeps each unchanged
//! app's `Arc<App>` (and its token buckets) and sends the new table to
//! whoever watches it (the gateway's shards, the coordinator).
//!
//! An app's secrets (API keys, token secrets, webhook signing secrets) are
//! each a current value plus the values a rotation retired, each honoured
//! until its grace ends.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_proto::ids::AppId;
use herald_proto::limits::ROUTE_LEN_MAX;
use herald_storage::{Saver, StorageError, StoredApp};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::clock::unix_ms;
use crate::coordinator::{AppWebhooks, WebhookRoute};
use crate::flow::{Rate, SharedBucket};

/// Longest app id: it names Redis keys and is stored in every row.
pub const APP_ID_LEN_MAX: usize = 64;

/// Most apps a deployment holds: every node keeps every app in memory and
/// reads them all on a reload.
pub const APPS_MAX: usize = 10_000;

/// Longest grace a rotation may give the retired secret: a week.
pub const GRACE_SECS_MAX: u64 = 7 * 24 * 3600;

/// Most webhook routes an app may have.
pub const WEBHOOK_ROUTES_MAX: usize = 16;

/// Largest `max_connections`.
pub const MAX_CONNECTIONS_MAX: u32 = 100_000_000;

/// Shortest API key or token secret an operator may set in the config
/// file (generated ones are 64 hex characters).
pub const SECRET_LEN_MIN: usize = 16;

/// An app id is 1 to 64 characters of A-Z, a-z, 0-9, `-`, `_`, `.`.
pub fn check_app_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= APP_ID_LEN_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "app id {id:?} must be 1 to {APP_ID_LEN_MAX} characters of A-Z, a-z, 0-9, '-', '_', '.'"
        ))
    }
}

/// A token bucket's settings: `{"per_sec": 100, "burst": 200}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: u32,
}

impl RateLimit {
    pub fn rate(self) -> Rate {
        Rate {
            per_sec: self.per_sec,
            burst: self.burst,
        }
    }

    fn check(self, name: &str) -> Result<(), String> {
        if self.per_sec > 0.0 && self.per_sec.is_finite() && self.burst >= 1 {
            Ok(())
        } else {
            Err(format!(
                "{name} needs per_sec above 0 and burst of at least 1"
            ))
        }
    }
}

/// What an app is, apart from its secrets: stored as JSON in `apps.settings`
/// and shown by the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    pub default_ttl_secs: u64,
    /// Pushes a second (a multicast counts each user); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_rate: Option<RateLimit>,
    /// Broadcasts a second; none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast_rate: Option<RateLimit>,
    #[serde(default)]
    pub webhooks: Vec<WebhookRoute>,
    /// Webhook calls a second; none: as fast as they come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_rate: Option<RateLimit>,
    /// Connections that may have the app bound at once, on each gateway
    /// node; none: no limit but the gateway's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl AppSettings {
    /// Checks every field; `ttl_secs_max` is the API's.
    pub fn check(&self, ttl_secs_max: u64) -> Result<(), String> {
        if self.default_ttl_secs == 0 || self.default_ttl_secs > ttl_secs_max {
            return Err(format!(
                "default_ttl_secs must be 1 to {ttl_secs_max} (the API's ttl_secs_max)"
            ));
        }
        for (name, rate) in [
            ("push_rate", self.push_rate),
            ("broadcast_rate", self.broadcast_rate),
            ("webhook_rate", self.webhook_rate),
        ] {
            if let Some(rate) = rate {
                rate.check(name)?;
            }
        }
        if let Some(max) = self.max_connections
            && !(1..=MAX_CONNECTIONS_MAX).contains(&max)
        {
            return Err(format!(
                "max_connections must be 1 to {MAX_CONNECTIONS_MAX}"
            ));
        }
        check_webhook_routes(&self.webhooks)
    }
}

/// Checks an app's webhook routes: how many, each name (unique) and URL,
/// and that each takes some event.
pub fn check_webhook_routes(routes: &[WebhookRoute]) -> Result<(), String> {
    if routes.len() > WEBHOOK_ROUTES_MAX {
        return Err(format!(
            "an app has at most {WEBHOOK_ROUTES_MAX} webhook routes"
        ));
    }
    let mut names = HashSet::new();
    for route in routes {
        let name = &route.route;
        let valid_name = !name.is_empty()
            && name.len() <= ROUTE_LEN_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_name {
            return Err(format!(
                "webhook route {name:?} must be 1 to {ROUTE_LEN_MAX} characters \
                 of A-Z, a-z, 0-9, '-', '_', '.'"
            ));
        }
        if !names.insert(name) {
            return Err(format!("webhook route {name:?} is defined twice"));
        }
        let url = &route.url;
        let host = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        if host.is_none_or(|rest| rest.is_empty() || rest.starts_with('/')) {
            return Err(format!(
                "webhook route {name:?} has URL {url:?}; a webhook URL must be \
                 http://host[:port]/path or https://host[:port]/path"
            ));
        }
        if route.events.is_empty() {
            return Err(format!("webhook route {name:?} takes no events"));
        }
    }
    Ok(())
}

/// Which of an app's secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    /// What business servers send as `Authorization: Bearer`.
    ApiKey,
    /// What client tokens are signed with.
    TokenSecret,
    /// What webhook calls are signed with.
    WebhookSecret,
}

impl SecretKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::ApiKey => "api_key",
            SecretKind::TokenSecret => "token_secret",
            SecretKind::WebhookSecret => "webhook_secret",
        }
    }
}

/// One value of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretValue {
    pub value: String,
    /// For a value a rotation retired: when its grace ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retires_at_ms: Option<u64>,
}

/// A secret: its current value first, then retired values still in their
/// grace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(Vec<SecretValue>);

impl Secret {
    fn new(value: String) -> Secret {
        Secret(vec![SecretValue {
            value,
            retires_at_ms: None,
        }])
    }

    pub fn current(&self) -> &str {
        &self.0[0].value
    }

    /// The values honoured at `now_ms`, the current one first.
    pub fn valid_at(&self, now_ms: u64) -> impl Iterator<Item = &SecretValue> {
        self.0
            .iter()
            .filter(move |value| value.retires_at_ms.is_none_or(|at| at > now_ms))
    }

    /// Whether `candidate` is a value honoured at `now_ms`, in time
    /// independent of where they differ.
    pub fn accepts(&self, candidate: &[u8], now_ms: u64) -> bool {
        self.valid_at(now_ms).fold(false, |found, value| {
            found | constant_time_eq(candidate, value.value.as_bytes())
        })
    }

    /// `value` becomes current; the old current one is honoured for
    /// `grace` more, values whose grace has ended are dropped.
    fn rotate(&mut self, value: String, grace: Duration, now_ms: u64) {
        let mut values = vec![SecretValue {
            value,
            retires_at_ms: None,
        }];
        for (i, old) in self.0.drain(..).enumerate() {
            let retires_at_ms = if i == 0 {
                Some(now_ms + grace.as_millis() as u64)
            } else {
                old.retires_at_ms
            };
            if retires_at_ms.is_some_and(|at| at > now_ms) {
                values.push(SecretValue {
                    value: old.value,
                    retires_at_ms,
                });
            }
        }
        self.0 = values;
    }

    /// Makes `value` current at once, retiring no other: what the config
    /// file says wins over what the database held.
    fn set(&mut self, value: &str) {
        if self.current() != value {
            *self = Secret::new(value.to_owned());
        }
    }
}

/// Equal bytes, in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An app's secrets, stored as JSON in `apps.secrets`, never shown after
/// they are made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSecrets {
    pub api_key: Secret,
    pub token_secret: Secret,
    pub webhook_secret: Secret,
}

impl AppSecrets {
    fn generated() -> AppSecrets {
        AppSecrets {
            api_key: Secret::new(random_secret()),
            token_secret: Secret::new(random_secret()),
            webhook_secret: Secret::new(random_secret()),
        }
    }

    fn get_mut(&mut self, kind: SecretKind) -> &mut Secret {
        match kind {
            SecretKind::ApiKey => &mut self.api_key,
            SecretKind::TokenSecret => &mut self.token_secret,
            SecretKind::WebhookSecret => &mut self.webhook_secret,
        }
    }
}

/// 32 random bytes as 64 hex characters.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An app as the nodes run it.
#[derive(Debug)]
pub struct App {
    /// Shared by every delivery and binding of the app.
    pub id: AppId,
    pub settings: AppSettings,
    pub secrets: AppSecrets,
    /// The database row's version this was made from.
    pub version: u64,
    pub push_bucket: Option<Arc<SharedBucket>>,
    pub broadcast_bucket: Option<Arc<SharedBucket>>,
}

impl App {
    /// The app's webhooks as the coordinator takes them at `now_ms`; none
    /// for an app without routes.
    pub fn webhooks(&self, now_ms: u64) -> Option<AppWebhooks> {
        (!self.settings.webhooks.is_empty()).then(|| AppWebhooks {
            routes: self.settings.webhooks.clone(),
            secrets: self
                .secrets
                .webhook_secret
                .valid_at(now_ms)
                .map(|value| value.value.clone())
                .collect(),
            rate: self.settings.webhook_rate.map(RateLimit::rate),
        })
    }

    /// When retired secrets' graces end: the table is sent out again
    /// then, so that the values stop working everywhere.
    fn retirements_ms(&self) -> impl Iterator<Item = u64> + '_ {
        [
            &self.secrets.api_key,
            &self.secrets.token_secret,
            &self.secrets.webhook_secret,
        ]
        .into_iter()
        .flat_map(|secret| secret.0.iter().filter_map(|value| value.retires_at_ms))
    }
}

/// The apps by id.
pub type AppTable = HashMap<AppId, Arc<App>>;

/// An app as `[[apps]]` in the config file gives it: created at startup, or
/// updated to what the file says.
#[derive(Debug, Clone)]
pub struct FileApp {
    pub id: String,
    pub api_key: String,
    pub token_secret: String,
    /// None: the database's (or a generated one, for a new app).
    pub webhook_secret: Option<String>,
    pub settings: AppSettings,
}

/// What a created app's caller is shown, once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedApp {
    pub id: String,
    pub api_key: String,
    pub token_secret: String,
    pub webhook_secret: String,
}

/// A change the admin API asks for: only the fields given change. An
/// optional field given as `null` is removed.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppPatch {
    pub default_ttl_secs: Option<u64>,
    #[serde(default, with = "double_option")]
    pub push_rate: Option<Option<RateLimit>>,
    #[serde(default, with = "double_option")]
    pub broadcast_rate: Option<Option<RateLimit>>,
    pub webhooks: Option<Vec<WebhookRoute>>,
    #[serde(default, with = "double_option")]
    pub webhook_rate: Option<Option<RateLimit>>,
    #[serde(default, with = "double_option")]
    pub max_connections: Option<Option<u32>>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value.
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
    where
        T: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

impl AppPatch {
    fn apply(self, settings: &mut AppSettings) {
        if let Some(ttl) = self.default_ttl_secs {
            settings.default_ttl_secs = ttl;
        }
        if let Some(rate) = self.push_rate {
            settings.push_rate = rate;
        }
        if let Some(rate) = self.broadcast_rate {
            settings.broadcast_rate = rate;
        }
        if let Some(webhooks) = self.webhooks {
            settings.webhooks = webhooks;
        }
        if let Some(rate) = self.webhook_rate {
            settings.webhook_rate = rate;
        }
        if let Some(max) = self.max_connections {
            settings.max_connections = max;
        }
    }
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("an app {0:?} exists (or is still being deleted)")]
    Exists(String),
    #[error("no app {0:?}")]
    Unknown(String),
    #[error("this deployment already has {APPS_MAX} apps")]
    TooMany,
    #[error("the app changed on another node at the same time, again and again")]
    Contended,
    #[error("the app's stored record is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Times a change is tried against a version another node changed under
/// it, before giving up.
const UPDATE_ATTEMPTS_MAX: usize = 8;

/// The apps, from the database, and who is told of changes.
pub struct Apps {
    saver: Saver,
    ttl_secs_max: u64,
    table: watch::Sender<Arc<AppTable>>,
    /// One reload at a time, so a slow one never overwrites a newer one;
    /// it holds when the last one read (unix ms).
    reloading: tokio::sync::Mutex<u64>,
    /// Apps whose rows this node is deleting.
    purging: Mutex<HashSet<String>>,
    /// Called after this node changed an app: in a cluster, tells the
    /// other nodes to reload.
    announce: Box<dyn Fn() + Send + Sync>,
}

impl Apps {
    /// Loads the apps the database holds, creating or updating those of
    /// the config file first, and goes on deleting the rows of apps
    /// deleted before.
    pub async fn open(
        saver: Saver,
        ttl_secs_max: u64,
        file_apps: Vec<FileApp>,
        announce: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Arc<Apps>, AdminError> {
        let (table, _) = watch::channel(Arc::new(AppTable::new()));
        let apps = Arc::new(Apps {
            saver,
            ttl_secs_max,
            table,
            reloading: tokio::sync::Mutex::new(0),
            purging: Mutex::default(),
            announce,
        });
        apps.put_file_apps(file_apps).await?;
        for stored in apps.saver.apps().await? {
            if stored.deleted_at_ms.is_some() {
                apps.purge_in_background(stored.id);
            }
        }
        Ok(apps)
    }

    /// Creates the config file's apps, or makes the stored ones what the
    /// file says (its rates, limits, secrets and webhooks), then takes the
    /// table as it now is and tells the other nodes.
    pub async fn put_file_apps(&self, file_apps: Vec<FileApp>) -> Result<(), AdminError> {
        for file_app in file_apps {
            self.put_file_app(file_app).await?;
        }
        self.reload().await?;
        (self.announce)();
        Ok(())
    }

    /// The apps now.
    pub fn table(&self) -> Arc<AppTable> {
        self.table.borrow().clone()
    }

    /// The table now and after every change.
    pub fn watch(&self) -> watch::Receiver<Arc<AppTable>> {
        self.table.subscribe()
    }

    /// Reads every app from the database and, if anything changed (or a
    /// retired secret's grace ended), makes that the table.
    pub async fn reload(&self) -> Result<(), AdminError> {
        let mut last_read_ms = self.reloading.lock().await;
        let now = Instant::now();
        let now_ms = unix_ms();
        let stored = self.saver.apps().await?;
        let old = self.table();
        let mut table = AppTable::with_capacity(stored.len());
        let mut changed = false;
        for row in stored {
            if row.deleted_at_ms.is_some() {
                continue;
            }
            let kept = old
                .get(row.id.as_str())
                .filter(|app| app.version == row.version)
                .cloned();
            let app = match kept {
                Some(app) => app,
                None => {
                    changed = true;
                    match parse(&row, old.get(row.id.as_str()), now) {
                        Ok(app) => Arc::new(app),
                        Err(error) => {
                            // One unreadable row must not take every app
                            // down: keep what this node had, if anything.
                            tracing::error!(app = %row.id, %error, "cannot read a stored app");
                            match old.get(row.id.as_str()) {
                                Some(app) => app.clone(),
                                None => continue,
                            }
                        }
                    }
                }
            };
            table.insert(app.id.clone(), app);
        }
        changed |= table.len() != old.len();
        // A grace that ended since the last read changes what the table
        // honours, though no row changed.
        let retired_since_last_read = |app: &Arc<App>| {
            app.retirements_ms()
                .any(|at| *last_read_ms < at && at <= now_ms)
        };
        changed |= table.values().any(retired_since_last_read);
        *last_read_ms = now_ms;
        if changed {
            self.table.send_replace(Arc::new(table));
        }
        Ok(())
    }

    /// Creates an app with generated secrets.
    pub async fn create(&self, id: &str, settings: AppSettings) -> Result<CreatedApp, AdminError> {
        check_app_id(id).map_err(AdminError::Invalid)?;
        settings
            .check(self.ttl_secs_max)
            .map_err(AdminError::Invalid)?;
        if self.saver.apps().await?.len() >= APPS_MAX {
            return Err(AdminError::TooMany);
        }
        let secrets = AppSecrets::generated();
        if !self
            .saver
            .create_app(id, &to_json(&settings), &to_json(&secrets))
            .await?
        {
            return Err(AdminError::Exists(id.to_owned()));
        }
        self.changed().await?;
        Ok(CreatedApp {
            id: id.to_owned(),
            api_key: secrets.api_key.current().to_owned(),
            token_secret: secrets.token_secret.current().to_owned(),
            webhook_secret: secrets.webhook_secret.current().to_owned(),
        })
    }

    /// Changes what the patch gives; returns the app's settings after.
    pub async fn update(&self, id: &str, patch: AppPatch) -> Result<AppSettings, AdminError> {
        self.change(id, |settings, _| {
            patch.clone().apply(settings);
            Ok(())
        })
        .await
        .map(|(settings, _)| settings)
    }

    /// Makes a new value of the secret current; the old one is honoured
    /// for `grace` more. Returns the new value.
    pub async fn rotate(
        &self,
        id: &str,
        kind: SecretKind,
        grace: Duration,
    ) -> Result<String, AdminError> {
        if grace.as_secs() > GRACE_SECS_MAX {
            return Err(AdminError::Invalid(format!(
                "grace_secs must be 0 to {GRACE_SECS_MAX}"
            )));
        }
        let value = random_secret();
        self.change(id, |_, secrets| {
            secrets
                .get_mut(kind)
                .rotate(value.clone(), grace, unix_ms());
            Ok(())
        })
        .await?;
        Ok(value)
    }

    /// Deletes an app: at once for every node (no new binds or calls), its
    /// stored rows in the background.
    pub async fn delete(&self, id: &str) -> Result<(), AdminError> {
        if !self.saver.mark_app_deleted(id, unix_ms()).await? {
            return Err(AdminError::Unknown(id.to_owned()));
        }
        self.changed().await?;
        self.purge_in_background(id.to_owned());
        Ok(())
    }

    /// Reads the app, lets `edit` change it, and writes it if no other
    /// change came in between (else reads again).
    async fn change(
        &self,
        id: &str,
        edit: impl Fn(&mut AppSettings, &mut AppSecrets) -> Result<(), AdminError>,
    ) -> Result<(AppSettings, AppSecrets), AdminError> {
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            let stored = self
                .saver
                .apps()
                .await?
                .into_iter()
                .find(|app| app.id == id && app.deleted_at_ms.is_none())
                .ok_or_else(|| AdminError::Unknown(id.to_owned()))?;
            let (mut settings, mut secrets) = parse_json(&stored)?;
            edit(&mut settings, &mut secrets)?;
            settings
                .check(self.ttl_secs_max)
                .map_err(AdminError::Invalid)?;
            if self
                .saver
                .update_app(id, &to_json(&settings), &to_json(&secrets), stored.version)
                .await?
            {
                self.changed().await?;
                return Ok((settings, secrets));
            }
        }
        Err(AdminError::Contended)
    }

    /// Creates a config file's app, or makes the stored one what the file
    /// says.
    async fn put_file_app(&self, file_app: FileApp) -> Result<(), AdminError> {
        check_app_id(&file_app.id).map_err(AdminError::Invalid)?;
        file_app
            .settings
            .check(self.ttl_secs_max)
            .map_err(|error| AdminError::Invalid(format!("app {:?}: {error}", file_app.id)))?;
        let secrets = AppSecrets {
            api_key: Secret::new(file_app.api_key.clone()),
            token_secret: Secret::new(file_app.token_secret.clone()),
            webhook_secret: Secret::new(
                file_app
                    .webhook_secret
                    .clone()
                    .unwrap_or_else(random_secret),
            ),
        };
        if self
            .saver
            .create_app(
                &file_app.id,
                &to_json(&file_app.settings),
                &to_json(&secrets),
            )
            .await?
        {
            return Ok(());
        }
        self.change(&file_app.id, |settings, stored_secrets| {
            *settings = file_app.settings.clone();
            stored_secrets.api_key.set(&file_app.api_key);
            stored_secrets.token_secret.set(&file_app.token_secret);
            if let Some(webhook_secret) = &file_app.webhook_secret {
                stored_secrets.webhook_secret.set(webhook_secret);
            }
            Ok(())
        })
        .await
        .map_err(|error| match error {
            // Deleted through the API and not yet purged: the file cannot
            // bring it back until it is.
            AdminError::Unknown(id) => AdminError::Exists(id),
            other => other,
        })?;
        Ok(())
    }

    /// Reloads this node and tells the others.
    async fn changed(&self) -> Result<(), AdminError> {
        self.reload().await?;
        (self.announce)();
        Ok(())
    }

    fn purge_in_background(&self, id: String) {
        if !self
            .purging
            .lock()
            .expect("purging lock")
            .insert(id.clone())
        {
            return;
        }
        let saver = self.saver.clone();
        tokio::spawn(async move {
            // Until it is done: the id stays taken until then.
            let mut wait = Duration::from_secs(1);
            loop {
                match saver.purge_app(&id).await {
                    Ok(rows) => {
                        tracing::info!(app = %id, rows, "deleted app's rows are gone");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(app = %id, %error, "deleting an app's rows failed; will retry");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(60));
                    }
                }
            }
        });
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("settings and secrets serialize")
}

fn parse_json(row: &StoredApp) -> Result<(AppSettings, AppSecrets), AdminError> {
    let settings = serde_json::from_str(&row.settings)
        .map_err(|error| AdminError::Corrupt(format!("app {:?} settings: {error}", row.id)))?;
    let secrets = serde_json::from_str(&row.secrets)
        .map_err(|error| AdminError::Corrupt(format!("app {:?} secrets: {error}", row.id)))?;
    Ok((settings, secrets))
}

/// Builds the app a row holds, keeping the old one's token buckets where
/// its rates did not change.
fn parse(row: &StoredApp, old: Option<&Arc<App>>, now: Instant) -> Result<App, AdminError> {
    let (settings, secrets) = parse_json(row)?;
    let bucket =
        |rate: Option<RateLimit>, old_rate: Option<RateLimit>, old: Option<&Arc<SharedBucket>>| {
            let rate = rate?;
            match old {
                Some(bucket) if old_rate == Some(rate) => Some(bucket.clone()),
                _ => Some(Arc::new(SharedBucket::new(rate.rate(), now))),
            }
        };
    Ok(App {
        id: old.map_or_else(|| AppId::from(row.id.as_str()), |old| old.id.clone()),
        push_bucket: bucket(
            settings.push_rate,
            old.and_then(|old| old.settings.push_rate),
            old.and_then(|old| old.push_bucket.as_ref()),
        ),
        broadcast_bucket: bucket(
            settings.broadcast_rate,
            old.and_then(|old| old.settings.broadcast_rate),
            old.and_then(|old| old.broadcast_bucket.as_ref()),
        ),
        settings,
        secrets,
        version: row.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_secret_is_honoured_until_its_grace_ends() {
        let mut secret = Secret::new("old".into());
        secret.rotate("new".into(), Duration::from_secs(10), 1_000);
        assert_eq!(secret.current(), "new");
        assert!(secret.accepts(b"new", 1_000));
        assert!(secret.accepts(b"old", 10_999));
        assert!(!secret.accepts(b"old", 11_000));
        assert!(!secret.accepts(b"other", 1_000));
        // A second rotation drops what already retired, keeps what has not.
        secret.rotate("newer".into(), Duration::from_secs(10), 5_000);
        let values: Vec<&str> = secret.0.iter().map(|v| v.value.as_str()).collect();
        assert_eq!(values, ["newer", "new", "old"]);
        // Without grace the old current value goes at once; "new" is
        // still in its grace, "old" no more.
        secret.rotate("newest".into(), Duration::ZERO, 12_000);
        let values: Vec<&str> = secret.valid_at(12_000).map(|v| v.value.as_str()).collect();
        assert_eq!(values, ["newest", "new"]);
        assert!(!secret.accepts(b"newer", 12_000));
    }

    #[test]
    fn settings_out_of_range_are_refused_with_the_field_named() {
        let ok = AppSettings {
            default_ttl_secs: 60,
            push_rate: None,
            broadcast_rate: None,
            webhooks: Vec::new(),
            webhook_rate: None,
            max_connections: None,
        };
        assert_eq!(ok.check(3600), Ok(()));
        let refused = |settings: AppSettings| settings.check(3600).unwrap_err();
        assert!(
            refused(AppSettings {
                default_ttl_secs: 0,
                ..ok.clone()
            })
            .contains("default_ttl_secs")
        );
        assert!(
            refused(AppSettings {
                default_ttl_secs: 3601,
                ..ok.clone()
            })
            .contains("default_ttl_secs")
        );
        assert!(
            refused(AppSettings {
                push_rate: Some(RateLimit {
                    per_sec: 0.0,
                    burst: 1
                }),
                ..ok.clone()
            })
            .contains("push_rate")
        );
        assert!(
            refused(AppSettings {
                max_connections: Some(0),
                ..ok.clone()
            })
            .contains("max_connections")
        );
        let route = |url: &str| WebhookRoute {
            route: "orders".into(),
            url: url.into(),
            events: vec![crate::coordinator::WebhookEvent::Upstream],
        };
        assert!(
            refused(AppSettings {
                webhooks: vec![route("ftp://x")],
                ..ok.clone()
            })
            .contains("http")
        );
        assert!(
            refused(AppSettings {
                webhooks: vec![route("http://")],
                ..ok.clone()
            })
            .contains("http")
        );
        assert!(
            refused(AppSettings {
                webhooks: vec![route("http://a"), route("https://b")],
                ..ok.clone()
            })
            .contains("twice")
        );
        assert_eq!(
            AppSettings {
                webhooks: vec![route("https://biz.example/herald")],
                ..ok.clone()
            }
            .check(3600),
            Ok(())
        );
    }

    #[test]
    fn a_patch_changes_only_what_it_names_and_null_removes() {
        let mut settings = AppSettings {
            default_ttl_secs: 60,
            push_rate: Some(RateLimit {
                per_sec: 5.0,
                burst: 5,
            }),
            broadcast_rate: Some(RateLimit {
                per_sec: 1.0,
                burst: 1,
            }),
            webhooks: Vec::new(),
            webhook_rate: None,
            max_connections: Some(10),
        };
        let patch: AppPatch =
            serde_json::from_str(r#"{"push_rate": null, "max_connections": 20}"#).unwrap();
        patch.apply(&mut settings);
        assert_eq!(settings.push_rate, None);
        assert_eq!(
            settings.broadcast_rate,
            Some(RateLimit {
                per_sec: 1.0,
                burst: 1
            })
        );
        assert_eq!(settings.max_connections, Some(20));
        assert_eq!(settings.default_ttl_secs, 60);
        assert!(serde_json::from_str::<AppPatch>(r#"{"colour": 1}"#).is_err());
    }
}
