//! A fleet on one PostgreSQL database and one S3 bucket (moto): two `api` processes and two `worker`
//! processes of the real binary, each with a data folder of its own, one worker killed with `kill -9`
//! mid-job and restarted. Every job ends `succeeded` exactly once, every
//! image is readable through the API, a follower on an API process sees the progress steps of jobs run by
//! each worker, and a follower resumes on the other API process with `Last-Event-ID`.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::moto::Moto;
use common::process::{start_with, terminate, Binary};
use eventsource_stream::Eventsource;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use serde_json::{json, Value};

const JOBS: usize = 40;

/// Events an all-jobs follower saw: (SSE id, job id, event type).
type Seen = Arc<Mutex<Vec<(u64, String, String)>>>;

/// Follows `GET /v1/events` on `base` until the task is dropped.
fn follow_all(client: reqwest::Client, base: String, seen: Seen) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let response = client.get(format!("{base}/v1/events")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut events = response.bytes_stream().eventsource();
        while let Some(Ok(event)) = events.next().await {
            let Ok(data) = serde_json::from_str::<Value>(&event.data) else { continue };
            let job = data["job_id"].as_str().unwrap_or_default().to_string();
            seen.lock().unwrap().push((event.id.parse().unwrap_or(0), job, event.event));
        }
    })
}

/// Ids of the jobs a process's log says it started.
fn started_by(process: &Binary) -> HashSet<String> {
    lines_with(process, "job started").into_iter().collect()
}

/// The job ids on the log lines of `process` that contain `what`.
fn lines_with(process: &Binary, what: &str) -> Vec<String> {
    process
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(what))
        .filter_map(|line| line.split("id=").nth(1).map(|rest| rest.chars().take(36).collect()))
        .collect()
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A config in `dir` (which is also the process's own data folder) on `database` and the bucket of `moto`.
fn write_config(dir: &Path, database: &str, moto: &Moto) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.toml");
    let toml = common::on_database(&common::test_config_toml(dir, ""), database).replacen(
        "[storage]\n",
        "[storage]\nbackend = \"s3\"\n",
        1,
    );
    std::fs::write(&path, format!("{toml}\n{}", moto.settings_toml(BUCKET))).unwrap();
    path
}

