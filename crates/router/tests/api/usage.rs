//! Tenants (SPEC §14): every `/v1` request recorded with whom it was for and what it used; the usage API; limits per
//! key and per user with OpenAI's 429s and headers; two routers on one database holding one limit together. The
//! nodes are stand-in runtimes that report `usage` as OpenAI's API does: in the answer, and in a stream's last
//! event only when asked (`stream_options.include_usage`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::helpers::*;
use crate::inference::{chat, openai_error};

/// A runtime that answers with usage: prompt tokens 10 per message, completion tokens 5.
struct UsageRuntime {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl UsageRuntime {
    async fn start(models: &[&str]) -> UsageRuntime {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let list = json!({"object": "list", "data": models.iter().map(|m| json!({"id": m})).collect::<Vec<_>>()});
        let app = axum::Router::new()
            .route("/v1/models", get(move || async move { axum::Json(list.clone()) }))
            .route("/v1/chat/completions", post(answer))
            .with_state(bodies.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        UsageRuntime { addr, bodies }
    }

    fn last_body(&self) -> Value {
        self.bodies.lock().expect("lock").last().cloned().expect("a request")
    }
}

async fn answer(State(bodies): State<Arc<Mutex<Vec<Value>>>>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).expect("JSON");
    bodies.lock().expect("lock").push(request.clone());
    let prompt = 10 * request["messages"].as_array().map_or(1, Vec::len);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5});
    if request["stream"] != true {
        return axum::Json(
            json!({"object": "chat.completion", "choices": [{"message": {"content": "hi"}}], "usage": usage}),
        )
        .into_response();
    }
    let asked = request["stream_options"]["include_usage"] == true;
    let mut events = String::new();
    for word in ["Hel", "lo"] {
        let mut chunk = json!({"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]});
        if asked {
            chunk["usage"] = Value::Null;
        }
        events.push_str(&format!("data: {}\n\n", serde_json::to_string(&chunk).expect("json")));
    }
    if asked {
        let last = json!({"object": "chat.completion.chunk", "choices": [], "usage": usage});
        events.push_str(&format!("data: {}\n\n", serde_json::to_string(&last).expect("json")));
    }
    events.push_str("data: [DONE]\n\n");
    Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(Body::from(events)).expect("response")
}

/// Registers, approves and heartbeats a node whose runtime is `runtime`, with `models` ready.
async fn online_node(app: &TestApp, name: &str, runtime: &UsageRuntime, models: &[&str]) -> String {
    let node = app.register_node_at(name, runtime.addr.port()).await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    assert_eq!(app.heartbeat(&node, models).await.status(), 200);
    node.id
}

/// Creates an inference API key with `extra` fields (limits, weight); returns (id, key).
async fn create_key(app: &TestApp, name: &str, extra: Value) -> (String, String) {
    let admin = app.admin_token().await;
    let mut body = json!({"name": name, "scope": "inference"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let created = app.request(Method::POST, "/v0/api-keys").bearer_auth(&admin).json(&body).send().await.expect("key");
    assert_eq!(created.status(), 201);
    let created = crate::helpers::body(created).await;
    (created["id"].as_str().expect("id").to_owned(), created["key"].as_str().expect("key").to_owned())
}

/// The recorded requests, newest first, once at least `count` are written.
async fn recorded(app: &TestApp, count: usize) -> Vec<Value> {
    let admin = app.admin_token().await;
    let started = std::time::Instant::now();
    loop {
        let request = app.request(Method::GET, "/v0/usage/requests").bearer_auth(&admin);
        let page = crate::helpers::body(request.send().await.expect("records")).await;
        let rows = page.as_array().cloned().unwrap_or_default();
        // A record is written at most a flush and its write after its request ended.
        if rows.len() >= count {
            return rows;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{count} records not written: {rows:?}");
        tokio::time::sleep(POLL).await;
    }
}

fn stream_body(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("event JSON"))
        .collect()
}

#[tokio::test]
async fn every_request_is_recorded_with_its_key_tokens_node_and_status() {
    let app = TestApp::spawn().await;
    let runtime = UsageRuntime::start(&["m"]).await;
    let node = online_node(&app, "gpu-a", &runtime, &["m"]).await;
    let (key_id, key) = create_key(&app, "batch", json!({})).await;
    let messages = json!([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]);

    let plain = chat(&app, Some(&key), &json!({"model": "m", "messages": messages})).await;
    assert_eq!(crate::helpers::body(plain).await["usage"]["prompt_tokens"], 20);

    // A stream whose client did not ask for usage: the router asks the runtime, and the client's answer is what it
    // would have been: no usage event, no `"usage": null`.
    let unasked = chat(&app, Some(&key), &json!({"model": "m", "messages": messages, "stream": true})).await;
    let text = unasked.text().await.expect("stream");
    assert_eq!(runtime.last_body()["stream_options"]["include_usage"], true, "the runtime was asked");
    let events = stream_body(&text);
    assert_eq!(events.len(), 2, "{text}");
    assert!(events.iter().all(|e| e.get("usage").is_none()), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // A client that asked gets the usage event as the runtime sent it.
    let body = json!({"model": "m", "messages": messages, "stream": true, "stream_options": {"include_usage": true}});
    let asked = chat(&app, Some(&key), &body).await.text().await.expect("stream");
    let events = stream_body(&asked);
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["usage"]["completion_tokens"], 5);
    assert_eq!(events[0]["usage"], Value::Null);

    // The signed-in admin, and a model nobody serves.
    let admin = app.admin_token().await;
    openai_error(chat(&app, Some(&admin), &json!({"model": "nope"})).await, 404, "model_not_found").await;

    let rows = recorded(&app, 4).await;
    assert_eq!(rows.len(), 4);
    let refused = &rows[0];
    assert_eq!((refused["principal"].as_str(), refused["status"].as_u64()), (Some("user:admin"), Some(404)));
    assert_eq!(refused["model"], "(not served)", "an invented name is not kept");
    assert_eq!(refused["node"], Value::Null);
    for row in &rows[1..] {
        assert_eq!(row["principal"], format!("key:{key_id}"));
        assert_eq!(row["principal_name"], "batch");
        assert_eq!(row["node"], node.as_str());
        assert_eq!(row["status"], 200);
        assert_eq!((row["prompt_tokens"].as_u64(), row["completion_tokens"].as_u64()), (Some(20), Some(5)));
    }
    assert_eq!(rows[1]["stream"], true);
    assert!(rows[1]["ttft_ms"].is_u64(), "a stream's time to first token: {}", rows[1]);
    assert_eq!(rows[3]["stream"], false);
    assert_eq!(rows[3]["ttft_ms"], Value::Null);

    // Filters and the next page.
    let page = app
        .request(Method::GET, &format!("/v0/usage/requests?principal=key:{key_id}&limit=2"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("page");
    let link = page.headers()["link"].to_str().expect("link").to_owned();
    assert_eq!(crate::helpers::body(page).await.as_array().map(Vec::len), Some(2));
    let next = link.trim_start_matches('<').split('>').next().expect("next").to_owned();
    let rest =
        crate::helpers::body(app.request(Method::GET, &next).bearer_auth(&admin).send().await.expect("next")).await;
    assert_eq!(rest.as_array().map(Vec::len), Some(1), "{next}");

    // The fleet's last hour: this minute's two streams give its time-to-first-token percentiles.
    let live = app.request(Method::GET, "/v0/usage/live").bearer_auth(&admin).send().await.expect("live");
    let live = crate::helpers::body(live).await;
    let now = &live.as_array().expect("minutes")[59];
    assert_eq!(now["requests"], 4, "{now}");
    assert!(now["ttft_p50_ms"].is_u64() && now["ttft_p99_ms"].as_u64() >= now["ttft_p50_ms"].as_u64(), "{now}");

    // /metrics counts the tokens by model.
    let scraped = app.scrape().await;
    assert_eq!(scraped.value("llm_router_tokens_total", &[("model", "m"), ("kind", "prompt")]), Some(60.0));
    assert_eq!(scraped.value("llm_router_tokens_total", &[("model", "m"), ("kind", "completion")]), Some(15.0));
}

#[tokio::test]
async fn usage_answers_totals_series_and_groups_and_viewers_see_totals_only() {
    let app = TestApp::spawn().await;
    let runtime = UsageRuntime::start(&["m", "n"]).await;
    online_node(&app, "gpu-a", &runtime, &["m", "n"]).await;
    let (_, a) = create_key(&app, "team-a", json!({})).await;
    let (_, b) = create_key(&app, "=team-b", json!({})).await;
    let one = json!([{"role": "user", "content": "q"}]);
    for _ in 0..3 {
        assert_eq!(chat(&app, Some(&a), &json!({"model": "m", "messages": one})).await.status(), 200);
    }
    app.clock.advance_ms(3_600_000);
    assert_eq!(chat(&app, Some(&b), &json!({"model": "n", "messages": one})).await.status(), 200);
    recorded(&app, 4).await;

    let admin = app.admin_token().await;
    let get = |path: String, token: String| {
        let request = app.request(Method::GET, &path).bearer_auth(token);
        async move { request.send().await.expect("usage") }
    };
    let to = llm_router::clock::rfc3339(app.clock_ms() + 60_000);
    let from = llm_router::clock::rfc3339(START_MS - 60_000);
    let by_principal = crate::helpers::body(
        get(format!("/v0/usage?from={from}&to={to}&step=hour&group_by=principal"), admin.clone()).await,
    )
    .await;
    assert_eq!(by_principal["totals"]["requests"], 4);
    assert_eq!(by_principal["totals"]["prompt_tokens"], 40);
    assert_eq!(by_principal["totals"]["completion_tokens"], 20);
    assert_eq!(by_principal["series"].as_array().map(Vec::len), Some(2), "two hours: {by_principal}");
    let groups = by_principal["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2);
    assert_eq!((groups[0]["name"].as_str(), groups[0]["totals"]["requests"].as_u64()), (Some("team-a"), Some(3)));
    assert_eq!(groups[1]["name"], "=team-b");

    let by_model = crate::helpers::body(
        get(format!("/v0/usage?from={from}&to={to}&step=day&group_by=model"), admin.clone()).await,
    )
    .await;
    let models: Vec<&str> =
        by_model["groups"].as_array().expect("groups").iter().filter_map(|g| g["key"].as_str()).collect();
    assert_eq!(models, ["m", "n"]);
    let by_node =
        crate::helpers::body(get(format!("/v0/usage?from={from}&to={to}&group_by=node"), admin.clone()).await).await;
    assert_eq!(by_node["groups"][0]["name"], "gpu-a");
    assert_eq!(by_node["groups"][0]["totals"]["requests"], 4);

    // CSV: one line per bucket and group, a name that could be a formula quoted as text.
    let csv = app
        .request(Method::GET, &format!("/v0/usage?from={from}&to={to}&step=hour&group_by=principal"))
        .bearer_auth(&admin)
        .header("accept", "text/csv")
        .send()
        .await
        .expect("csv");
    assert!(csv.headers()["content-type"].to_str().expect("type").starts_with("text/csv"));
    let text = csv.text().await.expect("text");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("at,group,name,requests"));
    assert!(lines.iter().any(|l| l.contains(",'=team-b,1,")), "{text}");

    // Viewers: totals, never who.
    let viewer = app.user_token("watcher", "viewer").await;
    let totals = get(format!("/v0/usage?from={from}&to={to}"), viewer.clone()).await;
    assert_eq!(totals.status(), 200);
    let totals = crate::helpers::body(totals).await;
    assert_eq!(totals["totals"]["requests"], 4);
    assert!(totals.get("groups").is_none());
    assert_error(get("/v0/usage?group_by=principal".to_owned(), viewer.clone()).await, 403, "forbidden").await;
    assert_error(get("/v0/usage/requests".to_owned(), viewer).await, 403, "forbidden").await;

    // Bad questions: a clear 400 each.
    for bad in [
        "/v0/usage?from=yesterday",
        "/v0/usage?step=week",
        "/v0/usage?group_by=node&step=minute",
        "/v0/usage?from=2020-01-01T00:00:00Z&step=minute",
        "/v0/usage?from=2030-01-01T00:00:00Z&to=2029-01-01T00:00:00Z",
    ] {
        assert_error(get(bad.to_owned(), admin.clone()).await, 400, "invalid_request").await;
    }

    // The last hour, per minute.
    let live = crate::helpers::body(get("/v0/usage/live".to_owned(), admin.clone()).await).await;
    let minutes = live.as_array().expect("minutes");
    assert_eq!(minutes.len(), 60);
    assert_eq!(minutes.iter().map(|m| m["requests"].as_u64().unwrap_or(0)).sum::<u64>(), 1, "{live}");
}

#[tokio::test]
async fn a_key_over_its_requests_per_minute_gets_openai_429s_until_the_minute_turns() {
    let app = TestApp::spawn().await;
    let runtime = UsageRuntime::start(&["m"]).await;
    online_node(&app, "gpu-a", &runtime, &["m"]).await;
    let (_, key) = create_key(&app, "app", json!({"limits": {"requests_per_minute": 2}})).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "q"}]});
    // Start of a minute, so the test's requests share it.
    let into_minute = app.clock_ms().rem_euclid(60_000);
    app.clock.advance_ms(60_000 - into_minute);
    for remaining in ["1", "0"] {
        let answer = chat(&app, Some(&key), &body).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(answer.headers()["x-ratelimit-remaining-requests"], remaining);
        assert_eq!(answer.headers()["x-ratelimit-reset-requests"], "1m0s");
    }
    app.clock.advance_ms(20_000);
    let refused = chat(&app, Some(&key), &body).await;
    assert_eq!(refused.headers()["retry-after"], "40");
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    openai_error(refused, 429, "rate_limit_exceeded").await;
    assert_eq!(runtime.bodies.lock().expect("lock").len(), 2, "the refused request reached no node");
    app.clock.advance_ms(40_000);
    assert_eq!(chat(&app, Some(&key), &body).await.status(), 200, "a new minute");
    let scraped = app.scrape().await;
    assert_eq!(scraped.value("llm_router_rate_limited_total", &[("reason", "requests_per_minute")]), Some(1.0));
    // The refusal is recorded too, as the key's.
    let rows = recorded(&app, 4).await;
    assert_eq!(rows.iter().filter(|r| r["status"] == 429).count(), 1);
    // A key without limits gets no rate-limit headers.
    let (_, free) = create_key(&app, "free", json!({})).await;
    assert!(!chat(&app, Some(&free), &body).await.headers().contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn a_spent_token_budget_refuses_with_insufficient_quota_until_the_day_turns() {
    let app = TestApp::spawn().await;
    let runtime = UsageRuntime::start(&["m"]).await;
    online_node(&app, "gpu-a", &runtime, &["m"]).await;
    let (id, key) = create_key(&app, "nightly", json!({"limits": {"tokens_per_day": 40}})).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "q"}]});
    // Each answer uses 15 tokens: admitted while under 40, so three answers (45 tokens), then refused.
    for _ in 0..3 {
        let answer = chat(&app, Some(&key), &body).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["x-ratelimit-limit-tokens"], "40");
        answer.bytes().await.expect("body");
        recorded(&app, 0).await;
    }
    // The third answer's tokens count once its answer has ended: soon after its last byte.
    let started = std::time::Instant::now();
    let refused = loop {
        let answer = chat(&app, Some(&key), &body).await;
        if answer.status() == 429 {
            break answer;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the spent budget did not refuse");
        tokio::time::sleep(POLL).await;
    };
    let retry: u64 = refused.headers()["retry-after"].to_str().expect("text").parse().expect("seconds");
    assert!(retry > 0 && retry <= 86_400);
    openai_error(refused, 429, "insufficient_quota").await;
    // The key's view shows its limits and what it used.
    let admin = app.admin_token().await;
    let keys =
        crate::helpers::body(app.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("keys"))
            .await;
    let view = keys.as_array().expect("keys").iter().find(|k| k["id"] == id.as_str()).expect("the key").clone();
    assert_eq!(view["limits"]["tokens_per_day"], 40);
    assert!(view["used"]["tokens_today"].as_u64().is_some_and(|t| t >= 45), "{view}");
    // A new day.
    app.clock.advance_ms(86_400_000);
    assert_eq!(chat(&app, Some(&key), &body).await.status(), 200);
}

