//! Live progress through a real SSE client (`eventsource-stream` over reqwest) on a real socket: event
//! order, previews, resuming with `Last-Event-ID`, cancellation, many subscribers, shutdown, deletion and
//! the job list.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{wait_for_job, TestServer};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Received {
    id: u64,
    name: String,
    data: Value,
}

/// Opens an SSE stream.
async fn open(
    client: &reqwest::Client,
    url: &str,
    last_event_id: Option<u64>,
) -> impl futures::Stream<Item = Received> + Unpin {
    let mut request = client.get(url);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    Box::pin(response.bytes_stream().eventsource().filter_map(|e| async move {
        let e = e.ok()?;
        if e.event == "error" {
            panic!("error event: {}", e.data);
        }
        Some(Received { id: e.id.parse().ok()?, name: e.event, data: serde_json::from_str(&e.data).ok()? })
    }))
}

/// Reads events until a terminal one (or the stream ends).
async fn collect_until_terminal(stream: &mut (impl futures::Stream<Item = Received> + Unpin)) -> Vec<Received> {
    let mut events = Vec::new();
    let deadline = tokio::time::sleep(TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(event) => {
                    let terminal = ["completed", "failed", "cancelled"].contains(&event.name.as_str());
                    events.push(event);
                    if terminal { return events; }
                }
                None => return events,
            },
            _ = &mut deadline => panic!("no terminal event within {TIMEOUT:?}: {events:?}"),
        }
    }
}

