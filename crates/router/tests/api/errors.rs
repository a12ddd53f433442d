//! Whatever the framework would reject on its own is answered in the SPEC §2 JSON shape, and no input gets a 5xx.

use reqwest::Method;

use crate::helpers::*;

#[tokio::test]
async fn framework_rejections_are_json_errors() {
    let app = TestApp::spawn().await;
    let raw = |method: Method, path: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut request = app.request(method, path).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    let json = Some("application/json");
    let malformed = raw(Method::POST, "/v0/nodes", json, b"{\"machine_name\": ".to_vec()).await.expect("send");
    assert_error(malformed, 400, "invalid_request").await;
    let trailing = raw(Method::POST, "/v0/auth/login", json, b"{} {}".to_vec()).await.expect("send");
    assert_error(trailing, 400, "invalid_request").await;
    let text = raw(Method::POST, "/v0/nodes", Some("text/plain"), b"{}".to_vec()).await.expect("send");
    assert_error(text, 415, "unsupported_media_type").await;
    // A heartbeat's token is checked before its body is read: a stranger's body is never parsed.
    let none = raw(Method::POST, "/v0/health", None, b"{}".to_vec()).await.expect("send");
    assert_error(none, 401, "unauthorized").await;
    let node = app.register_node("rejections").await;
    let none = app
        .request(Method::POST, "/v0/health")
        .header("X-Node-Token", &node.token)
        .body(b"{}".to_vec())
        .send()
        .await
        .expect("send");
    assert_error(none, 415, "unsupported_media_type").await;
    let huge = raw(Method::POST, "/v0/nodes", json, vec![b' '; 2 * 1024 * 1024]).await.expect("send");
    assert_error(huge, 413, "payload_too_large").await;
    let unknown = raw(Method::GET, "/v0/nothing-here", None, vec![]).await.expect("send");
    assert_error(unknown, 404, "not_found").await;
    let method = raw(Method::PUT, "/v0/nodes", json, b"{}".to_vec()).await.expect("send");
    assert_error(method, 405, "method_not_allowed").await;
    let method = raw(Method::GET, "/v0/health", None, vec![]).await.expect("send");
    assert_error(method, 405, "method_not_allowed").await;
    assert_eq!(app.nodes().await.len(), 1, "only the node registered here");
}

/// A query string that does not parse is the API's JSON 400, naming the parameter, on every route that reads one.
#[tokio::test]
async fn bad_query_strings_are_json_errors_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("queries").await;
    let paths = [
        "/v0/audit?limit=many".to_owned(),
        "/v0/fleet/events?limit=-1".to_owned(),
        format!("/v0/nodes/{}/events?before=yesterday", node.id),
        "/healthz?require=changes&require=changes".to_owned(),
    ];
    for path in paths {
        let answer = app.request(Method::GET, &path).bearer_auth(&admin).send().await.expect("send");
        let message = assert_error(answer, 400, "invalid_request").await;
        assert!(message.starts_with("Bad query string"), "{path}: {message}");
        let named = ["limit", "before", "require"].iter().any(|name| message.contains(name));
        assert!(named, "{path}: the message names the parameter: {message}");
    }
    // A query string that parses still works.
    let answer = app.request(Method::GET, "/healthz?require=changes").send().await.expect("send");
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn odd_bodies_never_get_a_server_error() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let node = app.register_node("gpu-fuzz").await;
    let bodies: Vec<String> = vec![
        "null".into(),
        "[]".into(),
        "42".into(),
        "\"text\"".into(),
        "{}".into(),
        format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
        r#"{"machine_name": "\u0000", "runtime_port": 1e400, "runtime_version": "v"}"#.into(),
        r#"{"machine_name": "a", "runtime_port": 18446744073709551616, "runtime_version": "v"}"#.into(),
        r#"{"machine_name": "ø✓🙂", "runtime_port": 9, "runtime_version": "v", "gpu_devices": [{"model": "X", "count": 9223372036854775807}]}"#.into(),
        format!(r#"{{"node_id": "{}", "cpu_usage": "NaN"}}"#, node.id),
        format!(r#"{{"node_id": "{}", "gpus": [{{"index": -1}}]}}"#, node.id),
        r#"{"username": 1, "password": null}"#.into(),
        "\u{feff}{}".into(),
    ];
    let paths = ["/v0/nodes", "/v0/health", "/v0/auth/login", "/v0/users", "/v0/api-keys"];
    for path in paths {
        for body in &bodies {
            let response = app
                .request(Method::POST, path)
                .header("content-type", "application/json")
                .header("X-Node-Token", &node.token)
                .bearer_auth(&token)
                .body(body.clone())
                .send()
                .await
                .expect("send");
            let status = response.status();
            assert!(status.as_u16() < 500, "{path} {body:.60}: {status}");
            if !status.is_success() {
                let value: serde_json::Value = response.json().await.expect("JSON error body");
                assert!(value["error"]["code"].is_string(), "{path}: {value}");
            }
        }
    }
}