#[tokio::test]
async fn limits_are_set_and_changed_by_admins_validated_and_audited() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let (id, _) = create_key(&app, "svc", json!({"weight": 5})).await;
    let patch = |path: String, body: Value| {
        let request = app.request(Method::PATCH, &path).bearer_auth(&admin).json(&body);
        async move { request.send().await.expect("patch") }
    };
    let changed = patch(format!("/v0/api-keys/{id}"), json!({"limits": {"tokens_per_month": 1000000}})).await;
    assert_eq!(changed.status(), 200);
    let changed = crate::helpers::body(changed).await;
    assert_eq!(changed["limits"], json!({"tokens_per_month": 1000000}));
    assert_eq!(changed["weight"], 5, "a field left out stays");
    let cleared =
        crate::helpers::body(patch(format!("/v0/api-keys/{id}"), json!({"limits": null, "weight": 1})).await).await;
    assert_eq!((cleared["limits"].clone(), cleared["weight"].clone()), (json!({}), json!(1)));
    for bad in [
        json!({"limits": {"requests_per_minute": 0}}),
        json!({"limits": {"requests_per_hour": 5}}),
        json!({"weight": 101}),
        json!({"limits": {"tokens_per_day": -1}}),
    ] {
        assert_error(patch(format!("/v0/api-keys/{id}"), bad).await, 400, "invalid_request").await;
    }
    assert_error(patch(format!("/v0/api-keys/{}", uuid::Uuid::new_v4()), json!({"weight": 2})).await, 404, "not_found")
        .await;
    let user = patch("/v0/users/admin".to_owned(), json!({"limits": {"requests_per_minute": 100}})).await;
    assert_eq!(crate::helpers::body(user).await["limits"]["requests_per_minute"], 100);
    assert_error(patch("/v0/users/nobody".to_owned(), json!({"limits": null})).await, 404, "not_found").await;
    let viewer = app.user_token("watcher", "viewer").await;
    let as_viewer =
        app.request(Method::PATCH, &format!("/v0/api-keys/{id}")).bearer_auth(&viewer).json(&json!({"weight": 2}));
    assert_error(as_viewer.send().await.expect("patch"), 403, "forbidden").await;

    app.state.audit.flush().await;
    let audit = crate::helpers::body(
        app.request(Method::GET, "/v0/audit?action=api_key.update").bearer_auth(&admin).send().await.expect("audit"),
    )
    .await;
    let outcomes: Vec<&str> = audit.as_array().expect("events").iter().filter_map(|e| e["outcome"].as_str()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "success").count(), 2, "{audit}");
    assert!(outcomes.contains(&"failure"));
    let users = crate::helpers::body(
        app.request(Method::GET, "/v0/audit?action=user.update").bearer_auth(&admin).send().await.expect("audit"),
    )
    .await;
    assert_eq!(users.as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn old_records_and_sums_are_pruned_by_their_retention() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.request_log = Duration::from_secs(86_400);
        settings.usage_retention = Duration::from_secs(3 * 86_400);
    })
    .await;
    let runtime = UsageRuntime::start(&["m"]).await;
    online_node(&app, "gpu-a", &runtime, &["m"]).await;
    let (_, key) = create_key(&app, "k", json!({})).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "q"}]});
    assert_eq!(chat(&app, Some(&key), &body).await.status(), 200);
    recorded(&app, 1).await;
    app.clock.advance_ms(2 * 86_400_000);
    assert_eq!(chat(&app, Some(&key), &body).await.status(), 200);
    recorded(&app, 2).await;
    let removed = llm_router::app::prune_usage(&app.state).await.expect("prune");
    assert_eq!(recorded(&app, 1).await.len(), 1, "the older record went");
    let admin = app.admin_token().await;
    let from = llm_router::clock::rfc3339(START_MS - 86_400_000);
    let usage = app.request(Method::GET, &format!("/v0/usage?from={from}&step=day")).bearer_auth(&admin);
    assert_eq!(crate::helpers::body(usage.send().await.expect("usage")).await["totals"]["requests"], 2, "sums stay");
    app.clock.advance_ms(2 * 86_400_000);
    let more = llm_router::app::prune_usage(&app.state).await.expect("prune");
    assert!(removed >= 1 && more >= 5, "{removed} then {more}");
    let usage = app.request(Method::GET, &format!("/v0/usage?from={from}&step=day")).bearer_auth(&admin);
    assert_eq!(crate::helpers::body(usage.send().await.expect("usage")).await["totals"]["requests"], 1);
}

