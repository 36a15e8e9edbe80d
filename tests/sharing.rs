//! What operators give keys over HTTP: priorities, fair sharing between keys, submission rates and daily
//! compute, with the `429` answers and `RateLimit-*` headers clients read, and `GET /v1/usage`.

mod common;

use std::time::Duration;

use common::TestServer;
use denoised::auth::LimitsUpdate;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Keys on, one worker, room for a long queue.
const CONFIG: &str = "max_queued = 1000\n[auth]\nenabled = true\n[limits]\nmax_outstanding_per_key = 500\n";

async fn submit(client: &reqwest::Client, server: &TestServer, key: &str, body: &Value) -> reqwest::Response {
    client.post(server.url("/v1/images")).bearer_auth(key).json(body).send().await.unwrap()
}

/// Polls job `id` with `key` until it ends.
async fn wait_for_job(client: &reqwest::Client, server: &TestServer, key: &str, id: &str) -> Value {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let job: Value = client
            .get(server.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return job;
        }
        assert!(std::time::Instant::now() < deadline, "job {id} did not end: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn started_at(client: &reqwest::Client, server: &TestServer, key: &str, id: &str) -> String {
    let job: Value =
        client.get(server.url(&format!("/v1/jobs/{id}"))).bearer_auth(key).send().await.unwrap().json().await.unwrap();
    job["started_at"].as_str().map(str::to_string).unwrap_or_else(|| panic!("{job}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_job_waits_for_at_most_one_job_of_a_key_with_two_hundred_queued() {
    let server = TestServer::start(CONFIG).await;
    let client = reqwest::Client::new();
    let (busy, quiet) = (server.create_key("busy", false).await, server.create_key("quiet", false).await);
    let mut busy_ids = Vec::new();
    for i in 0..200 {
        let response = submit(&client, &server, &busy, &json!({"prompt": "blob", "steps": 2, "seed": i})).await;
        assert_eq!(response.status(), 202);
        busy_ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let response = submit(&client, &server, &quiet, &json!({"prompt": "mine", "steps": 2})).await;
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    assert!(accepted["queue_position"].as_u64().unwrap() <= 1, "{accepted}");
    let done = wait_for_job(&client, &server, &quiet, &id).await;
    assert_eq!(done["status"], "succeeded");
    // Busy jobs that started after the single job was submitted and before it started: at most one per worker.
    let submitted = accepted["created_at"].as_str().unwrap().to_string();
    let started = done["started_at"].as_str().unwrap().to_string();
    let mut overtook = 0;
    for busy_id in &busy_ids {
        let job: Value = client
            .get(server.url(&format!("/v1/jobs/{busy_id}")))
            .bearer_auth(&busy)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(at) = job["started_at"].as_str() {
            if at > submitted.as_str() && at < started.as_str() {
                overtook += 1;
            }
        }
    }
    assert!(overtook <= 1, "{overtook} jobs of the busy key started first");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn high_priority_is_for_admins_and_runs_before_normal_jobs() {
    let server = TestServer::start(CONFIG).await;
    let client = reqwest::Client::new();
    let (tenant, admin) = (server.create_key("tenant", false).await, server.create_key("ops", true).await);
    let refused = submit(&client, &server, &tenant, &json!({"prompt": "x", "priority": "high"})).await;
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("priority"), "{body}");
    let bad = submit(&client, &server, &tenant, &json!({"prompt": "x", "priority": "urgent"})).await;
    assert_eq!(bad.status(), 422);

    let mut normal = Vec::new();
    for i in 0..6 {
        let response = submit(&client, &server, &tenant, &json!({"prompt": "n", "steps": 3, "seed": i})).await;
        normal.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let low = submit(&client, &server, &tenant, &json!({"prompt": "l", "steps": 3, "priority": "low"})).await;
    let low: Value = low.json().await.unwrap();
    let high = submit(&client, &server, &admin, &json!({"prompt": "h", "steps": 3, "priority": "high"})).await;
    let high: Value = high.json().await.unwrap();
    assert_eq!(high["priority"], "high");
    assert_eq!(low["priority"], "low");
    let (high_id, low_id) = (high["id"].as_str().unwrap(), low["id"].as_str().unwrap());
    wait_for_job(&client, &server, &tenant, low_id).await;
    let high_started = started_at(&client, &server, &admin, high_id).await;
    let low_started = started_at(&client, &server, &tenant, low_id).await;
    // The high job overtakes every normal job still queued; the low job starts after all of them, or with
    // the last of them when it fills a free place in that job's cohort (companions are claimed highest
    // priority first, so it can never be taken while a normal job waits).
    let last_normal = started_at(&client, &server, &tenant, normal.last().unwrap()).await;
    assert!(high_started < last_normal, "{high_started} vs {last_normal}");
    for id in &normal {
        let normal_started = started_at(&client, &server, &tenant, id).await;
        assert!(low_started >= normal_started, "low started {low_started}, normal job {id} {normal_started}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_and_compute_limits_answer_429_with_ratelimit_headers() {
    let server = TestServer::start(CONFIG).await;
    let client = reqwest::Client::new();
    let key = server.create_key("metered", false).await;
    server.set_limits("metered", LimitsUpdate { rate_per_minute: Some(Some(3)), ..Default::default() }).await;
    for remaining in [2, 1, 0] {
        let response = submit(&client, &server, &key, &json!({"prompt": "r", "steps": 2})).await;
        assert_eq!(response.status(), 202);
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        assert_eq!(response.headers()["ratelimit-remaining"], remaining.to_string().as_str());
    }
    let limited = submit(&client, &server, &key, &json!({"prompt": "r", "steps": 2})).await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "one token comes back within 20 s at 3 a minute: {retry}");
    assert_eq!(limited.headers()["ratelimit-remaining"], "0");
    let reset: u64 = limited.headers()["ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!((retry..=60).contains(&reset));
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["message"].as_str().unwrap().contains("rate_per_minute"), "{body}");

    // Daily compute: 10 image-steps (n × steps) leave room for 2 × 4 but not a third job of 4.
    let thrifty = server.create_key("thrifty", false).await;
    server.set_limits("thrifty", LimitsUpdate { daily_image_steps: Some(Some(10)), ..Default::default() }).await;
    for _ in 0..2 {
        let response = submit(&client, &server, &thrifty, &json!({"prompt": "c", "steps": 4})).await;
        assert_eq!(response.status(), 202);
    }
    let over = submit(&client, &server, &thrifty, &json!({"prompt": "c", "steps": 4})).await;
    assert_eq!(over.status(), 429);
    assert_eq!(over.headers()["ratelimit-limit"], "10");
    assert_eq!(over.headers()["ratelimit-remaining"], "2");
    assert!(over.headers().contains_key("retry-after"));
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"]["code"], "compute_quota_exceeded");
    assert!(body["error"]["message"].as_str().unwrap().contains("daily_image_steps"), "{body}");
    // A job that fits the 2 steps left still gets in.
    let small = submit(&client, &server, &thrifty, &json!({"prompt": "c", "steps": 2})).await;
    assert_eq!(small.status(), 202);

    // Each key sees its own usage; an admin sees every key's.
    let mine: Value =
        client.get(server.url("/v1/usage")).bearer_auth(&thrifty).send().await.unwrap().json().await.unwrap();
    let data = mine["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{mine}");
    assert_eq!(data[0]["name"], "thrifty");
    assert_eq!(data[0]["image_steps_24h"], 10);
    assert_eq!(data[0]["daily_image_steps"], 10);
    let admin = server.create_key("ops", true).await;
    let all: Value =
        client.get(server.url("/v1/usage")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = all["data"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"metered") && names.contains(&"thrifty") && names.contains(&"ops"), "{all}");
    let metered = all["data"].as_array().unwrap().iter().find(|k| k["name"] == "metered").unwrap();
    assert_eq!(metered["rate"]["limit"], 3);
    server.shutdown().await;
}
