//! Webhooks over HTTP against a real server: refused targets and misuses are `422`s naming the field (a
//! table, like `bad_requests.rs`); without API keys a webhook needs the configured secret; and a job's events
//! reach a receiver on loopback signed (checked here with HMAC-SHA256 written out from the specification's
//! formula), retried under the same `webhook-id` after failures, with the job view following along.

mod common;

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use common::{wait_for_job, TestServer, AUTH_ON};
use hmac::{Hmac, Mac};
use image::{DynamicImage, ImageFormat, RgbImage};
use serde_json::{json, Value};

/// The secret of jobs submitted without a key in these tests (24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn png_b64() -> String {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30])))
        .write_to(&mut out, ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

/// Sends `body` as JSON to `path` and returns the status and the JSON answer.
async fn post(server: &TestServer, key: Option<&str>, path: &str, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(server.url(path)).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_webhook_targets_and_misuses_are_422s_naming_the_field() {
    let server = TestServer::start(AUTH_ON).await;
    let key = server.create_key("alice", false).await;
    let long = format!("https://hooks.example.com/{}", "a".repeat(2048));
    let generation = |extra: Value| {
        let mut body = json!({"prompt": "a red circle", "steps": 1});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let edit = |extra: Value| {
        let mut body = json!({"mode": "img2img", "prompt": "x", "image": png_b64()});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("loopback", "/v1/images", generation(json!({"webhook_url": "http://127.0.0.1:9/hook"})), "webhook_url"),
        ("loopback by name", "/v1/images", generation(json!({"webhook_url": "http://localhost/"})), "webhook_url"),
        ("IPv6 loopback", "/v1/images", generation(json!({"webhook_url": "http://[::1]/"})), "webhook_url"),
        (
            "cloud metadata",
            "/v1/images",
            generation(json!({"webhook_url": "http://169.254.169.254/latest/meta-data/"})),
            "webhook_url",
        ),
        ("private", "/v1/images", generation(json!({"webhook_url": "https://10.1.2.3/"})), "webhook_url"),
        ("CGNAT", "/v1/images", generation(json!({"webhook_url": "http://100.64.0.1/"})), "webhook_url"),
        (
            "IPv4-mapped IPv6 metadata",
            "/v1/images",
            generation(json!({"webhook_url": "http://[::ffff:169.254.169.254]/"})),
            "webhook_url",
        ),
        ("decimal loopback", "/v1/images", generation(json!({"webhook_url": "http://2130706433/"})), "webhook_url"),
        (
            "credentials",
            "/v1/images",
            generation(json!({"webhook_url": "https://user:secret@hooks.example.com/"})),
            "webhook_url",
        ),
        ("ftp", "/v1/images", generation(json!({"webhook_url": "ftp://hooks.example.com/x"})), "webhook_url"),
        ("not a URL", "/v1/images", generation(json!({"webhook_url": "hooks"})), "webhook_url"),
        ("over-long", "/v1/images", generation(json!({"webhook_url": long})), "webhook_url"),
        (
            "unresolvable host",
            "/v1/images",
            generation(json!({"webhook_url": "http://no-such-host.invalid/hook"})),
            "webhook_url",
        ),
        ("URL not a string", "/v1/images", generation(json!({"webhook_url": 7})), "webhook_url"),
        (
            "unknown event",
            "/v1/images",
            generation(json!({"webhook_url": "http://127.0.0.1/", "webhook_events": ["exploded"]})),
            "webhook_events[0]",
        ),
        ("events without a URL", "/v1/images", generation(json!({"webhook_events": ["started"]})), "webhook_events"),
        ("edit to loopback", "/v1/edits", edit(json!({"webhook_url": "http://127.0.0.1:9/"})), "webhook_url"),
        ("edit to metadata", "/v1/edits", edit(json!({"webhook_url": "http://169.254.169.254/"})), "webhook_url"),
    ];
    for (what, path, body, field) in cases {
        let (status, answer) = post(&server, Some(&key), path, &body).await;
        assert_eq!(status, 422, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_field", "{what}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{what}: {answer}");
    }
    // The same checks on a multipart edit, events given as a form value.
    let form = |url: &str, events: &str| {
        let picture = base64::engine::general_purpose::STANDARD.decode(png_b64()).unwrap();
        let mut form = reqwest::multipart::Form::new()
            .text("mode", "img2img")
            .text("prompt", "x")
            .part("image", reqwest::multipart::Part::bytes(picture).file_name("x.png"));
        if !url.is_empty() {
            form = form.text("webhook_url", url.to_string());
        }
        if !events.is_empty() {
            form = form.text("webhook_events", events.to_string());
        }
        form
    };
    for (url, events, field) in
        [("http://169.254.169.254/", "started", "webhook_url"), ("", "started", "webhook_events")]
    {
        let response = reqwest::Client::new()
            .post(server.url("/v1/edits"))
            .bearer_auth(&key)
            .multipart(form(url, events))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    // Still serving, and a job without a webhook has none in its view.
    let (status, job) = post(&server, Some(&key), "/v1/images", &generation(json!({}))).await;
    assert_eq!(status, 202, "{job}");
    assert!(job.get("webhook").is_none(), "{job}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_a_webhook_needs_the_configured_secret() {
    let server = TestServer::start("[webhooks]\nallow_private_targets = true\n").await;
    let body = json!({"prompt": "x", "steps": 1, "webhook_url": "http://127.0.0.1:9/hook"});
    let (status, answer) = post(&server, None, "/v1/images", &body).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["field"], "webhook_url");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("[webhooks] secret"), "the message says how to configure it: {message}");
    server.shutdown().await;
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

/// A webhook receiver on loopback that answers 500 to its first `failures` requests, then 200.
async fn receiver(failures: usize) -> (String, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let log = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let mut log = log.lock().unwrap();
                log.push(Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    body: body.to_vec(),
                });
                if log.len() <= failures {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Whether `received` carries a valid `v1` signature under `secret`: HMAC-SHA256 of `id.timestamp.body`
/// keyed with the secret's base64-decoded bytes.
fn signed(received: &Received, secret: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", received.id, received.timestamp).as_bytes());
    mac.update(&received.body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    received.signature.split(' ').any(|s| s == expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_delivered_signed_and_retried_under_the_same_id() {
    let (url, got) = receiver(2).await;
    let server = TestServer::start(&format!(
        "[webhooks]\nsecret = \"{SECRET}\"\nallow_private_targets = true\nbackoff_initial_millis = 100\n\
         timeout_seconds = 2\n"
    ))
    .await;
    let body = json!({"prompt": "a red circle", "steps": 2, "webhook_url": url, "webhook_events": ["started"]});
    let (status, job) = post(&server, None, "/v1/images", &body).await;
    assert_eq!(status, 202, "{job}");
    // (A worker may already have claimed it, queueing `started`: the view shows that delivery then.)
    let hook = &job["webhook"];
    assert_eq!(
        (&hook["url"], &hook["status"], &hook["attempts"]),
        (&json!(url), &json!("pending"), &json!(0)),
        "{job}"
    );
    let id = job["id"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let done = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // `started` fails twice and is delivered on its third attempt; then `completed` goes out once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view: Value = client.get(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().json().await.unwrap();
        if view["webhook"]["status"] == "delivered" && view["webhook"]["event"] == "completed" {
            break view;
        }
        assert!(Instant::now() < deadline, "not delivered in time: {view} after {:?}", got.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view["webhook"]["attempts"], 1, "{view}");
    assert!(view["webhook"].get("last_error").is_none(), "{view}");
    let received = got.lock().unwrap().clone();
    let events: Vec<(String, String)> = received
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            (r.id.clone(), body["type"].as_str().unwrap().to_string())
        })
        .collect();
    let simple = id.replace('-', "");
    let started_id = format!("msg_{simple}_started_1");
    let completed_id = format!("msg_{simple}_completed");
    assert_eq!(
        events,
        vec![
            (started_id.clone(), "started".to_string()),
            (started_id.clone(), "started".to_string()),
            (started_id, "started".to_string()),
            (completed_id, "completed".to_string()),
        ]
    );
    for r in &received {
        assert!(signed(r, SECRET), "bad signature on {r:?}");
        assert!(!signed(r, "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), "a wrong secret must not verify");
        let age = (unix_seconds() - r.timestamp.parse::<i64>().unwrap()).abs();
        assert!(age < 60, "webhook-timestamp is the attempt's time: {r:?}");
    }
    let completed: Value = serde_json::from_slice(&received[3].body).unwrap();
    assert_eq!(completed["job_id"], id);
    assert_eq!(completed["images"], done["images"], "the images as the job view lists them");
    assert!(completed["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{completed}");
    server.shutdown().await;
}
