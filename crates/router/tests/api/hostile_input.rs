//! What a stranger on the network may send (SPEC §9 "Bounded work for strangers"): the reachability probe's limits,
//! the address rules, control characters in every string, numeric bounds, passwords and the session cookie.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

const MIB: usize = 1 << 20;

fn probing() -> Options {
    Options { reachability_check: true, ..Options::default() }
}

#[tokio::test]
async fn the_probe_reads_at_most_1_mib_of_a_streamed_model_list() {
    let app = TestApp::with(probing()).await;
    let runtime = StandInRuntime::start(&["m1"]).await;
    runtime.stream(2 * MIB);
    let message =
        assert_error(app.register(&registration("gpu-big", runtime.addr.port())).await, 422, "node_unreachable").await;
    assert!(message.contains("1 MiB") && message.contains("/v1/models"), "{message}");
    assert!(app.nodes().await.is_empty());

    // Just under the limit is an ordinary answer.
    runtime.stream(MIB - 16);
    let response = app.register(&registration("gpu-fits", runtime.addr.port())).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    assert_eq!(app.node(&id).await["loaded_models"], json!(["m1"]));
}

#[tokio::test]
async fn a_declared_length_over_1_mib_is_refused_before_reading() {
    let app = TestApp::with(probing()).await;
    let runtime = StandInRuntime::start(&[]).await;
    // The runtime announces 1 GiB and then stalls: reading would only end at the probe's timeout.
    runtime.declare_length(1 << 30);
    let message =
        assert_error(app.register(&registration("gpu-liar", runtime.addr.port())).await, 422, "node_unreachable").await;
    assert!(message.contains("announced") && message.contains(&(1u64 << 30).to_string()), "{message}");
    assert!(message.contains("1 MiB"), "{message}");
}

#[tokio::test]
async fn the_probe_keeps_the_first_1024_valid_model_ids() {
    let app = TestApp::with(probing()).await;
    let mut models = vec![" ".to_owned(), "evil\u{1b}[2J".to_owned(), "a\u{0}b".to_owned()];
    models.extend((0..100).map(|i| format!("{i}-{}", "x".repeat(600))));
    models.extend((0..5000).map(|i| format!("model-{i}")));
    let runtime = StandInRuntime::start(&[]).await;
    runtime.list(models);
    let response = app.register(&registration("gpu-many", runtime.addr.port())).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    let node = app.node(&id).await;
    let loaded = node["loaded_models"].as_array().expect("list");
    assert_eq!(loaded.len(), 1024);
    assert_eq!(loaded[0], "model-0");
    assert_eq!(loaded[1023], "model-1023");

    // What was kept survives a restart: it was stored, not only held in memory.
    let app = app.restart(0).await;
    assert_eq!(app.node(&id).await["loaded_models"].as_array().expect("list").len(), 1024);
}

#[tokio::test]
async fn the_probe_does_not_follow_redirects() {
    let app = TestApp::with(probing()).await;
    let target = StandInRuntime::start(&["m1"]).await;
    let runtime = StandInRuntime::start(&[]).await;
    runtime.redirect_to(format!("http://{}/v1/models", target.addr));
    let message =
        assert_error(app.register(&registration("gpu-redirect", runtime.addr.port())).await, 422, "node_unreachable")
            .await;
    assert!(message.contains("302") && message.contains("redirect"), "{message}");
    assert!(app.nodes().await.is_empty());
}

fn at(ip: &str) -> Value {
    let mut request = registration(&format!("gpu-at-{ip}"), 8000);
    request["ip_address"] = json!(ip);
    request
}

#[tokio::test]
async fn addresses_that_can_never_be_a_node_are_400_in_every_form() {
    let app = TestApp::with(Options { allow_link_local_nodes: true, ..Options::default() }).await;
    for ip in ["0.0.0.0", "::", "224.0.0.251", "ff02::1", "255.255.255.255", "::ffff:0.0.0.0", "::ffff:255.255.255.255"]
    {
        let message = assert_error(app.register(&at(ip)).await, 400, "invalid_request").await;
        assert!(message.contains("ip_address") && message.contains("never"), "{ip}: {message}");
    }
    assert!(app.nodes().await.is_empty());
    // Loopback stays allowed: a router and a node on one machine.
    for ip in ["127.0.0.1", "::1"] {
        assert_eq!(app.register(&at(ip)).await.status(), 201, "{ip}");
    }
}

