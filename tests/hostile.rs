//! Attacks on a real server on loopback, each bounded in count and time: a slow-header flood larger than
//! the connection cap while `/healthz` is probed, header and body deadlines, a never-ending chunked body,
//! stalled uploads against the body budget while the resident memory is read from `/proc`, and the
//! per-key budget. The README ("Limits under hostile load") reports their numbers.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, AUTH_ON};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Reads what the server sends until it closes the connection or `within` passes: the status code (if a
/// response came) and everything read.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> (Option<u16>, String) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
    }
    let text = String::from_utf8_lossy(&received).to_string();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok());
    (status, text)
}

/// Whether the server has closed `stream` within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Resident memory of this process (server and attackers), from `/proc/self/status`.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB");
    kib * 1024
}

/// One slow-header attacker: opens a connection, sends half a header, and opens another when the server
/// closes it, until `until`.
async fn slow_header_attacker(addr: String, until: Instant) -> u64 {
    let mut opened = 0;
    while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        opened += 1;
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: attacker\r\nX-Slow: ").await;
        let left = until.saturating_duration_since(Instant::now());
        closed_within(&mut stream, left).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_header_flood_larger_than_the_cap_leaves_healthz_answering() {
    let server = TestServer::start_with_server("max_connections = 64\n", "").await;
    let until = Instant::now() + Duration::from_secs(5);
    let attackers: Vec<_> = (0..300).map(|_| tokio::spawn(slow_header_attacker(addr(&server), until))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut latencies = Vec::new();
    while Instant::now() + Duration::from_millis(300) < until {
        let started = Instant::now();
        let health = tokio::time::timeout(Duration::from_secs(3), client.get(server.url("/healthz")).send()).await;
        let status = health.expect("/healthz answers within 3 s under the flood").expect("/healthz").status();
        assert_eq!(status, 200);
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
        let models = client.get(server.url("/v1/models")).send().await.expect("/v1/models under the flood");
        assert_eq!(models.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut opened = 0;
    for attacker in attackers {
        opened += attacker.await.unwrap();
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "flood: 300 slow-header attackers opened {opened} connections against max_connections = 64; \
         {} probes of /healthz (each followed by /v1/models) all answered, /healthz p50 {:.1} ms, max {:.1} ms",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(opened > 300, "the cap evicted attackers to admit others ({opened} connections)");
    assert!(latencies.len() >= 5, "{} probes", latencies.len());
    server.shutdown().await;
}

#[tokio::test]
async fn half_a_header_and_an_idle_kept_alive_connection_are_closed_after_the_header_timeout() {
    let server = TestServer::start_with_server("header_timeout_seconds = 1\n", "").await;
    let mut slow = TcpStream::connect(addr(&server)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut idle = TcpStream::connect(addr(&server)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut slow, Duration::from_secs(4)).await, "half a header is never timed out");
    assert!(closed_within(&mut idle, Duration::from_secs(4)).await, "an idle kept-alive connection stays open");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before the timeout");
    server.shutdown().await;
}

async fn post_head(server: &TestServer, extra_headers: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr(server)).await.unwrap();
    let head = format!("POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn a_stalled_body_gets_408_in_our_error_shape() {
    let server = TestServer::start_with_server("body_idle_timeout_seconds = 1\n", "").await;
    for sent in [&b""[..], &b"{\"prompt\": \"a red"[..]] {
        let mut stream = post_head(&server, "Content-Length: 1000\r\n").await;
        stream.write_all(sent).await.unwrap();
        let started = Instant::now();
        let (status, text) = read_answer(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(status, Some(408), "{text}");
        assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
        assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_never_ending_chunked_body_is_cut_off() {
    let server = TestServer::start_with_server("body_idle_timeout_seconds = 1\nbody_timeout_seconds = 2\n", "").await;
    let mut stream = post_head(&server, "Transfer-Encoding: chunked\r\n").await;
    let started = Instant::now();
    let (mut reader, mut writer) = stream.split();
    let trickle = async {
        while started.elapsed() < Duration::from_secs(8) {
            if writer.write_all(b"1\r\n \r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let answer = async {
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buffer[..n]);
        }
        String::from_utf8_lossy(&received).to_string()
    };
    let (text, ()) = tokio::join!(answer, trickle);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(8), "cut off after {elapsed:?}");
    server.shutdown().await;
}

const MIB: usize = 1024 * 1024;

/// One stalled upload: declares `declared` bytes, sends up to `sent` of them (stopping early if the server
/// stops reading for a second or closes), then holds the connection until `release`. Returns the status
/// code if the server answered meanwhile.
async fn stalled_upload(
    addr: String,
    declared: usize,
    sent: usize,
    release: tokio::sync::watch::Receiver<bool>,
) -> Option<u16> {
    static CHUNK: [u8; 64 * 1024] = [b' '; 64 * 1024];
    let mut stream = TcpStream::connect(&addr).await.ok()?;
    let head = format!(
        "POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut written = 0;
    while written < sent {
        match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&CHUNK)).await {
            Ok(Ok(())) => written += CHUNK.len(),
            _ => break,
        }
    }
    let mut release = release;
    let (status, _) = tokio::select! {
        answer = read_answer(&mut stream, Duration::from_secs(30)) => answer,
        _ = release.wait_for(|r| *r) => (None, String::new()),
    };
    let _ = release.wait_for(|r| *r).await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_uploads_stay_within_the_body_budget() {
    let budget = 16 * MIB;
    let server = TestServer::start_with_server(
        &format!("max_body_bytes = {}\nmax_body_bytes_in_flight = {budget}\nbody_idle_timeout_seconds = 30\n", 8 * MIB),
        "",
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    let before = resident_bytes();
    let (release, released) = tokio::sync::watch::channel(false);
    let uploads: Vec<_> =
        (0..60).map(|_| tokio::spawn(stalled_upload(addr(&server), 8 * MIB, 4 * MIB, released.clone()))).collect();
    let mut peak = before;
    let settle = Instant::now() + Duration::from_secs(4);
    while Instant::now() < settle {
        peak = peak.max(resident_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "/healthz answers while uploads stall");
    let _ = release.send(true);
    let mut refused = 0;
    for upload in uploads {
        if upload.await.unwrap() == Some(503) {
            refused += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = resident_bytes();
    let grown = peak.saturating_sub(before) as f64 / MIB as f64;
    println!(
        "bodies: 60 uploads of 4 MiB stalled against a {} MiB budget: resident {:.0} MiB before, peak {:.0} MiB \
         (+{grown:.0} MiB), {:.0} MiB after they left; {refused} answered 503",
        budget / MIB,
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        after as f64 / MIB as f64,
    );
    assert!(refused >= 50, "uploads past the budget are refused with 503 ({refused})");
    assert!(grown < (budget / MIB) as f64 + 48.0, "resident memory grew {grown:.0} MiB with a {budget} byte budget");
    server.shutdown().await;
}

#[tokio::test]
async fn one_key_cannot_take_the_whole_body_budget() {
    let server = TestServer::start_with_server(
        &format!("max_body_bytes = {MIB}\nmax_body_bytes_in_flight = {}\n", 64 * MIB),
        &format!("{AUTH_ON}[limits]\nmax_body_bytes_in_flight_per_key = {MIB}\n"),
    )
    .await;
    let (greedy, other) = (server.create_key("greedy", false).await, server.create_key("other", false).await);
    let mut first = post_head(&server, &format!("Authorization: Bearer {greedy}\r\nContent-Length: {MIB}\r\n")).await;
    first.write_all(&vec![b' '; MIB - 16]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"prompt": "a red circle", "steps": 1});
    let second = client.post(server.url("/v1/images")).bearer_auth(&greedy).json(&body).send().await.unwrap();
    assert_eq!(second.status(), 429, "the greedy key's second upload");
    assert_eq!(second.headers()["retry-after"], "1");
    let error: serde_json::Value = second.json().await.unwrap();
    assert_eq!(error["error"]["code"], "too_many_body_bytes", "{error}");
    let third = client.post(server.url("/v1/images")).bearer_auth(&other).json(&body).send().await.unwrap();
    assert_eq!(third.status(), 202, "another key is not held up");
    drop(first);
    server.shutdown().await;
}
