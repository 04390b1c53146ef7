//! `herald serve` and the open-file limit: by default the gateway holds
//! what the limit (raised to its hard value) leaves room for, said in one
//! line and never warned about; only a configured
//! `connections_per_shard_max` the limit cannot serve is warned about, once.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use support::{herald_bin, write_config};

/// What `herald serve` printed, on stdout up to its API line and on
/// stderr until it was stopped, when started with the open-file limit
/// (soft, hard) and `gateway_extra` in its config's [gateway].
fn serve_output(soft: u64, hard: u64, gateway_extra: &str) -> (Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 60, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[gateway]\n", &format!("[gateway]\n{gateway_extra}\n"), 1);
    std::fs::write(&config, text).unwrap();
    let mut command = Command::new(herald_bin());
    command
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--gateway-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command.spawn().expect("spawn herald serve");
    let mut stdout = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let listening = line.starts_with("herald: api listening on ");
        stdout.push(line);
        if listening {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (stdout, stderr.lines().map(str::to_owned).collect())
}

fn warnings(stdout: &[String], stderr: &[String]) -> Vec<String> {
    stdout
        .iter()
        .chain(stderr)
        .filter(|line| line.to_ascii_lowercase().contains("warn"))
        .cloned()
        .collect()
}

#[test]
fn the_default_comes_from_the_raised_limit_in_one_line_without_a_warning() {
    let (stdout, stderr) = serve_output(512, 4096, "");
    let said: Vec<&String> = stdout
        .iter()
        .filter(|line| line.starts_with("herald: the gateway holds up to "))
        .collect();
    assert_eq!(said.len(), 1, "{stdout:#?}");
    assert!(
        said[0].contains("open-file limit 4096, raised from 512"),
        "{}",
        said[0]
    );
    let connections: u64 = said[0]
        .trim_start_matches("herald: the gateway holds up to ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(connections > 0 && connections < 4096, "{}", said[0]);
    assert_eq!(warnings(&stdout, &stderr), Vec::<String>::new());
}

#[test]
fn a_configured_value_the_limit_cannot_serve_is_warned_about_once() {
    let (stdout, stderr) = serve_output(512, 512, "connections_per_shard_max = 100000");
    let warned = warnings(&stdout, &stderr);
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        warned[0].contains("connections_per_shard_max = 100000")
            && warned[0].contains("open-file limit 512"),
        "{}",
        warned[0]
    );
    assert!(
        !stdout.iter().any(|line| line.contains("holds up to")),
        "{stdout:#?}"
    );
}

#[test]
fn a_configured_value_within_the_limit_is_taken_silently() {
    let (stdout, stderr) = serve_output(512, 4096, "connections_per_shard_max = 1000");
    assert_eq!(warnings(&stdout, &stderr), Vec::<String>::new());
    assert!(
        !stdout.iter().any(|line| line.contains("holds up to")),
        "{stdout:#?}"
    );
}