#[tokio::test]
async fn link_local_and_metadata_addresses_need_the_flag() {
    let app = TestApp::spawn().await;
    for ip in ["169.254.169.254", "169.254.10.20", "fe80::1", "::ffff:169.254.169.254", "fd00:ec2::254"] {
        let message = assert_error(app.register(&at(ip)).await, 400, "invalid_request").await;
        assert!(message.contains("ip_address") && message.contains("--allow-link-local-nodes"), "{ip}: {message}");
    }
    assert!(app.nodes().await.is_empty());

    let app = TestApp::with(Options { allow_link_local_nodes: true, ..Options::default() }).await;
    let response = app.register(&at("::ffff:169.254.169.254")).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    assert_eq!(app.node(&id).await["ip_address"], "169.254.169.254", "stored in its IPv4 form");
}

/// A control character of each kind the SPEC names: NUL, an ANSI escape, CR/LF, DEL.
const CONTROLS: [&str; 4] = ["a\u{0}b", "\u{1b}[31mred", "line\r\nbreak", "del\u{7f}"];

/// Puts a string into one field of a registration body.
type SetField = fn(&mut Value, &str);

#[tokio::test]
async fn control_characters_in_a_registration_are_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let fields: [(&str, SetField); 7] = [
        ("machine_name", |r, s| r["machine_name"] = json!(s)),
        ("runtime_version", |r, s| r["runtime_version"] = json!(s)),
        ("gpu_devices[0].model", |r, s| r["gpu_devices"][0]["model"] = json!(s)),
        ("supported_runtimes[0]", |r, s| r["supported_runtimes"] = json!([s])),
        ("loaded_models[0]", |r, s| r["loaded_models"] = json!([s])),
        ("ready_models[1]", |r, s| r["ready_models"] = json!(["ok", s])),
        ("tags[0]", |r, s| r["tags"] = json!([s])),
    ];
    for (field, set) in fields {
        for bad in CONTROLS {
            let mut request = registration("gpu-ctl", 8000);
            set(&mut request, bad);
            let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
            assert!(message.contains(&format!("`{field}`")) && message.contains("control"), "{field}: {message}");
        }
    }
    assert!(app.nodes().await.is_empty());
    // Text beyond ASCII is welcome.
    let mut request = registration("gpu-ünïcode-🚀", 8000);
    request["tags"] = json!(["Zürich", "ラック"]);
    assert_eq!(app.register(&request).await.status(), 201);
}

#[tokio::test]
async fn control_characters_and_wild_numbers_in_a_heartbeat_are_400_and_change_nothing() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-hb").await;
    let bodies = [
        ("loaded_models[0]", json!({"node_id": node.id, "loaded_models": ["m\u{1b}[2J"]})),
        ("ready_models[0]", json!({"node_id": node.id, "ready_models": ["m\r\n"]})),
        ("gpus[0].model", json!({"node_id": node.id, "gpus": [{"index": 0, "model": "L4\u{0}"}]})),
        ("gpus[1].index", json!({"node_id": node.id, "gpus": [{"index": 0}, {"index": 1024}]})),
        (
            "gpus[0].memory_used_bytes",
            json!({"node_id": node.id, "gpus": [{"index": 0, "memory_used_bytes": (1u64 << 50) + 1}]}),
        ),
        (
            "gpus[0].memory_total_bytes",
            json!({"node_id": node.id, "gpus": [{"index": 0, "memory_total_bytes": u64::MAX}]}),
        ),
        ("active_requests", json!({"node_id": node.id, "active_requests": 1_000_001})),
    ];
    for (field, heartbeat) in bodies {
        let message = assert_error(app.heartbeat_body(&node.token, &heartbeat).await, 400, "invalid_request").await;
        assert!(message.contains(&format!("`{field}`")), "{field}: {message}");
    }
    assert!(app.node(&node.id).await["metrics"].is_null(), "a refused heartbeat records nothing");
    let fine = json!({"node_id": node.id, "active_requests": 1_000_000,
        "gpus": [{"index": 1023, "model": "NVIDIA L4", "memory_total_bytes": 1u64 << 50}]});
    assert_eq!(app.heartbeat_body(&node.token, &fine).await.status(), 200);
}

#[tokio::test]
async fn gpu_counts_and_memory_are_bounded_at_registration() {
    let app = TestApp::spawn().await;
    let mut request = registration("gpu-many-gpus", 8000);
    request["gpu_devices"] = json!([{"model": "NVIDIA L4", "count": 1025}]);
    let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
    assert!(message.contains("gpu_devices[0].count") && message.contains("1024"), "{message}");
    request["gpu_devices"] = json!([{"model": "NVIDIA L4", "count": 1, "memory_bytes": (1u64 << 50) + 1}]);
    let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
    assert!(message.contains("gpu_devices[0].memory_bytes"), "{message}");
    assert!(app.nodes().await.is_empty());
    request["gpu_devices"] = json!([{"model": "NVIDIA L4", "count": 1024, "memory_bytes": 1u64 << 50}]);
    assert_eq!(app.register(&request).await.status(), 201);
}

