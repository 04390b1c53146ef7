//! `herald listen`: a client on the SDK that prints each push as one JSON
//! line and acks it.

use std::io::Write as _;
use std::time::Duration;

use anyhow::bail;
use clap::{ArgGroup, Args};
use herald_client::{AckMode, AppToken, Backoff, Client, ClientOptions, Dispatch, Event};
use herald_proto::NetworkType;

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("gateways")
        .args(["gateway", "dispatch"])
        .required(true)
        .multiple(true)
))]
pub struct ListenArgs {
    /// Gateway address, e.g. 127.0.0.1:7070. With --dispatch, the one tried
    /// when the dispatcher cannot be reached and no gateway has worked yet.
    #[arg(long)]
    gateway: Option<String>,
    /// The dispatcher (an API base URL, e.g. http://127.0.0.1:8080): asked
    /// which gateways to try, best first, at start, after a lost connection
    /// and when every gateway it named failed.
    #[arg(long, value_name = "URL")]
    dispatch: Option<String>,
    #[arg(long)]
    app: String,
    /// The user the token was issued to (checked against the server's answer).
    #[arg(long)]
    user: String,
    #[arg(long)]
    token: String,
    /// This device's id; the server keeps an ack cursor per device.
    #[arg(long, default_value = "cli")]
    device: String,
}

pub fn run(args: ListenArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(listen(args))
}

async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let mut client = Client::start(ClientOptions {
        // Empty with only --dispatch: the SDK then has no fallback gateway.
        gateway: args.gateway.clone().unwrap_or_default(),
        dispatch: args.dispatch.clone().map(|url| Dispatch {
            url,
            app: args.app.clone(),
            user: args.user.clone(),
            region: None,
        }),
        device_id: args.device.clone(),
        network: NetworkType::Wired,
        client_version: concat!("herald-listen/", env!("CARGO_PKG_VERSION")).to_owned(),
        apps: vec![AppToken {
            app: args.app.clone(),
            token: args.token.clone(),
            tags: Vec::new(),
        }],
        ack_mode: AckMode::Auto,
        reconnect: Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        },
        connect_timeout: Duration::from_secs(10),
    });
    let mut stdout = std::io::stdout();
    while let Some(event) = client.next_event().await {
        match event {
            event @ (Event::Push(_) | Event::Broadcast(_)) => {
                // A broadcast's seq counts the app's broadcasts, not the inbox.
                let (kind, push) = match event {
                    Event::Broadcast(push) => ("broadcast", push),
                    Event::Push(push) => ("push", push),
                    _ => unreachable!("matched above"),
                };
                let line = serde_json::json!({
                    "kind": kind,
                    "app": push.app,
                    "seq": push.seq,
                    "message_id": push.message_id.to_string(),
                    "payload": String::from_utf8_lossy(&push.payload),
                });
                writeln!(stdout, "{line}")?;
                stdout.flush()?;
            }
            Event::Connected { gateway, .. } => {
                eprintln!("herald listen: connected to {gateway}");
            }
            Event::DispatchFailed { error } => {
                eprintln!("herald listen: cannot ask the dispatcher ({error})");
            }
            Event::Bound { app, user } => {
                if user != args.user {
                    eprintln!(
                        "herald listen: warning: the token is for user {user:?}, not {:?}",
                        args.user
                    );
                }
                eprintln!("herald listen: bound app {app:?} as user {user:?}");
            }
            Event::Disconnected {
                error,
                reconnect_in,
            } => {
                eprintln!(
                    "herald listen: disconnected ({error}); reconnecting in {reconnect_in:?}"
                );
            }
            Event::Reset {
                app,
                sequence,
                after,
            } => {
                eprintln!(
                    "herald listen: the server holds less of app {app:?}'s {} than this \
                     client had (its data was reset or restored); resuming after seq {after}",
                    sequence.as_str()
                );
            }
            Event::Closed(terminal) => bail!("{terminal}"),
            _ => {}
        }
    }
    Ok(())
}
