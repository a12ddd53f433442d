//! The HTTP server's bounds (SPEC §9): `nosniff` on every answer.

use reqwest::Method;

use crate::helpers::*;

#[tokio::test]
async fn every_answer_says_nosniff() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let answers = [
        app.request(Method::GET, "/healthz").send().await,
        app.request(Method::GET, "/metrics").send().await,
        app.request(Method::GET, "/dashboard").send().await,
        app.request(Method::GET, "/dashboard/app.js").send().await,
        app.request(Method::GET, "/dashboard/missing.js").send().await,
        app.request(Method::GET, "/v0/openapi.json").send().await,
        app.request(Method::GET, "/v0/nodes").bearer_auth(&token).send().await,
        app.request(Method::GET, "/v0/nodes").send().await,
        app.request(Method::GET, "/v0/nothing-here").send().await,
        app.request(Method::PUT, "/v0/nodes").send().await,
        app.request(Method::POST, "/v0/nodes").header("content-type", "application/json").body("{").send().await,
    ];
    let mut statuses = Vec::new();
    for answer in answers {
        let answer = answer.expect("send");
        statuses.push(answer.status().as_u16());
        assert_eq!(
            answer.headers().get("x-content-type-options").and_then(|v| v.to_str().ok()),
            Some("nosniff"),
            "{} lacks nosniff",
            answer.url()
        );
    }
    assert_eq!(statuses, [200, 200, 200, 200, 404, 200, 200, 401, 404, 405, 400]);
}
