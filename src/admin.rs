//! `herald admin`: the admin API from the command line. Each command is one
//! call; it prints the reply's JSON, or the error's JSON on stderr with a
//! failing exit status.

use anyhow::Context;
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The HTTP API of any node, e.g. http://127.0.0.1:8080.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// The `[admin] api_key` of the config.
    #[arg(long, env = "HERALD_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCommand {
    /// Apps: create, list, get, update, rotate, delete.
    #[command(subcommand)]
    Apps(AppsCommand),
}

#[derive(Debug, clap::Subcommand)]
enum AppsCommand {
    /// Create an app; prints its API key, token secret and webhook secret
    /// (shown only now).
    Create {
        /// 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'.
        id: String,
        #[arg(long)]
        default_ttl_secs: Option<u64>,
        #[arg(long)]
        max_connections: Option<u32>,
        /// More settings as a JSON object (push_rate, broadcast_rate,
        /// webhooks, webhook_rate), e.g. '{"push_rate": {"per_sec": 100, "burst": 200}}'.
        #[arg(long)]
        settings: Option<String>,
    },
    /// Every app's settings (no secrets).
    List,
    /// One app's settings (no secrets).
    Get { id: String },
    /// Change an app's settings: a JSON object of the fields to change
    /// (`null` removes a limit).
    Update {
        id: String,
        #[arg(long)]
        settings: String,
    },
    /// A new value of a secret; the old one works for --grace-secs more.
    Rotate {
        id: String,
        /// api_key, token_secret or webhook_secret.
        #[arg(long)]
        what: String,
        #[arg(long, default_value_t = 0)]
        grace_secs: u64,
    },
    /// Delete an app: bound clients are unbound, its messages deleted.
    Delete { id: String },
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(call(args))
}

fn json_object(text: &str, what: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        _ => anyhow::bail!("{what} must be a JSON object, like '{{\"max_connections\": 1000}}'"),
    }
}

async fn call(args: AdminArgs) -> anyhow::Result<()> {
    let api = args.api.trim_end_matches('/');
    let apps = format!("{api}/v1/admin/apps");
    let client = reqwest::Client::new();
    let request = match args.command {
        AdminCommand::Apps(AppsCommand::Create {
            id,
            default_ttl_secs,
            max_connections,
            settings,
        }) => {
            let mut body = match settings {
                Some(text) => json_object(&text, "--settings")?,
                None => serde_json::Map::new(),
            };
            body.insert("id".into(), json!(id));
            if let Some(ttl) = default_ttl_secs {
                body.insert("default_ttl_secs".into(), json!(ttl));
            }
            if let Some(max) = max_connections {
                body.insert("max_connections".into(), json!(max));
            }
            client.post(apps).json(&body)
        }
        AdminCommand::Apps(AppsCommand::List) => client.get(apps),
        AdminCommand::Apps(AppsCommand::Get { id }) => client.get(format!("{apps}/{id}")),
        AdminCommand::Apps(AppsCommand::Update { id, settings }) => client
            .patch(format!("{apps}/{id}"))
            .json(&json_object(&settings, "--settings")?),
        AdminCommand::Apps(AppsCommand::Rotate {
            id,
            what,
            grace_secs,
        }) => client
            .post(format!("{apps}/{id}/rotate"))
            .json(&json!({ "what": what, "grace_secs": grace_secs })),
        AdminCommand::Apps(AppsCommand::Delete { id }) => client.delete(format!("{apps}/{id}")),
    };
    let response = request
        .bearer_auth(&args.admin_key)
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {api}"))?;
    let status = response.status();
    let text = response.text().await.context("the API's reply broke off")?;
    let shown = match serde_json::from_str::<Value>(&text) {
        Ok(value) => serde_json::to_string_pretty(&value).expect("JSON values print"),
        Err(_) => text,
    };
    if status.is_success() {
        println!("{shown}");
        Ok(())
    } else {
        eprintln!("{shown}");
        anyhow::bail!("the API answered {status}")
    }
}
