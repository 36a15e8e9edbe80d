//! Durability with the real binary: jobs accepted before a `kill -9` run after a restart, and SIGTERM shuts
//! down cleanly with exit code 0. Each test runs on SQLite and, with `TEST_POSTGRES_URL`, on PostgreSQL.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{start, terminate};
use serde_json::{json, Value};

/// Writes the test config into `dir`, on `database` (`None`: a SQLite file in `dir`).
fn write_config(dir: &Path, database: Option<&str>) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let toml = common::test_config_toml(dir, "");
    std::fs::write(&path, database.map_or(toml.clone(), |url| common::on_database(&toml, url))).unwrap();
    path
}

/// Runs each named `async fn(Option<String>)` once on SQLite (`None`) and once on a fresh PostgreSQL schema.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(None).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(url) = super::common::postgres_url(stringify!($name)).await {
                        super::$name(Some(url)).await
                    }
                }
            )*
        }
    };
}

on_both_databases!(
    jobs_accepted_before_kill_9_run_after_restart,
    sigterm_finishes_running_work_and_exits_zero,
    two_server_processes_on_one_database_never_run_a_job_twice,
);

async fn job(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client.get(format!("{base}/v1/jobs/{id}")).send().await.unwrap().json().await.unwrap()
}

async fn jobs_accepted_before_kill_9_run_after_restart(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), database.as_deref());
    let client = reqwest::Client::new();

    let mut server = start(&config);
    let mut ids = Vec::new();
    for i in 0..3 {
        let response = client
            .post(format!("{}/v1/images", server.base))
            .json(&json!({"prompt": format!("job {i}"), "steps": 150, "n": 2, "seed": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    // Kill -9 while the first job is running and the others wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    while job(&client, &server.base, &ids[0]).await["status"] != "running" {
        assert!(Instant::now() < deadline, "the first job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    // A second crash right after the restart, before anything can finish.
    server = start(&config);
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    server = start(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let state = job(&client, &server.base, id).await;
            match state["status"].as_str().unwrap() {
                "succeeded" => {
                    let images = state["images"].as_array().unwrap();
                    assert_eq!(images.len(), 2, "{state}");
                    for image in images {
                        let url = format!("{}{}", server.base, image["url"].as_str().unwrap());
                        let bytes = client.get(url).send().await.unwrap().bytes().await.unwrap();
                        assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 64);
                    }
                    break;
                }
                "failed" | "cancelled" => panic!("job lost to the crash: {state}"),
                _ => {
                    assert!(Instant::now() < deadline, "job never finished after restart: {state}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let first = job(&client, &server.base, &ids[0]).await;
    assert!(first["attempts"].as_u64().unwrap() >= 2, "the killed job must have been re-run: {first}");
    // No stray temporary files: every image was renamed into place.
    let leftovers = walk(&dir.path().join("images")).into_iter().filter(|p| p.ends_with(".tmp")).count();
    assert_eq!(leftovers, 0);
    terminate(server);
}

async fn sigterm_finishes_running_work_and_exits_zero(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), database.as_deref());
    let client = reqwest::Client::new();
    let server = start(&config);
    let response = client
        .post(format!("{}/v1/images", server.base))
        .json(&json!({"prompt": "finish me", "steps": 40}))
        .send()
        .await
        .unwrap();
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while job(&client, &server.base, &id).await["status"] == "queued" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    terminate(server);
    // The job finished within the grace period, so a new server finds it done.
    let server = start(&config);
    let state = job(&client, &server.base, &id).await;
    assert_eq!(state["status"], "succeeded", "{state}");
    terminate(server);
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

async fn two_server_processes_on_one_database_never_run_a_job_twice(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), database.as_deref());
    let client = reqwest::Client::new();
    let mut servers = [start(&config), start(&config)];
    let mut ids = Vec::new();
    for i in 0..24 {
        // Submissions alternate between the two processes; either may claim any job.
        let base = &servers[i % 2].base;
        let response = client
            .post(format!("{base}/v1/images"))
            .json(&json!({"prompt": format!("job {i}"), "steps": 3, "seed": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let body = job(&client, &servers[0].base, id).await;
            if body["status"] == "succeeded" {
                assert_eq!(body["attempts"], 1, "{body}");
                let image = body["images"][0]["url"].as_str().unwrap();
                let bytes =
                    client.get(format!("{}{image}", servers[1].base)).send().await.unwrap().bytes().await.unwrap();
                image::load_from_memory(&bytes).expect("a readable image");
                break;
            }
            assert!(body["status"] == "queued" || body["status"] == "running", "{body}");
            assert!(Instant::now() < deadline, "job {id} did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut started_by = Vec::new();
    for server in &mut servers {
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        let log = server.log.lock().unwrap();
        started_by.push(
            ids.iter()
                .map(|id| log.iter().filter(|l| l.contains("job started") && l.contains(id.as_str())).count())
                .collect::<Vec<_>>(),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            started_by[0][i] + started_by[1][i],
            1,
            "job {id} started {} + {} times",
            started_by[0][i],
            started_by[1][i]
        );
    }
    let first: usize = started_by[0].iter().sum();
    assert!(first > 0 && first < ids.len(), "both processes should have taken jobs ({first} of {})", ids.len());
}
