//! Weights in external data (`model.onnx` + `model.onnx_data`, how exports above 2 GB come): the tiny-sd
//! pipeline re-saved that way (`tests/fixtures/make_external_fixture.py`) draws the same picture as tiny-sd.

mod common;

use std::path::Path;

use denoised::engine::model::{LoadedModel, ModelInfo};
use denoised::engine::pipeline::{text_to_image, GenerateRequest, NoObserver};
use denoised::engine::runtime::Device;
use denoised::engine::scheduler::SchedulerKind;

fn draw(folder: &Path) -> Vec<image::RgbImage> {
    let info = ModelInfo::read(folder).unwrap();
    let mut model = LoadedModel::load(info, &common::runtime().session_factory(Device::Cpu, 1)).unwrap();
    let request = GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 7.5,
        guidance_rescale: 0.0,
        scheduler: SchedulerKind::EulerA,
        seed: 1234,
        images: 2,
        latents: None,
        watermark: None,
    };
    text_to_image(&mut model, &request, &mut NoObserver).unwrap()
}

#[test]
fn external_data_draws_the_same_picture_as_embedded_weights() {
    let external = common::fixture("tiny-sd-external");
    assert!(external.join("unet/model.onnx_data").is_file() && external.join("text_encoder/model.onnx_data").is_file());
    // A path relative to the working directory (the crate root, not the model folder): ONNX Runtime must find
    // `model.onnx_data` next to the graph, not in the working directory.
    let relative = Path::new("tests/fixtures/tiny-sd-external");
    assert!(std::env::current_dir().unwrap() != external && !Path::new("model.onnx_data").exists());
    let expected = draw(&common::fixture("tiny-sd"));
    for folder in [external.as_path(), relative] {
        let got = draw(folder);
        assert_eq!(got.len(), expected.len());
        // Same runtime, graphs and weights: only where the bytes come from differs, so no tolerance at all.
        for (a, b) in got.iter().zip(&expected) {
            let worst = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
            assert_eq!(worst, 0, "{}: pictures differ by up to {worst}/255", folder.display());
        }
    }
}

#[test]
fn missing_external_data_names_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model");
    let source = common::fixture("tiny-sd-external");
    for entry in walk(&source) {
        let target = copy.join(entry.strip_prefix(&source).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    std::fs::remove_file(copy.join("unet/model.onnx_data")).unwrap();
    let info = ModelInfo::read(&copy).unwrap();
    let err = LoadedModel::load(info, &common::runtime().session_factory(Device::Cpu, 1)).unwrap_err().to_string();
    assert!(err.contains("unet") && err.contains("model.onnx_data"), "{err}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Two CPU workers: the pool turns prepacking off so they share memory-mapped weights; both still serve, and
/// the same seed draws the same picture on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cpu_workers_sharing_weights_serve_the_same_pictures() {
    let second_worker = "[[workers]]\ndevice = \"cpu\"\nthreads = 1\n";
    let server = common::TestServer::start_with_model("", second_worker).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"prompt": "a cat", "steps": 4, "seed": 7, "scheduler": "euler_a"});
    let mut locations = Vec::new();
    for _ in 0..2 {
        let response = client.post(server.url("/v1/images")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["location"].to_str().unwrap().to_string());
    }
    let mut pictures = Vec::new();
    for location in locations {
        let timeout = std::time::Duration::from_secs(60);
        let job = common::wait_for_job(&client, &server.url(&location), timeout).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let url = server.url(job["images"][0]["url"].as_str().unwrap());
        let bytes = client.get(url).send().await.unwrap().bytes().await.unwrap();
        pictures.push(image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw());
    }
    assert_eq!(pictures[0], pictures[1]);
    server.shutdown().await;
}
