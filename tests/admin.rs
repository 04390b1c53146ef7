//! The admin API end to end on `herald serve`: apps created, used, changed,
//! rotated and deleted at runtime, with the keys it hands out checked by
//! real pushes and real BINDs; and `herald admin` calling it.

mod support;

use std::time::{Duration, Instant};

use herald_proto::{BindErrorCode, Frame, GoAwayReason, UnbindReason};
use serde_json::{Value, json};
use support::{API_KEY, APP, RawClient, Server, WAIT, app_token, herald_bin, token};

const ADMIN_KEY: &str = "admin-key-0123456789-0123456789-0123456789";

fn admin_server() -> Server {
    Server::start_with(60, &format!("[admin]\napi_key = \"{ADMIN_KEY}\""))
}

/// One call: (status, JSON body).
async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, server.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn admin(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    call(server, method, path, Some(ADMIN_KEY), body).await
}

async fn create(server: &Server, body: Value) -> Value {
    let (status, created) =
        admin(server, reqwest::Method::POST, "/v1/admin/apps", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn push(
    server: &Server,
    app: &str,
    api_key: &str,
    user: &str,
    payload: &str,
) -> (u16, Value) {
    call(
        server,
        reqwest::Method::POST,
        &format!("/v1/apps/{app}/users/{user}/messages"),
        Some(api_key),
        Some(json!({ "payload": payload })),
    )
    .await
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn admin_routes_take_only_the_admin_key_and_app_routes_never_take_it() {
    let server = admin_server();
    let list = "/v1/admin/apps";
    let (status, body) = call(&server, reqwest::Method::GET, list, None, None).await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    let (status, body) = call(&server, reqwest::Method::GET, list, Some("wrong"), None).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, body) = call(&server, reqwest::Method::GET, list, Some(API_KEY), None).await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "forbidden"),
        "an app's key"
    );
    let (status, body) = push(&server, APP, ADMIN_KEY, "alice", "x").await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "forbidden"),
        "the admin key"
    );

    // The config's apps are in the table, without their secrets.
    let (status, body) = admin(&server, reqwest::Method::GET, list, None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|app| app["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "news"]);
    assert!(!body.to_string().contains(API_KEY), "{body}");

    // Without [admin] the admin API is off.
    let plain = Server::start();
    let (status, body) = call(&plain, reqwest::Method::GET, list, Some(ADMIN_KEY), None).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[admin]")
    );
}

#[tokio::test]
async fn bad_admin_input_gets_its_documented_answer() {
    let server = admin_server();
    let post = |body: Value| {
        let server = &server;
        async move { admin(server, reqwest::Method::POST, "/v1/admin/apps", Some(body)).await }
    };
    for (body, status, code) in [
        (json!({"id": "bad id"}), 400, "bad_request"),
        (json!({"id": ""}), 400, "bad_request"),
        (json!({"id": "x".repeat(65)}), 400, "bad_request"),
        (
            json!({"id": "shop", "default_ttl_secs": 0}),
            400,
            "bad_request",
        ),
        (
            json!({"id": "shop", "max_connections": 0}),
            400,
            "bad_request",
        ),
        (
            json!({"id": "shop", "push_rate": {"per_sec": -1, "burst": 1}}),
            400,
            "bad_request",
        ),
        (
            json!({"id": "shop", "webhooks": [{"route": "a", "url": "ftp://biz", "events": ["upstream"]}]}),
            400,
            "bad_request",
        ),
        (
            json!({"id": "shop", "colour": "red"}),
            400,
            "malformed_json",
        ),
        (json!({"id": APP}), 409, "app_exists"),
    ] {
        let (got_status, reply) = post(body.clone()).await;
        assert_eq!(
            (got_status, error_code(&reply)),
            (status, code),
            "{body}: {reply}"
        );
    }
    let (status, reply) = admin(
        &server,
        reqwest::Method::POST,
        "/v1/admin/apps/nope/rotate",
        Some(json!({"what": "api_key"})),
    )
    .await;
    assert_eq!((status, error_code(&reply)), (404, "unknown_app"));
    let (status, reply) = admin(
        &server,
        reqwest::Method::POST,
        &format!("/v1/admin/apps/{APP}/rotate"),
        Some(json!({"what": "password"})),
    )
    .await;
    assert_eq!(
        (status, error_code(&reply)),
        (400, "malformed_json"),
        "{reply}"
    );
    let (status, reply) = admin(
        &server,
        reqwest::Method::PATCH,
        &format!("/v1/admin/apps/{APP}"),
        Some(json!({"default_ttl_secs": 0})),
    )
    .await;
    assert_eq!(
        (status, error_code(&reply)),
        (400, "bad_request"),
        "{reply}"
    );
    let (status, reply) = admin(
        &server,
        reqwest::Method::DELETE,
        "/v1/admin/apps/nope",
        None,
    )
    .await;
    assert_eq!((status, error_code(&reply)), (404, "unknown_app"));
    // Nothing refused was created.
    let (_, list) = admin(&server, reqwest::Method::GET, "/v1/admin/apps", None).await;
    assert_eq!(list["apps"].as_array().unwrap().len(), 2, "{list}");
}

