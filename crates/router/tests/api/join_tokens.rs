//! Join tokens (SPEC §9): enrollment an operator controls. Tokens are created, listed and revoked by an admin; a
//! registration carrying one gets its tags, skips the anonymous rate limit, and is approved by the token's rule when
//! it auto-approves; `--registration-mode token` refuses registrations without one.

use futures_util::future::join_all;
use llm_router::config::RegistrationMode;
use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::helpers::*;

/// Creates a join token as the admin; returns the created answer (with `token`).
async fn create(app: &TestApp, body: Value) -> Value {
    let admin = app.admin_token().await;
    let answer =
        app.request(Method::POST, "/v0/join-tokens").bearer_auth(&admin).json(&body).send().await.expect("create");
    assert_eq!(answer.status(), 201, "creating a join token");
    crate::helpers::body(answer).await
}

async fn join(app: &TestApp, token: Option<&str>, request: &Value) -> Response {
    let mut call = app.request(Method::POST, "/v0/nodes").json(request);
    if let Some(token) = token {
        call = call.header("X-Join-Token", token);
    }
    call.send().await.expect("register")
}

async fn tokens(app: &TestApp) -> Vec<Value> {
    let admin = app.admin_token().await;
    let listed = app.request(Method::GET, "/v0/join-tokens").bearer_auth(&admin).send().await.expect("list");
    assert_eq!(listed.status(), 200);
    body(listed).await.as_array().expect("array").clone()
}

fn token_mode() -> impl FnOnce(&mut llm_router::config::Settings) {
    |settings| settings.registration_mode = RegistrationMode::Token
}

#[tokio::test]
async fn an_admin_creates_lists_and_revokes_join_tokens_and_sees_the_secret_once() {
    let app = TestApp::spawn().await;
    let created = create(&app, json!({"name": "rack 7", "max_uses": 3, "tags": ["rack-7"]})).await;
    let secret = created["token"].as_str().expect("token");
    assert!(secret.starts_with("llmj_") && secret.len() == 5 + 64, "{secret}");
    assert_eq!(created["state"], "active");
    assert_eq!(created["uses"], 0);
    assert_eq!(created["auto_approve"], false);
    assert_eq!(created["expires_at"], "2026-01-02T00:00:00.000Z", "a day by default");

    let listed = tokens(&app).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "rack 7");
    assert_eq!(listed[0]["max_uses"], 3);
    assert_eq!(listed[0]["tags"], json!(["rack-7"]));
    assert!(!serde_json::to_string(&listed).expect("json").contains(secret), "the list never shows the token");

    let admin = app.admin_token().await;
    let id = created["id"].as_str().expect("id");
    let revoked = app.request(Method::DELETE, &format!("/v0/join-tokens/{id}")).bearer_auth(&admin).send().await;
    assert_eq!(revoked.expect("revoke").status(), 204);
    assert_eq!(tokens(&app).await[0]["state"], "revoked");
    let again = app.request(Method::DELETE, "/v0/join-tokens/not-a-token").bearer_auth(&admin).send().await;
    assert_error(again.expect("revoke"), 404, "not_found").await;
}

#[tokio::test]
async fn join_tokens_are_for_admins_and_their_fields_are_checked() {
    let app = TestApp::spawn().await;
    let viewer = app.user_token("watcher", "viewer").await;
    let refused = app.request(Method::POST, "/v0/join-tokens").bearer_auth(&viewer).json(&json!({"name": "x"}));
    assert_error(refused.send().await.expect("send"), 403, "forbidden").await;
    let admin = app.admin_token().await;
    for (body, field) in [
        (json!({"name": ""}), "name"),
        (json!({"name": "bad\u{7}name"}), "name"),
        (json!({"name": "x", "expires_in_secs": 0}), "expires_in_secs"),
        (json!({"name": "x", "expires_in_secs": 30 * 86_400 + 1}), "expires_in_secs"),
        (json!({"name": "x", "max_uses": 0}), "max_uses"),
        (json!({"name": "x", "tags": ["ok", ""]}), "tags"),
    ] {
        let answer = app.request(Method::POST, "/v0/join-tokens").bearer_auth(&admin).json(&body).send().await;
        let message = assert_error(answer.expect("send"), 400, "invalid_request").await;
        assert!(message.contains(field), "{body}: {message}");
    }
    assert!(tokens(&app).await.is_empty(), "nothing was created");
}

