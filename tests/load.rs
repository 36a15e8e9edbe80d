//! A load test on loopback: hundreds of concurrent clients, each submitting a job, following it over SSE
//! and downloading its image, for a bounded time, against a server with API keys on. Every request must
//! succeed or be a documented `429`; every accepted job must succeed. It prints throughput and latency
//! percentiles (the README reports a run of it).
//!
//! `LOAD_CLIENTS` and `LOAD_SECONDS` change the size of the run (defaults 200 clients, 10 s).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, AUTH_ON};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Mutex;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Tally {
    submit_ms: Vec<f64>,
    end_to_end_ms: Vec<f64>,
    accepted: u64,
    completed: u64,
    throttled: u64,
    errors: Vec<String>,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

/// One client's loop: submit, follow to the end, download; until `until`.
async fn client_loop(base: String, key: String, seed: u64, until: Instant, tally: Arc<Mutex<Tally>>) {
    let client = reqwest::Client::new();
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let started = Instant::now();
        let response = match client
            .post(format!("{base}/v1/images"))
            .bearer_auth(&key)
            .json(&json!({"prompt": "a red circle", "steps": 2, "seed": seed * 1000 + round}))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tally.lock().await.errors.push(format!("submit: {e}"));
                continue;
            }
        };
        let submit_ms = started.elapsed().as_secs_f64() * 1e3;
        match response.status().as_u16() {
            202 => {}
            429 => {
                tally.lock().await.throttled += 1;
                let wait =
                    response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait).min(Duration::from_secs(2))).await;
                continue;
            }
            other => {
                let body = response.text().await.unwrap_or_default();
                tally.lock().await.errors.push(format!("submit answered {other}: {body}"));
                continue;
            }
        }
        let job: Value = match response.json().await {
            Ok(job) => job,
            Err(e) => {
                tally.lock().await.errors.push(format!("submit body: {e}"));
                continue;
            }
        };
        {
            let mut t = tally.lock().await;
            t.accepted += 1;
            t.submit_ms.push(submit_ms);
        }
        let id = job["id"].as_str().unwrap_or_default().to_string();
        let outcome = follow(&client, &base, &key, &id).await;
        let mut t = tally.lock().await;
        match outcome {
            Ok(()) => {
                t.completed += 1;
                t.end_to_end_ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
            Err(e) => t.errors.push(format!("job {id}: {e}")),
        }
    }
}

async fn follow(client: &reqwest::Client, base: &str, key: &str, id: &str) -> Result<(), String> {
    let response =
        client.get(format!("{base}/v1/jobs/{id}/events")).bearer_auth(key).send().await.map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("events answered {}", response.status()));
    }
    let mut events = response.bytes_stream().eventsource();
    let mut url = None;
    while let Some(event) =
        tokio::time::timeout(Duration::from_secs(300), events.next()).await.map_err(|_| "stalled")?
    {
        let event = event.map_err(|e| e.to_string())?;
        match event.event.as_str() {
            "completed" => {
                let data: Value = serde_json::from_str(&event.data).map_err(|e| e.to_string())?;
                url = data["images"][0]["url"].as_str().map(str::to_string);
                break;
            }
            "failed" | "cancelled" => return Err(format!("ended {}: {}", event.event, event.data)),
            _ => {}
        }
    }
    let url = url.ok_or("the stream ended without `completed`")?;
    let image = client.get(format!("{base}{url}")).bearer_auth(key).send().await.map_err(|e| e.to_string())?;
    if image.status() != 200 {
        return Err(format!("image answered {}", image.status()));
    }
    let bytes = image.bytes().await.map_err(|e| e.to_string())?;
    image::load_from_memory(&bytes).map_err(|e| format!("image does not decode: {e}"))?;
    Ok(())
}

/// The two load tests take turns: each is sized to load this 2-core machine on its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_clients_submit_and_stream_without_errors() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = common::test_config_toml(dir.path(), AUTH_ON);
    load(TestServer::start_configured(dir, toml).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_clients_submit_and_stream_without_errors_on_postgres() {
    let Some(url) = common::postgres_url("hundreds_of_clients_submit_and_stream_without_errors_on_postgres").await
    else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = common::on_database(&common::test_config_toml(dir.path(), AUTH_ON), &url);
    load(TestServer::start_configured(dir, toml).await).await;
}

/// Hundreds of clients with four keys submit and follow jobs for a while against `server`; every accepted
/// job must complete, with no errors.
async fn load(server: TestServer) {
    let clients = setting("LOAD_CLIENTS", 200);
    let seconds = setting("LOAD_SECONDS", 10);
    let mut keys = Vec::new();
    for i in 0..4 {
        keys.push(server.create_key(&format!("tenant-{i}"), false).await);
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let key = keys[(i % keys.len() as u64) as usize].clone();
            tokio::spawn(client_loop(server.base.clone(), key, i, until, tally.clone()))
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut t = tally.lock().await;
    let (p50_submit, p99_submit) = (percentile(&mut t.submit_ms, 50.0), percentile(&mut t.submit_ms, 99.0));
    let (p50_e2e, p99_e2e) = (percentile(&mut t.end_to_end_ms, 50.0), percentile(&mut t.end_to_end_ms, 99.0));
    println!(
        "load: {clients} clients, {seconds} s of submissions, {elapsed:.1} s until every job ended\n\
         load: {} accepted, {} completed, {} throttled (429), {} errors\n\
         load: throughput {:.1} jobs/s completed, {:.1} submissions/s accepted\n\
         load: submit latency p50 {p50_submit:.1} ms, p99 {p99_submit:.1} ms; \
         submit-to-image p50 {p50_e2e:.0} ms, p99 {p99_e2e:.0} ms",
        t.accepted,
        t.completed,
        t.throttled,
        t.errors.len(),
        t.completed as f64 / elapsed,
        t.accepted as f64 / elapsed,
    );
    assert!(t.errors.is_empty(), "errors under load: {:?}", &t.errors[..t.errors.len().min(10)]);
    assert!(t.accepted >= clients, "every client should have had at least one job accepted");
    assert_eq!(t.completed, t.accepted, "every accepted job must complete");
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    drop(t);
    server.shutdown().await;
}