#[tokio::test]
async fn a_created_app_pushes_binds_keeps_its_limit_and_survives_a_restart() {
    let server = admin_server();
    let created = create(&server, json!({"id": "shop", "max_connections": 1})).await;
    assert_eq!(created["max_connections"], 1);
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    let token_secret = created["token_secret"].as_str().unwrap().to_owned();
    assert_eq!(api_key.len(), 64);
    let (status, shown) = admin(&server, reqwest::Method::GET, "/v1/admin/apps/shop", None).await;
    assert_eq!(status, 200);
    assert!(!shown.to_string().contains(&api_key), "{shown}");

    let mut alice = RawClient::connect(&server.gateway).await;
    alice.hello("alice-phone").await;
    assert!(matches!(
        alice
            .bind_app("shop", app_token(&token_secret, "shop", "alice"))
            .await,
        Frame::BindOk { .. }
    ));
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_app_connections{app=\"shop\"} 1"),
        "{metrics}"
    );
    let (status, reply) = push(&server, "shop", &api_key, "alice", "hello").await;
    assert_eq!(status, 200, "{reply}");
    match alice.recv().await {
        Some(Frame::Push { app, payload, .. }) => {
            assert_eq!((app.as_str(), &payload[..]), ("shop", &b"hello"[..]));
        }
        other => panic!("expected the push, got {other:?}"),
    }

    // One connection allowed: a second is refused with the documented code.
    let mut bob = RawClient::connect(&server.gateway).await;
    bob.hello("bob-phone").await;
    match bob
        .bind_app("shop", app_token(&token_secret, "shop", "bob"))
        .await
    {
        Frame::BindErr { code, .. } => assert_eq!(code, BindErrorCode::TOO_MANY_CONNECTIONS),
        other => panic!("expected BIND_ERR, got {other:?}"),
    }
    // Raised: the gateway takes the change without a restart.
    let (status, patched) = admin(
        &server,
        reqwest::Method::PATCH,
        "/v1/admin/apps/shop",
        Some(json!({"max_connections": 2, "default_ttl_secs": 60})),
    )
    .await;
    assert_eq!(
        (status, patched["max_connections"].clone()),
        (200, json!(2))
    );
    let deadline = Instant::now() + WAIT;
    loop {
        match bob
            .bind_app("shop", app_token(&token_secret, "shop", "bob"))
            .await
        {
            Frame::BindOk { .. } => break,
            Frame::BindErr { code, .. } if code == BindErrorCode::TOO_MANY_CONNECTIONS => {
                assert!(Instant::now() < deadline, "the raised limit never applied");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("expected BIND_OK, got {other:?}"),
        }
    }

    // The app, its keys and its messages are in the database.
    let server = server.kill_and_restart();
    let (status, reply) = push(&server, "shop", &api_key, "alice", "after restart").await;
    assert_eq!((status, reply["seq"].clone()), (200, json!(2)), "{reply}");
    let (_, shown) = admin(&server, reqwest::Method::GET, "/v1/admin/apps/shop", None).await;
    assert_eq!(
        (
            shown["max_connections"].clone(),
            shown["default_ttl_secs"].clone()
        ),
        (json!(2), json!(60))
    );
}

