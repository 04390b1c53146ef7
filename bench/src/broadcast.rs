//! The `broadcast` scenario: one 256-byte message to N connected clients,
//! through Herald (its broadcast API), Mosquitto (one topic, N subscribers)
//! and the NATS server (one subject, N subscribers), in the same run, with
//! the same N and payload; and through `bare` acceptors that send it with
//! one send(2) per socket and nothing else, the kernel's floor on this
//! machine. It reports the receipt latency percentiles, the time from the
//! send to the last receipt, the servers' peak memory during the fan-out
//! against idle, and the CPU time servers and load generator used.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ChildStdin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::pool::{Clients, Workers};
use crate::procfs::PeakSampler;
use crate::systems::Server;
use crate::transport::{Transport, row_name};
use crate::worker::{Target, mqtt_connect};
use crate::{
    Common, now_nanos, percentiles, rows_to_measure, settle_after_teardown, start_servers,
    total_rss,
};

/// The payload size every system sends.
const PAYLOAD_LEN: usize = 256;
/// The MQTT topic and NATS subject the peers' clients subscribe to.
const TOPIC: &str = "bench";
/// How long the last receipt may take before the run counts the rest as
/// lost: 60 s, or 1 s per 2,000 clients (on two cores with the load
/// generator beside the servers, a push to each of 300,000 clients took
/// 35 s, a broadcast 9 s: this leaves room for a slower, busier day).
pub fn receipt_deadline(connections: u64) -> Duration {
    Duration::from_secs(60.max(connections / 2_000))
}
/// How often the servers' memory is read during the fan-out.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(5);

/// The payload: the send time (unix ns) first, as the workers expect.
pub fn payload(sent_nanos: u128) -> Vec<u8> {
    crate::payload::timestamped(sent_nanos, PAYLOAD_LEN)
}

pub async fn broadcast(common: &Common) -> anyhow::Result<Value> {
    let mut rows = serde_json::Map::new();
    let mut failures_total = 0;
    let (measured, skipped) = rows_to_measure(common);
    for (name, target, transport) in measured {
        let dir = tempfile::tempdir()?;
        let mut servers = start_servers(common, name, target, transport, dir.path())?;
        let name = if target == Target::Herald && common.no_broadcast_ack {
            row_name(transport, &format!("{name}-unacked"))
        } else {
            row_name(transport, name)
        };
        let row = fan_out(common, target, transport, &mut servers, &name).await?;
        failures_total += row["failures_total"].as_u64().unwrap_or(0);
        rows.insert(name, row);
        drop(servers);
        settle_after_teardown();
    }
    add_ratios(&mut rows);
    Ok(json!({
        "payload_bytes": PAYLOAD_LEN,
        "servers": rows,
        "skipped": skipped,
        "failures_total": failures_total,
    }))
}

/// The floors a server's time to the last receipt is compared with, when
/// they ran: the kernel's with one send(2) per socket, with io_uring
/// sends, and with clients that reply as Herald's ack.
pub const FLOORS: [&str; 3] = ["bare", "bare-uring", "bare-acked"];

/// Each row's time to the last receipt over the same system's over tcp,
/// and every server's over each of the [`FLOORS`] measured in the run.
fn add_ratios(rows: &mut serde_json::Map<String, Value>) {
    let names: Vec<String> = rows.keys().cloned().collect();
    for floor in FLOORS {
        let Some(floor_ms) = rows
            .get(floor)
            .and_then(|row| row["ms_to_last_receipt"].as_f64())
        else {
            continue;
        };
        for name in names.iter().filter(|name| !name.starts_with("bare")) {
            let row = rows.get_mut(name).expect("listed");
            if let Some(ms) = row["ms_to_last_receipt"].as_f64() {
                row[format!("last_receipt_over_{floor}")] =
                    json!(ms / floor_ms.max(f64::MIN_POSITIVE));
            }
        }
    }
    for name in names {
        let Some((system, transport)) = name.rsplit_once('-') else {
            continue;
        };
        if !matches!(transport, "tls" | "ws" | "wss") {
            continue;
        }
        let Some(tcp) = rows
            .get(system)
            .and_then(|row| row["ms_to_last_receipt"].as_f64())
        else {
            continue;
        };
        let row = rows.get_mut(&name).expect("listed");
        if let Some(ms) = row["ms_to_last_receipt"].as_f64() {
            row["last_receipt_over_tcp"] = json!(ms / tcp.max(f64::MIN_POSITIVE));
        }
    }
}

