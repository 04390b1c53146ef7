//! The CI smoke test: `herald-bench all --quick` against real `herald serve`
//! processes, Mosquitto and NATS, with zero failures and figures that were
//! really measured.

use std::path::PathBuf;
use std::process::Command;

/// The herald binary of the same target directory (`cargo test --workspace`
/// builds it for the root package's tests), or HERALD_BIN.
fn herald_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("HERALD_BIN") {
        return PathBuf::from(path);
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_herald-bench"));
    let path = bench.with_file_name("herald");
    assert!(
        path.exists(),
        "{} is missing: run the whole workspace's tests (cargo test --workspace) \
         or `cargo build --bin herald` first, or set HERALD_BIN",
        path.display()
    );
    path
}

/// The nats-server that scripts/install-test-tools.sh puts under the
/// target dir (one that knows JetStream's `sync_interval`). Without it
/// (outside CI) the machine's own, whose `sync_interval: always` row may
/// be skipped; under CI=true its absence fails the test.
fn nats_server() -> (PathBuf, bool) {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_herald-bench"));
    let installed = bench
        .parent()
        .and_then(|profile| profile.parent())
        .map(|target| target.join("tools/nats-venv/bin/nats-server"));
    match installed {
        Some(path) if path.exists() => (path, true),
        _ if std::env::var_os("CI").is_some() => {
            panic!("no nats-server under the target dir: run scripts/install-test-tools.sh")
        }
        _ => {
            eprintln!("no nats-server under the target dir: using the machine's");
            (PathBuf::from("nats-server"), false)
        }
    }
}

/// Runs herald-bench with `args` against the herald binary, and returns
/// the JSON report of the run, which must have succeeded.
fn bench_report(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--herald")
        .arg(herald_bin())
        .output()
        .expect("run herald-bench");
    successful_report(&output, &json)
}