#[tokio::test]
async fn a_rotated_secret_works_until_its_grace_ends() {
    let server = admin_server();
    let created = create(&server, json!({"id": "shop"})).await;
    let old_key = created["api_key"].as_str().unwrap().to_owned();
    let old_secret = created["token_secret"].as_str().unwrap().to_owned();
    let rotate = |what: &str, grace_secs: u64| {
        let server = &server;
        let body = json!({"what": what, "grace_secs": grace_secs});
        async move {
            let (status, reply) = admin(
                server,
                reqwest::Method::POST,
                "/v1/admin/apps/shop/rotate",
                Some(body),
            )
            .await;
            assert_eq!(status, 200, "{reply}");
            reply
        }
    };
    let grace = Duration::from_secs(2);
    let rotated_at = Instant::now();
    let new_key = rotate("api_key", grace.as_secs()).await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let new_secret = rotate("token_secret", grace.as_secs()).await["token_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_key, old_key);

    assert_eq!(push(&server, "shop", &new_key, "alice", "new").await.0, 200);
    assert_eq!(
        push(&server, "shop", &old_key, "alice", "old, in grace")
            .await
            .0,
        200
    );
    let mut old_token = RawClient::connect(&server.gateway).await;
    old_token.hello("d1").await;
    assert!(matches!(
        old_token
            .bind_app("shop", app_token(&old_secret, "shop", "alice"))
            .await,
        Frame::BindOk { .. }
    ));

    tokio::time::sleep((grace + Duration::from_millis(1500)).saturating_sub(rotated_at.elapsed()))
        .await;
    let (status, reply) = push(&server, "shop", &old_key, "alice", "old, too late").await;
    assert_eq!((status, error_code(&reply)), (403, "forbidden"));
    assert_eq!(push(&server, "shop", &new_key, "alice", "new").await.0, 200);
    let mut late = RawClient::connect(&server.gateway).await;
    late.hello("d2").await;
    match late
        .bind_app("shop", app_token(&old_secret, "shop", "bob"))
        .await
    {
        Frame::BindErr { code, .. } => assert_eq!(code, BindErrorCode::INVALID_TOKEN),
        other => panic!("expected BIND_ERR, got {other:?}"),
    }
    assert!(matches!(
        late.bind_app("shop", app_token(&new_secret, "shop", "bob"))
            .await,
        Frame::BindOk { .. }
    ));
}

#[tokio::test]
async fn deleting_an_app_unbinds_its_clients_loses_no_other_apps_push_and_frees_its_id() {
    let server = admin_server();
    let created = create(&server, json!({"id": "shop"})).await;
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    let token_secret = created["token_secret"].as_str().unwrap().to_owned();
    for i in 0..20 {
        assert_eq!(
            push(&server, "shop", &api_key, "alice", &format!("m{i}"))
                .await
                .0,
            200
        );
    }
    // One client with only the app, one with it and the config's app.
    let mut only = RawClient::connect(&server.gateway).await;
    only.hello("only").await;
    assert!(matches!(
        only.bind_app("shop", app_token(&token_secret, "shop", "alice"))
            .await,
        Frame::BindOk { .. }
    ));
    let mut both = RawClient::connect(&server.gateway).await;
    both.hello("both").await;
    assert!(matches!(
        both.bind_app(APP, token("alice", 3600)).await,
        Frame::BindOk { .. }
    ));
    assert!(matches!(
        both.bind_app("shop", app_token(&token_secret, "shop", "alice"))
            .await,
        Frame::BindOk { .. }
    ));

    // Pushes to both apps keep coming while the app is deleted.
    let pushing = {
        let url = server.url("");
        let api_key = api_key.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut chat_seqs = Vec::new();
            let mut shop_statuses = Vec::new();
            for i in 0..40 {
                let chat = client
                    .post(format!("{url}/v1/apps/{APP}/users/alice/messages"))
                    .bearer_auth(API_KEY)
                    .body(json!({"payload": format!("c{i}")}).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(chat.status(), 200);
                let reply: Value = chat.json().await.unwrap();
                chat_seqs.push(reply["seq"].as_u64().unwrap());
                let shop = client
                    .post(format!("{url}/v1/apps/shop/users/alice/messages"))
                    .bearer_auth(&api_key)
                    .body(json!({"payload": format!("s{i}")}).to_string())
                    .send()
                    .await
                    .unwrap();
                shop_statuses.push(shop.status().as_u16());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (chat_seqs, shop_statuses)
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, reply) = admin(
        &server,
        reqwest::Method::DELETE,
        "/v1/admin/apps/shop",
        None,
    )
    .await;
    assert_eq!((status, reply["deleted"].clone()), (200, json!("shop")));
    let (status, reply) = push(&server, "shop", &api_key, "alice", "gone").await;
    assert_eq!((status, error_code(&reply)), (404, "unknown_app"));

    // The client with only the app is told to go, and does not come back.
    let deadline = Instant::now() + WAIT;
    loop {
        match only.recv().await {
            Some(Frame::GoAway { reason, .. }) => {
                assert_eq!(reason, GoAwayReason::APP_DELETED);
                break;
            }
            Some(Frame::Push { .. }) => assert!(Instant::now() < deadline),
            other => panic!("expected GOAWAY app_deleted, got {other:?}"),
        }
    }
    let (chat_seqs, shop_statuses) = pushing.await.unwrap();
    assert_eq!(
        chat_seqs,
        (1..=40).collect::<Vec<u64>>(),
        "every chat push stored in order"
    );
    assert!(
        shop_statuses
            .iter()
            .all(|&status| status == 200 || status == 404)
    );
    assert_eq!(*shop_statuses.last().unwrap(), 404);

    // The other is unbound from the app and still gets the other app's
    // pushes, every one of them.
    let mut chat_received = Vec::new();
    let mut unbound = false;
    while chat_received.len() < 40 || !unbound {
        match both.recv().await {
            Some(Frame::Push { app, seq, .. }) if app == APP => {
                chat_received.push(seq);
                both.send(Frame::Ack { app, seq }).await;
            }
            Some(Frame::Push { app, .. }) => {
                assert_eq!(app, "shop");
                assert!(!unbound, "a push of the deleted app after its UNBIND");
            }
            Some(Frame::Unbind { app, reason }) => {
                assert_eq!(
                    (app.as_str(), reason),
                    ("shop", Some(UnbindReason::APP_DELETED))
                );
                unbound = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(chat_received, (1..=40).collect::<Vec<u64>>());

    // Its messages are deleted in the background; then the id is free,
    // and the new app's inboxes start empty.
    let deadline = Instant::now() + WAIT;
    let created = loop {
        let (status, reply) = admin(
            &server,
            reqwest::Method::POST,
            "/v1/admin/apps",
            Some(json!({"id": "shop"})),
        )
        .await;
        match status {
            201 => break reply,
            409 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            _ => panic!("the id never came free: {status} {reply}"),
        }
    };
    let (status, pulled) = call(
        &server,
        reqwest::Method::GET,
        "/v1/apps/shop/users/alice/messages",
        created["api_key"].as_str(),
        None,
    )
    .await;
    assert_eq!(
        (status, pulled["messages"].clone()),
        (200, json!([])),
        "{pulled}"
    );
}

#[tokio::test]
async fn herald_admin_calls_the_admin_api_and_prints_json() {
    let server = admin_server();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(herald_bin())
            .args(["admin", "--api", &server.url(""), "--admin-key", ADMIN_KEY])
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let (ok, stdout, stderr) = run(&["apps", "create", "cli-app", "--max-connections", "5"]);
    assert!(ok, "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (created["id"].as_str(), created["max_connections"].as_u64()),
        (Some("cli-app"), Some(5))
    );
    assert!(created["api_key"].is_string() && created["token_secret"].is_string());

    let (ok, stdout, _) = run(&["apps", "list"]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["apps"].as_array().unwrap().len(), 3);

    let (ok, stdout, _) = run(&[
        "apps",
        "rotate",
        "cli-app",
        "--what",
        "api_key",
        "--grace-secs",
        "0",
    ]);
    assert!(ok);
    let rotated: Value = serde_json::from_str(&stdout).unwrap();
    let new_key = rotated["api_key"].as_str().unwrap();
    assert_eq!(push(&server, "cli-app", new_key, "alice", "x").await.0, 200);
    let old_key = created["api_key"].as_str().unwrap();
    assert_eq!(push(&server, "cli-app", old_key, "alice", "x").await.0, 403);

    let (ok, _, stderr) = run(&["apps", "create", "cli-app"]);
    assert!(!ok);
    assert!(stderr.contains("app_exists"), "{stderr}");
    let (ok, stdout, _) = run(&["apps", "delete", "cli-app"]);
    assert!(ok, "{stdout}");
    let (ok, _, stderr) = run(&["apps", "get", "cli-app"]);
    assert!(!ok && stderr.contains("unknown_app"), "{stderr}");
}

/// Waits until the client has bound every one of `apps`.
async fn wait_bound(client: &mut herald_client::Client, apps: &[&str]) {
    let mut bound = Vec::new();
    while bound.len() < apps.len() {
        match tokio::time::timeout(WAIT, client.next_event()).await {
            Ok(Some(herald_client::Event::Bound { app, .. })) => bound.push(app),
            Ok(Some(herald_client::Event::Connected { .. })) => {}
            other => panic!("expected BIND_OK, got {other:?}"),
        }
    }
    bound.sort();
    assert_eq!(bound, apps);
}

/// The next SDK event, skipping connection-state ones.
async fn next_sdk_event(client: &mut herald_client::Client) -> herald_client::Event {
    loop {
        let event = tokio::time::timeout(WAIT, client.next_event())
            .await
            .expect("timed out waiting for an SDK event")
            .expect("the client stopped");
        if !matches!(
            event,
            herald_client::Event::Connected { .. } | herald_client::Event::Bound { .. }
        ) {
            return event;
        }
    }
}

#[tokio::test]
async fn the_sdk_drops_a_deleted_app_and_stops_when_it_was_the_only_one() {
    use herald_client::{AppToken, Client, Event, Terminal};
    let server = admin_server();
    let created = create(&server, json!({"id": "shop"})).await;
    let token_secret = created["token_secret"].as_str().unwrap();
    let shop_token = |user: &str| AppToken {
        app: "shop".to_owned(),
        token: app_token(token_secret, "shop", user),
        tags: Vec::new(),
    };
    let mut only = Client::start(herald_client::ClientOptions {
        apps: vec![shop_token("alice")],
        ..support::sdk_options(&server.gateway, String::new())
    });
    let mut both = Client::start(herald_client::ClientOptions {
        apps: vec![
            AppToken {
                app: APP.to_owned(),
                token: token("bob", 3600),
                tags: Vec::new(),
            },
            shop_token("bob"),
        ],
        device_id: "both".to_owned(),
        ..support::sdk_options(&server.gateway, String::new())
    });
    wait_bound(&mut only, &["shop"]).await;
    wait_bound(&mut both, &[APP, "shop"]).await;

    let (status, _) = admin(
        &server,
        reqwest::Method::DELETE,
        "/v1/admin/apps/shop",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        next_sdk_event(&mut only).await,
        Event::Closed(Terminal::AppDeleted)
    );
    assert_eq!(
        next_sdk_event(&mut both).await,
        Event::Unbound {
            app: "shop".to_owned(),
            reason: UnbindReason::APP_DELETED
        }
    );
    // The other app goes on.
    let (status, _) = push(&server, APP, API_KEY, "bob", "still here").await;
    assert_eq!(status, 200);
    match next_sdk_event(&mut both).await {
        Event::Push(push) => assert_eq!(&push.payload[..], b"still here"),
        other => panic!("expected the push, got {other:?}"),
    }
}

/// An app made through the API calls its webhooks, signed with the
/// webhook secret the API gave; after a rotation calls carry both
/// secrets' signatures until the grace ends, then only the new one's.
#[tokio::test]
async fn an_api_made_apps_webhooks_are_signed_with_its_secret_through_a_rotation() {
    use support::webhook::{Answer, Receiver};
    let server = admin_server();
    let created = create(&server, json!({"id": "shop"})).await;
    let old_secret = created["webhook_secret"].as_str().unwrap().to_owned();
    let token_secret = created["token_secret"].as_str().unwrap().to_owned();
    let old_receiver = Receiver::start(&old_secret, |_, _| Answer::Status(200)).await;
    let routes = |receiver: &Receiver| json!({"webhooks": [{"route": "main", "url": receiver.base, "events": ["upstream", "online"]}]});
    let (status, _) = admin(
        &server,
        reqwest::Method::PATCH,
        "/v1/admin/apps/shop",
        Some(routes(&old_receiver)),
    )
    .await;
    assert_eq!(status, 200);

    let upstream = |request_id| Frame::Upstream {
        app: "shop".to_owned(),
        request_id,
        route: None,
        payload: bytes::Bytes::from_static(b"order"),
    };
    // Until the coordinator has the routes, an upstream finds no endpoint.
    let accepted_by = |receiver: Receiver, user: &'static str| {
        let gateway = server.gateway.clone();
        let token = app_token(&token_secret, "shop", user);
        async move {
            let mut client = RawClient::connect(&gateway).await;
            client.hello(user).await;
            assert!(matches!(
                client.bind_app("shop", token).await,
                Frame::BindOk { .. }
            ));
            let deadline = Instant::now() + WAIT;
            for request_id in 1.. {
                client.send(upstream(request_id)).await;
                match client.recv().await {
                    Some(Frame::UpstreamAck { status, .. })
                        if status == herald_proto::UpstreamStatus::ACCEPTED =>
                    {
                        break;
                    }
                    Some(Frame::UpstreamAck { .. }) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("expected the upstream accepted, got {other:?}"),
                }
            }
            assert!(receiver.calls().iter().any(|call| call.event == "upstream"));
        }
    };
    accepted_by(old_receiver.clone(), "ann").await;
    old_receiver.assert_all_signed();

    // Rotated with a grace: a receiver that knows only the new secret and
    // one that knows only the old both verify the same calls.
    let (status, rotated) = admin(
        &server,
        reqwest::Method::POST,
        "/v1/admin/apps/shop/rotate",
        Some(json!({"what": "webhook_secret", "grace_secs": 4})),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let rotated_at = Instant::now();
    let new_secret = rotated["webhook_secret"].as_str().unwrap().to_owned();
    let new_receiver = Receiver::start(&new_secret, |_, _| Answer::Status(200)).await;
    let both = json!({"webhooks": [
        {"route": "old", "url": old_receiver.base, "events": ["online"]},
        {"route": "new", "url": new_receiver.base, "events": ["upstream", "online"]},
    ]});
    let (status, _) = admin(
        &server,
        reqwest::Method::PATCH,
        "/v1/admin/apps/shop",
        Some(both),
    )
    .await;
    assert_eq!(status, 200);
    accepted_by(new_receiver.clone(), "bob").await;
    let online_for = |receiver: &Receiver, user: &str| {
        receiver
            .calls()
            .iter()
            .any(|call| call.event == "online" && call.body["user"] == user)
    };
    let deadline = Instant::now() + WAIT;
    while !(online_for(&old_receiver, "bob") && online_for(&new_receiver, "bob")) {
        assert!(
            Instant::now() < deadline,
            "bob's online event never reached both routes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old_receiver.assert_all_signed();
    new_receiver.assert_all_signed();
    assert!(
        rotated_at.elapsed() < Duration::from_secs(4),
        "the checks ran inside the grace"
    );

    // After the grace the old secret signs nothing: the old receiver's
    // check fails on the next call.
    tokio::time::sleep(Duration::from_millis(5_000).saturating_sub(rotated_at.elapsed())).await;
    accepted_by(new_receiver.clone(), "cy").await;
    let deadline = Instant::now() + WAIT;
    while !online_for(&old_receiver, "cy") {
        assert!(
            Instant::now() < deadline,
            "cy's online event never reached the old route"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    new_receiver.assert_all_signed();
    let outcome = std::panic::catch_unwind(|| old_receiver.assert_all_signed());
    assert!(
        outcome.is_err(),
        "a call past the grace verified with the old secret"
    );
}