async fn fan_out(
    common: &Common,
    target: Target,
    transport: Transport,
    servers: &mut [Server],
    label: &str,
) -> anyhow::Result<Value> {
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let creds = common.creds()?;
    let mut workers = Workers::start(&Clients {
        subscribe: matches!(target, Target::Mqtt | Target::Nats).then_some(TOPIC),
        ack_broadcasts: match target {
            Target::Bare => label == "bare-acked",
            _ => !common.no_broadcast_ack,
        },
        ..common.clients(target, transport, &creds, &addrs)
    })?;
    workers.wait_all_up(crate::pool::ramp_timeout(common.connections), label)?;
    let tls = match transport.uses_tls() {
        true => Some(crate::transport::client_config(
            common.ca_file().context("no CA file")?,
        )?),
        false => None,
    };
    let mut publishers = Publishers::connect(target, servers, tls)?;
    // Idle: after the connect storm settled.
    tokio::time::sleep(Duration::from_secs(if common.quick { 2 } else { 5 })).await;
    let idle_rss = total_rss(servers)?;

    let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
    let sampler = PeakSampler::start(pids.clone(), RSS_SAMPLE_INTERVAL);

    let worker_pids = workers.pids();
    let cpu_before = (cpu_seconds(&pids), cpu_seconds(&worker_pids));
    let before = workers.pushes_received();
    let started = Instant::now();
    let sent = publishers.send(&payload(now_nanos()), common).await;
    let deadline = started + receipt_deadline(common.connections);
    let expected = common.connections;
    while workers.pushes_received() - before < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu_after = (cpu_seconds(&pids), cpu_seconds(&worker_pids));
    let peaks = sampler.finish();
    let peak_rss = peaks.rss.max(idle_rss);
    let received = workers.pushes_received() - before;
    let (_, latency) = workers.report()?;
    let failures = workers.failures();
    let not_received = expected.saturating_sub(received);
    let send_errors = u64::from(sent.is_err());
    if let Err(error) = &sent {
        eprintln!("{label}: sending the broadcast failed: {error:#}");
    }
    Ok(json!({
        "transport": transport,
        "connections": expected,
        "received": received,
        "clients_ack": target == Target::Herald && !common.no_broadcast_ack,
        "latency_us": percentiles(&latency),
        "ms_to_last_receipt": latency.max() as f64 / 1000.0,
        "idle_rss_bytes": idle_rss,
        "peak_rss_bytes": peak_rss,
        "peak_over_idle": peak_rss as f64 / idle_rss.max(1) as f64,
        "peak_tcp_buffer_bytes": peaks.tcp_buffers,
        // CPU time from the send until the last receipt was seen (polled
        // every 2 ms; workers report every 200 ms), so the load generator's
        // share of the two cores shows beside the servers'.
        "server_cpu_seconds": cpu_after.0 - cpu_before.0,
        "load_generator_cpu_seconds": cpu_after.1 - cpu_before.1,
        "failures": failures,
        "not_received": not_received,
        "failures_total": failures.values().sum::<u64>() + not_received + send_errors,
    }))
}

/// The CPU time (user and system) the processes used so far, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&pid| crate::procfs::cpu_seconds(pid).ok())
        .sum()
}

/// A publisher's connection: TCP, or TLS over it.
trait Wire: Read + Write + Send {}

impl<T: Read + Write + Send> Wire for T {}

/// Wraps `stream` in TLS (blocking rustls) when `tls` is given.
fn over(
    stream: TcpStream,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server: SocketAddr,
) -> anyhow::Result<Box<dyn Wire>> {
    let Some(config) = tls else {
        return Ok(Box::new(stream));
    };
    let name = rustls::pki_types::ServerName::from(server.ip());
    let connection = rustls::ClientConnection::new(config.clone(), name)?;
    let mut stream = rustls::StreamOwned::new(connection, stream);
    // The handshake, now rather than on the first write.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(Box::new(stream))
}

/// What sends the one message to each server: the HTTP API for Herald, a
/// publishing client connected ahead of time for the peers (over TLS when
/// the clients are).
enum Publishers {
    Herald {
        apis: Vec<SocketAddr>,
        client: reqwest::Client,
    },
    Mqtt(Vec<Box<dyn Wire>>),
    Nats(Vec<Box<dyn Wire>>),
    /// The bare acceptors' stdin.
    Bare(Vec<ChildStdin>),
}

