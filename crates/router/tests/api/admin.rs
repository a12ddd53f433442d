//! The admin API (SPEC §3): sessions, roles, users, API keys, and the node actions.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn login_me_and_logout() {
    let app = TestApp::spawn().await;
    assert_error(app.login("admin", "wrong").await, 401, "invalid_credentials").await;
    assert_error(app.login("nobody", "wrong").await, 401, "invalid_credentials").await;

    let response = app.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(response.status(), 200);
    let cookie = response.headers().get("set-cookie").and_then(|v| v.to_str().ok()).expect("cookie").to_owned();
    assert!(cookie.starts_with("llm_router_session=llms_"), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let answer = body(response).await;
    assert_eq!(answer["user"], json!({"username": "admin", "role": "admin"}));
    let token = answer["token"].as_str().expect("token").to_owned();

    let me = app.request(Method::GET, "/v0/auth/me").bearer_auth(&token).send().await.expect("me");
    assert_eq!(body(me).await, json!({"username": "admin", "role": "admin"}));
    let out = app.request(Method::POST, "/v0/auth/logout").bearer_auth(&token).send().await.expect("logout");
    assert_eq!(out.status(), 204);
    let me = app.request(Method::GET, "/v0/auth/me").bearer_auth(&token).send().await.expect("me");
    assert_error(me, 401, "unauthorized").await;
}

#[tokio::test]
async fn sessions_expire() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    app.clock.advance_ms(app.settings.session_ttl.as_millis() as i64 + 1);
    let me = app.request(Method::GET, "/v0/auth/me").bearer_auth(&token).send().await.expect("me");
    assert_error(me, 401, "unauthorized").await;
}

#[tokio::test]
async fn no_credential_is_401_and_a_viewer_cannot_act() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-v").await;
    let list = app.request(Method::GET, "/v0/nodes").send().await.expect("list");
    assert_error(list, 401, "unauthorized").await;
    let bad = app.request(Method::GET, "/v0/nodes").header("Authorization", "Basic abc").send().await.expect("list");
    assert_error(bad, 401, "unauthorized").await;

    let viewer = app.user_token("watcher", "viewer").await;
    let list = app.request(Method::GET, "/v0/nodes").bearer_auth(&viewer).send().await.expect("list");
    assert_eq!(list.status(), 200);
    assert_eq!(app.get_node(&viewer, &node.id).await.status(), 200);
    let events = app.request(Method::GET, &format!("/v0/nodes/{}/events", node.id)).bearer_auth(&viewer).send();
    assert_eq!(events.await.expect("events").status(), 200);

    assert_error(app.approve(&viewer, &node.id).await, 403, "forbidden").await;
    let patch = app.request(Method::PATCH, &format!("/v0/nodes/{}", node.id)).bearer_auth(&viewer);
    assert_error(patch.json(&json!({"notes": "x"})).send().await.expect("patch"), 403, "forbidden").await;
    let delete = app.request(Method::DELETE, &format!("/v0/nodes/{}", node.id)).bearer_auth(&viewer);
    assert_error(delete.send().await.expect("delete"), 403, "forbidden").await;
    let users = app.request(Method::GET, "/v0/users").bearer_auth(&viewer).send().await.expect("users");
    assert_error(users, 403, "forbidden").await;
    let keys = app.request(Method::POST, "/v0/api-keys").bearer_auth(&viewer).json(&json!({"name": "k"}));
    assert_error(keys.send().await.expect("keys"), 403, "forbidden").await;
    assert_eq!(app.status_of(&node.id).await, "pending", "nothing changed");
}