async fn submit(client: &reqwest::Client, server: &TestServer, body: Value) -> String {
    let response = client.post(server.url("/v1/images")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

async fn status(client: &reqwest::Client, server: &TestServer, id: &str) -> Value {
    client.get(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().json().await.unwrap()
}

async fn wait_status(client: &reqwest::Client, server: &TestServer, id: &str, wanted: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while status(client, server, id).await["status"] != wanted {
        assert!(Instant::now() < deadline, "job {id} never became {wanted}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn check_order(events: &[Received], id: &str, total: u64) {
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids must increase: {events:?}");
    for e in events {
        assert_eq!(e.data["type"], e.name.as_str(), "data.type matches the event name");
        assert_eq!(e.data["job_id"], id);
    }
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    let started = names.iter().position(|n| *n == "started").expect("a started event");
    assert!(names[..started].iter().all(|n| *n == "queued"), "{names:?}");
    let steps: Vec<u64> =
        events.iter().filter(|e| e.name == "progress").map(|e| e.data["step"].as_u64().unwrap()).collect();
    assert!(!steps.is_empty());
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps increase: {steps:?}");
    assert_eq!(*steps.last().unwrap(), total, "the last progress event is the last step");
    for e in events.iter().filter(|e| e.name == "progress") {
        assert_eq!(e.data["total"], total);
        assert!(e.data["eta_ms"].is_u64());
    }
    let completed = events.last().unwrap();
    assert_eq!(completed.data["images"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order_and_late_clients_get_the_terminal_event() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let id = submit(&client, &server, json!({"prompt": "a red circle", "steps": 12, "preview_every": 0})).await;
    let mut stream = open(&client, &server.url(&format!("/v1/jobs/{id}/events")), None).await;
    let events = collect_until_terminal(&mut stream).await;
    check_order(&events, &id, 12);
    assert!(events.iter().all(|e| e.data.get("preview").is_none()), "preview_every 0 sends no previews");
    assert!(stream.next().await.is_none(), "the stream ends after the terminal event");

    // After the end: the terminal event at once, and only that.
    let mut late = open(&client, &server.url(&format!("/v1/jobs/{id}/events")), None).await;
    let events = collect_until_terminal(&mut late).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name, "completed");
    assert_eq!(events[0].data["images"][0]["url"], format!("/v1/jobs/{id}/images/0"));

    let missing = client.get(server.url(&format!("/v1/jobs/{}/events", uuid::Uuid::now_v7()))).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_decode_to_the_image_size() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    // Following every job before submitting guarantees someone listens from the first step.
    let mut all = open(&client, &server.url("/v1/events"), None).await;
    for (mode, width) in [("approx", 64), ("vae", 128)] {
        let id = submit(
            &client,
            &server,
            json!({"prompt": "a blue square", "steps": 6, "preview_every": 2, "preview": mode, "width": width}),
        )
        .await;
        let mut previews = Vec::new();
        loop {
            let event = tokio::time::timeout(TIMEOUT, all.next()).await.unwrap().unwrap();
            if event.data["job_id"] != id.as_str() {
                continue;
            }
            if let Some(url) = event.data.get("preview").and_then(Value::as_str) {
                previews.push((event.data["step"].as_u64().unwrap(), url.to_string()));
            }
            if event.name == "completed" {
                break;
            }
        }
        let steps: Vec<u64> = previews.iter().map(|p| p.0).collect();
        assert_eq!(steps, vec![2, 4, 6], "{mode}: a preview every 2 steps");
        for (_, url) in previews {
            let encoded = url.strip_prefix("data:image/jpeg;base64,").expect("a JPEG data URL");
            let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
            let picture = image::load_from_memory(&bytes).unwrap();
            assert_eq!((picture.width(), picture.height()), (width, 64), "{mode}");
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_last_event_id_resumes_without_repeats() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let id = submit(&client, &server, json!({"prompt": "resume me", "steps": 60, "n": 2, "preview_every": 0})).await;
    let url = server.url(&format!("/v1/jobs/{id}/events"));
    let mut first = open(&client, &url, None).await;
    let mut seen = Vec::new();
    while let Some(event) = first.next().await {
        let progress = event.name == "progress";
        seen.push(event);
        if progress {
            break;
        }
    }
    drop(first); // disconnecting never cancels the job
    let last = seen.last().unwrap().id;
    let mut second = open(&client, &url, Some(last)).await;
    let rest = collect_until_terminal(&mut second).await;
    assert!(rest.iter().all(|e| e.id > last), "nothing at or before Last-Event-ID is repeated");
    assert!(rest.iter().all(|e| e.name != "started" && e.name != "queued"), "{rest:?}");
    assert_eq!(rest.last().unwrap().name, "completed");
    assert_eq!(status(&client, &server, &id).await["status"], "succeeded");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_queued_and_running_jobs_frees_the_worker() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let running = submit(&client, &server, json!({"prompt": "long", "steps": 150, "n": 8, "preview_every": 0})).await;
    let queued = submit(&client, &server, json!({"prompt": "waiting", "steps": 4})).await;
    wait_status(&client, &server, &running, "running").await;
    let queued_state = status(&client, &server, &queued).await;
    assert_eq!(queued_state["status"], "queued");
    assert_eq!(queued_state["queue_position"], 0);

    let mut queued_events = open(&client, &server.url(&format!("/v1/jobs/{queued}/events")), None).await;
    // The position at submission (1: the other job was not claimed yet), then the current one.
    loop {
        let event = tokio::time::timeout(TIMEOUT, queued_events.next()).await.unwrap().unwrap();
        assert_eq!(event.name, "queued");
        if event.data["position"] == 0 {
            break;
        }
        assert_eq!(event.data["position"], 1);
    }
    let response = client.post(server.url(&format!("/v1/jobs/{queued}/cancel"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "cancelled");
    let rest = collect_until_terminal(&mut queued_events).await;
    assert_eq!(rest.last().unwrap().name, "cancelled");

    let mut running_events = open(&client, &server.url(&format!("/v1/jobs/{running}/events")), None).await;
    let response = client.post(server.url(&format!("/v1/jobs/{running}/cancel"))).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let cancelled_at = Instant::now();
    let events = collect_until_terminal(&mut running_events).await;
    assert_eq!(events.last().unwrap().name, "cancelled");
    let last_step = events.iter().rev().find(|e| e.name == "progress").map_or(0, |e| e.data["step"].as_u64().unwrap());
    assert!(last_step < 150, "the job stopped early, at step {last_step}");
    let job = status(&client, &server, &running).await;
    assert_eq!(job["status"], "cancelled");
    assert!(job["images"].as_array().unwrap().is_empty());

    // The worker is free again: a new job runs at once.
    let next = submit(&client, &server, json!({"prompt": "next", "steps": 2})).await;
    let job = wait_for_job(&client, &server.url(&format!("/v1/jobs/{next}")), TIMEOUT).await;
    assert_eq!(job["status"], "succeeded");
    assert!(cancelled_at.elapsed() < Duration::from_secs(20));

    let again = client.post(server.url(&format!("/v1/jobs/{running}/cancel"))).send().await.unwrap();
    assert_eq!(again.status(), 409, "an ended job cannot be cancelled");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscribers_all_see_the_end() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let blocker = submit(&client, &server, json!({"prompt": "first", "steps": 60, "n": 4, "preview_every": 0})).await;
    let id = submit(&client, &server, json!({"prompt": "watched", "steps": 10})).await;
    let url = server.url(&format!("/v1/jobs/{id}/events"));
    let mut followers = Vec::new();
    for _ in 0..100 {
        let client = client.clone();
        let mut stream = open(&client, &url, None).await;
        followers.push(tokio::spawn(async move { collect_until_terminal(&mut stream).await }));
    }
    for follower in followers {
        let events = follower.await.unwrap();
        assert_eq!(events.last().unwrap().name, "completed", "{events:?}");
        assert!(events.iter().any(|e| e.name == "progress"));
    }
    assert_eq!(status(&client, &server, &blocker).await["status"], "succeeded");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_streams_promptly() {
    let mut server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let running = submit(&client, &server, json!({"prompt": "long", "steps": 150, "n": 8, "preview_every": 0})).await;
    let queued = submit(&client, &server, json!({"prompt": "never runs", "steps": 4})).await;
    wait_status(&client, &server, &running, "running").await;
    let mut streams = vec![
        open(&client, &server.url(&format!("/v1/jobs/{queued}/events")), None).await,
        open(&client, &server.url("/v1/events"), None).await,
    ];
    let first = streams[0].next().await.unwrap();
    assert_eq!(first.name, "queued");
    server.begin_shutdown();
    let started = Instant::now();
    for mut stream in streams.drain(..) {
        tokio::time::timeout(Duration::from_secs(5), async { while stream.next().await.is_some() {} })
            .await
            .expect("stream still open 5 s after shutdown began");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_jobs_and_images_and_the_list_pages_newest_first() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = submit(&client, &server, json!({"prompt": format!("job {i}"), "steps": 2})).await;
        wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
        ids.push(id);
    }
    let page: Value = client.get(server.url("/v1/jobs?limit=2")).send().await.unwrap().json().await.unwrap();
    let listed: Vec<&str> = page["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(listed, vec![ids[2].as_str(), ids[1].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let page2 = common::json_of(client.get(server.url(&format!("/v1/jobs?limit=2&cursor={cursor}")))).await;
    assert_eq!(page2["data"][0]["id"], ids[0].as_str());
    assert!(page2.get("next_cursor").is_none());
    let succeeded: Value =
        client.get(server.url("/v1/jobs?status=succeeded")).send().await.unwrap().json().await.unwrap();
    assert_eq!(succeeded["data"].as_array().unwrap().len(), 3);
    let bad = client.get(server.url("/v1/jobs?status=done")).send().await.unwrap();
    assert_eq!(bad.status(), 422);

    let image_dir = server.dir.path().join("images").join(&ids[0]);
    assert!(image_dir.exists());
    let deleted = client.delete(server.url(&format!("/v1/jobs/{}", ids[0]))).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(client.get(server.url(&format!("/v1/jobs/{}", ids[0]))).send().await.unwrap().status(), 404);
    assert!(!image_dir.exists());
    assert_eq!(client.delete(server.url(&format!("/v1/jobs/{}", ids[0]))).send().await.unwrap().status(), 404);

    // Deleting a running job stops it and leaves nothing behind.
    let running = submit(&client, &server, json!({"prompt": "long", "steps": 150, "n": 8, "preview_every": 0})).await;
    wait_status(&client, &server, &running, "running").await;
    assert_eq!(client.delete(server.url(&format!("/v1/jobs/{running}"))).send().await.unwrap().status(), 204);
    let next = submit(&client, &server, json!({"prompt": "after", "steps": 2})).await;
    assert_eq!(wait_for_job(&client, &server.url(&format!("/v1/jobs/{next}")), TIMEOUT).await["status"], "succeeded");
    assert!(!server.dir.path().join("images").join(&running).exists());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_blocking_and_streaming_openai_requests_promptly() {
    let mut server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let running = submit(&client, &server, json!({"prompt": "long", "steps": 150, "n": 8, "preview_every": 0})).await;
    wait_status(&client, &server, &running, "running").await;
    // Both queue behind the long job: without the fix, each would hold the graceful shutdown for 600 s.
    let blocking =
        client.post(server.url("/v1/images/generations")).json(&json!({"prompt": "waits", "steps": 2})).send();
    let blocking = tokio::spawn(blocking);
    let streamed = client
        .post(server.url("/v1/images/generations"))
        .json(&json!({"prompt": "streams", "steps": 2, "stream": true, "partial_images": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let mut streaming = streamed.bytes_stream().eventsource();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.begin_shutdown();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), blocking)
        .await
        .expect("blocking OpenAI request still open 5 s after shutdown began")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    let mut last = None;
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(event)) = streaming.next().await {
            last = Some(event.event);
        }
    })
    .await
    .expect("OpenAI stream still open 5 s after shutdown began");
    assert_eq!(last.as_deref(), Some("error"), "the stream says why it ended");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.shutdown().await;
}
