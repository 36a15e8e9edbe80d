//! The shipped default model (`models/tiny-shapes`) served with the shipped `config.toml`: it loads, draws a
//! canonical prompt at the requested size, its background comes out in the prompted colour, and its preview
//! decoder renders previews.

mod common;

use std::path::Path;
use std::time::Duration;

use denoised::config::{Config, Overrides};
use serde_json::{json, Value};

/// Colour table of `models/tiny-shapes/README.md`.
const BLUE: [f32; 3] = [40.0, 80.0, 230.0];
const YELLOW: [f32; 3] = [245.0, 220.0, 40.0];

fn border_median(picture: &image::RgbImage) -> [f32; 3] {
    let (w, h) = picture.dimensions();
    let mut channels: [Vec<u8>; 3] = Default::default();
    for (x, y, px) in picture.enumerate_pixels() {
        if x < 2 || y < 2 || x >= w - 2 || y >= h - 2 {
            for c in 0..3 {
                channels[c].push(px[c]);
            }
        }
    }
    channels.map(|mut v| {
        v.sort_unstable();
        f32::from(v[v.len() / 2])
    })
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f32>().sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_serves_canonical_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        bind: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.path().to_path_buf()),
        database_url: Some(format!("sqlite://{}/denoised.db", dir.path().display())),
        ..Overrides::default()
    };
    let env = vec![("ORT_DYLIB_PATH".to_string(), common::ort_library().display().to_string())];
    let config = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"), env, &overrides).unwrap();
    let server = denoised::server::Server::start(&config).await.unwrap();
    let base = format!("http://{}", server.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    let models: Value = client.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-shapes");
    assert_eq!(models["data"][0]["width"], 64);

    for (prompt, background) in [
        ("a large red circle top left on a blue background", BLUE),
        ("a large green square center on a yellow background", YELLOW),
    ] {
        let submit = client.post(format!("{base}/v1/images"));
        let accepted = common::json_of(submit.json(&json!({"prompt": prompt, "seed": 3, "preview_every": 5}))).await;
        assert_eq!(accepted["params"]["guidance_scale"], 2.5, "the model's configured default");
        let url = format!("{base}/v1/jobs/{}", accepted["id"].as_str().unwrap());
        let job = common::wait_for_job(&client, &url, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let bytes = client.get(format!("{base}{}", job["images"][0]["url"].as_str().unwrap())).send().await.unwrap();
        let picture = image::load_from_memory(&bytes.bytes().await.unwrap()).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), (64, 64));
        let border = border_median(&picture);
        assert!(distance(border, background) < 60.0, "{prompt}: background {border:?}, expected about {background:?}");
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
