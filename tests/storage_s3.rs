//! The S3 storage backend against a real S3-compatible server: moto in server mode, started by each test on
//! a free port from the program `MOTO_SERVER` names (`scripts/test` installs it in `.venv-clients` and sets
//! it). Without `MOTO_SERVER` the tests say loudly that they SKIPPED; under `CI=true` they fail instead.
//!
//! Covered: storing, reading and removing blobs through [`ImageFiles`] (with a key prefix), a missing object,
//! a server refusing to start on a missing bucket, and the whole server over HTTP with `backend = "s3"`: a
//! generation with client latents and an inpainting edit run, their images download through the API, their
//! objects sit in the bucket under the prefix, and deleting the jobs removes them.

mod common;

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::moto::{Moto, PREFIX};
use common::{test_config_toml, wait_for_job, TestServer};
use denoised::config::{S3Config, StorageBackend, StorageConfig};
use denoised::storage::{ImageFiles, StorageError};
use futures::TryStreamExt;
use object_store::aws::AmazonS3;
use object_store::ObjectStore;
use serde_json::{json, Value};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);
/// Every key in the bucket under `prefix`, sorted.
async fn keys_under(store: &AmazonS3, prefix: &str) -> Vec<String> {
    let prefix = object_store::path::Path::from(prefix);
    let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut keys: Vec<String> = listed.into_iter().map(|meta| meta.location.to_string()).collect();
    keys.sort();
    keys
}

