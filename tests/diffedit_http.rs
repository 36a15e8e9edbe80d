//! DiffEdit (`mask: "auto"` on `POST /v1/edits`) end to end on the default model (`models/tiny-shapes`): a
//! generated red circle is recoloured by prompt, the computed mask comes back as the job's `mask` (a PNG at
//! `/v1/jobs/{id}/mask`) in both encodings, inpainting with that mask explicitly gives the same picture, the
//! mask survives a restart and goes with the job; identical prompts change nothing; the field rules are `422`s
//! naming the field.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::{wait_for_job, TestServer};
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);
const SOURCE: &str = "a large red circle left on a blue background";
const TARGET: &str = "a large yellow circle left on a blue background";

/// The test config serving the default model, with its data in `data`.
fn shapes_toml(data: &Path) -> String {
    common::shapes_config_toml(data, "")
}

fn png(image: &DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn get_bytes(client: &reqwest::Client, url: String) -> (u16, Vec<u8>) {
    let response = client.get(url).send().await.unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

/// Waits for the job `accepted` describes and returns it with its first picture.
async fn finished(client: &reqwest::Client, server: &TestServer, accepted: &Value) -> (Value, RgbImage) {
    let id = accepted["id"].as_str().unwrap_or_else(|| panic!("not accepted: {accepted}"));
    let job = wait_for_job(client, &server.url(&format!("/v1/jobs/{id}")), TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (status, bytes) = get_bytes(client, server.url(job["images"][0]["url"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    (job, image::load_from_memory(&bytes).unwrap().to_rgb8())
}

async fn post_json(client: &reqwest::Client, server: &TestServer, route: &str, body: &Value) -> (u16, Value) {
    let response = client.post(server.url(route)).json(body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn largest_difference(a: &RgbImage, b: &RgbImage, only: impl Fn(u32, u32) -> bool) -> u8 {
    a.enumerate_pixels()
        .filter(|(x, y, _)| only(*x, *y))
        .flat_map(|(x, y, p)| (0..3).map(move |c| p[c].abs_diff(b.get_pixel(x, y)[c])))
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffedit_recolours_by_prompt_and_returns_its_mask_across_a_restart() {
    let holder = tempfile::tempdir().unwrap();
    let data = holder.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let toml = shapes_toml(&data);
    let server = TestServer::start_configured(tempfile::tempdir().unwrap(), toml.clone()).await;
    let client = reqwest::Client::new();

    let (_, accepted) = post_json(&client, &server, "/v1/images", &json!({"prompt": SOURCE, "seed": 7})).await;
    let (_, picture) = finished(&client, &server, &accepted).await;
    let picture_png = png(&DynamicImage::ImageRgb8(picture.clone()));
    let edit = json!({
        "mode": "inpaint", "image": b64(&picture_png), "mask": "auto", "source_prompt": SOURCE, "prompt": TARGET,
        "seed": 11, "steps": 20,
    });
    let (status, accepted) = post_json(&client, &server, "/v1/edits", &edit).await;
    assert_eq!(status, 202, "{accepted}");
    assert!(accepted.get("mask").is_none(), "no mask before the job has run: {accepted}");
    let (job, edited) = finished(&client, &server, &accepted).await;
    let id = job["id"].as_str().unwrap().to_string();
    let settings = &job["params"]["diffedit"];
    assert_eq!(settings["source_prompt"], SOURCE, "{job}");
    assert_eq!((settings["mask_samples"].as_u64(), settings["mask_encode_strength"].as_f64()), (Some(10), Some(0.5)));
    assert_eq!(settings["mask_threshold"].as_f64(), Some(3.0));
    // Ten mask draws, then twenty inpainting steps, counted as one run.
    assert_eq!((job["progress"]["step"].as_u64(), job["progress"]["total"].as_u64()), (Some(30), Some(30)), "{job}");
    assert_eq!(job["mask"]["url"], format!("/v1/jobs/{id}/mask"));
    // A follower of the finished job gets its `completed` event with the same mask.
    let events = client.get(server.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap().text().await.unwrap();
    let completed = events
        .split("\n\n")
        .find(|block| block.lines().any(|line| line == "event: completed"))
        .and_then(|block| block.lines().find_map(|line| line.strip_prefix("data: ")))
        .unwrap_or_else(|| panic!("no completed event in {events}"));
    let completed: Value = serde_json::from_str(completed).unwrap();
    assert_eq!(completed["mask"]["url"], format!("/v1/jobs/{id}/mask"), "{completed}");

    let response = client.get(server.url(&format!("/v1/jobs/{id}/mask"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let mask_png = response.bytes().await.unwrap().to_vec();
    let mask: GrayImage = image::load_from_memory(&mask_png).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (64, 64));
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255), "a binary mask");
    let marked = |x: u32, y: u32| mask.get_pixel(x, y)[0] == 255;
    let count = mask.pixels().filter(|p| p[0] == 255).count();
    assert!(count > 0 && count < 64 * 64 / 2, "{count} pixels marked");
    // The mask lies on the circle (left half), and everything outside it is the input, exactly.
    assert!((0..64).flat_map(|y| (40..64).map(move |x| (x, y))).all(|(x, y)| !marked(x, y)), "mask off the circle");
    assert!(largest_difference(&edited, &picture, |x, y| !marked(x, y)) <= 2);
    // Inside the mask, red became yellow: green rises from about 40 to about 220.
    let green = |image: &RgbImage| {
        let values: Vec<f32> =
            image.enumerate_pixels().filter(|(x, y, _)| marked(*x, *y)).map(|(_, _, p)| f32::from(p[1])).collect();
        values.iter().sum::<f32>() / values.len() as f32
    };
    assert!(green(&edited) - green(&picture) > 80.0, "green {} → {}", green(&picture), green(&edited));

    // The same edit as multipart computes the same mask; inpainting with that mask gives the same picture.
    let mut form = Form::new()
        .part("image", Part::bytes(picture_png.clone()).file_name("in.png").mime_str("image/png").unwrap())
        .text("mask", "auto");
    for (name, value) in [("mode", "inpaint"), ("source_prompt", SOURCE), ("prompt", TARGET), ("seed", "11")] {
        form = form.text(name, value);
    }
    let accepted: Value =
        client.post(server.url("/v1/edits")).multipart(form).send().await.unwrap().json().await.unwrap();
    let (again, again_picture) = finished(&client, &server, &accepted).await;
    let (_, again_mask) = get_bytes(&client, server.url(again["mask"]["url"].as_str().unwrap())).await;
    assert_eq!(image::load_from_memory(&again_mask).unwrap().to_luma8(), mask, "the mask depends on the seed only");
    assert!(largest_difference(&again_picture, &edited, |_, _| true) <= 1);
    let explicit = json!({
        "mode": "inpaint", "image": b64(&picture_png), "mask": b64(&mask_png), "prompt": TARGET, "seed": 11,
    });
    let (_, accepted) = post_json(&client, &server, "/v1/edits", &explicit).await;
    let (plain, plain_picture) = finished(&client, &server, &accepted).await;
    assert!(largest_difference(&plain_picture, &edited, |_, _| true) <= 1, "DiffEdit = inpainting with its mask");
    assert!(plain.get("mask").is_none(), "{plain}");
    let plain_id = plain["id"].as_str().unwrap();
    let (status, _) = get_bytes(&client, server.url(&format!("/v1/jobs/{plain_id}/mask"))).await;
    assert_eq!(status, 404, "a job with a given mask has no computed one");

    // Identical prompts: nothing differs, the mask is empty and the picture comes back as it was.
    let same = json!({"mode": "inpaint", "image": b64(&picture_png), "mask": "auto", "source_prompt": SOURCE,
                      "prompt": SOURCE, "seed": 11, "mask_samples": 3});
    let (_, accepted) = post_json(&client, &server, "/v1/edits", &same).await;
    let (unchanged, unchanged_picture) = finished(&client, &server, &accepted).await;
    assert_eq!(unchanged["progress"]["total"].as_u64(), Some(23), "{unchanged}");
    let (_, empty) = get_bytes(&client, server.url(unchanged["mask"]["url"].as_str().unwrap())).await;
    assert!(image::load_from_memory(&empty).unwrap().to_luma8().pixels().all(|p| p[0] == 0), "an empty mask");
    assert_eq!(largest_difference(&unchanged_picture, &picture, |_, _| true), 0);

    // The mask survives a restart, and goes with the job.
    server.shutdown().await;
    let server = TestServer::start_configured(tempfile::tempdir().unwrap(), toml).await;
    let job: Value = client.get(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(job["mask"]["url"], format!("/v1/jobs/{id}/mask"), "{job}");
    let (status, bytes) = get_bytes(&client, server.url(&format!("/v1/jobs/{id}/mask"))).await;
    assert_eq!((status, bytes == mask_png), (200, true));
    let stored = data.join(format!("images/{id}/mask.png"));
    assert!(stored.is_file(), "{} missing", stored.display());
    let deleted = client.delete(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let (status, _) = get_bytes(&client, server.url(&format!("/v1/jobs/{id}/mask"))).await;
    assert_eq!(status, 404);
    assert!(!stored.exists(), "the mask is deleted with the job");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffedit_fields_are_checked_naming_the_field() {
    let holder = tempfile::tempdir().unwrap();
    let server = TestServer::start_configured(tempfile::tempdir().unwrap(), shapes_toml(holder.path())).await;
    let client = reqwest::Client::new();
    let picture = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([40, 80, 230]))));
    let body = |patch: Value| {
        let mut body = json!({"mode": "inpaint", "image": b64(&picture), "mask": "auto", "source_prompt": SOURCE,
                              "prompt": TARGET});
        for (key, value) in patch.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let cases = [
        (body(json!({"mode": "img2img"})), "mask"),
        (body(json!({"mode": "outpaint", "right": 8})), "mask"),
        (body(json!({"source_prompt": null})), "source_prompt"),
        (body(json!({"source_prompt": ""})), "source_prompt"),
        (body(json!({"mask": null})), "source_prompt"),
        (body(json!({"mask_encode_strength": 0})), "mask_encode_strength"),
        (body(json!({"mask_samples": 33})), "mask_samples"),
        (body(json!({"mask_threshold": 0})), "mask_threshold"),
        (body(json!({"mask": null, "source_prompt": null, "mode": "img2img", "mask_samples": 2})), "mask_samples"),
    ];
    for (body, field) in cases {
        let (status, response) = post_json(&client, &server, "/v1/edits", &body).await;
        assert_eq!(status, 422, "{field}: {response}");
        assert_eq!(response["error"]["field"], field, "{response}");
    }
    // Multipart: `mask=auto` with another mode.
    let form = Form::new()
        .part("image", Part::bytes(picture.clone()).file_name("in.png").mime_str("image/png").unwrap())
        .text("mask", "auto")
        .text("mode", "img2img")
        .text("source_prompt", SOURCE)
        .text("prompt", TARGET);
    let response = client.post(server.url("/v1/edits")).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "mask", "{body}");
    server.shutdown().await;
}
