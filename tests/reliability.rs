//! Backpressure, idempotency, per-job timeouts and retention, over HTTP against a real server.

mod common;

use std::time::Duration;

use common::{wait_for_job, TestServer};
use serde_json::{json, Value};

/// Held by the tests that stop a running job or run a 512² job: the process's metrics are shared by every
/// test server in it, and the cancel test times one U-Net call, so these run one at a time.
static STOPS_AND_LARGE_JOBS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TIMEOUT: Duration = Duration::from_secs(60);
const LONG_JOB: &str = r#"{"prompt": "long", "steps": 150, "n": 8, "preview_every": 0}"#;

async fn post(client: &reqwest::Client, server: &TestServer, body: &Value, key: Option<&str>) -> reqwest::Response {
    let mut request = client.post(server.url("/v1/images")).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = TestServer::start("max_queued = 2\n").await;
    let client = reqwest::Client::new();
    let long: Value = serde_json::from_str(LONG_JOB).unwrap();
    let mut accepted = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        let response = post(&client, &server, &long, None).await;
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 202);
        accepted.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let refused = refused.expect("the queue never filled");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert!((2..=3).contains(&accepted.len()), "two waiting plus at most one running: {}", accepted.len());
    for id in &accepted {
        client.post(server.url(&format!("/v1/jobs/{id}/cancel"))).send().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_same_job() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let body = json!({"prompt": "once", "steps": 2});
    let first = post(&client, &server, &body, Some("order-42")).await;
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = post(&client, &server, &body, Some("order-42")).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let other: Value = post(&client, &server, &body, Some("order-43")).await.json().await.unwrap();
    assert_ne!(other["id"], first["id"]);
    // The same key with another request, or on another route, is a mistake the client must hear about.
    let changed = post(&client, &server, &json!({"prompt": "something else", "steps": 2}), Some("order-42")).await;
    assert_eq!(changed.status(), 422);
    assert_eq!(changed.json::<Value>().await.unwrap()["error"]["field"], "Idempotency-Key");
    let elsewhere = client
        .post(server.url("/v1/images/generations"))
        .header("Idempotency-Key", "order-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 400, "OpenAI's status for a client mistake");
    assert_eq!(elsewhere.json::<Value>().await.unwrap()["error"]["param"], "Idempotency-Key");
    let bad = post(&client, &server, &body, Some("")).await;
    assert_eq!(bad.status(), 422);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"]["field"], "Idempotency-Key");
    let listed: Value = client.get(server.url("/v1/jobs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "the replay created no job");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_time_limit_fails_with_timeout_and_frees_the_worker() {
    let _serial = STOPS_AND_LARGE_JOBS.lock().await;
    let server = TestServer::start("job_timeout_seconds = 1\n").await;
    let client = reqwest::Client::new();
    let long: Value = serde_json::from_str(LONG_JOB).unwrap();
    let id =
        post(&client, &server, &long, None).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let job = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "timeout");
    let next =
        post(&client, &server, &json!({"prompt": "quick", "steps": 2}), None).await.json::<Value>().await.unwrap();
    let next = wait_for_job(&client, &server.url(&format!("/v1/jobs/{}", next["id"].as_str().unwrap())), TIMEOUT).await;
    assert_eq!(next["status"], "succeeded");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_finished_jobs_and_their_files() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let body: Value = post(&client, &server, &json!({"prompt": "old", "steps": 2}), None).await.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await["status"], "succeeded");
    let images = server.dir.path().join("images").join(&id);
    assert!(images.exists());
    // The same sweep the server runs, on the same database and folder, with no retention left.
    let store =
        denoised::jobs::JobStore::connect(&format!("sqlite://{}", server.dir.path().join("denoised.db").display()))
            .await
            .unwrap();
    let files = denoised::storage::ImageFiles::local(server.dir.path());
    let rules = denoised::jobs::JobRules {
        max_attempts: 1,
        max_queued: 10,
        max_outstanding_per_key: 10,
        max_stored_bytes_per_key: u64::MAX,
        workers: 1,
    };
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let jobs = denoised::jobs::Jobs::new(store, files, rules, stopped);
    let deleted = denoised::retention::sweep(&jobs, Duration::ZERO).await.unwrap();
    assert_eq!(deleted, 1);
    assert!(!images.exists());
    assert_eq!(client.get(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().status(), 404);
    assert_eq!(denoised::retention::sweep(&jobs, Duration::from_secs(3600)).await.unwrap(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_lease_is_lost_stops_at_its_next_step_and_frees_the_worker() {
    let _serial = STOPS_AND_LARGE_JOBS.lock().await;
    let server = TestServer::start_with_model("", "max_pixels = 65536\nmax_pixel_steps = 100000000\n").await;
    let client = reqwest::Client::new();
    // Minutes of work on the one worker if it ran to the end.
    let long = json!({"prompt": "long", "steps": 150, "n": 8, "width": 256, "height": 256, "preview_every": 0});
    let id =
        post(&client, &server, &long, None).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let url = server.url(&format!("/v1/jobs/{id}"));
    let deadline = std::time::Instant::now() + TIMEOUT;
    while client.get(&url).send().await.unwrap().json::<Value>().await.unwrap()["status"] != "running" {
        assert!(std::time::Instant::now() < deadline, "the long job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another process takes the job over, as a reaper would after a missed renewal.
    let store = sqlx::SqlitePool::connect(&format!("sqlite://{}", server.dir.path().join("denoised.db").display()))
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET lease_owner = 'another-process' WHERE id = ?1")
        .bind(&id)
        .execute(&store)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let next =
        post(&client, &server, &json!({"prompt": "quick", "steps": 2}), None).await.json::<Value>().await.unwrap();
    let next = wait_for_job(&client, &server.url(&format!("/v1/jobs/{}", next["id"].as_str().unwrap())), TIMEOUT).await;
    assert_eq!(next["status"], "succeeded");
    // The lease is renewed every third of its 5 s: the next renewal notices, and the next step stops the job.
    assert!(started.elapsed() < Duration::from_secs(15), "the worker was busy for {:?}", started.elapsed());
    let stolen: (String, Option<String>) =
        sqlx::query_as("SELECT status, lease_owner FROM jobs WHERE id = ?1").bind(&id).fetch_one(&store).await.unwrap();
    assert_eq!(stolen, ("running".to_string(), Some("another-process".to_string())), "the loser wrote nothing");
    store.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_interrupts_the_onnx_runtime_call_in_progress() {
    let _serial = STOPS_AND_LARGE_JOBS.lock().await;
    // One step at 512x512 is one U-Net call of seconds on the tiny model (its attention at full latent size):
    // without interruption a cancel would wait for the call and the decode after it, and the job would
    // succeed; ONNX Runtime stops between graph nodes instead.
    let server = TestServer::start_with_model("", "max_pixels = 262144\n").await;
    let client = reqwest::Client::new();
    let big = json!({"prompt": "big", "steps": 1, "width": 512, "height": 512, "preview_every": 0, "seed": 1});
    let job_url = |body: Value| server.url(&format!("/v1/jobs/{}", body["id"].as_str().unwrap()));
    let started = std::time::Instant::now();
    let full = job_url(post(&client, &server, &big, None).await.json().await.unwrap());
    assert_eq!(wait_for_job(&client, &full, TIMEOUT).await["status"], "succeeded");
    let uninterrupted = started.elapsed();

    let url = job_url(post(&client, &server, &big, None).await.json().await.unwrap());
    let deadline = std::time::Instant::now() + TIMEOUT;
    while client.get(&url).send().await.unwrap().json::<Value>().await.unwrap()["status"] != "running" {
        assert!(std::time::Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(uninterrupted / 5).await;
    let interrupted_before = interrupted_runs(&client, &server).await;
    let cancelled_at = std::time::Instant::now();
    let cancel = client.post(format!("{url}/cancel")).send().await.unwrap();
    assert_eq!(cancel.status(), 202);
    let job = wait_for_job(&client, &url, TIMEOUT).await;
    let stopping = cancelled_at.elapsed();
    assert_eq!(job["status"], "cancelled", "{job}");
    // The U-Net call ended in ONNX Runtime's terminate error, not at its end: the worker counts such runs.
    assert_eq!(interrupted_runs(&client, &server).await, interrupted_before + 1, "the call ran to its end");
    assert!(
        stopping < uninterrupted / 2,
        "stopping took {stopping:?}; the whole job takes {uninterrupted:?}: the call in progress was not interrupted"
    );
    server.shutdown().await;
}

/// `denoised_onnx_runs_interrupted_total` as the server's metrics show it (0 before the first).
async fn interrupted_runs(client: &reqwest::Client, server: &TestServer) -> u64 {
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("denoised_onnx_runs_interrupted_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// Resident memory of this process (the server runs in it), from `/proc/self/status`.
fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_near_its_baseline_after_a_large_job() {
    let _serial = STOPS_AND_LARGE_JOBS.lock().await;
    let server = TestServer::start_with_model("", "max_pixels = 262144\n").await;
    let client = reqwest::Client::new();
    let run = |body: Value| {
        let (client, server) = (&client, &server);
        async move {
            let accepted: Value = post(client, server, &body, None).await.json().await.unwrap();
            let url = server.url(&format!("/v1/jobs/{}", accepted["id"].as_str().unwrap()));
            assert_eq!(wait_for_job(client, &url, TIMEOUT).await["status"], "succeeded");
        }
    };
    run(json!({"prompt": "small", "steps": 2})).await;
    let baseline = resident_mib();
    run(json!({"prompt": "large", "steps": 1, "width": 512, "height": 512, "preview_every": 0})).await;
    let after = resident_mib();
    println!("resident memory: {baseline} MiB before the 512x512 job, {after} MiB after it");
    assert!(after < baseline + 300, "{after} MiB after the job, {baseline} MiB before: the arena kept its peak");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_latents_live_outside_the_job_row_and_go_with_the_job() {
    use base64::Engine as _;
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let noise = ndarray::ArrayD::<f32>::from_elem(ndarray::IxDyn(&[8, 4, 8, 8]), 0.5);
    let latents = base64::engine::general_purpose::STANDARD.encode(denoised::engine::npy::write_f32(&noise));
    let body = json!({"prompt": "blobs", "steps": 2, "n": 8, "latents": latents});
    let accepted: Value = post(&client, &server, &body, None).await.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await["status"], "succeeded");
    let store = sqlx::SqlitePool::connect(&format!("sqlite://{}", server.dir.path().join("denoised.db").display()))
        .await
        .unwrap();
    let (params,): (String,) =
        sqlx::query_as("SELECT params FROM jobs WHERE id = ?1").bind(&id).fetch_one(&store).await.unwrap();
    store.close().await;
    assert!(params.len() < latents.len() / 4, "the row holds {} bytes: {params}", params.len());
    let stored: Value = serde_json::from_str(&params).unwrap();
    let file = server.dir.path().join(stored["latents_path"].as_str().unwrap());
    assert!(file.exists());
    let listed: Value = client.get(server.url("/v1/jobs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"][0]["params"]["has_latents"], true);
    assert!(listed["data"][0]["params"].get("latents_path").is_none());
    assert_eq!(client.delete(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().status(), 204);
    assert!(!file.exists(), "the latents file goes with the job");
    server.shutdown().await;
}
