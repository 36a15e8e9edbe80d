//! The HTTP API end to end: a real server on 127.0.0.1:0 with the tiny optimum fixture, real ONNX Runtime,
//! a real SQLite file, driven by a real HTTP client.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{wait_for_job, TestServer};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

async fn submit(
    client: &reqwest::Client,
    server: &TestServer,
    body: Value,
) -> (reqwest::StatusCode, Value, Option<String>) {
    let response = client.post(server.url("/v1/images")).json(&body).send().await.unwrap();
    let status = response.status();
    let location = response.headers().get("location").map(|v| v.to_str().unwrap().to_string());
    (status, response.json().await.unwrap(), location)
}

async fn run_job(client: &reqwest::Client, server: &TestServer, body: Value) -> Value {
    let (status, accepted, location) = submit(client, server, body).await;
    assert_eq!(status, 202, "{accepted}");
    let job = wait_for_job(client, &server.url(&location.unwrap()), JOB_TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

async fn fetch_image(client: &reqwest::Client, server: &TestServer, url: &str) -> (String, Vec<u8>) {
    let response = client.get(server.url(url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mime = response.headers()["content-type"].to_str().unwrap().to_string();
    (mime, response.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_comes_back_as_an_image_in_the_requested_size_and_format() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();

    let (status, accepted, location) =
        submit(&client, &server, json!({"prompt": "a red circle", "steps": 4, "seed": 7})).await;
    assert_eq!(status, 202);
    assert_eq!(accepted["status"], "queued");
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(location.as_deref(), Some(format!("/v1/jobs/{id}").as_str()));
    assert_eq!(accepted["params"]["seed"], 7);
    assert_eq!(accepted["params"]["width"], 64, "default is the model's native size");
    assert_eq!(accepted["params"]["scheduler"], "pndm", "default is the model's own scheduler");

    let job = wait_for_job(&client, &server.url(&location.unwrap()), JOB_TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["step"], job["progress"]["total"]);
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    let images = job["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["seed"], 7);
    let (mime, bytes) = fetch_image(&client, &server, images[0]["url"].as_str().unwrap()).await;
    assert_eq!(mime, "image/png");
    let picture = image::load_from_memory(&bytes).unwrap();
    assert_eq!((picture.width(), picture.height()), (64, 64));

    for (format, mime, expected) in
        [("jpeg", "image/jpeg", image::ImageFormat::Jpeg), ("webp", "image/webp", image::ImageFormat::WebP)]
    {
        let job = run_job(
            &client,
            &server,
            json!({"prompt": "a blue square", "steps": 3, "width": 96, "height": 64, "output_format": format}),
        )
        .await;
        let (got, bytes) = fetch_image(&client, &server, job["images"][0]["url"].as_str().unwrap()).await;
        assert_eq!(got, mime);
        assert_eq!(image::guess_format(&bytes).unwrap(), expected);
        let picture = image::load_from_memory(&bytes).unwrap();
        assert_eq!((picture.width(), picture.height()), (96, 64));
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_reproduce_images_alone_or_in_a_batch() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let batch =
        run_job(&client, &server, json!({"prompt": "a cat", "steps": 4, "seed": 100, "n": 2, "scheduler": "euler_a"}))
            .await;
    let images = batch["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[1]["seed"], 101);
    let second_alone =
        run_job(&client, &server, json!({"prompt": "a cat", "steps": 4, "seed": 101, "scheduler": "euler_a"})).await;
    let (_, a) = fetch_image(&client, &server, images[1]["url"].as_str().unwrap()).await;
    let (_, b) = fetch_image(&client, &server, second_alone["images"][0]["url"].as_str().unwrap()).await;
    let (_, first) = fetch_image(&client, &server, images[0]["url"].as_str().unwrap()).await;
    let decode = |bytes: &[u8]| image::load_from_memory(bytes).unwrap().to_rgb8().into_raw();
    let max_diff = decode(&a).iter().zip(decode(&b)).map(|(x, y)| x.abs_diff(y)).max().unwrap();
    assert!(max_diff <= 2, "image 1 of seed 100 differs from seed 101 alone by {max_diff}");
    assert_ne!(decode(&first), decode(&a), "two images of one job must differ");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_latents_reproduce_the_optimum_reference_through_http() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let reference_dir = common::fixture("reference");
    let latents = std::fs::read(reference_dir.join("latents_1x4x8x8.npy")).unwrap();
    let job = run_job(
        &client,
        &server,
        json!({
            "prompt": "a red circle on a blue background",
            "negative_prompt": "blurry",
            "steps": 10,
            "guidance_scale": 7.5,
            "scheduler": "ddim",
            "latents": base64::engine::general_purpose::STANDARD.encode(latents),
        }),
    )
    .await;
    assert_eq!(job["params"]["has_latents"], true);
    let (_, bytes) = fetch_image(&client, &server, job["images"][0]["url"].as_str().unwrap()).await;
    let ours = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let reference = common::read_npy(&reference_dir.join("ddim.npy"));
    let mut worst = 0f32;
    for (x, y, px) in ours.enumerate_pixels() {
        for c in 0..3 {
            worst = worst.max((px[c] as f32 / 255.0 - reference[[0, y as usize, x as usize, c]]).abs());
        }
    }
    assert!(worst <= 2.0 / 255.0, "max pixel difference {worst}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheduler_generates_through_the_api() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let models: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let names: Vec<String> =
        models["data"][0]["schedulers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for expected in [
        "ddim",
        "pndm",
        "ddpm",
        "euler",
        "euler_a",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "dpmpp_2m_sde_karras",
        "unipc",
        "lcm",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n == "flow_euler"), "a diffusion model lists a flow scheduler: {names:?}");
    let mut submitted = Vec::new();
    for name in &names {
        let (status, body, location) =
            submit(&client, &server, json!({"prompt": "a green triangle", "steps": 4, "seed": 3, "scheduler": name}))
                .await;
        assert_eq!(status, 202, "{name}: {body}");
        assert_eq!(body["params"]["scheduler"], name.as_str());
        submitted.push((name.clone(), location.unwrap()));
    }
    let alias = run_job(&client, &server, json!({"prompt": "x", "steps": 2, "scheduler": "DPM++ 2M Karras"})).await;
    assert_eq!(alias["params"]["scheduler"], "dpmpp_2m_karras");
    for (name, location) in submitted {
        let job = wait_for_job(&client, &server.url(&location), JOB_TIMEOUT).await;
        assert_eq!(job["status"], "succeeded", "{name}: {job}");
        let (_, bytes) = fetch_image(&client, &server, job["images"][0]["url"].as_str().unwrap()).await;
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        let distinct: std::collections::HashSet<_> = img.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 10, "{name}: degenerate image");
    }
    server.shutdown().await;
}

async fn expect_error(response: reqwest::Response, status: u16, code: &str, field: Option<&str>) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    if let Some(field) = field {
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_naming_the_field() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let post = |body: Value| client.post(server.url("/v1/images")).json(&body).send();
    let wrong_latents = denoised::engine::npy::write_f32(&ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 4, 4, 4])));
    let cases: Vec<(Value, &str)> = vec![
        (json!({"steps": 4}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "x", "steps": "ten"}), "steps"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "steps": 151}), "steps"),
        (json!({"prompt": "x", "steps": -3}), "steps"),
        (json!({"prompt": "x", "width": 65}), "width"),
        (json!({"prompt": "x", "height": 4096}), "height"),
        (json!({"prompt": "x", "n": 9}), "n"),
        (json!({"prompt": "x", "guidance_scale": 99}), "guidance_scale"),
        (json!({"prompt": "x", "guidance_rescale": 1.5}), "guidance_rescale"),
        (json!({"prompt": "x", "model": "nope"}), "model"),
        (json!({"prompt": "x", "scheduler": "warp"}), "scheduler"),
        (json!({"prompt": "x", "output_format": "gif"}), "output_format"),
        (json!({"prompt": "x", "seed": -1}), "seed"),
        (json!({"prompt": "x", "colour": "red"}), "colour"),
        (json!({"prompt": "x", "latents": "%%%"}), "latents"),
        (json!({"prompt": "x", "latents": base64::engine::general_purpose::STANDARD.encode(b"not npy")}), "latents"),
        (
            json!({"prompt": "x", "latents": base64::engine::general_purpose::STANDARD.encode(&wrong_latents)}),
            "latents",
        ),
        (json!({"prompt": "x".repeat(5000)}), "prompt"),
    ];
    for (body, field) in cases {
        let response = post(body.clone()).await.unwrap();
        expect_error(response, 422, "invalid_field", Some(field)).await;
    }
    let malformed = client
        .post(server.url("/v1/images"))
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .await
        .unwrap();
    expect_error(malformed, 400, "malformed_json", None).await;
    let not_json =
        client.post(server.url("/v1/images")).header("content-type", "text/plain").body("hi").send().await.unwrap();
    expect_error(not_json, 415, "unsupported_media_type", None).await;
    expect_error(client.get(server.url("/v1/nothing")).send().await.unwrap(), 404, "not_found", None).await;
    expect_error(client.delete(server.url("/v1/images")).send().await.unwrap(), 405, "method_not_allowed", None).await;
    expect_error(client.get(server.url("/v1/jobs/not-a-uuid")).send().await.unwrap(), 404, "not_found", None).await;
    let unknown = uuid::Uuid::now_v7();
    expect_error(client.get(server.url(&format!("/v1/jobs/{unknown}"))).send().await.unwrap(), 404, "not_found", None)
        .await;
    expect_error(
        client.get(server.url(&format!("/v1/jobs/{unknown}/images/0"))).send().await.unwrap(),
        404,
        "not_found",
        None,
    )
    .await;
    // Nothing of the above was stored as a job, and the server still serves.
    let ok = run_job(&client, &server, json!({"prompt": "still alive", "steps": 2})).await;
    assert_eq!(ok["status"], "succeeded");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_a_json_413() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let huge = "x".repeat(33 * 1024 * 1024);
    let response = client.post(server.url("/v1/images")).json(&json!({"prompt": huge})).send().await.unwrap();
    let body = expect_error(response, 413, "payload_too_large", None).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("33554432"), "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_models_and_openapi() {
    let server = TestServer::start("").await;
    let client = reqwest::Client::new();
    let health: Value = client.get(server.url("/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let ready = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let models: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    let card = &models["data"][0];
    assert_eq!(card["id"], "tiny-sd");
    assert_eq!(card["width"], 64);
    assert_eq!(card["height"], 64);
    assert_eq!(card["default_scheduler"], "pndm");
    assert_eq!(card["capabilities"], json!(["text_to_image", "img2img", "inpaint", "outpaint"]));
    let spec: Value = client.get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(spec["paths"]["/v1/images"]["post"].is_object());
    let schedulers: Value = client.get(server.url("/v1/schedulers")).send().await.unwrap().json().await.unwrap();
    let list = schedulers["data"].as_array().unwrap();
    assert_eq!(list.len(), 12);
    let karras = list.iter().find(|s| s["id"] == "dpmpp_2m_karras").unwrap();
    assert!(karras["aliases"].as_array().unwrap().iter().any(|a| a == "DPM++ 2M Karras"));
    assert!(list.iter().all(|s| !s["description"].as_str().unwrap().is_empty()));
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("denoised_jobs{status=\"queued\"}"), "{metrics}");
    let docs = client.get(server.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_image_urls_come_from_public_url_never_from_the_host_header() {
    let dir = tempfile::tempdir().unwrap();
    let toml = common::test_config_toml(dir.path(), "")
        .replace("[server]\n", "[server]\npublic_url = \"https://images.example.com/\"\n");
    let server = TestServer::start_configured(dir, toml).await;
    let client = reqwest::Client::new();
    let forged = client.post(server.url("/v1/images/generations")).header("host", "evil.example.com/phish?x=");
    let answer =
        common::json_of(forged.json(&json!({"prompt": "a red circle", "steps": 2, "response_format": "url"}))).await;
    let url = answer["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with("https://images.example.com/v1/jobs/"), "{url}");
    assert!(!url.contains("evil"), "{url}");
    let path = url.trim_start_matches("https://images.example.com");
    assert_eq!(client.get(server.url(path)).send().await.unwrap().status(), 200);
    server.shutdown().await;
}
