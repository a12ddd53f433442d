//! Sign-in under attack (SPEC §9): throttling per (username, client address) and the bounded password hashing
//! pool. Time moves on the manual clock; nothing sleeps.

use std::time::{Duration, Instant};

use reqwest::{Method, Response};
use serde_json::json;

use crate::helpers::*;

const VICTIM_PASSWORD: &str = "user-password-1";

fn retry_after(response: &Response) -> u64 {
    let value = response.headers().get("retry-after").expect("Retry-After header");
    value.to_str().expect("text").parse().expect("seconds")
}

/// A sign-in of `username`, sent through a proxy that says the client is `forwarded_for`.
async fn login_via(app: &TestApp, username: &str, password: &str, forwarded_for: &str) -> Response {
    app.request(Method::POST, "/v0/auth/login")
        .header("X-Forwarded-For", forwarded_for)
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("login")
}

async fn fail_times(app: &TestApp, username: &str, times: usize) {
    for _ in 0..times {
        let response = app.login(username, "wrong-password-1").await;
        assert_error(response, 401, "invalid_credentials").await;
    }
}

/// Asserts a `login_throttled` answer and returns its `Retry-After`.
async fn assert_throttled(response: Response) -> u64 {
    let secs = retry_after(&response);
    let message = assert_error(response, 429, "login_throttled").await;
    assert!(message.contains(&format!("{secs} s")), "{message}");
    secs
}

#[tokio::test]
async fn five_failures_throttle_the_pair_before_any_password_check() {
    // One hash at a time and no queue: while the test holds that hash, any sign-in that checks a password is
    // answered `hashing_busy`. A throttled one is not, because it never reaches the hashing pool.
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.hash_workers = 1;
        settings.hash_queue = 0;
    })
    .await;
    app.user_token("victim", "viewer").await;
    fail_times(&app, "victim", 5).await;

    let secs = assert_throttled(app.login("victim", VICTIM_PASSWORD).await).await;
    assert_eq!(secs, 60, "the first lock is a minute");
    let held = app.state.credentials.hasher().permit(None).await.expect("the pool's only permit");
    assert_throttled(app.login("victim", VICTIM_PASSWORD).await).await;
    drop(held);
    assert_eq!(app.metric("llm_router_logins_throttled_total").await, 2.0);

    app.clock.advance_ms(59_000);
    assert_eq!(assert_throttled(app.login("victim", VICTIM_PASSWORD).await).await, 1);
    app.clock.advance_ms(1_000);
    assert_eq!(app.login("victim", VICTIM_PASSWORD).await.status(), 200, "the lock is over");
}

#[tokio::test]
async fn locks_grow_to_fifteen_minutes_and_a_success_resets_them() {
    let app = TestApp::spawn().await;
    app.user_token("victim", "viewer").await;
    fail_times(&app, "victim", 5).await;
    let mut lock = assert_throttled(app.login("victim", "wrong-password-1").await).await;
    let mut locks = vec![lock];
    while lock < 900 {
        app.clock.advance_ms(i64::try_from(lock).expect("secs") * 1000);
        // One more try after each lock; failing it locks again, twice as long.
        fail_times(&app, "victim", 1).await;
        lock = assert_throttled(app.login("victim", VICTIM_PASSWORD).await).await;
        locks.push(lock);
    }
    assert_eq!(locks, [60, 120, 240, 480, 900]);
    app.clock.advance_ms(900_000);
    fail_times(&app, "victim", 1).await;
    assert_eq!(assert_throttled(app.login("victim", VICTIM_PASSWORD).await).await, 900, "15 minutes at most");

    app.clock.advance_ms(900_000);
    assert_eq!(app.login("victim", VICTIM_PASSWORD).await.status(), 200);
    // The success forgot every failure: five more tries before the next lock, and that lock is a minute again.
    fail_times(&app, "victim", 5).await;
    assert_eq!(assert_throttled(app.login("victim", VICTIM_PASSWORD).await).await, 60);
}