impl Publishers {
    fn connect(
        target: Target,
        servers: &mut [Server],
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Publishers> {
        let tls = tls.as_ref();
        Ok(match target {
            Target::Herald => Publishers::Herald {
                apis: servers
                    .iter()
                    .map(|s| s.api.context("a gateway without an API"))
                    .collect::<anyhow::Result<_>>()?,
                client: reqwest::Client::new(),
            },
            Target::Mqtt => Publishers::Mqtt(
                servers
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let stream = TcpStream::connect(s.addr)?;
                        stream.set_nodelay(true)?;
                        let mut stream = over(stream, tls, s.addr)?;
                        stream.write_all(&mqtt_connect(&format!("publisher{i}"), 600))?;
                        stream.flush()?;
                        let mut connack = [0u8; 4];
                        stream.read_exact(&mut connack)?;
                        anyhow::ensure!(connack[0] == 0x20 && connack[3] == 0, "CONNACK refused");
                        Ok(stream)
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
            Target::Bare => Publishers::Bare(
                servers
                    .iter_mut()
                    .map(|s| s.lines.take().context("a bare acceptor without its stdin"))
                    .collect::<anyhow::Result<_>>()?,
            ),
            Target::Nats => Publishers::Nats(
                servers
                    .iter()
                    .map(|s| {
                        let mut stream = TcpStream::connect(s.addr)?;
                        stream.set_nodelay(true)?;
                        // INFO in plain text, then TLS if the server requires it.
                        read_line(&mut stream)?;
                        let mut stream = over(stream, tls, s.addr)?;
                        let connect = format!(
                            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":{}}}\r\n",
                            tls.is_some()
                        );
                        stream.write_all(connect.as_bytes())?;
                        stream.flush()?;
                        Ok(stream)
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
        })
    }

    /// Sends `payload` to every server, all at once.
    async fn send(&mut self, payload: &[u8], common: &Common) -> anyhow::Result<()> {
        match self {
            Publishers::Herald { apis, client } => {
                herald_broadcast(client, apis, &common.creds()?, payload).await?;
            }
            Publishers::Mqtt(streams) => {
                let packet = mqtt_publish(TOPIC, payload);
                for stream in streams {
                    stream.write_all(&packet)?;
                    stream.flush()?;
                }
            }
            Publishers::Bare(lines) => {
                let mut line = payload.to_vec();
                line.push(b'\n');
                for stdin in lines {
                    stdin.write_all(&line)?;
                    stdin.flush()?;
                }
            }
            Publishers::Nats(streams) => {
                let mut packet = format!("PUB {TOPIC} {}\r\n", payload.len()).into_bytes();
                packet.extend_from_slice(payload);
                packet.extend_from_slice(b"\r\n");
                for stream in streams {
                    stream.write_all(&packet)?;
                    stream.flush()?;
                }
            }
        }
        Ok(())
    }
}

/// One broadcast through Herald's broadcast API: one call to each gateway
/// process (each is a node of its own here), all at once.
pub async fn herald_broadcast(
    client: &reqwest::Client,
    apis: &[SocketAddr],
    creds: &crate::systems::AppCreds,
    payload: &[u8],
) -> anyhow::Result<()> {
    let body = json!({ "payload": String::from_utf8_lossy(payload) });
    let calls = apis.iter().map(|api| {
        client
            .post(format!("http://{api}/v1/apps/{}/broadcasts", creds.app))
            .bearer_auth(&creds.api_key)
            .json(&body)
            .send()
    });
    for response in futures_util::future::join_all(calls).await {
        let response = response?;
        anyhow::ensure!(
            response.status().is_success(),
            "broadcast API answered {}",
            response.status()
        );
    }
    Ok(())
}

/// Reads one line (the NATS server's INFO) a byte at a time, so that
/// nothing after it (the TLS handshake) is taken from the socket.
fn read_line(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            return Ok(());
        }
    }
}

/// An MQTT 3.1.1 PUBLISH at QoS 0.
fn mqtt_publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_carries_a_two_byte_remaining_length_past_127() {
        let packet = mqtt_publish("bench", &[b'x'; 256]);
        // 2 + 5 + 256 = 263 = 0x07 * 128 + 0x07
        assert_eq!(&packet[..3], &[0x30, 0x87, 0x02]);
        assert_eq!(packet.len(), 3 + 263);
    }

    #[test]
    fn the_payload_starts_with_the_send_time() {
        let payload = payload(1_234);
        assert_eq!(payload.len(), PAYLOAD_LEN);
        assert!(payload.starts_with(b"1234 x"));
    }
}
