//! `herald config check`: a config file checked before a node runs it:
//! every problem listed (exit 1), else the effective configuration with its
//! secrets masked, the memory its connection limits budget for, and the
//! kernel limits they need.

use std::path::Path;

use anyhow::Context;

use crate::config::{Config, IoSetting};
use crate::open_files;

/// Gateway user space per idle authenticated connection, register
/// included (RSS delta / N of `herald-bench idle --connections 100000`,
/// 2026-12-01; README "Capacity"), on io_uring and on epoll.
const USER_BYTES_PER_CONNECTION_URING: u64 = 698;
const USER_BYTES_PER_CONNECTION_EPOLL: u64 = 536;

/// The kernel's slab per idle TCP connection in the same run.
const KERNEL_BYTES_PER_CONNECTION: u64 = 5_348;

/// What a TLS or WSS connection keeps on top of a TCP one (its session
/// keys; `room-core/tests/conn_memory.rs`).
const TLS_EXTRA_BYTES_PER_CONNECTION: u64 = 244;

/// Keys whose values are secrets: shown masked.
const SECRET_KEYS: [&str; 3] = ["api_key", "token_secret", "webhook_secret"];

/// Keys whose values are URLs that may carry a password.
const URL_KEYS: [&str; 3] = ["database_url", "redis_url", "redis_cluster_urls"];

