//! The admin page (`GET /admin`) and its data (`GET /v1/admin/overview`).
//!
//! The browser test runs `tests/admin_page.mjs` in headless Chromium
//! (Debian's `chromium`, driven by playwright-core from the JS SDK's npm
//! packages, both installed by `scripts/install-test-tools.sh`) against a
//! real `herald serve` holding raw clients; it saves a screenshot to
//! `target/test-artefacts/admin-page.png`. Without node, chromium or the
//! packages it is skipped, except with CI=true.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::{API_KEY, APP, RawClient, Server, WAIT};

const ADMIN_KEY: &str = "admin-page-test-key-0123456789-0123456789";

/// Clients bound while the page watches.
const CLIENTS: usize = 12;

/// The broadcast's pace, connections a second: slow enough that it takes
/// several of the page's 2-second refreshes.
const BROADCAST_RATE: f64 = 2.0;

fn with_admin_key() -> Server {
    Server::start_with(60, &format!("[admin]\napi_key = \"{ADMIN_KEY}\""))
}

async fn overview(server: &Server) -> Value {
    let (status, body) = server.get("/v1/admin/overview", ADMIN_KEY).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn app<'a>(overview: &'a Value, id: &str) -> &'a Value {
    overview["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|app| app["id"] == id)
        .unwrap_or_else(|| panic!("no app {id} in {overview}"))
}

/// Node connections summed, and the same over every node's shards.
fn connections(overview: &Value) -> (u64, u64) {
    let nodes = overview["nodes"].as_array().unwrap();
    let total = nodes
        .iter()
        .map(|n| n["connections"].as_u64().unwrap())
        .sum();
    let by_shard = nodes
        .iter()
        .flat_map(|n| n["shard_connections"].as_array().unwrap())
        .map(|count| count.as_u64().unwrap())
        .sum();
    (total, by_shard)
}

#[tokio::test]
async fn the_page_is_served_without_a_key_under_a_strict_policy_and_its_data_needs_the_admin_key() {
    let server = with_admin_key();
    let http = reqwest::Client::new();
    for (path, content_type) in [
        ("/admin", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/admin/admin.css", "text/css"),
        ("/admin/favicon.svg", "image/svg+xml"),
    ] {
        let response = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(content_type), "{path}");
        let policy = header("content-security-policy");
        assert!(
            policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"),
            "{path}: {policy}"
        );
    }
    let page = http
        .get(server.url("/admin"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"<script src="/admin/admin.js""#) && !page.contains("<script>"),
        "the page's script is its own file, never inline"
    );

    let (status, body) = server.get("/v1/admin/overview", "").await;
    assert_eq!(status, 401, "{body}");
    for refused in ["not-the-admin-key-0123456789-0123456789", API_KEY] {
        let (status, body) = server.get("/v1/admin/overview", refused).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let idle = overview(&server).await;
    assert_eq!(connections(&idle), (0, 0));
    assert_eq!(idle["nodes"][0]["id"], "test-node");
    assert_eq!(
        idle["nodes"][0]["shard_connections"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "one count per shard of the test config"
    );

    // Without [admin] the page still loads, but its data is off.
    let off = Server::start();
    let (status, body) = off.get("/v1/admin/overview", ADMIN_KEY).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[admin] api_key"),
        "{body}"
    );
}

#[tokio::test]
async fn the_overview_counts_an_apps_clients_messages_and_broadcasts() {
    let server = with_admin_key();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(RawClient::bound(&server.gateway, &format!("d{i}"), "alice", None).await);
    }
    server.push("alice", "hello").await;
    server.push("bob", "stored for later").await;
    let (status, body) = server
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            json!({"payload": "to all"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let seen = loop {
        let seen = overview(&server).await;
        let chat = app(&seen, APP);
        let settled = chat["online_connections"] == 3
            && chat["totals"]["deliveries"] == 3
            && chat["broadcasts"][0]["percent"] == 100;
        if settled || tokio::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let chat = app(&seen, APP);
    assert_eq!(connections(&seen), (3, 3), "{seen}");
    assert_eq!(chat["online_connections"], 3, "{seen}");
    assert_eq!(chat["online_users"], 1, "{seen}");
    assert_eq!(chat["totals"]["binds"], 3, "{seen}");
    assert_eq!(chat["totals"]["messages_stored"], 2, "{seen}");
    assert_eq!(chat["totals"]["deliveries"], 3, "{seen}");
    assert_eq!(chat["totals"]["broadcasts"], 1, "{seen}");
    let broadcast = &chat["broadcasts"][0];
    assert_eq!(broadcast["seq"], 1, "{seen}");
    assert_eq!(broadcast["target"], 3, "{seen}");
    assert_eq!(broadcast["sent"], 3, "{seen}");
    assert_eq!(broadcast["in_progress"], false, "{seen}");
    assert_eq!(broadcast["percent"], 100, "{seen}");
    let other = app(&seen, support::OTHER_APP);
    assert_eq!(other["online_connections"], 0, "{seen}");
    assert_eq!(other["broadcasts"], json!([]), "{seen}");
}

#[tokio::test]
async fn the_admin_page_in_chromium_shows_the_connections_and_a_broadcast_reaching_100_percent() {
    const TEST: &str =
        "the_admin_page_in_chromium_shows_the_connections_and_a_broadcast_reaching_100_percent";
    let Some((sdk, chromium)) = support::browser_tools(TEST) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    let server = with_admin_key();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let client =
            RawClient::bound(&server.gateway, &format!("d{i}"), &format!("u{i}"), None).await;
        clients.push(client);
    }
    // The overview counts them before the page is asked to.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = overview(&server).await;
        if app(&seen, APP)["online_connections"] == CLIENTS as u64 {
            assert_eq!(
                connections(&seen),
                (CLIENTS as u64, CLIENTS as u64),
                "{seen}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let screenshot = root.join("target/test-artefacts/admin-page.png");
    std::fs::create_dir_all(screenshot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&screenshot);
    let mut script = Command::new("node");
    script
        .arg(root.join("tests/admin_page.mjs"))
        .arg(&screenshot)
        .env("ADMIN_URL", server.url("/admin"))
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("API_URL", server.url(""))
        .env("APP", APP)
        .env("APP_API_KEY", API_KEY)
        .env("CONNECTIONS", CLIENTS.to_string())
        .env("BROADCAST_RATE", BROADCAST_RATE.to_string())
        .env("PLAYWRIGHT_FROM", &sdk)
        .env("CHROMIUM", &chromium);
    let browser = tokio::task::spawn_blocking(move || script.output())
        .await
        .unwrap()
        .expect("run node tests/admin_page.mjs");
    assert!(
        browser.status.success(),
        "the admin page test failed:\n{}\n{}",
        String::from_utf8_lossy(&browser.stdout),
        String::from_utf8_lossy(&browser.stderr)
    );
    print!("{}", String::from_utf8_lossy(&browser.stdout));
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );

    // What the page showed is what happened: every client got it.
    for client in &mut clients {
        assert_eq!(client.recv_broadcast().await.0, 1);
    }
    let seen = overview(&server).await;
    let broadcast = &app(&seen, APP)["broadcasts"][0];
    assert_eq!(broadcast["planned"], CLIENTS as u64, "{seen}");
    assert_eq!(broadcast["sent"], CLIENTS as u64, "{seen}");
    assert_eq!(broadcast["percent"], 100, "{seen}");
}
