//! Shared helpers for integration tests: where the fixtures and the ONNX Runtime library are.
#![allow(dead_code)]

pub mod moto;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use denoised::engine::runtime::Runtime;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture folder under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The ONNX Runtime library the tests load: `ORT_DYLIB_PATH`, else `.ort/libonnxruntime.so` as
/// `scripts/fetch-onnxruntime.py` leaves it.
pub fn ort_library() -> PathBuf {
    let path = Runtime::library_path(&root().join(".ort/libonnxruntime.so"));
    assert!(
        path.is_file(),
        "ONNX Runtime library {} is missing: run `python3 scripts/fetch-onnxruntime.py`",
        path.display()
    );
    path
}

/// The device the engine-level parity tests run on: `TEST_DEVICE` (`cuda:0` under `scripts/gpu-check`),
/// else the CPU.
pub fn device() -> denoised::engine::runtime::Device {
    match std::env::var("TEST_DEVICE") {
        Ok(text) => denoised::engine::runtime::Device::parse(&text).expect("TEST_DEVICE: `cpu` or `cuda:N`"),
        Err(_) => denoised::engine::runtime::Device::Cpu,
    }
}

/// The process-wide runtime.
pub fn runtime() -> Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::load(&ort_library()).expect("loading ONNX Runtime")).clone()
}

/// A fresh, empty PostgreSQL schema for `test` on the server `TEST_POSTGRES_URL` names, as a database URL;
/// `None` when the variable is unset, said loudly (and a failure under `CI=true`, where it must be set).
pub async fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("TEST_POSTGRES_URL") {
        Ok(base) => {
            Some(denoised::jobs::store::postgres::fresh_schema(&base).await.expect("a fresh PostgreSQL schema"))
        }
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: TEST_POSTGRES_URL is not set, so the PostgreSQL test cannot run in CI")
        }
        Err(_) => {
            eprintln!("*** SKIPPED {test}: TEST_POSTGRES_URL is not set (PostgreSQL tests need a server)");
            None
        }
    }
}