#[tokio::test]
async fn token_mode_refuses_registrations_without_a_usable_join_token_and_says_why() {
    let app = TestApp::with_settings(Options::default(), token_mode()).await;
    let message =
        assert_error(join(&app, None, &registration("no-token", 8000)).await, 401, "join_token_required").await;
    assert!(message.contains("X-Join-Token"), "{message}");
    let unknown = join(&app, Some("llmj_0000"), &registration("unknown", 8000)).await;
    assert!(assert_error(unknown, 401, "join_token_invalid").await.contains("unknown"));

    let once = create(&app, json!({"name": "once", "max_uses": 1})).await;
    let once = once["token"].as_str().expect("token");
    assert_eq!(join(&app, Some(once), &registration("first", 8000)).await.status(), 201);
    let used_up = join(&app, Some(once), &registration("second", 8000)).await;
    assert!(assert_error(used_up, 401, "join_token_invalid").await.contains("used up"));

    let revoked = create(&app, json!({"name": "revoked"})).await;
    let admin = app.admin_token().await;
    let id = revoked["id"].as_str().expect("id");
    app.request(Method::DELETE, &format!("/v0/join-tokens/{id}")).bearer_auth(&admin).send().await.expect("revoke");
    let refused = join(&app, revoked["token"].as_str(), &registration("third", 8000)).await;
    assert!(assert_error(refused, 401, "join_token_invalid").await.contains("revoked"));

    let short = create(&app, json!({"name": "short", "expires_in_secs": 60})).await;
    app.clock.advance_ms(60_000);
    let expired = join(&app, short["token"].as_str(), &registration("fourth", 8000)).await;
    assert!(assert_error(expired, 401, "join_token_invalid").await.contains("expired"));

    let names: Vec<Value> = app.nodes().await.iter().map(|node| node["machine_name"].clone()).collect();
    assert_eq!(names, vec![json!("first")], "only the registration with a usable token was stored");
}

#[tokio::test]
async fn a_node_joins_pending_with_the_tokens_tags_and_name_and_its_use_is_counted() {
    let app = TestApp::with_settings(Options::default(), token_mode()).await;
    let created = create(&app, json!({"name": "lab", "tags": ["lab", "rack-a"]})).await;
    let answer = join(&app, created["token"].as_str(), &registration("gpu-lab", 8000)).await;
    assert_eq!(answer.status(), 201);
    let id = body(answer).await["node_id"].as_str().expect("id").to_owned();
    let node = app.node(&id).await;
    assert_eq!(node["status"], "pending", "no auto-approval: an administrator approves");
    assert_eq!(node["tags"], json!(["rack-a", "lab"]), "its own tags, then the token's");
    assert_eq!(node["joined_with"], "lab");
    assert_eq!(tokens(&app).await[0]["uses"], 1);
    // The name survives a restart.
    let app = app.restart(0).await;
    assert_eq!(app.node(&id).await["joined_with"], "lab");
}

#[tokio::test]
async fn an_auto_approving_token_approves_by_its_rule_with_two_events() {
    let app = TestApp::with_settings(Options::default(), token_mode()).await;
    let created = create(&app, json!({"name": "fleet-a", "auto_approve": true})).await;
    let mut request = registration("gpu-auto", 8000);
    request["ready_models"] = json!(["llama-3-8b"]);
    let answer = join(&app, created["token"].as_str(), &request).await;
    assert_eq!(answer.status(), 201);
    let answer = body(answer).await;
    assert_eq!(answer["status"], "online", "approved with a ready model: online at once");
    let id = answer["node_id"].as_str().expect("id");
    let node = app.node(id).await;
    assert_eq!(node["approved_by"], "join-token:fleet-a");
    assert_eq!(node["approved_at"], node["registered_at"]);
    let events = app.events(id).await;
    let history: Vec<(Value, Value, Value)> =
        events.iter().rev().map(|e| (e["from"].clone(), e["to"].clone(), e["actor"].clone())).collect();
    assert_eq!(
        history,
        vec![
            (Value::Null, json!("pending"), Value::Null),
            (json!("pending"), json!("online"), json!("join-token:fleet-a")),
        ],
        "registered pending, then approved by the token's rule"
    );
    assert_eq!(app.scrape().await.value("llm_router_nodes", &[("status", "pending")]), Some(0.0));
}

