//! The audit log (SPEC §9): admin actions, sign-ins and throttling decisions, with actor, client address, action,
//! target and outcome; `GET /v0/audit` pages it, newest first, and filters by actor or action.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

async fn audit(app: &TestApp, query: &str) -> (Vec<Value>, Option<String>) {
    let admin = app.admin_token().await;
    let answer =
        app.request(Method::GET, &format!("/v0/audit{query}")).bearer_auth(&admin).send().await.expect("audit");
    assert_eq!(answer.status(), 200);
    let link = answer.headers().get("link").map(|v| v.to_str().expect("link").to_owned());
    (body(answer).await.as_array().expect("array").clone(), link)
}

fn summary(event: &Value) -> (String, String, String, String) {
    let text = |key: &str| event[key].as_str().unwrap_or("").to_owned();
    (text("actor"), text("action"), text("target"), text("outcome"))
}

#[tokio::test]
async fn sign_ins_are_audited_with_their_outcome_and_client_address() {
    let app = TestApp::spawn().await;
    assert_eq!(app.login("admin", "wrong password!").await.status(), 401);
    assert_eq!(app.login("nobody", "wrong password!").await.status(), 401);
    // Five failures for one username and address, then the throttle refuses.
    for _ in 0..4 {
        app.login("nobody", "wrong password!").await;
    }
    assert_eq!(app.login("nobody", "wrong password!").await.status(), 429);
    let (events, _) = audit(&app, "?action=auth.login").await;
    // Newest first: the admin's own sign-in for this query, the throttled one, then the failures.
    let outcomes: Vec<(String, String)> = events.iter().map(|e| (summary(e).0, summary(e).3)).collect();
    assert_eq!(outcomes[0], ("admin".to_owned(), "success".to_owned()));
    assert_eq!(outcomes[1], ("nobody".to_owned(), "throttled".to_owned()));
    assert_eq!(outcomes.iter().filter(|o| o.1 == "failure").count(), 6);
    assert!(events.iter().all(|e| e["client"] == "127.0.0.1"), "{events:#?}");
    let (mine, _) = audit(&app, "?actor=nobody").await;
    assert_eq!(mine.len(), 6, "five failures and the throttled attempt of `nobody`");
}

#[tokio::test]
async fn admin_actions_are_audited_with_actor_target_and_outcome() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("gpu-audited").await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    assert_eq!(app.approve(&admin, &node.id).await.status(), 409, "approving twice fails");
    let patched = app
        .request(Method::PATCH, &format!("/v0/nodes/{}", node.id))
        .bearer_auth(&admin)
        .json(&json!({"notes": "rack 4"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    let key = app.request(Method::POST, "/v0/api-keys").bearer_auth(&admin).json(&json!({"name": "ci"}));
    let key = body(key.send().await.expect("key")).await;
    let key_id = key["id"].as_str().expect("id");
    app.request(Method::DELETE, &format!("/v0/api-keys/{key_id}")).bearer_auth(&admin).send().await.expect("delete");
    let token = app.request(Method::POST, "/v0/join-tokens").bearer_auth(&admin).json(&json!({"name": "lab"}));
    assert_eq!(token.send().await.expect("token").status(), 201);
    let deleted = app.request(Method::DELETE, &format!("/v0/nodes/{}", node.id)).bearer_auth(&admin).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);

    let (events, _) = audit(&app, "?actor=admin").await;
    let actions: Vec<(String, String, String, String)> =
        events.iter().map(summary).filter(|e| e.1 != "auth.login").rev().collect();
    let expected = [
        ("node.approve", node.id.as_str(), "success"),
        ("node.approve", node.id.as_str(), "failure"),
        ("node.update", node.id.as_str(), "success"),
        ("api_key.create", "ci", "success"),
        ("api_key.delete", key_id, "success"),
        ("join_token.create", "lab", "success"),
        ("node.delete", node.id.as_str(), "success"),
    ];
    let expected: Vec<(String, String, String, String)> = expected
        .iter()
        .map(|(action, target, outcome)| ("admin".into(), (*action).into(), (*target).into(), (*outcome).into()))
        .collect();
    assert_eq!(actions, expected);
}

#[tokio::test]
async fn throttled_registrations_are_audited() {
    let app = TestApp::with(Options { registration_rate: 1, ..Options::default() }).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        statuses.push(app.register(&registration(&format!("flood-{i}"), 8000)).await.status().as_u16());
    }
    assert_eq!(statuses, vec![201, 201, 429]);
    let (events, _) = audit(&app, "?action=node.register").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        summary(&events[0]),
        ("anonymous".into(), "node.register".into(), "rate_limited".into(), "throttled".into())
    );
}

#[tokio::test]
async fn the_log_is_paged_newest_first_and_only_for_admins() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        app.login("admin", "wrong password!").await;
    }
    let (first, link) = audit(&app, "?limit=2&actor=admin").await;
    assert_eq!(first.len(), 2);
    let link = link.expect("a full page links to the next");
    let next = link.trim_start_matches('<').split('>').next().expect("url").to_owned();
    assert!(next.contains("actor=admin"), "{link}");
    let (second, _) = audit(&app, next.trim_start_matches("/v0/audit")).await;
    assert!(first[1]["id"].as_i64() > second[0]["id"].as_i64(), "older events on the next page");
    let ids: Vec<i64> = first.iter().chain(&second).map(|e| e["id"].as_i64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");

    let admin = app.admin_token().await;
    let bad = app.request(Method::GET, "/v0/audit?limit=0").bearer_auth(&admin).send().await.expect("send");
    assert_error(bad, 400, "invalid_request").await;
    let viewer = app.user_token("watcher", "viewer").await;
    let refused = app.request(Method::GET, "/v0/audit").bearer_auth(&viewer).send().await.expect("send");
    assert_error(refused, 403, "forbidden").await;
}

#[tokio::test]
async fn audit_events_are_kept_for_the_retention_period() {
    let app = TestApp::spawn().await;
    app.login("admin", "wrong password!").await;
    app.state.audit.flush().await;
    let retention = app.settings.event_retention.as_millis() as i64;
    app.clock.advance_ms(retention - 1);
    assert_eq!(llm_router::app::prune_events(&app.state).await.expect("prune"), 0, "not old enough yet");
    app.clock.advance_ms(2);
    assert_eq!(llm_router::app::prune_events(&app.state).await.expect("prune"), 1, "the failed sign-in goes");
    let (events, _) = audit(&app, "?action=auth.login&outcome=failure").await;
    assert!(events.iter().all(|e| e["outcome"] == "success"), "{events:#?}");
}