fn s3_storage(settings: S3Config, data_dir: PathBuf) -> StorageConfig {
    StorageConfig { data_dir, backend: StorageBackend::S3, s3: Some(settings), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_round_trip_through_the_bucket_under_the_prefix_and_go_with_their_job() {
    let Some(moto) = Moto::start().await else { return };
    moto.create_bucket("round-trip").await;
    let dir = tempfile::tempdir().unwrap();
    let files = ImageFiles::open(&s3_storage(moto.settings("round-trip"), dir.path().into())).await.unwrap();
    let inspector = moto.inspector("round-trip");
    assert!(keys_under(&inspector, "").await.is_empty(), "the start-up probe leaves nothing behind");

    let (job, folder) = (Uuid::now_v7(), Uuid::new_v4());
    let image = files.write_image(job, 0, "png", b"image zero".to_vec()).await.unwrap();
    files.write_image(job, 1, "png", b"image one".to_vec()).await.unwrap();
    let input = files.write_input(folder, "image.png", b"picture".to_vec()).await.unwrap();
    files.write_input(folder, "mask.png", b"mask".to_vec()).await.unwrap();
    assert_eq!(image, format!("images/{job}/0.png"), "keys are relative: the prefix is the backend's business");
    assert_eq!(files.read(&image).await.unwrap(), b"image zero");
    assert_eq!(files.read(&input).await.unwrap(), b"picture");
    assert_eq!(
        keys_under(&inspector, "").await,
        vec![
            format!("{PREFIX}/images/{job}/0.png"),
            format!("{PREFIX}/images/{job}/1.png"),
            format!("{PREFIX}/inputs/{folder}/image.png"),
            format!("{PREFIX}/inputs/{folder}/mask.png"),
        ]
    );

    let missing = format!("images/{}/0.png", Uuid::now_v7());
    assert!(matches!(files.read(&missing).await, Err(StorageError::NotFound(key)) if key == missing));
    assert!(matches!(files.read("images/../../x").await, Err(StorageError::UnsafeKey(_))));

    // Another job's blobs stay when one job goes.
    let other = Uuid::now_v7();
    files.write_image(other, 0, "webp", b"other".to_vec()).await.unwrap();
    files.remove_job_files(job, Some(&input)).await.unwrap();
    assert_eq!(keys_under(&inspector, "").await, vec![format!("{PREFIX}/images/{other}/0.webp")]);
    assert!(matches!(files.read(&image).await, Err(StorageError::NotFound(_))));
    files.remove_job_files(job, Some(&input)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_stops_start_up_with_its_name() {
    let Some(moto) = Moto::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let error = ImageFiles::open(&s3_storage(moto.settings("no-such-bucket"), dir.path().into())).await.unwrap_err();
    assert!(matches!(error, StorageError::Unusable(_)), "{error:?}");
    let error = error.to_string();
    assert!(error.contains("s3://no-such-bucket/tenant/denoised"), "{error}");
    assert!(!error.contains("testing"), "credentials never show: {error}");
}

fn png(image: image::DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Submits `body` to `route`, waits for success and returns the job.
async fn run(client: &reqwest::Client, server: &TestServer, route: &str, body: Value) -> Value {
    let response = client.post(server.url(route)).json(&body).send().await.unwrap();
    let status = response.status();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{accepted}");
    let job =
        wait_for_job(client, &server.url(&format!("/v1/jobs/{}", accepted["id"].as_str().unwrap())), TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_a_bucket_stores_runs_serves_and_deletes_jobs() {
    let Some(moto) = Moto::start().await else { return };
    moto.create_bucket("server-images").await;
    let dir = tempfile::tempdir().unwrap();
    let toml = test_config_toml(dir.path(), &moto.settings_toml("server-images")).replacen(
        "[storage]\n",
        "[storage]\nbackend = \"s3\"\n",
        1,
    );
    let server = TestServer::start_configured(dir, toml).await;
    let client = reqwest::Client::new();
    let inspector = moto.inspector("server-images");

    // A generation from the client's latents: the worker reads them back from the bucket.
    let reference = common::fixture("reference");
    let latents = std::fs::read(reference.join("latents_1x4x8x8.npy")).unwrap();
    let generation = json!({
        "prompt": "a red circle on a blue background", "negative_prompt": "blurry", "steps": 10,
        "guidance_scale": 7.5, "scheduler": "ddim", "latents": b64(&latents),
    });
    let generated = run(&client, &server, "/v1/images", generation).await;
    // An inpainting edit: picture and mask are stored in the bucket at submission, read by the worker.
    let picture = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 160]));
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) { 255 } else { 0 }])
    });
    let edit = json!({
        "mode": "inpaint", "model": "tiny-sd", "prompt": "a green square", "steps": 4,
        "image": b64(&png(picture.into())), "mask": b64(&png(mask.into())),
    });
    let edited = run(&client, &server, "/v1/edits", edit).await;

    // The images come back through the API, the generation matching diffusers' reference for its latents.
    let mut downloaded = Vec::new();
    for job in [&generated, &edited] {
        let url = server.url(job["images"][0]["url"].as_str().unwrap());
        let response = client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        downloaded.push(image::load_from_memory(&response.bytes().await.unwrap()).unwrap().to_rgb8());
    }
    let reference = common::read_npy(&reference.join("ddim.npy"));
    let worst = common::max_difference(&downloaded[..1], &reference);
    assert!(worst <= 2.0 / 255.0, "the generation from stored latents differs by {worst}");
    assert_eq!(downloaded[1].dimensions(), (64, 64));

    // Each job's objects are in the bucket under the prefix, and nothing is on disk but the database.
    let (gen_id, edit_id) = (generated["id"].as_str().unwrap(), edited["id"].as_str().unwrap());
    let all = keys_under(&inspector, PREFIX).await;
    let images_of = |id: &str| all.iter().filter(|k| k.starts_with(&format!("{PREFIX}/images/{id}/"))).count();
    assert_eq!((images_of(gen_id), images_of(edit_id)), (1, 1), "{all:?}");
    let inputs: Vec<&String> = all.iter().filter(|k| k.starts_with(&format!("{PREFIX}/inputs/"))).collect();
    let named = |name: &str| inputs.iter().filter(|k| k.ends_with(&format!("/{name}"))).count();
    // The edit keeps its prepared picture and mask and, for content credentials, the picture as it was sent.
    let counts = (named("latents.npy"), named("image.png"), named("mask.png"), named("original.png"), inputs.len());
    assert_eq!(counts, (1, 1, 1, 1, 4), "{all:?}");
    assert!(!server.dir.path().join("images").exists() && !server.dir.path().join("inputs").exists());

    // Deleting the jobs removes their objects.
    for id in [gen_id, edit_id] {
        let deleted = client.delete(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap();
        assert_eq!(deleted.status(), 204);
        assert_eq!(client.get(server.url(&format!("/v1/jobs/{id}/images/0"))).send().await.unwrap().status(), 404);
    }
    assert_eq!(keys_under(&inspector, PREFIX).await, Vec::<String>::new());
    server.shutdown().await;
}