#[tokio::test]
async fn two_agents_racing_for_the_last_use_one_joins() {
    let app = TestApp::with_settings(Options::default(), token_mode()).await;
    let created = create(&app, json!({"name": "last", "max_uses": 1})).await;
    let token = created["token"].as_str().expect("token");
    let requests: Vec<Value> = (0..8).map(|i| registration(&format!("racer-{i}"), 8000)).collect();
    let answers = join_all(requests.iter().map(|request| join(&app, Some(token), request))).await;
    let statuses: Vec<u16> = answers.iter().map(|answer| answer.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 7, "{statuses:?}");
    assert_eq!(app.nodes().await.len(), 1);
    assert_eq!(tokens(&app).await[0]["uses"], 1);
}

#[tokio::test]
async fn a_token_rotation_needs_no_join_token_and_revoking_leaves_joined_nodes_alone() {
    let app = TestApp::with_settings(Options::default(), token_mode()).await;
    let created = create(&app, json!({"name": "rotate"})).await;
    let answer = body(join(&app, created["token"].as_str(), &registration("gpu-r", 8000)).await).await;
    let node_token = answer["node_token"].as_str().expect("node token");
    let admin = app.admin_token().await;
    let id = created["id"].as_str().expect("id");
    app.request(Method::DELETE, &format!("/v0/join-tokens/{id}")).bearer_auth(&admin).send().await.expect("revoke");
    let rotated = app
        .request(Method::POST, "/v0/nodes")
        .header("X-Node-Token", node_token)
        .json(&registration("gpu-r", 8000))
        .send()
        .await
        .expect("rotate");
    assert_eq!(rotated.status(), 200, "the node's own token is enough");
    assert_eq!(app.nodes().await.len(), 1, "the node that joined stays");
}

#[tokio::test]
async fn registrations_with_a_join_token_skip_the_anonymous_rate_limit() {
    let app = TestApp::with(Options { registration_rate: 1, ..Options::default() }).await;
    let created = create(&app, json!({"name": "burst"})).await;
    for i in 0..6 {
        let answer = join(&app, created["token"].as_str(), &registration(&format!("burst-{i}"), 8000)).await;
        assert_eq!(answer.status(), 201, "registration {i} with the token");
    }
    // Anonymous ones from the same address are limited (a burst of twice the per-minute rate).
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(join(&app, None, &registration(&format!("anon-{i}"), 8000)).await.status().as_u16());
    }
    assert_eq!(statuses, vec![201, 201, 429, 429]);
}

#[tokio::test]
async fn unknown_join_tokens_are_throttled_per_address_counted_and_audited_in_aggregate() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let guess = |i: usize, from: &'static str| {
        let request = registration(&format!("gpu-guess-{i}"), 8000);
        app.request(Method::POST, "/v0/nodes")
            .header("X-Join-Token", format!("llmj_{i:064}"))
            .header("X-Forwarded-For", from)
            .json(&request)
            .send()
    };
    for i in 0..5 {
        assert_error(guess(i, "198.51.100.7").await.expect("register"), 401, "join_token_invalid").await;
    }
    // The sixth guess from that address is refused before any lookup, with Retry-After, for a minute.
    let refused = guess(5, "198.51.100.7").await.expect("register");
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("60"));
    assert_error(refused, 429, "join_token_throttled").await;
    // Even a valid token waits out the lock from that address; another address is not locked.
    let valid = create(&app, json!({"name": "rack 7"})).await["token"].as_str().expect("token").to_owned();
    let join_with_valid = || {
        app.request(Method::POST, "/v0/nodes")
            .header("X-Join-Token", &valid)
            .header("X-Forwarded-For", "198.51.100.7")
            .json(&registration("gpu-real", 8000))
            .send()
    };
    assert_error(join_with_valid().await.expect("register"), 429, "join_token_throttled").await;
    assert_error(guess(6, "198.51.100.8").await.expect("register"), 401, "join_token_invalid").await;
    assert_eq!(app.metric("llm_router_join_tokens_unknown_total").await, 6.0);
    assert_eq!(app.metric("llm_router_join_tokens_throttled_total").await, 2.0);
    // One audit event for the lock, not one per guess.
    app.state.audit.flush().await;
    let admin = app.admin_token().await;
    let audit =
        app.request(Method::GET, "/v0/audit?action=node.register").bearer_auth(&admin).send().await.expect("audit");
    let events = body(audit).await.as_array().expect("an array of events").clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["client"], "198.51.100.7");
    assert_eq!(events[0]["outcome"], "throttled");
    assert!(events[0]["target"].as_str().is_some_and(|t| t.contains("unknown join tokens")), "{events:?}");
    // After the lock, the address may try again.
    app.clock.advance_ms(60_000);
    assert_eq!(join_with_valid().await.expect("register").status(), 201);
}