pub fn run(path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: Config = match toml::from_str(&text) {
        Ok(config) => config,
        Err(error) => anyhow::bail!(
            "{}: not a valid Herald config:\n  - {error}",
            path.display()
        ),
    };
    let problems = config.problems();
    if !problems.is_empty() {
        anyhow::bail!(
            "{}: {} problem(s):\n{}",
            path.display(),
            problems.len(),
            problems
                .iter()
                .map(|problem| format!("  - {problem}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    println!("{}: valid", path.display());
    println!("\n# the effective configuration, secrets masked\n");
    println!("{}", effective(&config)?);
    let too_low = print_budget(&config)?;
    if too_low.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "this host cannot serve the configured connections:\n{}",
            too_low
                .iter()
                .map(|limit| format!("  - {limit}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// The config with every default filled in, as TOML, secrets masked.
fn effective(config: &Config) -> anyhow::Result<String> {
    let mut value = toml::Value::try_from(config).context("cannot show the configuration")?;
    mask(&mut value);
    toml::to_string(&value).context("cannot show the configuration")
}

fn mask(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) {
                    *value = toml::Value::String("********".to_owned());
                } else if URL_KEYS.contains(&key.as_str()) {
                    mask_url_passwords(value);
                } else {
                    mask(value);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(mask),
        _ => {}
    }
}

/// `scheme://user:password@host` becomes `scheme://user:********@host`.
fn mask_url_passwords(value: &mut toml::Value) {
    match value {
        toml::Value::String(url) => {
            if let Some((scheme, rest)) = url.split_once("://")
                && let Some((credentials, host)) = rest.split_once('@')
                && let Some((user, _password)) = credentials.split_once(':')
            {
                *url = format!("{scheme}://{user}:********@{host}");
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(mask_url_passwords),
        _ => {}
    }
}

/// Prints the budget and the limits; returns the limits too low.
fn print_budget(config: &Config) -> anyhow::Result<Vec<String>> {
    let shards = config.shards();
    let per_shard =
        open_files::connections_per_shard(config.gateway.connections_per_shard_max, shards)?;
    let connections = (per_shard as u64).saturating_mul(shards as u64);
    let epoll = matches!(config.gateway.io, Some(IoSetting::Epoll));
    let user = if epoll {
        USER_BYTES_PER_CONNECTION_EPOLL
    } else {
        USER_BYTES_PER_CONNECTION_URING
    };
    let tls = config
        .gateway_listeners()
        .iter()
        .any(|listener| listener.transport.uses_tls());
    let idle = user
        + KERNEL_BYTES_PER_CONNECTION
        + if tls {
            TLS_EXTRA_BYTES_PER_CONNECTION
        } else {
            0
        };
    let rings = if epoll {
        0
    } else {
        u64::from(config.gateway.recv_buffers) * config.gateway.recv_buffer_bytes as u64
    };
    let queues = config.gateway.send_queue_bytes_max as u64;
    println!("# memory budget (estimates from the measured figures in README \"Capacity\")\n");
    println!(
        "connections: {shards} shards x {per_shard} = {connections} ({} driver{})",
        if epoll { "epoll" } else { "io_uring" },
        if tls { ", TLS listeners" } else { "" }
    );
    println!(
        "idle, per connection: {user} B user space + {KERNEL_BYTES_PER_CONNECTION} B kernel{} = {idle} B",
        if tls {
            format!(" + {TLS_EXTRA_BYTES_PER_CONNECTION} B TLS session")
        } else {
            String::new()
        }
    );
    println!(
        "idle, per shard: {}; per process: {}",
        human(idle * per_shard as u64),
        human(idle * connections)
    );
    println!(
        "receive buffer rings: {shards} x {} x {} B = {}",
        config.gateway.recv_buffers,
        config.gateway.recv_buffer_bytes,
        human(rings * shards as u64)
    );
    println!(
        "worst case, every connection's send queue full ({} each): {} more",
        human(queues),
        human(queues.saturating_mul(connections))
    );
    println!("\n# kernel limits these connections need\n");
    // Every connection is an open file, besides the files the process
    // keeps for everything else (src/open_files.rs).
    let files_needed = connections + open_files::OTHER_FILES_MAX;
    let (_, hard) = open_file_limits()?;
    let mut too_low = Vec::new();
    let mut check = |name: &str, have: u64| {
        let verdict = if have >= files_needed {
            "ok"
        } else {
            "TOO LOW"
        };
        println!("{name}: {have}, needs at least {files_needed}: {verdict}");
        if have < files_needed {
            too_low.push(format!(
                "{name} is {have}; {connections} connections need {files_needed}"
            ));
        }
    };
    // Herald raises its soft limit to the hard one at startup.
    check("open files (hard limit, ulimit -Hn)", hard);
    for sysctl in ["fs/file-max", "fs/nr_open"] {
        let name = sysctl.replace('/', ".");
        match std::fs::read_to_string(format!("/proc/sys/{sysctl}")) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(have) => check(&name, have),
                Err(_) => println!("{name}: unreadable ({:?})", text.trim()),
            },
            Err(error) => println!("{name}: cannot read ({error})"),
        }
    }
    println!(
        "(kernel-tuning/ has the sysctls and the systemd drop-in for millions of connections)"
    );
    Ok(too_low)
}

fn open_file_limits() -> anyhow::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read the open-file limit");
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Bytes in binary units, one decimal.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_url_passwords_are_masked_and_nothing_else() {
        let mut value: toml::Value = toml::from_str(
            r#"
            [cluster]
            database_url = "mysql://root:hunter2@db:3306/herald"
            redis_cluster_urls = ["redis://:pw@r1:7000", "redis://r2:7000"]
            [admin]
            api_key = "admin-secret"
            [[apps]]
            id = "chat"
            api_key = "app-key"
            token_secret = "token-secret"
            default_ttl_secs = 60
            "#,
        )
        .unwrap();
        mask(&mut value);
        let shown = toml::to_string(&value).unwrap();
        for secret in ["hunter2", "admin-secret", "app-key", "token-secret", ":pw@"] {
            assert!(!shown.contains(secret), "{secret} shown in:\n{shown}");
        }
        for kept in [
            "mysql://root:********@db:3306/herald",
            "redis://r2:7000",
            "chat",
            "60",
        ] {
            assert!(shown.contains(kept), "{kept} missing in:\n{shown}");
        }
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(6_046 * 1_000_000), "5.6 GiB");
    }
}