#[tokio::test]
async fn node_lookups_filters_and_unknown_ids() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let a = app.register_node("gpu-1").await;
    app.register_node("gpu-2").await;
    assert_eq!(app.approve(&admin, &a.id).await.status(), 200);

    let pending = app.request(Method::GET, "/v0/nodes?status=pending").bearer_auth(&admin).send().await;
    let pending = body(pending.expect("list")).await;
    assert_eq!(pending.as_array().expect("array").len(), 1);
    assert_eq!(pending[0]["machine_name"], "gpu-2");
    let bad = app.request(Method::GET, "/v0/nodes?status=sleeping").bearer_auth(&admin).send().await;
    let message = assert_error(bad.expect("list"), 400, "invalid_request").await;
    assert!(message.contains("status"), "{message}");

    let missing = "00000000-0000-4000-8000-000000000000";
    assert_error(app.get_node(&admin, missing).await, 404, "not_found").await;
    assert_error(app.get_node(&admin, "not-a-uuid").await, 404, "not_found").await;
    assert_error(app.approve(&admin, missing).await, 404, "not_found").await;
    let events = app.request(Method::GET, &format!("/v0/nodes/{missing}/events")).bearer_auth(&admin).send().await;
    assert_error(events.expect("events"), 404, "not_found").await;
    let delete = app.request(Method::DELETE, &format!("/v0/nodes/{missing}")).bearer_auth(&admin).send().await;
    assert_error(delete.expect("delete"), 404, "not_found").await;
}

