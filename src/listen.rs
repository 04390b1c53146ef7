//! `herald listen`: a client on the SDK that prints each push as one JSON
//! line and acks it.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{ArgGroup, Args};
use herald_client::{
    AckMode, AppToken, Backoff, Client, ClientOptions, Dispatch, Event, GatewayAddress, Transport,
};
use herald_proto::NetworkType;

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("gateways")
        .args(["gateway", "dispatch"])
        .required(true)
        .multiple(true)
))]
pub struct ListenArgs {
    /// Gateway address: host:port (plain TCP), or a URL that names the
    /// transport: tcp://host:port, tls://host:port,
    /// ws://host:port/v1/connect or wss://host:port/v1/connect (ws and wss
    /// default to port 80 and 443, and to path /v1/connect). With
    /// --dispatch, the one tried when the dispatcher cannot be reached and
    /// no gateway has worked yet; the dispatcher is asked for gateways of
    /// its transport.
    #[arg(long, value_name = "ADDR", value_parser = gateway_address)]
    gateway: Option<String>,
    /// Use TLS: turns --gateway host:port into tls://host:port, and asks
    /// the dispatcher for tls gateways.
    #[arg(long)]
    tls: bool,
    /// A PEM file of the CA certificates that tls and wss gateways'
    /// certificates must chain to, instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
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

/// Checks a --gateway value, keeping it as written.
fn gateway_address(text: &str) -> Result<String, String> {
    text.parse::<GatewayAddress>()
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
}

/// The gateway (empty with only --dispatch: the SDK then has no fallback
/// gateway) and the transport to ask the dispatcher for.
fn gateway_and_transport(args: &ListenArgs) -> anyhow::Result<(String, Transport)> {
    let gateway = match &args.gateway {
        Some(gateway) if args.tls && gateway.contains("://") => bail!(
            "--tls turns host:port into tls://host:port; {gateway} already names its transport"
        ),
        Some(gateway) if args.tls => format!("tls://{gateway}"),
        Some(gateway) => gateway.clone(),
        None => String::new(),
    };
    let transport = if args.tls {
        Transport::Tls
    } else if gateway.is_empty() {
        Transport::Tcp
    } else {
        gateway.parse::<GatewayAddress>()?.transport()
    };
    Ok((gateway, transport))
}

async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let (gateway, transport) = gateway_and_transport(&args)?;
    if let Some(ca) = &args.ca {
        // Said now rather than at each connection attempt.
        std::fs::metadata(ca).with_context(|| format!("--ca {}", ca.display()))?;
    }
    let mut client = Client::start(ClientOptions {
        gateway,
        dispatch: args.dispatch.clone().map(|url| Dispatch {
            url,
            app: args.app.clone(),
            user: args.user.clone(),
            region: None,
            transport,
        }),
        ca_file: args.ca.clone(),
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
        heartbeat_probe: None,
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
            Event::Transient { app, payload } => {
                // Never stored: no seq and no message id.
                let line = serde_json::json!({
                    "kind": "transient",
                    "app": app,
                    "payload": String::from_utf8_lossy(&payload),
                });
                writeln!(stdout, "{line}")?;
                stdout.flush()?;
            }
            Event::Notified {
                app,
                seq,
                message_id,
                size,
                hint,
            } => {
                // Its body follows as a push once the client pulled it.
                let line = serde_json::json!({
                    "kind": "notify",
                    "app": app,
                    "seq": seq,
                    "message_id": message_id.to_string(),
                    "size": size,
                    "hint": hint,
                });
                writeln!(stdout, "{line}")?;
                stdout.flush()?;
            }
            Event::NotifyGone { app, seq, .. } => {
                eprintln!(
                    "herald listen: the body of app {app:?}'s message {seq} expired before it \
                     was pulled"
                );
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        listen: ListenArgs,
    }

    fn gateway_and_transport_of(flags: &[&str]) -> anyhow::Result<(String, Transport)> {
        let mut argv = vec!["listen", "--app", "a", "--user", "u", "--token", "t"];
        argv.extend(flags);
        gateway_and_transport(&Cli::try_parse_from(argv)?.listen)
    }

    #[test]
    fn the_gateway_names_the_transport_asked_of_the_dispatcher() {
        let cases = [
            (&["--gateway", "h:7070"][..], ("h:7070", Transport::Tcp)),
            (
                &["--gateway", "h:7443", "--tls"],
                ("tls://h:7443", Transport::Tls),
            ),
            (
                &["--gateway", "wss://h/v1/connect", "--dispatch", "http://d"],
                ("wss://h/v1/connect", Transport::Wss),
            ),
            (&["--dispatch", "http://d"], ("", Transport::Tcp)),
            (&["--dispatch", "http://d", "--tls"], ("", Transport::Tls)),
        ];
        for (flags, (gateway, transport)) in cases {
            let answer = gateway_and_transport_of(flags).unwrap();
            assert_eq!(answer, (gateway.to_owned(), transport), "{flags:?}");
        }
    }

    #[test]
    fn tls_takes_only_host_port_and_bad_addresses_are_refused() {
        let error = gateway_and_transport_of(&["--gateway", "tcp://h:1", "--tls"]).unwrap_err();
        assert!(
            error.to_string().contains("already names its transport"),
            "{error}"
        );
        let error = gateway_and_transport_of(&["--gateway", "http://h:1"]).unwrap_err();
        assert!(
            error.to_string().contains("unknown transport \"http\""),
            "{error}"
        );
    }
}
