//! `POST /v1/edits` end to end over HTTP, in both encodings (JSON with base64, multipart files), on the tiny
//! fixtures: plain (4-channel: img2img, blended inpaint, outpaint), inpainting (9-channel) and
//! InstructPix2Pix (8-channel) U-Nets. Bad uploads are refused at submission with the field named.

mod common;

use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use common::{extra_models, wait_for_job, TestServer};
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(60);

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn input_image(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let inside = (x as i32 - 32).pow(2) + (y as i32 - 32).pow(2) < 200;
        if inside {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 160])
        }
    })
}

fn rect_mask(width: u32, height: u32) -> GrayImage {
    GrayImage::from_fn(width, height, |x, y| {
        image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) { 255 } else { 0 }])
    })
}

async fn server() -> TestServer {
    TestServer::start(&extra_models(&["tiny-sd-inpaint", "tiny-sd-instruct"])).await
}

async fn post_json(client: &reqwest::Client, server: &TestServer, body: Value) -> (u16, Value) {
    let response = client.post(server.url("/v1/edits")).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn post_form(client: &reqwest::Client, server: &TestServer, form: Form) -> (u16, Value) {
    let response = client.post(server.url("/v1/edits")).multipart(form).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn png_part(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes).file_name("image.png").mime_str("image/png").unwrap()
}

async fn expect_field(result: (u16, Value), status: u16, field: &str) {
    let (got, body) = result;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"]["field"], field, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_at_submission_naming_the_field() {
    let server = server().await;
    let client = reqwest::Client::new();
    let picture = DynamicImage::ImageRgb8(input_image(64, 64));
    let png = encode(&picture, ImageFormat::Png);
    let good = |extra: Value| {
        let mut body = json!({"mode": "img2img", "prompt": "x", "image": b64(&png), "model": "tiny-sd"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let mut truncated = png.clone();
    truncated.truncate(png.len() / 2);
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let huge = encode(&DynamicImage::ImageLuma8(GrayImage::new(9000, 16)), ImageFormat::Png);
    let small_mask = encode(&DynamicImage::ImageLuma8(rect_mask(32, 32)), ImageFormat::Png);
    let empty_mask = encode(&DynamicImage::ImageLuma8(GrayImage::new(64, 64)), ImageFormat::Png);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"mode": "img2img", "prompt": "x", "model": "tiny-sd"}), "image"),
        (good(json!({"image": "%%%not base64"})), "image"),
        (good(json!({"image": b64(&truncated)})), "image"),
        (good(json!({"image": b64(&gif)})), "image"),
        (good(json!({"image": b64(b"plain text")})), "image"),
        (good(json!({"image": b64(&huge)})), "image"),
        (good(json!({"mode": "inpaint", "mask": b64(&small_mask)})), "mask"),
        (good(json!({"mode": "inpaint", "mask": b64(&empty_mask)})), "mask"),
        (good(json!({"mode": "inpaint"})), "mask"),
        (good(json!({"mask": b64(&small_mask)})), "mask"),
        (good(json!({"mode": "instruct"})), "mode"),
        (good(json!({"mode": "sharpen"})), "mode"),
        (good(json!({"strength": 0})), "strength"),
        (good(json!({"strength": 1.5})), "strength"),
        (good(json!({"width": 100})), "width"),
        (good(json!({"mode": "outpaint"})), "left"),
        (good(json!({"mode": "outpaint", "left": 12})), "left"),
        (good(json!({"mode": "outpaint", "left": 8})), "left"),
        (good(json!({"left": 16})), "left"),
        (good(json!({"image_guidance_scale": 0.5})), "image_guidance_scale"),
        (good(json!({"steps": 0})), "steps"),
        (good(json!({"colour": 1})), "colour"),
    ];
    for (body, field) in cases {
        let described = body.to_string().chars().take(120).collect::<String>();
        let (status, response) = post_json(&client, &server, body).await;
        assert_eq!(status, 422, "{described}: {response}");
        assert_eq!(response["error"]["field"], field, "{described}: {response}");
    }
    let (status, body) = post_json(&client, &server, good(json!({"mode": "img2img"}))).await;
    assert_eq!(status, 202, "{body}");

    // Multipart: the same checks.
    let form = Form::new()
        .text("mode", "inpaint")
        .text("prompt", "x")
        .text("model", "tiny-sd")
        .part("image", png_part(png.clone()))
        .part("mask", png_part(small_mask));
    expect_field(post_form(&client, &server, form).await, 422, "mask").await;
    let form = Form::new()
        .text("mode", "img2img")
        .text("prompt", "x")
        .text("strength", "lots")
        .part("image", png_part(png.clone()));
    expect_field(post_form(&client, &server, form).await, 422, "strength").await;
    let form = Form::new().text("mode", "img2img").text("prompt", "x");
    expect_field(post_form(&client, &server, form).await, 422, "image").await;
    let not_json =
        client.post(server.url("/v1/edits")).header("content-type", "text/plain").body("x").send().await.unwrap();
    assert_eq!(not_json.status(), 415);
    let models: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let modes =
        |id: &str| models["data"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap()["capabilities"].clone();
    assert_eq!(modes("tiny-sd-instruct"), json!(["instruct"]));
    server.shutdown().await;
}

fn reference_dir() -> std::path::PathBuf {
    common::fixture("reference-edit")
}

fn reference_file(name: &str) -> Vec<u8> {
    std::fs::read(reference_dir().join(name)).unwrap()
}

/// Largest difference between a returned picture and a reference float array `[1, H, W, 3]` in [0, 1].
fn max_difference(picture: &RgbImage, reference: &str) -> f32 {
    common::max_difference(std::slice::from_ref(picture), &common::read_npy(&reference_dir().join(reference)))
}

async fn result_picture(client: &reqwest::Client, server: &TestServer, accepted: (u16, Value)) -> (Value, RgbImage) {
    let (status, body) = accepted;
    assert_eq!(status, 202, "{body}");
    let url = server.url(&format!("/v1/jobs/{}", body["id"].as_str().unwrap()));
    let job = wait_for_job(client, &url, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let image_url = server.url(job["images"][0]["url"].as_str().unwrap());
    let bytes = client.get(image_url).send().await.unwrap().bytes().await.unwrap();
    (job, image::load_from_memory(&bytes).unwrap().to_rgb8())
}

fn reference_fields(mode: &str, model: &str, noise: &str) -> Value {
    json!({
        "mode": mode,
        "model": model,
        "prompt": "a red circle on a blue background",
        "negative_prompt": "blurry",
        "guidance_scale": 7.5,
        "steps": 10,
        "scheduler": "ddim",
        "latents": b64(&reference_file(noise)),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_matches_diffusers_through_http_in_both_encodings() {
    let server = server().await;
    let client = reqwest::Client::new();
    let input = reference_file("input.png");

    // img2img, JSON with a data URL.
    let mut body = reference_fields("img2img", "tiny-sd", "noise_img2img.npy");
    body["strength"] = json!(0.75);
    body["image"] = json!(format!("data:image/png;base64,{}", b64(&input)));
    let (job, picture) = result_picture(&client, &server, post_json(&client, &server, body).await).await;
    assert_eq!(job["progress"]["total"], 7, "img2img at 0.75 runs 7 of 10 steps");
    let diff = max_difference(&picture, "img2img_s075.npy");
    assert!(diff <= 2.0 / 255.0, "img2img differs by {diff}");

    // inpaint on the 9-channel model, multipart, with the white-on-black mask and then the alpha mask.
    for mask in ["mask.png", "mask_alpha.png"] {
        let fields = reference_fields("inpaint", "tiny-sd-inpaint", "noise_inpaint.npy");
        let mut form = Form::new().part("image", png_part(input.clone())).part("mask", png_part(reference_file(mask)));
        for (key, value) in fields.as_object().unwrap() {
            let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
            form = form.text(key.clone(), text);
        }
        let (_, picture) = result_picture(&client, &server, post_form(&client, &server, form).await).await;
        let diff = max_difference(&picture, "inpaint_s100.npy");
        assert!(diff <= 2.0 / 255.0, "inpaint with {mask} differs by {diff}");
    }

    // instruct on the 8-channel model, JSON with plain base64.
    let mut body = reference_fields("instruct", "tiny-sd-instruct", "noise_instruct.npy");
    body["image_guidance_scale"] = json!(1.5);
    body["image"] = json!(b64(&input));
    let (_, picture) = result_picture(&client, &server, post_json(&client, &server, body).await).await;
    let diff = max_difference(&picture, "instruct.npy");
    assert!(diff <= 2.0 / 255.0, "instruct differs by {diff}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_model_inpainting_and_outpainting_keep_the_pixels_outside_the_mask() {
    let server = server().await;
    let client = reqwest::Client::new();
    let original = input_image(64, 64);
    let png = encode(&DynamicImage::ImageRgb8(original.clone()), ImageFormat::Png);
    let mask = rect_mask(64, 64);
    let form = Form::new()
        .text("mode", "inpaint")
        .text("model", "tiny-sd")
        .text("prompt", "a green square")
        .text("steps", "8")
        .text("mask_blur", "4")
        .part("image", png_part(png.clone()))
        .part("mask", png_part(encode(&DynamicImage::ImageLuma8(mask.clone()), ImageFormat::Png)));
    let (_, picture) = result_picture(&client, &server, post_form(&client, &server, form).await).await;
    let (mut outside_worst, mut inside_changed, mut inside) = (0u8, 0, 0);
    for (x, y, px) in picture.enumerate_pixels() {
        let before = original.get_pixel(x, y);
        let diff = (0..3).map(|c| px[c].abs_diff(before[c])).max().unwrap();
        if mask.get_pixel(x, y)[0] == 0 {
            outside_worst = outside_worst.max(diff);
        } else {
            inside += 1;
            inside_changed += usize::from(diff > 8);
        }
    }
    assert!(outside_worst <= 2, "pixels outside the mask moved by {outside_worst}");
    assert!(inside_changed * 2 > inside, "only {inside_changed} of {inside} masked pixels changed");

    // Outpaint 32 px to the right and 64 px at the bottom of a JPEG upload (the canvas stays a multiple of 16).
    let jpeg = encode(&DynamicImage::ImageRgb8(original.clone()), ImageFormat::Jpeg);
    let body = json!({"mode": "outpaint", "model": "tiny-sd", "prompt": "more", "steps": 6, "right": 32, "bottom": 64, "image": b64(&jpeg)});
    let (job, picture) = result_picture(&client, &server, post_json(&client, &server, body).await).await;
    assert_eq!(picture.dimensions(), (96, 128));
    assert_eq!(job["params"]["width"], 96);
    let decoded_input = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    let mut worst = 0u8;
    for (x, y, px) in decoded_input.enumerate_pixels() {
        let out = picture.get_pixel(x, y);
        worst = worst.max((0..3).map(|c| px[c].abs_diff(out[c])).max().unwrap());
    }
    assert!(worst <= 2, "the original area moved by {worst}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_resized_by_resize_mode_and_jobs_report_it() {
    let server = server().await;
    let client = reqwest::Client::new();
    let wide = encode(&DynamicImage::ImageRgb8(input_image(100, 50)), ImageFormat::WebP);
    for (mode, expected) in [("crop", (64, 64)), ("fit", (64, 64)), ("stretch", (64, 64))] {
        let body = json!({"mode": "img2img", "model": "tiny-sd", "prompt": "x", "steps": 2, "width": 64, "height": 64, "resize_mode": mode, "image": b64(&wide)});
        let (job, picture) = result_picture(&client, &server, post_json(&client, &server, body).await).await;
        assert_eq!(picture.dimensions(), expected, "{mode}");
        assert_eq!(job["params"]["resize_mode"], mode);
        assert!(job["params"].get("image_path").is_none(), "storage paths stay internal");
    }
    // Default size: the input rounded to the model's size multiple (16 for this fixture): 100x50 -> 96x48.
    let body = json!({"mode": "img2img", "model": "tiny-sd", "prompt": "x", "steps": 2, "image": b64(&wide)});
    let (_, picture) = result_picture(&client, &server, post_json(&client, &server, body).await).await;
    assert_eq!(picture.dimensions(), (96, 48));
    server.shutdown().await;
}