#[tokio::test]
async fn patch_edits_the_admin_fields_only() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("gpu-edit").await;
    let path = format!("/v0/nodes/{}", node.id);
    let patched = app
        .request(Method::PATCH, &path)
        .bearer_auth(&admin)
        .json(&json!({"display_name": "Rack A / 1", "notes": "spare PSU", "tags": ["a", "b"]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    let patched = body(patched).await;
    assert_eq!(patched["display_name"], "Rack A / 1");
    assert_eq!(patched["notes"], "spare PSU");
    assert_eq!(patched["tags"], json!(["a", "b"]));
    assert_eq!(patched["machine_name"], "gpu-edit");

    // Absent fields stay; null clears.
    let cleared = app.request(Method::PATCH, &path).bearer_auth(&admin).json(&json!({"display_name": null}));
    let cleared = body(cleared.send().await.expect("patch")).await;
    assert!(cleared["display_name"].is_null());
    assert_eq!(cleared["notes"], "spare PSU");

    let too_long =
        app.request(Method::PATCH, &path).bearer_auth(&admin).json(&json!({"display_name": "x".repeat(300)}));
    let message = assert_error(too_long.send().await.expect("patch"), 400, "invalid_request").await;
    assert!(message.contains("display_name"));
    let blank_tag = app.request(Method::PATCH, &path).bearer_auth(&admin).json(&json!({"tags": ["ok", " "]}));
    assert_error(blank_tag.send().await.expect("patch"), 400, "invalid_request").await;
    assert_eq!(app.node(&node.id).await["tags"], json!(["a", "b"]));
}

#[tokio::test]
async fn users_are_created_listed_and_deleted_with_argon2id_hashes() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let create =
        |body: serde_json::Value| app.request(Method::POST, "/v0/users").bearer_auth(&admin).json(&body).send();
    let created =
        create(json!({"username": "ops", "password": "long-enough-pw", "role": "admin"})).await.expect("create");
    assert_eq!(created.status(), 201);
    assert_eq!(body(created).await["role"], "admin");
    let duplicate = create(json!({"username": "ops", "password": "long-enough-pw", "role": "viewer"})).await;
    assert_error(duplicate.expect("dup"), 409, "conflict").await;
    let short = create(json!({"username": "x", "password": "short", "role": "viewer"})).await;
    assert!(assert_error(short.expect("short"), 400, "invalid_request").await.contains("password"));
    let role = create(json!({"username": "y", "password": "long-enough-pw", "role": "root"})).await;
    assert!(assert_error(role.expect("role"), 400, "invalid_request").await.contains("role"));

    assert_eq!(app.login("ops", "long-enough-pw").await.status(), 200);
    let (hash,): (String,) =
        app.sql().await.fetch_one("SELECT password_hash FROM users WHERE username = 'ops'", &[]).await;
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    let listed = body(app.request(Method::GET, "/v0/users").bearer_auth(&admin).send().await.expect("list")).await;
    let names: Vec<&str> =
        listed.as_array().expect("array").iter().map(|u| u["username"].as_str().expect("name")).collect();
    assert_eq!(names, ["admin", "ops"]);
    assert!(!listed.to_string().contains("argon2"), "hashes are never listed");

    let ops_token = body(app.login("ops", "long-enough-pw").await).await["token"].as_str().expect("t").to_owned();
    let deleted = app.request(Method::DELETE, "/v0/users/ops").bearer_auth(&admin).send().await.expect("delete");
    assert_eq!(deleted.status(), 204);
    let me = app.request(Method::GET, "/v0/auth/me").bearer_auth(&ops_token).send().await.expect("me");
    assert_error(me, 401, "unauthorized").await;
    let again = app.request(Method::DELETE, "/v0/users/ops").bearer_auth(&admin).send().await.expect("delete");
    assert_error(again, 404, "not_found").await;
    let last = app.request(Method::DELETE, "/v0/users/admin").bearer_auth(&admin).send().await.expect("delete");
    assert!(assert_error(last, 409, "conflict").await.contains("last administrator"));
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_and_revocable() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let created = app.request(Method::POST, "/v0/api-keys").bearer_auth(&admin).json(&json!({"name": "ci"}));
    let created = created.send().await.expect("create");
    assert_eq!(created.status(), 201);
    let created = body(created).await;
    let key = created["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("llmk_"));
    assert_eq!(created["name"], "ci");
    assert!(created["created_at"].is_string() && created["id"].is_string());

    let listed = body(app.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("list")).await;
    assert_eq!(listed.as_array().expect("array").len(), 1);
    assert!(!listed.to_string().contains(&key) && listed[0].get("key").is_none());

    // The key works as a bearer credential with the admin role.
    let node = app.register_node("gpu-key").await;
    assert_eq!(app.approve(&key, &node.id).await.status(), 200);
    assert_eq!(app.events(&node.id).await[0]["actor"], "api-key:ci");

    let id = created["id"].as_str().expect("id");
    let deleted = app.request(Method::DELETE, &format!("/v0/api-keys/{id}")).bearer_auth(&admin).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);
    assert_error(app.get_node(&key, &node.id).await, 401, "unauthorized").await;
    let blank = app.request(Method::POST, "/v0/api-keys").bearer_auth(&admin).json(&json!({"name": " "}));
    assert_error(blank.send().await.expect("blank"), 400, "invalid_request").await;
}

#[tokio::test]
async fn the_session_cookie_needs_a_custom_header_for_changes() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-cookie").await;
    let token = app.admin_token().await;
    let cookie = format!("llm_router_session={token}");
    let read = app.request(Method::GET, "/v0/nodes").header("Cookie", &cookie).send().await.expect("read");
    assert_eq!(read.status(), 200);
    let path = format!("/v0/nodes/{}/approve", node.id);
    let forged = app.request(Method::POST, &path).header("Cookie", &cookie).send().await.expect("forged");
    assert!(assert_error(forged, 403, "forbidden").await.contains("X-Requested-With"));
    assert_eq!(app.status_of(&node.id).await, "pending");
    let real = app
        .request(Method::POST, &path)
        .header("Cookie", &cookie)
        .header("X-Requested-With", "llm-router-dashboard")
        .send()
        .await
        .expect("approve");
    assert_eq!(real.status(), 200);
}

#[tokio::test]
async fn deletion_is_recorded_with_its_actor() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("gpu-audit").await;
    let deleted = app.request(Method::DELETE, &format!("/v0/nodes/{}", node.id)).bearer_auth(&admin).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);
    let (to, actor): (String, String) = app
        .sql()
        .await
        .fetch_one("SELECT to_status, actor FROM node_events WHERE node_id = $1 ORDER BY id DESC LIMIT 1", &[&node.id])
        .await;
    assert_eq!((to.as_str(), actor.as_str()), ("deleted", "admin"));
}
