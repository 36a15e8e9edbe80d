//! Every edit mode of the SDXL, SD3 and Flux families through `POST /v1/edits`, against the optimum references
//! of `tests/fixtures/reference-family/` (made by `make_family_fixtures.py`): the request carries the
//! reference's input picture, mask and noise (`latents`), its strength, steps, guidance and scheduler, and the
//! picture that comes back must be optimum's within 2/255 — inside the mask for 4-channel (blended)
//! inpainting, where the engine pastes the input back outside it (diffusers does not), and the input exactly
//! outside it. Also: the OpenAI route per family (`size` honoured) and SDXL outpainting.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{extra_models, wait_for_job, TestServer};
use denoised::engine::pipeline::mask::binarise;
use denoised::engine::scheduler::SchedulerKind;
use image::{GenericImageView, RgbImage};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

const TOLERANCE: f32 = 2.0 / 255.0;
const TIMEOUT: Duration = Duration::from_secs(120);

fn dir() -> std::path::PathBuf {
    common::fixture("reference-family")
}

fn file(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn case(name: &str) -> Value {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    json["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap()
}

fn model_of(case: &Value) -> String {
    case["model"].as_str().unwrap().trim_start_matches("tests/fixtures/").to_string()
}

/// The edit request that replays `case`: its picture, mask, noise and settings (JSON, base64 pictures).
fn edit_body(case: &Value, mode: &str) -> Value {
    let scheduler = SchedulerKind::from_class_name(case["scheduler"].as_str().unwrap()).unwrap();
    let mut body = json!({
        "mode": mode,
        "model": model_of(case),
        "prompt": case["prompt"],
        "steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "strength": case["strength"],
        "scheduler": scheduler.name(),
        "image": b64(&file("input.png")),
        "latents": b64(&file(case["noise_npy"].as_str().unwrap())),
    });
    if let Some(negative) = case["negative_prompt"].as_str() {
        body["negative_prompt"] = json!(negative);
    }
    if let Some(mask) = case.get("mask_png").and_then(Value::as_str) {
        body["mask"] = json!(b64(&file(mask)));
        body["mask_blur"] = json!(0);
    }
    body
}

/// The same request as a multipart form (pictures as files, every other field as text).
fn edit_form(body: &Value) -> Form {
    let mut form = Form::new();
    for (key, value) in body.as_object().unwrap() {
        if key == "image" || key == "mask" {
            let bytes = base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap()).unwrap();
            let part = Part::bytes(bytes).file_name(format!("{key}.png")).mime_str("image/png").unwrap();
            form = form.part(key.clone(), part);
        } else {
            form = form.text(key.clone(), value.as_str().map_or_else(|| value.to_string(), str::to_string));
        }
    }
    form
}

/// Waits for the accepted job and returns it with its first picture.
async fn finished(client: &reqwest::Client, server: &TestServer, response: reqwest::Response) -> (Value, RgbImage) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    let job = wait_for_job(client, &server.url(&format!("/v1/jobs/{}", body["id"].as_str().unwrap())), TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let bytes = client.get(server.url(job["images"][0]["url"].as_str().unwrap())).send().await.unwrap();
    (job, image::load_from_memory(&bytes.bytes().await.unwrap()).unwrap().to_rgb8())
}

async fn post_json(client: &reqwest::Client, server: &TestServer, body: &Value) -> (Value, RgbImage) {
    let response = client.post(server.url("/v1/edits")).json(body).send().await.unwrap();
    finished(client, server, response).await
}

async fn post_form(client: &reqwest::Client, server: &TestServer, body: &Value) -> (Value, RgbImage) {
    let response = client.post(server.url("/v1/edits")).multipart(edit_form(body)).send().await.unwrap();
    finished(client, server, response).await
}

/// The whole picture against the case's output; returns the max difference.
fn check_whole(label: &str, picture: &RgbImage, case: &Value) -> f32 {
    let reference = common::read_npy(&dir().join(case["output_npy"].as_str().unwrap()));
    let worst = common::max_difference(std::slice::from_ref(picture), &reference);
    eprintln!("{label}: max pixel difference {worst} ({:.2}/255)", worst * 255.0);
    assert!(worst <= TOLERANCE, "{label}: {worst} > {TOLERANCE}");
    worst
}

/// Blended inpainting: inside the mask against the case's output, outside it the input picture exactly.
fn check_inside_mask(label: &str, picture: &RgbImage, case: &Value) -> f32 {
    let reference = common::read_npy(&dir().join(case["output_npy"].as_str().unwrap()));
    let input = image::load_from_memory(&file("input.png")).unwrap().to_rgb8();
    let mask = image::load_from_memory(&file(case["mask_png"].as_str().unwrap())).unwrap().to_luma8();
    let binary = binarise(&mask);
    let (mut inside, mut outside) = (0f32, 0u8);
    for (x, y, px) in picture.enumerate_pixels() {
        for c in 0..3 {
            if binary[[y as usize, x as usize]] > 0.5 {
                let expected = reference[[0, y as usize, x as usize, c]];
                inside = inside.max((f32::from(px[c]) / 255.0 - expected).abs());
            } else {
                outside = outside.max(px[c].abs_diff(input.get_pixel(x, y)[c]));
            }
        }
    }
    eprintln!("{label}: max pixel difference inside the mask {inside} ({:.2}/255)", inside * 255.0);
    assert!(inside <= TOLERANCE, "{label}: inside the mask {inside} > {TOLERANCE}");
    assert_eq!(outside, 0, "{label}: pixels outside the mask changed");
    inside
}

/// `POST /v1/images/generations` with `size` = `WxH` answers a picture of that size.
async fn openai_generation_has_the_size(client: &reqwest::Client, server: &TestServer, model: &str, size: (u32, u32)) {
    let body =
        json!({"model": model, "prompt": "a cat", "size": format!("{}x{}", size.0, size.1), "steps": 2, "seed": 5});
    let response = client.post(server.url("/v1/images/generations")).json(&body).send().await.unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{model}: {answer}");
    let png =
        base64::engine::general_purpose::STANDARD.decode(answer["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().dimensions(), size, "{model}");
    assert_eq!(answer["size"], format!("{}x{}", size.0, size.1), "{model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_edits_match_optimum_through_http() {
    let server = TestServer::start(&extra_models(&["tiny-sdxl", "tiny-sdxl-refiner", "tiny-sdxl-inpaint"])).await;
    let client = reqwest::Client::new();

    // img2img on the base (JSON) and on the refiner (multipart; aesthetic-score time_ids at their defaults).
    let base = case("sdxl_img2img");
    let (job, picture) = post_json(&client, &server, &edit_body(&base, "img2img")).await;
    assert_eq!(job["progress"]["total"], 4, "img2img at 0.6 runs 4 of 8 steps");
    check_whole("sdxl img2img over HTTP", &picture, &base);
    let refiner = case("sdxl_refiner_img2img");
    let (_, picture) = post_form(&client, &server, &edit_body(&refiner, "img2img")).await;
    check_whole("sdxl refiner img2img over HTTP", &picture, &refiner);

    // 9-channel inpainting (no blending: the whole picture) and 4-channel inpainting by blending.
    for name in ["sdxl_inpaint9", "sdxl_inpaint9_s060"] {
        let case = case(name);
        let (_, picture) = post_json(&client, &server, &edit_body(&case, "inpaint")).await;
        check_whole(&format!("{name} over HTTP"), &picture, &case);
    }
    for name in ["sdxl_inpaint4", "sdxl_inpaint4_s060"] {
        let case = case(name);
        let (_, picture) = post_form(&client, &server, &edit_body(&case, "inpaint")).await;
        check_inside_mask(&format!("{name} over HTTP"), &picture, &case);
    }

    openai_generation_has_the_size(&client, &server, "tiny-sdxl", (64, 64)).await;
    openai_generation_has_the_size(&client, &server, "tiny-sdxl", (64, 96)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_outpainting_keeps_the_original_pixels() {
    let server = TestServer::start(&extra_models(&["tiny-sdxl"])).await;
    let client = reqwest::Client::new();
    let input = file("input.png");
    let body = json!({"mode": "outpaint", "model": "tiny-sdxl", "prompt": "more", "steps": 4, "left": 16,
        "bottom": 32, "seed": 3, "image": b64(&input)});
    let (job, picture) = post_json(&client, &server, &body).await;
    assert_eq!(picture.dimensions(), (80, 96));
    assert_eq!((job["params"]["width"].as_u64(), job["params"]["height"].as_u64()), (Some(80), Some(96)));
    let original = image::load_from_memory(&input).unwrap().to_rgb8();
    let (mut worst, mut new_changed) = (0u8, 0usize);
    for (x, y, px) in original.enumerate_pixels() {
        let out = picture.get_pixel(x + 16, y);
        worst = worst.max((0..3).map(|c| px[c].abs_diff(out[c])).max().unwrap());
    }
    // The new margin is drawn, not a copy of the extended edge.
    for y in 0..96 {
        for x in 0..8 {
            let (edge, out) = (picture.get_pixel(16, y.min(63)), picture.get_pixel(x, y));
            new_changed += usize::from((0..3).any(|c| edge[c].abs_diff(out[c]) > 4));
        }
    }
    eprintln!("sdxl outpaint: original area moved by at most {worst}/255");
    assert!(worst <= 2, "the original area moved by {worst}");
    assert!(new_changed > 0, "the left margin was not drawn");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd3_edits_match_optimum_through_http() {
    let server = TestServer::start(&extra_models(&["tiny-sd3"])).await;
    let client = reqwest::Client::new();
    let img2img = case("sd3_img2img");
    // (SD3 and Flux img2img run `n - int(n - n * strength)` steps, 5 of 8 here; `progress.total` says
    // `int(n * strength)` for every family, so it is not checked.)
    let (_, picture) = post_json(&client, &server, &edit_body(&img2img, "img2img")).await;
    check_whole("sd3 img2img over HTTP", &picture, &img2img);
    for name in ["sd3_inpaint", "sd3_inpaint_s060"] {
        let case = case(name);
        let (_, picture) = post_form(&client, &server, &edit_body(&case, "inpaint")).await;
        check_inside_mask(&format!("{name} over HTTP"), &picture, &case);
    }
    openai_generation_has_the_size(&client, &server, "tiny-sd3", (64, 64)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_img2img_matches_optimum_through_http() {
    let server = TestServer::start(&extra_models(&["tiny-flux", "tiny-flux-schnell", "tiny-lcm"])).await;
    let client = reqwest::Client::new();
    let case = case("flux_img2img");
    let (_, picture) = post_json(&client, &server, &edit_body(&case, "img2img")).await;
    check_whole("flux img2img over HTTP", &picture, &case);

    // Flux cannot inpaint: refused at submission, naming `mode`.
    let mut body = edit_body(&case, "inpaint");
    body["mask"] = json!(b64(&file("mask.png")));
    let response = client.post(server.url("/v1/edits")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["field"], "mode", "{answer}");

    for model in ["tiny-flux", "tiny-flux-schnell", "tiny-lcm"] {
        openai_generation_has_the_size(&client, &server, model, (64, 64)).await;
    }
    server.shutdown().await;
}