const BUCKET: &str = "fleet-images";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_api_and_two_worker_processes_share_one_postgres_database() {
    let Some(database) = common::postgres_url("two_api_and_two_worker_processes_share_one_postgres_database").await
    else {
        return;
    };
    let Some(moto) = Moto::start().await else { return };
    moto.create_bucket(BUCKET).await;
    // No folder is shared: each process has its own, and images and uploads live in the bucket.
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| write_config(&dir.path().join(name), &database, &moto);
    let client = reqwest::Client::new();
    let apis = [start_with(&config("api-1"), &["--role", "api"]), start_with(&config("api-2"), &["--role", "api"])];
    // Without a worker an API process is alive but not ready.
    assert_eq!(client.get(format!("{}/healthz", apis[0].base)).send().await.unwrap().status(), 200);
    assert_eq!(client.get(format!("{}/readyz", apis[0].base)).send().await.unwrap().status(), 503);
    let mut workers = vec![
        start_with(&config("worker-1"), &["--role", "worker"]),
        start_with(&config("worker-2"), &["--role", "worker"]),
    ];
    wait_ready(&client, &apis[0].base).await;
    // A worker process serves health, not the API.
    assert_eq!(client.get(format!("{}/readyz", workers[0].base)).send().await.unwrap().status(), 200);
    assert_eq!(client.get(format!("{}/v1/jobs", workers[0].base)).send().await.unwrap().status(), 404);
    let listed: Value = client.get(format!("{}/v1/workers", apis[1].base)).send().await.unwrap().json().await.unwrap();
    let registered = listed["data"].as_array().unwrap();
    assert_eq!(registered.len(), 2, "{listed}");
    assert!(registered.iter().all(|w| w["alive"] == true && w["models"] == json!(["tiny-sd"])), "{listed}");

    let seen: Seen = Arc::default();
    let follower = follow_all(client.clone(), apis[0].base.clone(), seen.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let api = &apis[i % 2].base;
        let response = client
            .post(format!("{api}/v1/images"))
            .json(&json!({"prompt": format!("job {i}"), "steps": 40, "seed": i, "preview_every": 10}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }

    // Kill -9 the first worker in the middle of a job, then start it again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let killed_job = loop {
        let started = lines_with(&workers[0], "job started");
        let done: HashSet<String> = lines_with(&workers[0], "job succeeded").into_iter().collect();
        if let Some(running) = started.into_iter().find(|id| !done.contains(id)) {
            break running;
        }
        assert!(Instant::now() < deadline, "the first worker never started a job");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    workers[0].child.kill().unwrap();
    workers[0].child.wait().unwrap();
    let killed = workers.remove(0);
    workers.push(start_with(&config("worker-1"), &["--role", "worker"]));

    // Every job succeeds, and its image is readable through either API process.
    for (i, id) in ids.iter().enumerate() {
        let url = format!("{}/v1/jobs/{id}", apis[i % 2].base);
        let job = common::wait_for_job(&client, &url, Duration::from_secs(240)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let image = job["images"][0]["url"].as_str().unwrap();
        let bytes = client.get(format!("{}{image}", apis[(i + 1) % 2].base)).send().await.unwrap();
        assert_eq!(bytes.status(), 200);
        image::load_from_memory(&bytes.bytes().await.unwrap()).expect("a readable image");
    }
    // Unless the kill came just after the job's completion was committed, the job ran again elsewhere.
    let finished_before_kill = lines_with(&killed, "job succeeded").contains(&killed_job);
    let rerun: Value =
        client.get(format!("{}/v1/jobs/{killed_job}", apis[0].base)).send().await.unwrap().json().await.unwrap();
    assert!(
        finished_before_kill || rerun["attempts"].as_u64().unwrap() >= 2,
        "the killed job must have run again: {rerun}"
    );

    // Exactly once: one `job succeeded` per job over every worker process, the killed one included.
    let mut successes: HashMap<String, usize> = HashMap::new();
    for process in [&killed, &workers[0], &workers[1]] {
        for id in lines_with(process, "job succeeded") {
            *successes.entry(id).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(successes.get(id), Some(&1), "job {id} succeeded {:?} times", successes.get(id));
    }

    // The follower on the first API process saw progress (with previews) of jobs each worker ran.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    follower.abort();
    let seen = seen.lock().unwrap().clone();
    let progressed: HashSet<&str> =
        seen.iter().filter(|(_, _, kind)| kind == "progress").map(|(_, job, _)| job.as_str()).collect();
    // (The restarted worker may have found little left to do; the two that ran from the start must show.)
    for process in [&killed, &workers[0]] {
        let ran = started_by(process);
        assert!(ran.iter().any(|job| progressed.contains(job.as_str())), "no progress seen of a worker's jobs");
    }
    let completed: Vec<&str> =
        seen.iter().filter(|(_, _, kind)| kind == "completed").map(|(_, job, _)| job.as_str()).collect();
    // Events are written after the state they report: a `kill -9` right after a commit may lose the killed
    // worker's last events (the job's row still says it succeeded; per-job followers read that).
    let unique: HashSet<&str> = completed.iter().copied().collect();
    assert_eq!(unique.len(), completed.len(), "no job completes twice");
    let missing: Vec<&String> = ids.iter().filter(|id| !unique.contains(id.as_str())).collect();
    assert!(missing.iter().all(|id| **id == killed_job), "completions missing: {missing:?}");

    // Every picture is in the bucket; no process wrote one to its own folder.
    let stored = moto.inspector(BUCKET).list(None).try_collect::<Vec<_>>().await.unwrap();
    let pictures = stored.iter().filter(|o| o.location.as_ref().contains("/images/")).count();
    assert_eq!(pictures, JOBS, "one picture per job in the bucket");
    assert!(!dir.path().join("worker-2/images").exists() && !dir.path().join("worker-1/images").exists());

    resume_on_the_other_api_process(&client, &apis).await;
    for process in apis.into_iter().chain(workers) {
        terminate(process);
    }
}

/// A client follows a job on one API process, drops the stream after `started`, and reconnects to the other
/// with `Last-Event-ID`: it gets the rest of the job's events, none twice.
async fn resume_on_the_other_api_process(client: &reqwest::Client, apis: &[Binary]) {
    let body = json!({"prompt": "resume me", "steps": 60, "preview_every": 5});
    let accepted: Value =
        client.post(format!("{}/v1/images", apis[0].base)).json(&body).send().await.unwrap().json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    let first = client.get(format!("{}/v1/jobs/{id}/events", apis[0].base)).send().await.unwrap();
    let mut events = first.bytes_stream().eventsource();
    let mut last = String::new();
    let mut kinds = Vec::new();
    while let Some(Ok(event)) = events.next().await {
        last = event.id.clone();
        kinds.push(event.event.clone());
        if event.event == "progress" {
            break;
        }
    }
    drop(events);
    let second = client
        .get(format!("{}/v1/jobs/{id}/events", apis[1].base))
        .header("Last-Event-ID", &last)
        .send()
        .await
        .unwrap();
    let mut rest = Vec::new();
    let mut events = second.bytes_stream().eventsource();
    while let Some(Ok(event)) = tokio::time::timeout(Duration::from_secs(60), events.next()).await.unwrap() {
        assert!(event.id.parse::<u64>().unwrap() > last.parse::<u64>().unwrap(), "replayed {event:?} after {last}");
        rest.push(event.event.clone());
        if event.event == "completed" {
            break;
        }
    }
    assert_eq!(kinds.last().map(String::as_str), Some("progress"), "{kinds:?}");
    assert!(!rest.iter().any(|k| k == "queued" || k == "started"), "nothing before the resume point again: {rest:?}");
    assert_eq!(rest.last().map(String::as_str), Some("completed"), "{rest:?}");
}