#[tokio::test]
async fn two_routers_on_one_database_hold_one_requests_per_minute() {
    let Some(server) = postgres_server() else { return };
    let database = PgDatabase::create_on(&server).await;
    let options = || Options { database: Database::Postgres(database.clone()), ..Options::default() };
    let a = TestApp::with(options()).await;
    let b = TestApp::with(options()).await;
    let runtime = UsageRuntime::start(&["m"]).await;
    let node = a.register_node_at("gpu-a", runtime.addr.port()).await;
    assert_eq!(a.approve(&a.admin_token().await, &node.id).await.status(), 200);
    within(Duration::from_secs(5), "B routes to the node", || async {
        // The node heartbeats to either router, as behind a load balancer.
        b.heartbeat(&node, &["m"]).await.status() == 200
            && b.state.registry.routing().models().contains(&"m".to_owned())
    })
    .await;
    assert_eq!(a.heartbeat(&node, &["m"]).await.status(), 200);
    let (id, key) = create_key(&a, "shared", json!({"limits": {"requests_per_minute": 100}})).await;
    let tenant = format!("key:{id}");
    within(Duration::from_secs(5), "B knows the key's limit", || async {
        b.state.credentials.limiter().limits(&tenant).requests_per_minute == Some(100)
    })
    .await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "q"}]});
    let into_minute = a.clock_ms().rem_euclid(60_000);
    a.clock.advance_ms(60_000 - into_minute);
    b.clock.advance_ms(a.clock_ms() - b.clock_ms());
    let mut admitted = 0;
    for i in 0..160 {
        let router = if i % 2 == 0 { &a } else { &b };
        admitted += usize::from(chat(router, Some(&key), &body).await.status() == 200);
    }
    // SPEC §14: at most 2 % over, plus one per router.
    assert!(admitted <= 100 + 2 + 2, "{admitted} admitted of a limit of 100");
    assert!(admitted >= 90, "{admitted}: claims left unused are few");
}
