//! A table of hostile and mistaken requests against a server with API keys on: each must get the 4xx that
//! the OpenAPI document lists for its route, with a JSON error body (naming the field where there is one),
//! and the server must keep serving after all of them.

mod common;

use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use common::{extra_models, wait_for_job, TestServer, AUTH_ON};
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use reqwest::Method;
use serde_json::{json, Value};

/// One row: what is sent and what must come back.
struct Case {
    what: &'static str,
    method: Method,
    path: String,
    key: Option<String>,
    body: Body,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
    /// An extra request header, for header-borne mistakes.
    header: Option<(&'static str, &'static str)>,
}

enum Body {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

fn png(image: DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A PNG whose header claims `side`×`side` pixels but holds almost no data: a decompression-bomb shape.
fn claimed_huge_png(side: u32) -> Vec<u8> {
    let mut bytes = png(DynamicImage::ImageLuma8(GrayImage::new(1, 1)));
    bytes[16..20].copy_from_slice(&side.to_be_bytes());
    bytes[20..24].copy_from_slice(&side.to_be_bytes());
    bytes
}

/// The OpenAPI path template that `path` matches.
fn template_for<'a>(spec: &'a Value, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.split('/').collect();
    spec["paths"].as_object()?.keys().map(String::as_str).find(|template| {
        let t: Vec<&str> = template.split('/').collect();
        t.len() == parts.len() && t.iter().zip(&parts).all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}')))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_documented_json_error() {
    let server =
        TestServer::start(&format!("{AUTH_ON}[limits]\nmax_steps = 150\n{}", extra_models(&["tiny-sd-inpaint"]))).await;
    let alice = server.create_key("alice", false).await;
    let bob = server.create_key("bob", false).await;
    let client = reqwest::Client::new();
    let spec: Value = client.get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();

    // Alice's finished job, which bob will try to reach.
    let response = client
        .post(server.url("/v1/images"))
        .bearer_auth(&alice)
        .json(&json!({"prompt": "a red circle", "steps": 2, "model": "tiny-sd"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let alice_client = reqwest::Client::builder()
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {alice}").parse().unwrap())].into_iter().collect(),
        )
        .build()
        .unwrap();
    let done = wait_for_job(&alice_client, &server.url(&format!("/v1/jobs/{id}")), Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let picture = png(DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30]))));
    let mut truncated = picture.clone();
    truncated.truncate(picture.len() / 2);
    let small_mask = png(DynamicImage::ImageLuma8(GrayImage::from_pixel(32, 32, image::Luma([255]))));
    let edit = |extra: Value| {
        let mut body = json!({"mode": "img2img", "prompt": "x", "image": b64(&picture), "model": "tiny-sd"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        Body::Json(body)
    };
    let gen = |extra: Value| {
        let mut body = json!({"prompt": "a red circle", "steps": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        Body::Json(body)
    };
    let key = Some(bob.clone());
    let case = |what, method, path: &str, body, status, code, field| Case {
        what,
        method,
        path: path.to_string(),
        key: key.clone(),
        body,
        status,
        code,
        field,
        header: None,
    };
    let job = format!("/v1/jobs/{id}");
    let mut cases = vec![
        case(
            "malformed JSON",
            Method::POST,
            "/v1/images",
            Body::Raw("application/json", b"{\"prompt\":".to_vec()),
            400,
            "malformed_json",
            None,
        ),
        case(
            "not JSON at all",
            Method::POST,
            "/v1/images",
            Body::Raw("text/plain", b"draw a cat".to_vec()),
            415,
            "unsupported_media_type",
            None,
        ),
        case(
            "JSON array instead of object",
            Method::POST,
            "/v1/images",
            Body::Json(json!([1, 2])),
            422,
            "invalid_field",
            None,
        ),
        case(
            "missing prompt",
            Method::POST,
            "/v1/images",
            Body::Json(json!({"steps": 2})),
            422,
            "invalid_field",
            Some("prompt"),
        ),
        case(
            "prompt of zero-width characters only",
            Method::POST,
            "/v1/images",
            gen(json!({"prompt": "\u{200B}\u{200D}\u{FEFF}"})),
            422,
            "invalid_field",
            Some("prompt"),
        ),
        case(
            "edit image as a data URL of another type",
            Method::POST,
            "/v1/edits",
            edit(json!({"image": format!("data:text/html;base64,{}", b64(&picture))})),
            422,
            "invalid_field",
            Some("image"),
        ),
        case(
            "edit image as a data URL that is not base64",
            Method::POST,
            "/v1/edits",
            edit(json!({"image": "data:image/png,%89PNG"})),
            422,
            "invalid_field",
            Some("image"),
        ),
        case(
            "prompt of the wrong type",
            Method::POST,
            "/v1/images",
            gen(json!({"prompt": 7})),
            422,
            "invalid_field",
            Some("prompt"),
        ),
        case(
            "steps as a string",
            Method::POST,
            "/v1/images",
            gen(json!({"steps": "ten"})),
            422,
            "invalid_field",
            Some("steps"),
        ),
        case("zero steps", Method::POST, "/v1/images", gen(json!({"steps": 0})), 422, "invalid_field", Some("steps")),
        case(
            "steps over the limit",
            Method::POST,
            "/v1/images",
            gen(json!({"steps": 151})),
            422,
            "invalid_field",
            Some("steps"),
        ),
        case("too many images", Method::POST, "/v1/images", gen(json!({"n": 9})), 422, "invalid_field", Some("n")),
        case(
            "area over the model's max_pixels (each side allowed)",
            Method::POST,
            "/v1/images",
            gen(json!({"width": 2048, "height": 2048})),
            422,
            "invalid_field",
            Some("width"),
        ),
        case(
            "images × steps × area over the model's work budget (each allowed)",
            Method::POST,
            "/v1/images",
            gen(json!({"width": 128, "height": 128, "n": 8, "steps": 150})),
            422,
            "invalid_field",
            Some("steps"),
        ),
        case("negative n", Method::POST, "/v1/images", gen(json!({"n": -1})), 422, "invalid_field", Some("n")),
        case(
            "width over the limit",
            Method::POST,
            "/v1/images",
            gen(json!({"width": 4096})),
            422,
            "invalid_field",
            Some("width"),
        ),
        case(
            "width not a multiple of 8",
            Method::POST,
            "/v1/images",
            gen(json!({"width": 65})),
            422,
            "invalid_field",
            Some("width"),
        ),
        case(
            "negative guidance",
            Method::POST,
            "/v1/images",
            gen(json!({"guidance_scale": -1.0})),
            422,
            "invalid_field",
            Some("guidance_scale"),
        ),
        case("negative seed", Method::POST, "/v1/images", gen(json!({"seed": -5})), 422, "invalid_field", Some("seed")),
        case(
            "unknown field",
            Method::POST,
            "/v1/images",
            gen(json!({"colour": "red"})),
            422,
            "invalid_field",
            Some("colour"),
        ),
        case(
            "unknown model",
            Method::POST,
            "/v1/images",
            gen(json!({"model": "sdxl-turbo"})),
            422,
            "invalid_field",
            Some("model"),
        ),
        case(
            "unknown scheduler",
            Method::POST,
            "/v1/images",
            gen(json!({"scheduler": "warp"})),
            422,
            "invalid_field",
            Some("scheduler"),
        ),
        case(
            "flow-matching scheduler on a diffusion model",
            Method::POST,
            "/v1/images",
            gen(json!({"scheduler": "flow_euler"})),
            422,
            "invalid_field",
            Some("scheduler"),
        ),
        case(
            "prompt over the limit",
            Method::POST,
            "/v1/images",
            gen(json!({"prompt": "a".repeat(4001)})),
            422,
            "invalid_field",
            Some("prompt"),
        ),
        case(
            "unknown output format",
            Method::POST,
            "/v1/images",
            gen(json!({"output_format": "gif"})),
            422,
            "invalid_field",
            Some("output_format"),
        ),
        Case {
            header: Some(("idempotency-key", "has spaces in it")),
            ..case(
                "bad Idempotency-Key",
                Method::POST,
                "/v1/images",
                gen(json!({})),
                422,
                "invalid_field",
                Some("Idempotency-Key"),
            )
        },
        case(
            "body over the limit",
            Method::POST,
            "/v1/images",
            Body::Raw("application/json", vec![b' '; 33 * 1024 * 1024]),
            413,
            "payload_too_large",
            None,
        ),
        case(
            "edit: image not base64",
            Method::POST,
            "/v1/edits",
            edit(json!({"image": "%%%"})),
            422,
            "invalid_field",
            Some("image"),
        ),
        case(
            "edit: truncated PNG",
            Method::POST,
            "/v1/edits",
            edit(json!({"image": b64(&truncated)})),
            422,
            "invalid_field",
            Some("image"),
        ),
        case(
            "edit: not an image",
            Method::POST,
            "/v1/edits",
            edit(json!({"image": b64(b"hello")})),
            422,
            "invalid_field",
            Some("image"),
        ),
        case(
            "edit: decompression bomb",
            Method::POST,
            "/v1/edits",
            edit(json!({"image": b64(&claimed_huge_png(60_000))})),
            422,
            "invalid_field",
            Some("image"),
        ),
        case(
            "edit: mask of another size",
            Method::POST,
            "/v1/edits",
            edit(json!({"mode": "inpaint", "mask": b64(&small_mask)})),
            422,
            "invalid_field",
            Some("mask"),
        ),
        case(
            "edit: unknown mode",
            Method::POST,
            "/v1/edits",
            edit(json!({"mode": "sharpen"})),
            422,
            "invalid_field",
            Some("mode"),
        ),
        case(
            "edit: strength out of range",
            Method::POST,
            "/v1/edits",
            edit(json!({"strength": 1.5})),
            422,
            "invalid_field",
            Some("strength"),
        ),
        case(
            "edit: mode the model cannot do",
            Method::POST,
            "/v1/edits",
            edit(json!({"mode": "instruct"})),
            422,
            "invalid_field",
            Some("mode"),
        ),
        case(
            "edit: multipart without image",
            Method::POST,
            "/v1/edits",
            Body::Raw(
                "multipart/form-data; boundary=X",
                b"--X\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--X\r\nContent-Disposition: form-data; name=\"mode\"\r\n\r\nimg2img\r\n--X--\r\n".to_vec(),
            ),
            422,
            "invalid_field",
            Some("image"),
        ),
        case("job id that is not a UUID", Method::GET, "/v1/jobs/not-a-uuid", Body::None, 404, "not_found", None),
        case(
            "job that does not exist",
            Method::GET,
            "/v1/jobs/0190f0f0-0000-7000-8000-000000000000",
            Body::None,
            404,
            "not_found",
            None,
        ),
        case("list with limit 0", Method::GET, "/v1/jobs?limit=0", Body::None, 422, "invalid_field", Some("limit")),
        case(
            "list with an unknown status",
            Method::GET,
            "/v1/jobs?status=bogus",
            Body::None,
            422,
            "invalid_field",
            Some("status"),
        ),
        case(
            "list with a forged cursor",
            Method::GET,
            "/v1/jobs?cursor=abc",
            Body::None,
            422,
            "invalid_field",
            Some("cursor"),
        ),
        case("another tenant's job", Method::GET, &job, Body::None, 404, "not_found", None),
        case("another tenant's image", Method::GET, &format!("{job}/images/0"), Body::None, 404, "not_found", None),
        case("another tenant's events", Method::GET, &format!("{job}/events"), Body::None, 404, "not_found", None),
        case(
            "cancelling another tenant's job",
            Method::POST,
            &format!("{job}/cancel"),
            Body::None,
            404,
            "not_found",
            None,
        ),
        case("deleting another tenant's job", Method::DELETE, &job, Body::None, 404, "not_found", None),
        case("metrics with a tenant key", Method::GET, "/metrics", Body::None, 403, "forbidden", None),
        case("method the route does not have", Method::PATCH, "/v1/jobs", Body::None, 405, "method_not_allowed", None),
    ];
    // Authentication failures.
    for (what, key) in [
        ("missing key", None),
        ("wrong key", Some("dn_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
        ("not a key", Some("hunter2")),
    ] {
        cases.push(Case {
            what,
            method: Method::POST,
            path: "/v1/images".into(),
            key: key.map(str::to_string),
            body: gen(json!({})),
            status: 401,
            code: "unauthorized",
            field: None,
            header: None,
        });
    }
    // Alice's own job, asking for an image index it does not have.
    cases.push(Case {
        key: Some(alice.clone()),
        ..case("image index out of range", Method::GET, &format!("{job}/images/7"), Body::None, 404, "not_found", None)
    });
    assert!(cases.len() >= 30, "the table must hold at least 30 cases");

    for case in cases {
        let mut request = client.request(case.method.clone(), server.url(&case.path));
        if let Some(key) = &case.key {
            request = request.bearer_auth(key);
        }
        if let Some((name, value)) = case.header {
            request = request.header(name, value);
        }
        request = match case.body {
            Body::None => request,
            Body::Json(body) => request.json(&body),
            Body::Raw(content_type, bytes) => request.header("content-type", content_type).body(bytes),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, case.status, "{}: {body}", case.what);
        assert!(content_type.is_some_and(|c| c.starts_with("application/json")), "{}: not JSON", case.what);
        assert_eq!(body["error"]["code"], case.code, "{}: {body}", case.what);
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: {body}", case.what);
        if let Some(field) = case.field {
            assert_eq!(body["error"]["field"], field, "{}: {body}", case.what);
        }
        // The status is one the API description promises for this route (405 is for routes, not operations).
        if status != 405 {
            let template = template_for(&spec, &case.path).unwrap_or_else(|| panic!("{}: no route", case.what));
            let method = case.method.as_str().to_lowercase();
            let documented = &spec["paths"][template][&method]["responses"];
            assert!(
                documented.get(status.to_string()).is_some(),
                "{}: {status} is not documented for {method} {template}",
                case.what
            );
        }
    }
    // One multipart reader for both edit routes: a second image, a second mask or a nameless part is refused
    // naming the field (422 natively, OpenAI's 400 with `param` on the OpenAI route).
    let part = |name: &str, file: bool, bytes: &[u8]| {
        let filename = if file { "; filename=\"x.png\"" } else { "" };
        let mut out = format!("--X\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n").into_bytes();
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
        out
    };
    let form = |parts: Vec<Vec<u8>>| {
        let mut body: Vec<u8> = parts.concat();
        body.extend_from_slice(b"--X--\r\n");
        body
    };
    let text = |name: &str, value: &str| part(name, false, value.as_bytes());
    let base =
        || vec![text("mode", "img2img"), text("prompt", "x"), text("model", "tiny-sd"), part("image", true, &picture)];
    let forms = [
        ("a second image", [base(), vec![part("image[]", true, &picture)]].concat(), "image"),
        ("a second mask", [base(), vec![part("mask", true, &picture), part("mask", true, &picture)]].concat(), "mask"),
        ("a nameless part", [base(), vec![part("", false, b"x")]].concat(), "form"),
    ];
    for (what, parts, field) in forms {
        let body = form(parts);
        for (route, status, name) in [("/v1/edits", 422, "field"), ("/v1/images/edits", 400, "param")] {
            let answer = client
                .post(server.url(route))
                .bearer_auth(&alice)
                .header("content-type", "multipart/form-data; boundary=X")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status().as_u16(), status, "{route} with {what}");
            let error: Value = answer.json().await.unwrap();
            assert_eq!(error["error"][name], field, "{route} with {what}: {error}");
        }
    }
    // Still serving.
    assert_eq!(client.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    let response = client
        .post(server.url("/v1/images"))
        .bearer_auth(&bob)
        .json(&json!({"prompt": "x", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    server.shutdown().await;
}