#[tokio::test]
async fn node_edits_refuse_control_characters_but_notes_keep_line_breaks_and_tabs() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-edit").await;
    let admin = app.admin_token().await;
    let path = format!("/v0/nodes/{}", node.id);
    let patch = |body: Value| app.request(Method::PATCH, &path).bearer_auth(&admin).json(&body).send();
    for (field, body) in [
        ("display_name", json!({"display_name": "rack\na"})),
        ("notes", json!({"notes": "ok\rnot ok"})),
        ("notes", json!({"notes": "bell\u{7}"})),
        ("tags[1]", json!({"tags": ["ok", "\u{1b}[1m"]})),
    ] {
        let message = assert_error(patch(body).await.expect("patch"), 400, "invalid_request").await;
        assert!(message.contains(&format!("`{field}`")), "{field}: {message}");
    }
    let stored = app.node(&node.id).await;
    assert!(stored["display_name"].is_null() && stored["notes"].is_null(), "{stored}");

    let notes = "Spare PSU in the rack.\n\tOwner: ops";
    let response = patch(json!({"notes": notes})).await.expect("patch");
    assert_eq!(response.status(), 200);
    assert_eq!(app.node(&node.id).await["notes"], notes);
}

#[tokio::test]
async fn user_names_passwords_key_names_and_sign_in_refuse_control_characters() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let post = |path: &'static str, body: Value| app.request(Method::POST, path).bearer_auth(&admin).json(&body).send();

    let response = post("/v0/users", json!({"username": "ops", "password": "twelve-chars\u{0}", "role": "viewer"}));
    let message = assert_error(response.await.expect("user"), 400, "invalid_request").await;
    assert!(message.contains("`password`") && message.contains("control"), "{message}");
    let response = post("/v0/users", json!({"username": "ops\n", "password": "twelve-chars", "role": "viewer"}));
    assert!(assert_error(response.await.expect("user"), 400, "invalid_request").await.contains("`username`"));
    let response = post("/v0/api-keys", json!({"name": "ci\u{1b}[8m"}));
    let message = assert_error(response.await.expect("key"), 400, "invalid_request").await;
    assert!(message.contains("`name`") && message.contains("control"), "{message}");

    let message = assert_error(app.login("admin\u{0}", ADMIN_PASSWORD).await, 400, "invalid_request").await;
    assert!(message.contains("`username`"), "{message}");

    let users = body(app.request(Method::GET, "/v0/users").bearer_auth(&admin).send().await.expect("users")).await;
    assert_eq!(users.as_array().expect("array").len(), 1, "{users}");
    let keys = body(app.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("keys")).await;
    assert_eq!(keys, json!([]));
}

#[tokio::test]
async fn new_passwords_need_twelve_characters() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let create = |name: &str, password: &str| {
        app.request(Method::POST, "/v0/users")
            .bearer_auth(&admin)
            .json(&json!({"username": name, "password": password, "role": "viewer"}))
            .send()
    };
    for short in ["12345678", "elevenchars", "ünïcödé-11"] {
        let message = assert_error(create("short", short).await.expect("create"), 400, "invalid_request").await;
        assert!(message.contains("`password`") && message.contains("at least 12"), "{short}: {message}");
    }
    assert_eq!(create("twelve", "twelve-chars").await.expect("create").status(), 201);
    assert_eq!(app.login("twelve", "twelve-chars").await.status(), 200);
}

fn set_cookie(response: &reqwest::Response) -> String {
    response.headers().get("set-cookie").and_then(|v| v.to_str().ok()).expect("Set-Cookie").to_owned()
}

#[tokio::test]
async fn the_session_cookie_is_secure_behind_an_https_public_url() {
    let app = TestApp::with(Options { public_url: Some("https://router.example".into()), ..Options::default() }).await;
    let login = app.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(login.status(), 200);
    let cookie = set_cookie(&login);
    assert!(cookie.contains("; Secure") && cookie.contains("HttpOnly"), "{cookie}");
    let token = body(login).await["token"].as_str().expect("token").to_owned();
    let logout = app.request(Method::POST, "/v0/auth/logout").bearer_auth(&token).send().await.expect("logout");
    assert_eq!(logout.status(), 204);
    let cookie = set_cookie(&logout);
    assert!(cookie.contains("Max-Age=0") && cookie.contains("; Secure"), "{cookie}");

    let app = TestApp::with(Options { public_url: Some("http://router.example".into()), ..Options::default() }).await;
    let cookie = set_cookie(&app.login("admin", ADMIN_PASSWORD).await);
    assert!(!cookie.contains("Secure"), "{cookie}");
}
