//! The OpenAPI document: served at `/openapi.json` without a key, and held
//! to the server by schemathesis, which sends every route generated valid
//! and invalid input from the document and checks each answer: no 5xx, a
//! status the document lists for the route, a body that matches its
//! schema. schemathesis comes from scripts/install-test-tools.sh (a
//! virtualenv under the target dir); without it the test is skipped,
//! except with CI=true, where it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use support::{API_KEY, APP, OTHER_APP, Server};

const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef0123456789";

/// Test cases per operation and phase: enough to reach every route's
/// checks and refusals, few enough that both runs take a minute or two.
const MAX_EXAMPLES: &str = "100";

/// Seconds one request may take before schemathesis calls it a failure.
const REQUEST_TIMEOUT_SECS: &str = "10";

/// `herald serve` with the admin API on, and a listener of every transport
/// (`/v1/dispatch` answers 503 `no_gateway` for a transport no live node
/// listens on, as it would in a cluster whose wss nodes are all down).
fn start_server() -> Server {
    Server::start_with_args(
        &format!("[admin]\napi_key = \"{ADMIN_KEY}\"\n"),
        &[
            "--tls-self-signed",
            "--listener",
            "tls=127.0.0.1:0",
            "--listener",
            "ws=127.0.0.1:0",
            "--listener",
            "wss=127.0.0.1:0",
        ],
    )
}

#[tokio::test]
async fn the_document_is_served_without_a_key() {
    let server = start_server();
    let response = reqwest::get(server.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served: serde_json::Value = response.json().await.unwrap();
    let built: serde_json::Value =
        serde_json::from_str(herald_control::openapi::document_json()).unwrap();
    assert_eq!(served, built);
    assert_eq!(served["openapi"], "3.1.0");
    for path in [
        "/v1/apps/{app}/users/{user}/messages",
        "/v1/admin/apps/{app}/rotate",
        "/openapi.json",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} is missing");
    }
}

/// The schemathesis that scripts/install-test-tools.sh puts under the
/// target dir.
fn schemathesis() -> Option<PathBuf> {
    let installed = PathBuf::from(support::herald_bin())
        .parent()
        .and_then(|profile| profile.parent())
        .map(|target| target.join("tools/schemathesis-venv/bin/schemathesis"));
    match installed {
        Some(path) if path.exists() => Some(path),
        _ if std::env::var_os("CI").is_some() => {
            panic!("no schemathesis under the target dir: run scripts/install-test-tools.sh")
        }
        _ => None,
    }
}

/// Runs schemathesis on the operations `filter` selects, as `key`, with
/// the app (`{app}`, `/v1/dispatch?app=`) fixed to `app` (a random app id
/// would only ever meet `unknown_app`), and fails the test if it found
/// anything.
fn run_schemathesis(tool: &Path, server: &Server, filter: &[&str], key: &str, app: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!("[parameters]\n\"path.app\" = \"{app}\"\n\"query.app\" = \"{app}\"\n"),
    )
    .unwrap();
    let started = Instant::now();
    let output = Command::new(tool)
        .arg("--config-file")
        .arg(&config)
        .arg("--no-color")
        .arg("run")
        .arg(server.url("/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
            "--max-examples",
            MAX_EXAMPLES,
            "--request-timeout",
            REQUEST_TIMEOUT_SECS,
            // One worker: on several threads, hypothesis's parsing of its
            // own source can fail inside CPython 3.11 ("AST constructor
            // recursion depth mismatch"), an error of the tool's.
            "--workers",
            "1",
            "--header",
            &format!("Authorization: Bearer {key}"),
        ])
        .args(filter)
        // Its own files (hypothesis's example database) go there too.
        .current_dir(dir.path())
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    println!(
        "schemathesis {filter:?}: {:.1} s, {}",
        started.elapsed().as_secs_f64(),
        output.status
    );
    assert!(
        output.status.success(),
        "schemathesis found failures (see above) on {filter:?}"
    );
}

#[test]
fn schemathesis_finds_the_server_true_to_its_document() {
    let Some(tool) = schemathesis() else {
        eprintln!(
            "SKIPPED: no schemathesis under the target dir (scripts/install-test-tools.sh installs it)"
        );
        return;
    };
    let server = start_server();
    // The app's routes and the open ones with the app's key; then the
    // admin routes with the admin key, on the other app (the run creates,
    // changes, rotates and deletes).
    run_schemathesis(
        &tool,
        &server,
        &["--exclude-path-regex", "^/v1/admin/"],
        API_KEY,
        APP,
    );
    run_schemathesis(
        &tool,
        &server,
        &["--include-path-regex", "^/v1/admin/"],
        ADMIN_KEY,
        OTHER_APP,
    );
}