#[tokio::test]
async fn unknown_usernames_are_throttled_the_same_way() {
    let app = TestApp::spawn().await;
    fail_times(&app, "nobody-by-this-name", 5).await;
    assert_eq!(assert_throttled(app.login("nobody-by-this-name", "wrong-password-1").await).await, 60);
    // Another name from the same address is its own pair.
    assert_eq!(app.login("admin", ADMIN_PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn another_client_address_behind_a_trusted_proxy_is_not_throttled() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    app.user_token("victim", "viewer").await;
    for _ in 0..5 {
        let response = login_via(&app, "victim", "wrong-password-1", "198.51.100.7").await;
        assert_error(response, 401, "invalid_credentials").await;
    }
    assert_throttled(login_via(&app, "victim", VICTIM_PASSWORD, "198.51.100.7").await).await;
    // The same user from another address signs in; the attacker's address stays locked.
    assert_eq!(login_via(&app, "victim", VICTIM_PASSWORD, "198.51.100.8").await.status(), 200);
    assert_throttled(login_via(&app, "victim", VICTIM_PASSWORD, "198.51.100.7").await).await;
    // An address the client writes in front of the proxy's own entry is not believed.
    let spoofed = login_via(&app, "victim", VICTIM_PASSWORD, "203.0.113.1, 198.51.100.7").await;
    assert_throttled(spoofed).await;
}

#[tokio::test]
async fn forwarded_addresses_from_an_untrusted_peer_do_not_escape_the_throttle() {
    let app = TestApp::spawn().await;
    app.user_token("victim", "viewer").await;
    for i in 0..5 {
        let response = login_via(&app, "victim", "wrong-password-1", &format!("198.51.100.{i}")).await;
        assert_error(response, 401, "invalid_credentials").await;
    }
    assert_throttled(login_via(&app, "victim", VICTIM_PASSWORD, "198.51.100.99").await).await;
}

#[tokio::test]
async fn a_full_hashing_pool_answers_429_and_counts_nothing_against_the_user() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.hash_workers = 1;
        settings.hash_queue = 0;
    })
    .await;
    let held = app.state.credentials.hasher().permit(None).await.expect("the pool's only permit");
    for _ in 0..6 {
        let response = app.login("admin", "wrong-password-1").await;
        assert_eq!(retry_after(&response), 1);
        let message = assert_error(response, 429, "hashing_busy").await;
        assert!(message.contains("try again"), "{message}");
    }
    assert_eq!(app.metric("llm_router_password_hashes_refused_total").await, 6.0);
    assert_eq!(app.metric("llm_router_logins_throttled_total").await, 0.0);
    drop(held);
    // None of the refused attempts was a failed password check, so nothing is locked.
    assert_eq!(app.login("admin", ADMIN_PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_short_queue_waits_its_turn_then_gives_up() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.hash_workers = 1;
        settings.hash_queue = 1;
        settings.hash_wait = Duration::from_millis(200);
    })
    .await;
    let held = app.state.credentials.hasher().permit(None).await.expect("the pool's only permit");
    let started = Instant::now();
    assert_error(app.login("admin", ADMIN_PASSWORD).await, 429, "hashing_busy").await;
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited its turn before giving up");

    let queued = tokio::spawn({
        let request = app.request(Method::POST, "/v0/auth/login");
        async move { request.json(&json!({"username": "admin", "password": ADMIN_PASSWORD})).send().await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.state.credentials.hasher().waiting() == 0 {
        assert!(Instant::now() < deadline, "the sign-in never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(held);
    let answer = queued.await.expect("task").expect("login");
    assert_eq!(answer.status(), 200, "served once the hash it waited for was done");
}

#[tokio::test]
async fn one_address_holds_at_most_a_quarter_of_the_sign_in_queue() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.hash_workers = 1;
        settings.hash_queue = 8;
        settings.hash_wait = Duration::from_secs(30);
        settings.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let held = app.state.credentials.hasher().permit(None).await.expect("the pool's only permit");
    let queue = |from: &'static str| {
        let request = app.request(Method::POST, "/v0/auth/login").header("X-Forwarded-For", from);
        tokio::spawn(async move {
            request.json(&json!({"username": "admin", "password": ADMIN_PASSWORD})).send().await.expect("login")
        })
    };
    // Two places of eight for one address.
    let first = queue("198.51.100.7");
    let second = queue("198.51.100.7");
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.state.credentials.hasher().waiting() < 2 {
        assert!(Instant::now() < deadline, "the sign-ins never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let refused = login_via(&app, "admin", ADMIN_PASSWORD, "198.51.100.7").await;
    assert_error(refused, 429, "hashing_busy").await;
    // Another address still queues, and every queued sign-in is served once the pool frees.
    let other = queue("198.51.100.8");
    while app.state.credentials.hasher().waiting() < 3 {
        assert!(Instant::now() < deadline, "the other address never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(held);
    for answer in [first, second, other] {
        assert_eq!(answer.await.expect("task").status(), 200);
    }
}
