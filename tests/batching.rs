//! Batching across jobs over HTTP: text-to-image jobs queued behind a busy worker are claimed together and
//! share their denoiser calls; each gets exactly the pixels it gets alone, a cancelled member leaves the
//! others untouched, and a `kill -9` during a cohort loses none of its jobs.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for_job, TestServer};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The process's metrics are shared by every server in it: these tests run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn submit(client: &reqwest::Client, base: &str, body: &Value) -> String {
    let response = client.post(format!("{base}/v1/images")).json(body).send().await.unwrap();
    assert_eq!(response.status(), 202, "{body}");
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

async fn job(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client.get(format!("{base}/v1/jobs/{id}")).send().await.unwrap().json().await.unwrap()
}

async fn wait_until_running(client: &reqwest::Client, base: &str, id: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while job(client, base, id).await["status"] == "queued" {
        assert!(Instant::now() < deadline, "job {id} never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The decoded pixels of every image of a finished job.
async fn pixels(client: &reqwest::Client, base: &str, finished: &Value) -> Vec<Vec<u8>> {
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let mut out = Vec::new();
    for image in finished["images"].as_array().unwrap() {
        let bytes = client.get(format!("{base}{}", image["url"].as_str().unwrap())).send().await.unwrap();
        let bytes = bytes.bytes().await.unwrap();
        out.push(image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw());
    }
    out
}

/// `(sum, count)` of the `denoised_cohort_jobs` histogram: jobs run in cohorts, and cohorts.
async fn cohorts(client: &reqwest::Client, server: &TestServer) -> (f64, f64) {
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    (value("denoised_cohort_jobs_sum "), value("denoised_cohort_jobs_count "))
}

/// A job that keeps the one worker busy while the others queue (another step count: it runs alone).
fn blocker() -> Value {
    json!({"prompt": "keep the worker busy", "steps": 150, "n": 4, "seed": 9})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_share_denoiser_calls_and_keep_their_own_pixels() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let bodies = [
        json!({"prompt": "a red circle", "steps": 8, "seed": 1, "guidance_scale": 7.5, "scheduler": "dpmpp_2m"}),
        json!({"prompt": "a blue square", "steps": 8, "seed": 2, "n": 2, "guidance_scale": 3.0, "scheduler": "dpmpp_2m"}),
        json!({"prompt": "a shape", "steps": 8, "seed": 3, "scheduler": "dpmpp_2m", "preview_every": 2}),
    ];
    let (sum_before, count_before) = cohorts(&client, &server).await;
    let busy = submit(&client, &base, &blocker()).await;
    wait_until_running(&client, &base, &busy).await;
    let mut ids = Vec::new();
    for body in &bodies {
        ids.push(submit(&client, &base, body).await);
    }
    let mut batched = Vec::new();
    for id in &ids {
        let finished = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
        batched.push(pixels(&client, &base, &finished).await);
    }
    let (sum, count) = cohorts(&client, &server).await;
    assert_eq!((sum - sum_before, count - count_before), (3.0, 1.0), "the three jobs ran as one cohort");

    // The same requests one at a time, each alone on an idle worker.
    for (body, batched) in bodies.iter().zip(&batched) {
        let id = submit(&client, &base, body).await;
        let finished = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
        assert_eq!(&pixels(&client, &base, &finished).await, batched, "{body}: batched pixels differ from alone");
    }
    assert_eq!(cohorts(&client, &server).await.1, count, "jobs alone are not cohorts");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_member_leaves_the_others_untouched() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let body = |seed: u64| json!({"prompt": "a green triangle", "steps": 60, "seed": seed, "scheduler": "euler_a"});
    let (sum_before, count_before) = cohorts(&client, &server).await;
    let busy = submit(&client, &base, &blocker()).await;
    wait_until_running(&client, &base, &busy).await;
    let ids = [submit(&client, &base, &body(1)).await, submit(&client, &base, &body(2)).await];
    let cancelled = submit(&client, &base, &body(3)).await;
    wait_until_running(&client, &base, &cancelled).await;
    let response = client.post(format!("{base}/v1/jobs/{cancelled}/cancel")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let stopped = wait_for_job(&client, &server.url(&format!("/v1/jobs/{cancelled}")), TIMEOUT).await;
    assert_eq!(stopped["status"], "cancelled", "{stopped}");
    let mut kept = Vec::new();
    for id in &ids {
        let finished = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
        kept.push(pixels(&client, &base, &finished).await);
    }
    let (sum, count) = cohorts(&client, &server).await;
    assert_eq!((sum - sum_before, count - count_before), (3.0, 1.0), "the three jobs ran as one cohort");
    for (seed, kept) in [1, 2].into_iter().zip(&kept) {
        let id = submit(&client, &base, &body(seed)).await;
        let alone = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
        assert_eq!(&pixels(&client, &base, &alone).await, kept, "seed {seed} was disturbed by the cancel");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_a_cohort_loses_none_of_its_jobs() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, common::test_config_toml(dir.path(), "")).unwrap();
    let client = reqwest::Client::new();
    let mut server = common::process::start(&config);
    let body = |seed: u64| json!({"prompt": "a purple circle", "steps": 150, "seed": seed});
    let busy = submit(&client, &server.base, &blocker()).await;
    wait_until_running(&client, &server.base, &busy).await;
    let mut ids = Vec::new();
    for seed in 1..=3 {
        ids.push(submit(&client, &server.base, &body(seed)).await);
    }
    for id in &ids {
        wait_until_running(&client, &server.base, id).await;
    }
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains("cohort=3"), "the three jobs should have started as one cohort:\n{log}");
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let server = common::process::start(&config);
    let mut recovered = Vec::new();
    for id in &ids {
        let finished = wait_for_job(&client, &format!("{}/v1/jobs/{id}", server.base), TIMEOUT).await;
        assert_eq!(finished["attempts"], 2, "run again after the crash: {finished}");
        recovered.push(pixels(&client, &server.base, &finished).await);
    }
    assert_ne!(recovered[0], recovered[1], "each job has its own seed");
    let id = submit(&client, &server.base, &body(2)).await;
    let alone = wait_for_job(&client, &format!("{}/v1/jobs/{id}", server.base), TIMEOUT).await;
    assert_eq!(pixels(&client, &server.base, &alone).await, recovered[1], "the recovered job has its own pixels");
    common::process::terminate(server);
}
