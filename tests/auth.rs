//! API keys end to end: the `denoised keys` commands, bearer authentication on every non-public route,
//! tenants kept out of each other's jobs, images and events, the per-key limit, the refusal to serve an open
//! server on a public address, and no secret in the logs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_for_job, TestServer, AUTH_ON};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(60);

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_denoised")
}

/// Runs `denoised keys …` against a config whose database is `server`'s; returns stdout.
fn keys_cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let config = server.dir.path().join("cli.toml");
    std::fs::write(&config, common::test_config_toml(server.dir.path(), AUTH_ON)).unwrap();
    let out = Command::new(binary()).arg("keys").args(args).arg("--config").arg(&config).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A client that sends `key` with every request.
fn keyed_client(key: &str) -> reqwest::Client {
    let headers = [(reqwest::header::AUTHORIZATION, bearer(key).parse().unwrap())].into_iter().collect();
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

async fn submit(client: &reqwest::Client, server: &TestServer, key: &str, seed: u64) -> Value {
    let response = client
        .post(server.url("/v1/images"))
        .header("authorization", bearer(key))
        .json(&json!({"prompt": "a red circle", "steps": 2, "seed": seed}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json().await.unwrap()
}

async fn get_json(client: &reqwest::Client, url: String, key: &str) -> Value {
    client.get(url).header("authorization", bearer(key)).send().await.unwrap().json().await.unwrap()
}

async fn status_of(client: &reqwest::Client, method: reqwest::Method, url: String, key: Option<&str>) -> u16 {
    let mut request = client.request(method, url);
    if let Some(key) = key {
        request = request.header("authorization", bearer(key));
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_create_list_and_revoke() {
    let server = TestServer::start(AUTH_ON).await;
    let client = reqwest::Client::new();
    let (ok, out, err) = keys_cli(&server, &["create", "--name", "alice"]);
    assert!(ok, "{err}");
    let key = out.lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("dn_") && key.len() > 40, "the last line must be the key: {out}");
    let (ok, _, err) = keys_cli(&server, &["create", "--name", "alice"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, out, _) = keys_cli(&server, &["create", "--name", "ops", "--admin"]);
    assert!(ok && out.contains("admin"));

    let (ok, listing, _) = keys_cli(&server, &["list"]);
    assert!(ok && listing.contains("alice") && listing.contains("ops"), "{listing}");
    assert!(!listing.contains(&key), "the list must not show secrets");
    // `dn_<id>_<secret>`; the secret is URL-safe base64 and may hold `_` itself.
    let secret = key.splitn(3, '_').nth(2).unwrap();
    assert!(secret.len() >= 40, "{key}");
    assert!(!listing.contains(secret));

    let models = server.url("/v1/models");
    assert_eq!(status_of(&client, reqwest::Method::GET, models.clone(), Some(&key)).await, 200);
    let (ok, out, err) = keys_cli(&server, &["revoke", "alice"]);
    assert!(ok && out.contains("revoked"), "{err}");
    assert_eq!(
        status_of(&client, reqwest::Method::GET, models, Some(&key)).await,
        401,
        "a revoked key must stop working"
    );
    let (ok, _, err) = keys_cli(&server, &["revoke", "alice"]);
    assert!(!ok && err.contains("no key named"), "{err}");
    let (ok, listing, _) = keys_cli(&server, &["list"]);
    assert!(ok && listing.lines().any(|l| l.starts_with("alice") && !l.trim_end().ends_with('-')), "{listing}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_turn_watermarks_on_and_off() {
    let server = TestServer::start(AUTH_ON).await;
    let (ok, out, err) = keys_cli(&server, &["create", "--name", "alice", "--watermark"]);
    assert!(ok && out.contains("watermark: on"), "{out}{err}");
    let (ok, out, _) = keys_cli(&server, &["create", "--name", "bob"]);
    assert!(ok && out.contains("watermark: none"), "{out}");
    let column = |listing: &str, name: &str| {
        let line = listing.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
        line.split_whitespace().rev().nth(1).unwrap_or_default().to_string()
    };
    let (_, listing, _) = keys_cli(&server, &["list"]);
    assert_eq!((column(&listing, "alice"), column(&listing, "bob")), ("on".into(), "-".into()), "{listing}");
    let (ok, out, err) = keys_cli(&server, &["update", "alice", "--watermark", "off"]);
    assert!(ok && out.contains("watermark: off"), "{out}{err}");
    let (_, listing, _) = keys_cli(&server, &["list"]);
    assert_eq!(column(&listing, "alice"), "off", "the secret stays: {listing}");
    let (ok, _, err) = keys_cli(&server, &["update", "alice", "--watermark", "maybe"]);
    assert!(!ok && err.contains("maybe"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_probes_and_the_api_description_are_public() {
    let server = TestServer::start(AUTH_ON).await;
    let client = reqwest::Client::new();
    let tenant = server.create_key("tenant", false).await;
    let admin = server.create_key("admin", true).await;
    for path in ["/healthz", "/readyz", "/openapi.json", "/docs/"] {
        assert_eq!(status_of(&client, reqwest::Method::GET, server.url(path), None).await, 200, "{path}");
    }
    for path in ["/v1/models", "/v1/schedulers", "/v1/jobs", "/metrics"] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
    for header in ["Basic dXNlcjpwYXNz".to_string(), "Bearer".into(), "Bearer dn_nope".into(), tenant.to_string()] {
        let response =
            client.get(server.url("/v1/models")).header("authorization", header.clone()).send().await.unwrap();
        assert_eq!(response.status(), 401, "{header}");
    }
    // The OpenAI routes answer in OpenAI's shape.
    let response = client
        .post(server.url("/v1/images/generations"))
        .header("authorization", "Bearer sk-wrong")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // Metrics are for operators.
    assert_eq!(status_of(&client, reqwest::Method::GET, server.url("/metrics"), Some(&tenant)).await, 403);
    assert_eq!(status_of(&client, reqwest::Method::GET, server.url("/metrics"), Some(&admin)).await, 200);
    assert_eq!(status_of(&client, reqwest::Method::GET, server.url("/v1/models"), Some(&tenant)).await, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_jobs_images_or_events() {
    let server = TestServer::start(AUTH_ON).await;
    let client = reqwest::Client::new();
    let alice = server.create_key("alice", false).await;
    let bob = server.create_key("bob", false).await;
    let admin = server.create_key("admin", true).await;

    // Bob follows the all-jobs stream from before anything is submitted.
    let bob_stream = client.get(server.url("/v1/events")).header("authorization", bearer(&bob)).send().await.unwrap();
    assert_eq!(bob_stream.status(), 200);
    let mut bob_events = bob_stream.bytes_stream().eventsource();

    let job = submit(&client, &server, &alice, 1).await;
    let id = job["id"].as_str().unwrap().to_string();
    let url = server.url(&format!("/v1/jobs/{id}"));
    let done = wait_for_job(&keyed_client(&alice), &url, TIMEOUT).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let image = server.url(done["images"][0]["url"].as_str().unwrap());

    // Bob: every route about alice's job says "not found", exactly as for a job that does not exist.
    use reqwest::Method;
    for (method, target) in [
        (Method::GET, url.clone()),
        (Method::GET, image.clone()),
        (Method::GET, format!("{url}/events")),
        (Method::POST, format!("{url}/cancel")),
        (Method::DELETE, url.clone()),
    ] {
        assert_eq!(status_of(&client, method.clone(), target.clone(), Some(&bob)).await, 404, "{method} {target}");
    }
    let listed = get_json(&client, server.url("/v1/jobs"), &bob).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");
    // Alice and the admin see it.
    assert_eq!(status_of(&client, Method::GET, image.clone(), Some(&alice)).await, 200);
    assert_eq!(status_of(&client, Method::GET, image.clone(), Some(&admin)).await, 200);
    for (key, expected) in [(&alice, 1), (&admin, 1)] {
        let listed = get_json(&client, server.url("/v1/jobs"), key).await;
        assert_eq!(listed["data"].as_array().unwrap().len(), expected, "{listed}");
    }

    // Bob's own job: his stream shows its events and never one of alice's.
    let own = submit(&client, &server, &bob, 2).await;
    let own_id = own["id"].as_str().unwrap().to_string();
    let mut seen_own_terminal = false;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !seen_own_terminal {
        let event = tokio::time::timeout_at(deadline, bob_events.next()).await.expect("bob's job must finish").unwrap();
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data["job_id"], own_id.as_str(), "bob saw another tenant's event: {data}");
        seen_own_terminal = event.event == "completed";
    }
    // Alice cannot delete bob's job; bob can.
    let own_url = server.url(&format!("/v1/jobs/{own_id}"));
    assert_eq!(status_of(&client, Method::DELETE, own_url.clone(), Some(&alice)).await, 404);
    assert_eq!(status_of(&client, Method::DELETE, own_url, Some(&bob)).await, 204);
    // The same Idempotency-Key used by two tenants makes two jobs.
    let mut ids = Vec::new();
    for key in [&alice, &bob] {
        let response = client
            .post(server.url("/v1/images"))
            .header("authorization", bearer(key))
            .header("idempotency-key", "shared-key")
            .json(&json!({"prompt": "x", "steps": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(response.json::<Value>().await.unwrap()["id"].clone());
    }
    assert_ne!(ids[0], ids[1]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_cannot_hold_more_than_its_outstanding_limit() {
    let server = TestServer::start(&format!("{AUTH_ON}[limits]\nmax_outstanding_per_key = 2\n")).await;
    let client = reqwest::Client::new();
    let greedy = server.create_key("greedy", false).await;
    let other = server.create_key("other", false).await;
    let slow = json!({"prompt": "x", "steps": 150, "n": 8});
    let mut urls = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(server.url("/v1/images"))
            .header("authorization", bearer(&greedy))
            .json(&slow)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        urls.push(server.url(&format!("/v1/jobs/{}", response.json::<Value>().await.unwrap()["id"].as_str().unwrap())));
    }
    let refused = client
        .post(server.url("/v1/images"))
        .header("authorization", bearer(&greedy))
        .json(&slow)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_outstanding_jobs", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_outstanding_per_key"), "{body}");
    // Another key is not held back.
    let response = client
        .post(server.url("/v1/images"))
        .header("authorization", bearer(&other))
        .json(&json!({"prompt": "x", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // Cancelling frees the slots.
    for url in &urls {
        let status = status_of(&client, reqwest::Method::POST, format!("{url}/cancel"), Some(&greedy)).await;
        assert!(status == 200 || status == 202, "{status}");
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let response = client
            .post(server.url("/v1/images"))
            .header("authorization", bearer(&greedy))
            .json(&json!({"prompt": "x", "steps": 1}))
            .send()
            .await
            .unwrap();
        if response.status() == 202 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "cancelled jobs must stop counting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

/// Starts the real binary; returns the child and its stderr lines as they come.
fn spawn_server(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "info,tower_http=debug,ort=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str, log: &mut Vec<String>) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
    }
    None
}

#[test]
fn an_open_server_on_a_public_address_needs_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, common::test_config_toml(dir.path(), "")).unwrap();
    let config = config.to_str().unwrap();
    let refused = Command::new(binary()).args(["serve", "--config", config, "--bind", "0.0.0.0:0"]).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--allow-unauthenticated") && stderr.contains("[auth]"), "{stderr}");

    let (mut child, rx) =
        spawn_server(&["serve", "--config", config, "--bind", "0.0.0.0:0", "--allow-unauthenticated"]);
    let mut log = Vec::new();
    let listening = wait_for_line(&rx, "listening", &mut log);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(listening.is_some(), "the flag must let it serve: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_appear_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, common::test_config_toml(dir.path(), AUTH_ON)).unwrap();
    let config = config.to_str().unwrap().to_string();
    let created =
        Command::new(binary()).args(["keys", "create", "--name", "logged", "--config", &config]).output().unwrap();
    assert!(created.status.success());
    let key = String::from_utf8_lossy(&created.stdout).lines().last().unwrap().trim().to_string();
    let (mut child, rx) = spawn_server(&["serve", "--config", &config]);
    let mut log = Vec::new();
    let line = wait_for_line(&rx, "listening", &mut log).expect("the server must start");
    let addr = line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let wrong = format!("{}x", &key[..key.len() - 1]);
    for k in [&key, &wrong] {
        let _ = client.get(format!("{base}/v1/models")).header("authorization", bearer(k)).send().await.unwrap();
    }
    let response = client
        .post(format!("{base}/v1/images"))
        .header("authorization", bearer(&key))
        .json(&json!({"prompt": "x", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.unwrap();
    let url = format!("{base}/v1/jobs/{}", job["id"].as_str().unwrap());
    let done = wait_for_job(&keyed_client(&key), &url, TIMEOUT).await;
    assert_eq!(done["status"], "succeeded");
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    log.extend(rx.try_iter());
    let text = log.join("\n");
    assert!(text.contains("logged"), "requests should be attributed to the key's name: {text}");
    // `dn_<id>_<secret>`; the secret is URL-safe base64 and may hold `_` itself.
    let secret = key.splitn(3, '_').nth(2).unwrap();
    assert!(secret.len() >= 40, "{key}");
    for needle in [key.as_str(), wrong.as_str(), secret] {
        assert!(!text.contains(needle), "a secret reached the log");
    }
}

fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_ends_its_open_streams_and_owners_see_their_deletions() {
    let server = TestServer::start(AUTH_ON).await;
    let client = reqwest::Client::new();
    let alice = server.create_key("alice", false).await;
    let carol = server.create_key("carol", false).await;

    // Carol follows everything she may see, then deletes a job of hers that is still queued or running.
    let carol_all = client.get(server.url("/v1/events")).bearer_auth(&carol).send().await.unwrap();
    let mut carol_events = carol_all.bytes_stream().eventsource();
    let long = json!({"prompt": "x", "steps": 150, "n": 8, "preview_every": 0});
    let doomed = client.post(server.url("/v1/images")).bearer_auth(&carol).json(&long).send().await.unwrap();
    let doomed = doomed.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let deleted = client.delete(server.url(&format!("/v1/jobs/{doomed}"))).bearer_auth(&carol).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, carol_events.next()).await.expect("the deletion event").unwrap();
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        if data["job_id"] == doomed.as_str() && event.event == "cancelled" {
            break;
        }
    }

    // Alice has a long job and two open streams; revoking her key closes both.
    let job = client.post(server.url("/v1/images")).bearer_auth(&alice).json(&long).send().await.unwrap();
    let id = job.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let mut streams = Vec::new();
    for path in ["/v1/events".to_string(), format!("/v1/jobs/{id}/events")] {
        let response = client.get(server.url(&path)).bearer_auth(&alice).send().await.unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response.bytes_stream().eventsource());
    }
    server.revoke_key("alice").await;
    for mut stream in streams {
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(event) = stream.next().await {
                if event.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a stream of a revoked key must end");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_cancels_its_queued_jobs_and_stops_its_running_one() {
    let server = TestServer::start(AUTH_ON).await;
    let alice = keyed_client(&server.create_key("alice", false).await);
    let admin = keyed_client(&server.create_key("admin", true).await);
    let submit = |client: &reqwest::Client, body: serde_json::Value| {
        let request = client.post(server.url("/v1/images")).json(&body).send();
        async move { request.await.unwrap().json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string() }
    };
    let long = json!({"prompt": "long", "steps": 150, "n": 8, "preview_every": 0});
    let running = submit(&alice, long.clone()).await;
    let queued = submit(&alice, json!({"prompt": "waits", "steps": 2})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = |id: &str| {
        let request = admin.get(server.url(&format!("/v1/jobs/{id}"))).send();
        async move { request.await.unwrap().json::<Value>().await.unwrap()["status"].as_str().unwrap().to_string() }
    };
    while status(&running).await != "running" {
        assert!(std::time::Instant::now() < deadline, "the long job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out, err) = keys_cli(&server, &["revoke", "alice"]);
    assert!(ok && out.contains("cancelled its 1 queued jobs"), "{out}{err}");
    assert_eq!(status(&queued).await, "cancelled");
    // The lease is renewed every third of its 5 s: the next renewal sees the revocation.
    while status(&running).await == "running" {
        assert!(std::time::Instant::now() < deadline, "the revoked key's job kept running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&running).await, "cancelled");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_storage_quota_gets_429_until_it_deletes_jobs() {
    let server = TestServer::start(&format!("{AUTH_ON}[limits]\nmax_stored_bytes_per_key = 40000\n")).await;
    let alice = keyed_client(&server.create_key("alice", false).await);
    let bob = keyed_client(&server.create_key("bob", false).await);
    let mut finished = Vec::new();
    let refused = loop {
        let response =
            alice.post(server.url("/v1/images")).json(&json!({"prompt": "x", "steps": 2})).send().await.unwrap();
        if response.status() != 202 {
            break response;
        }
        let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        let job = wait_for_job(&alice, &server.url(&format!("/v1/jobs/{id}")), Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded");
        finished.push(id);
        assert!(finished.len() < 50, "the quota never bit");
    };
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_quota_exceeded", "{body}");
    let other = bob.post(server.url("/v1/images")).json(&json!({"prompt": "x", "steps": 2})).send().await.unwrap();
    assert_eq!(other.status(), 202, "another key has its own quota");
    for id in &finished {
        assert_eq!(alice.delete(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().status(), 204);
    }
    let again = alice.post(server.url("/v1/images")).json(&json!({"prompt": "x", "steps": 2})).send().await.unwrap();
    assert_eq!(again.status(), 202, "deleting jobs frees the quota");
    server.shutdown().await;
}