/// The JSON report of a herald-bench run that must have succeeded.
fn successful_report(output: &std::process::Output, json: &std::path::Path) -> serde_json::Value {
    println!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "herald-bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn the_quick_benchmark_runs_every_scenario_without_failures() {
    let report = bench_report(&["all", "--quick"]);
    assert_eq!(report["failures_total"], 0);
    let results = &report["results"];
    let connect = &results["connect"]["servers"]["herald"];
    assert_eq!(connect["connections"], 2000);
    assert!(connect["accept_per_sec"].as_f64().unwrap() > 0.0);
    let idle = &results["idle"];
    assert!(idle["bare"]["kernel_bytes_per_conn"].as_f64().unwrap() > 0.0);
    let herald = &idle["servers"]["herald"];
    assert!(herald["rss_after_bytes"].as_u64().unwrap() > 0);
    assert!(herald["load_generator_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(herald["push_to_all"]["latency_us"]["count"], 2000);
    assert_eq!(herald["connected_after_hold"], 2000);
    // The broadcast through the broadcast API reached every connection,
    // timed apart from the multicasts before it.
    let broadcast = &herald["broadcast_to_all"];
    assert_eq!(broadcast["received"], 2000);
    assert_eq!(broadcast["latency_us"]["count"], 2000);
    assert!(broadcast["ms_to_last_receipt"].as_f64().unwrap() > 0.0);
    assert!(broadcast["peak_rss_bytes"].as_u64().unwrap() > 0);
    let push = &results["push"]["servers"]["herald"];
    assert_eq!(push["received"], push["pushes"]);
    assert_eq!(results["storm"]["servers"]["herald"]["dropped"], 400);
    for server in ["herald", "mosquitto", "nats"] {
        assert_eq!(
            results["peers"]["servers"][server]["connections"], 2000,
            "{server}"
        );
    }
    for server in ["herald", "mosquitto", "nats", "bare"] {
        let row = &results["broadcast"]["servers"][server];
        assert_eq!(row["received"], 2000, "{server}");
        // Clock ticks of 10 ms: a quick run's CPU time may read as zero.
        assert!(row["server_cpu_seconds"].is_f64(), "{server}");
        assert!(row["load_generator_cpu_seconds"].is_f64(), "{server}");
        assert!(
            row["ms_to_last_receipt"].as_f64().unwrap() > 0.0,
            "{server}"
        );
    }
}

/// The encrypted paths: Herald over TLS and WSS, Mosquitto over TLS and the
/// NATS server with TLS after its INFO, each with the certificate the
/// benchmark makes, clients that handshake, receive and (Herald) ack.
#[test]
fn the_quick_benchmark_speaks_tls_and_wss() {
    let report = bench_report(&[
        "broadcast",
        "--quick",
        "--connections",
        "500",
        "--transport",
        "tls",
        "--transport",
        "wss",
        "--system",
        "herald",
        "--system",
        "mosquitto",
        "--system",
        "nats",
    ]);
    assert_eq!(report["failures_total"], 0);
    let broadcast = &report["results"]["broadcast"];
    for server in ["herald-tls", "herald-wss", "mosquitto-tls", "nats-tls"] {
        let row = &broadcast["servers"][server];
        assert_eq!(row["received"], 500, "{server}");
        assert!(
            row["ms_to_last_receipt"].as_f64().unwrap() > 0.0,
            "{server}"
        );
    }
    // The peers' clients speak MQTT and NATS over tcp and tls only.
    assert_eq!(
        broadcast["skipped"],
        serde_json::json!(["mosquitto-wss", "nats-wss"])
    );
}

/// A `herald serve` started by the test, killed when dropped.
struct RunningHerald(std::process::Child);

impl Drop for RunningHerald {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_benchmark_loads_a_gateway_it_did_not_start() {
    use std::io::BufRead as _;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{}"
[gateway]
listen = "127.0.0.1:0"
shards = 1
[api]
listen = "127.0.0.1:0"
[[apps]]
id = "chat"
api_key = "external-api-key-0123456789"
token_secret = "external-token-secret-0123456789"
"#,
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(herald_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let herald = RunningHerald(child);
    let (mut gateway, mut api) = (None, None);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("herald: gateway listening on ") {
            gateway = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("herald: api listening on ") {
            api = Some(rest.trim().to_owned());
        }
        if gateway.is_some() && api.is_some() {
            break;
        }
    }
    let (gateway, api) = (gateway.unwrap(), api.unwrap());

    let json = dir.path().join("external.json");
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(["push", "--quick", "--connections", "500", "--rate", "200"])
        .args(["--gateway", &gateway, "--api", &api, "--config"])
        .arg(&config)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run herald-bench");
    let report = successful_report(&output, &json);
    assert_eq!(report["failures_total"], 0);
    assert_eq!(report["gateways"], 1);
    let push = &report["results"]["push"]["servers"]["herald"];
    assert!(push["pushes"].as_u64().unwrap() > 0);
    assert_eq!(push["received"], push["pushes"]);

    // Flags that only make sense together are refused with a reason.
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(["connect", "--gateway", &gateway])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--config"));
    drop(herald);
}

/// `push` with JetStream beside Herald: the same 300-byte payloads at the
/// same rate, publish-with-ack to a file stream on a NATS server started
/// by the run, with the default sync and with `sync_interval: always` (a
/// nats-server older than 2.10 refuses that setting: the row then says so).
#[test]
fn the_quick_push_measures_jetstream_beside_herald() {
    let (nats_server, knows_sync_interval) = nats_server();
    let report = bench_report(&[
        "push",
        "--quick",
        "--connections",
        "300",
        "--rate",
        "200",
        "--duration",
        "2",
        "--payload-bytes",
        "300",
        "--with-jetstream",
        "--nats-server",
        nats_server.to_str().unwrap(),
    ]);
    assert_eq!(report["failures_total"], 0);
    let push = &report["results"]["push"];
    assert_eq!(push["payload_bytes"], 300);
    let herald = &push["servers"]["herald"];
    assert!(herald["pushes"].as_u64().unwrap() > 0);
    assert_eq!(herald["received"], herald["pushes"]);
    assert!(herald["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    let default = &push["servers"]["jetstream-sync-default"];
    assert!(default["accepted"].as_u64().unwrap() > 0, "{default}");
    assert_eq!(default["errors"], 0);
    assert!(default["durability"].as_str().unwrap().contains("2 min"));
    let always = &push["servers"]["jetstream-sync-always"];
    match always["skipped"].as_str() {
        Some(reason) if !knows_sync_interval => {
            assert!(reason.contains("sync_interval"), "{reason}")
        }
        _ => assert!(always["accepted"].as_u64().unwrap() > 0, "{always}"),
    }
}

/// `push --with-http-floor`: the same calls at the same rate to the bare
/// axum server the run starts, every one answered, with the row saying
/// what it is.
#[test]
fn the_quick_push_measures_the_http_floor_beside_herald() {
    let report = bench_report(&[
        "push",
        "--quick",
        "--connections",
        "300",
        "--rate",
        "200",
        "--duration",
        "2",
        "--with-http-floor",
    ]);
    assert_eq!(report["failures_total"], 0);
    let servers = &report["results"]["push"]["servers"];
    let herald = &servers["herald"];
    assert_eq!(herald["received"], herald["pushes"]);
    let floor = &servers["http-floor"];
    assert!(floor["accepted"].as_u64().unwrap() > 0, "{floor}");
    assert_eq!(floor["accepted"], floor["pushes"], "{floor}");
    assert_eq!(floor["errors"], 0, "{floor}");
    assert!(floor["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    assert!(floor["label"].as_str().unwrap().starts_with("HTTP floor"));
}

/// `push --find-max-rate`: every run has a warm-up and steps, each step's
/// verdict, and the row the median of the runs' answers.
#[test]
fn the_quick_push_finds_the_highest_rate_kept_up_with() {
    let report = bench_report(&[
        "push",
        "--quick",
        "--connections",
        "300",
        "--rate",
        "200",
        "--find-max-rate",
        "--step-secs",
        "1",
        "--runs",
        "2",
    ]);
    assert_eq!(report["failures_total"], 0);
    let push = &report["results"]["push"];
    assert_eq!(push["mode"], "find-max-rate");
    assert_eq!(push["criteria"]["p99_max_us"], 50_000);
    let herald = &push["servers"]["herald"];
    let runs = herald["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["warm_up"]["offered_per_sec"], 200);
        let steps = run["steps"].as_array().unwrap();
        assert_eq!(steps[0]["offered_per_sec"], 200);
        assert!(steps.iter().all(|step| step["passed"].is_boolean()));
    }
    assert!(herald["max_rate_per_sec"].is_f64());
}

/// `push --cluster-storage`: a control node and room nodes on the local
/// Redis and a database of the run's own on MySQL/MariaDB and on
/// PostgreSQL, every push received.
#[test]
fn the_quick_push_measures_a_cluster_on_each_engine() {
    let mysql = std::env::var("HERALD_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned());
    let postgres = std::env::var("HERALD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    for (url, row, setting) in [
        (
            &mysql,
            "herald-cluster-mysql",
            "innodb_flush_log_at_trx_commit=",
        ),
        (&postgres, "herald-cluster-postgres", "synchronous_commit="),
    ] {
        let report = bench_report(&[
            "push",
            "--quick",
            "--connections",
            "300",
            "--rate",
            "200",
            "--duration",
            "2",
            "--cluster-storage",
            url,
        ]);
        assert_eq!(report["failures_total"], 0, "{row}");
        let push = &report["results"]["push"]["servers"][row];
        assert!(push["pushes"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(push["received"], push["pushes"], "{row}");
        assert!(
            push["durability"].as_str().unwrap().contains(setting),
            "{row}: {}",
            push["durability"]
        );
    }
}

/// The CI version of the hour of churn: two minutes, 3,000 connections on
/// two gateways, a tenth reconnecting every 20 s, a broadcast every 40 s.
/// Every accepted push and broadcast must arrive exactly once; the memory
/// growth is printed, not asserted (two minutes of it is noise).
#[test]
fn a_two_minute_soak_loses_duplicates_and_invents_nothing() {
    let report = bench_report(&[
        "soak",
        "--connections",
        "3000",
        "--gateways",
        "2",
        "--duration",
        "120",
        "--push-rate",
        "50",
        "--reconnect-every",
        "20",
        "--broadcast-every",
        "40",
        "--sample-every",
        "2",
    ]);
    let soak = &report["results"]["soak"];
    assert_eq!(soak["completed"], true, "{soak:#}");
    assert_eq!(soak["failures_total"], 0, "{soak:#}");
    for kind in ["pushes", "broadcasts"] {
        for count in ["lost", "unexpected", "duplicated"] {
            assert_eq!(soak[kind][count], 0, "{kind} {count}: {soak:#}");
        }
    }
    // Rounds at 20, 40, ... 100 s (the one due at 120 s is the end), each
    // a tenth of the 3,000: every one came back as a session of its own.
    assert_eq!(soak["reconnect_rounds"], 5);
    assert!(
        soak["sessions"].as_u64().unwrap() >= 3000 + 5 * 300,
        "{soak:#}"
    );
    assert_eq!(soak["connected_at_end"], 3000);
    let accepted = soak["pushes_accepted"].as_u64().unwrap();
    assert!(
        accepted > 50 * 100,
        "{accepted} pushes accepted at 50/s for 120 s"
    );
    // Broadcasts at 20, 60 and 100 s, to each gateway.
    assert_eq!(
        soak["broadcasts_accepted_per_gateway"],
        serde_json::json!([3, 3])
    );
    assert_eq!(soak["broadcasts_received_per_connection"]["min"], 3);
    let memory = &soak["memory"];
    assert_eq!(memory["warm_up_secs"], 30);
    assert!(
        memory["gateways_rss"]["baseline_mean_bytes"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(memory["gateways_rss"]["end_mean_bytes"].as_f64().unwrap() > 0.0);
    println!(
        "soak memory growth (not asserted): {}",
        memory["gateways_rss"]["growth"]
    );
}