/// `toml` (a test config) with its database replaced by `database_url`.
pub fn on_database(toml: &str, database_url: &str) -> String {
    toml.lines()
        .map(|line| {
            if line.starts_with("database_url = ") {
                format!("database_url = \"{database_url}\"")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads a float32 `.npy` file.
pub fn read_npy(path: &Path) -> ndarray::ArrayD<f32> {
    denoised::engine::npy::read_f32(&std::fs::read(path).unwrap()).unwrap()
}

/// A config for the tiny fixture model with everything under `data_dir`; `extra` lands in `[queue]` (and
/// may open further sections).
pub fn test_config_toml(data_dir: &Path, extra: &str) -> String {
    test_config_toml_full(data_dir, "", extra, "")
}

/// [`test_config_toml`] with `model_extra` keys in the `tiny-sd` model's table.
pub fn test_config_toml_with(data_dir: &Path, extra: &str, model_extra: &str) -> String {
    test_config_toml_full(data_dir, "", extra, model_extra)
}

/// [`test_config_toml`] with `server` keys added to the `[server]` section.
pub fn test_config_toml_with_server(data_dir: &Path, server: &str, extra: &str) -> String {
    test_config_toml_full(data_dir, server, extra, "")
}

/// The test config with keys added to `[server]`, `[queue]` (or new sections) and the model's table.
pub fn test_config_toml_full(data_dir: &Path, server: &str, extra: &str, model_extra: &str) -> String {
    let model = format!("name = \"tiny-sd\"\npath = \"{}\"\n{model_extra}", fixture("tiny-sd").display());
    config_toml(data_dir, server, extra, &model)
}

/// The test config serving the default model (`models/tiny-shapes`, at the guidance its scores were measured
/// at) instead of the `tiny-sd` fixture, with keys added to `[queue]` (or new sections).
pub fn shapes_config_toml(data_dir: &Path, extra: &str) -> String {
    let model = format!(
        "name = \"tiny-shapes\"\npath = \"{}\"\nguidance_scale = 2.5",
        root().join("models/tiny-shapes").display()
    );
    config_toml(data_dir, "", extra, &model)
}

/// The test config with keys added to `[server]` and `[queue]` (or new sections), serving the model whose
/// `[[models]]` table holds `model`.
fn config_toml(data_dir: &Path, server: &str, extra: &str, model: &str) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
shutdown_grace_seconds = 5
{server}
[storage]
data_dir = "{data}"
database_url = "sqlite://{data}/denoised.db"
[runtime]
onnxruntime_library = "{ort}"
[queue]
lease_seconds = 5
poll_millis = 100
{extra}
[[models]]
{model}
[[workers]]
device = "cpu"
threads = 1
"#,
        data = data_dir.display(),
        ort = ort_library().display(),
    )
}

/// A server running in this process on a real socket.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Keeps the data folder alive.
    pub dir: tempfile::TempDir,
    /// Its database (a SQLite file in `dir`, or a PostgreSQL schema).
    pub database_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with `extra` TOML sections added to the test config.
    pub async fn start(extra: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra).await
    }

    /// Starts a server whose `data_dir` is `dir` (which may already hold a database and files).
    pub async fn start_in(dir: tempfile::TempDir, extra: &str) -> Self {
        let toml = test_config_toml(dir.path(), extra);
        Self::start_configured(dir, toml).await
    }

    /// Starts a server with `model_extra` keys in the `tiny-sd` model's table (e.g. `max_pixels`).
    pub async fn start_with_model(extra: &str, model_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let toml = test_config_toml_with(dir.path(), extra, model_extra);
        Self::start_configured(dir, toml).await
    }

    /// Starts a server with `server` keys added to `[server]` and `extra` sections added.
    pub async fn start_with_server(server: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let toml = test_config_toml_with_server(dir.path(), server, extra);
        Self::start_configured(dir, toml).await
    }

    /// Starts a server from a whole config text whose `data_dir` is `dir`.
    pub async fn start_configured(dir: tempfile::TempDir, toml: String) -> Self {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            // For debugging a test: the server's log on stderr (`TEST_LOG=info cargo test … -- --nocapture`).
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
        }
        let config =
            denoised::config::Config::from_toml_str(&toml, "test", dir.path(), Vec::new(), &Default::default())
                .expect("test config");
        let database_url = config.storage.database_url.clone();
        let server = denoised::server::Server::start(&config).await.expect("server start");
        let base = format!("http://{}", server.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Self { base, dir, database_url, stop: Some(stop), handle: Some(handle) }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Signals shutdown without waiting for it to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

/// Polls a job until it reaches a terminal status or `timeout` passes; returns its last JSON.
pub async fn wait_for_job(client: &reqwest::Client, url: &str, timeout: std::time::Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let job: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
        let status = job["status"].as_str().unwrap_or_default().to_string();
        if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) || std::time::Instant::now() > deadline {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `[[models]]` entries for more fixtures (the first one listed becomes the default model).
pub fn extra_models(names: &[&str]) -> String {
    names.iter().map(|n| format!("[[models]]\nname = \"{n}\"\npath = \"{}\"\n", fixture(n).display())).collect()
}

impl TestServer {
    /// Makes an API key in this server's database (what `denoised keys create` does) and returns it.
    pub async fn create_key(&self, name: &str, admin: bool) -> String {
        let store = denoised::jobs::JobStore::connect(&self.database_url).await.expect("open the server's database");
        let keys = denoised::auth::KeyStore::new(&store);
        let (_, key) = keys.create(name, admin).await.expect("create key");
        store.close().await;
        key
    }
}

/// The `[auth]` section that turns keys on, for `TestServer::start`.
pub const AUTH_ON: &str = "[auth]\nenabled = true\n";

impl TestServer {
    /// Sets the weight and limits of the key named `name` (what `denoised keys update` does).
    pub async fn set_limits(&self, name: &str, update: denoised::auth::LimitsUpdate) {
        let store = denoised::jobs::JobStore::connect(&self.database_url).await.expect("open the server's database");
        denoised::auth::KeyStore::new(&store).set_limits(name, update).await.expect("set limits");
        store.close().await;
    }

    /// Revokes the key named `name` in this server's database (what `denoised keys revoke` does).
    pub async fn revoke_key(&self, name: &str) {
        let store = denoised::jobs::JobStore::connect(&self.database_url).await.expect("open the server's database");
        denoised::auth::KeyStore::new(&store).revoke(name).await.expect("revoke key");
        store.close().await;
    }
}

/// Largest per-channel difference, in [0, 1], between pictures and a reference float array
/// `[n, H, W, 3]` in [0, 1]: the one pixel comparison of the parity tests.
pub fn max_difference(images: &[image::RgbImage], reference: &ndarray::ArrayD<f32>) -> f32 {
    let mut worst = 0f32;
    for (i, img) in images.iter().enumerate() {
        for (x, y, px) in img.enumerate_pixels() {
            for c in 0..3 {
                let expected = reference[[i, y as usize, x as usize, c]];
                worst = worst.max((px[c] as f32 / 255.0 - expected).abs());
            }
        }
    }
    worst
}

/// A picture as a float array `[1, H, W, 3]` in [0, 1], to compare with [`max_difference`].
pub fn as_reference(picture: &image::RgbImage) -> ndarray::ArrayD<f32> {
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    let data = picture.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, h, w, 3]), data).expect("shape")
}

/// The engine request a reference case of `cases.json` describes (`prompt`, `negative_prompt`, `width`,
/// `height`, `num_inference_steps`, `guidance_scale`, `scheduler` class), starting from `latents` (one image
/// per row) when given.
pub fn case_request(
    case: &serde_json::Value,
    latents: Option<ndarray::ArrayD<f32>>,
) -> denoised::engine::pipeline::GenerateRequest {
    let number = |key: &str| case[key].as_f64().unwrap_or_else(|| panic!("case field {key}"));
    let class = case["scheduler"].as_str().expect("scheduler class");
    denoised::engine::pipeline::GenerateRequest {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().expect("negative_prompt").into(),
        width: number("width") as u32,
        height: number("height") as u32,
        steps: number("num_inference_steps") as u32,
        guidance_scale: number("guidance_scale") as f32,
        guidance_rescale: 0.0,
        scheduler: denoised::engine::scheduler::SchedulerKind::from_class_name(class).expect("known class"),
        seed: 0,
        images: latents.as_ref().map_or(1, |l| l.shape()[0] as u32),
        latents,
        watermark: None,
    }
}

/// Sends `request` and reads its answer as JSON (the test fails on a transport or parse error).
pub async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.expect("request").json().await.expect("JSON answer")
}
