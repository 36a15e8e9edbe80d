//! Server configuration: `config.toml`, overridden by `DENOISED_…` environment variables, overridden by flags.
//!
//! Everything is validated once at start-up into [`Config`]; the rest of the program never reads the
//! environment or the file again. Unknown keys are an error that names the key, so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::runtime::{ArenaExtend, ConvSearch, CudaOptions, Device};
use crate::worker::layout::{self, Amount, WorkerEntry};
use crate::worker::pool::WorkerSpec;

/// Prefix of environment variables that override config keys (`DENOISED_SERVER__BIND`).
pub const ENV_PREFIX: &str = "DENOISED_";

/// Environment variable holding the config file's path (not a key override).
pub const CONFIG_PATH_ENV: &str = "DENOISED_CONFIG";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path that was tried.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// Where the bad value came from (the file or an environment variable).
        origin: String,
        /// The parser's message, which names the key.
        message: String,
    },
    /// The values parse but make no sense together.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP listener settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where jobs and images are stored.
    #[serde(default)]
    pub storage: StorageConfig,
    /// ONNX Runtime settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Job queue behaviour.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// API keys.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Logging.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Signed webhook deliveries.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Tree-Ring watermarks and their detection.
    #[serde(default)]
    pub watermark: WatermarkConfig,
    /// C2PA content credentials signed into every output picture.
    #[serde(default)]
    pub content_credentials: ContentCredentialsConfig,
    /// Models served, by the id clients use. The first is the default.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Worker threads, by entry (`count` threads each); none means one [`WorkerConfig::default`] entry.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// What this process does: `all` (the API and workers, the default), `api` (the HTTP API only: it loads
    /// no model and runs no job) or `worker` (runs jobs for its models; serves only health and metrics).
    pub role: Role,
    /// Address the HTTP server listens on.
    pub bind: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Seconds that running jobs get to finish on SIGTERM/SIGINT before they are handed back to the queue.
    pub shutdown_grace_seconds: u64,
    /// The server's address as clients reach it (`https://images.example.com`), for the absolute image URLs
    /// of the OpenAI routes. Unset: those URLs are relative paths; never taken from a request's `Host`.
    pub public_url: Option<String>,
    /// A request's header must arrive whole within this many seconds of the connection opening (or of the
    /// previous response, for a kept-alive connection); else the connection is closed. Slow-header clients
    /// ("slowloris") and idle keep-alive connections cannot hold a socket longer.
    pub header_timeout_seconds: u64,
    /// Largest request header (request line plus fields), in bytes; a longer one gets `431`. Bounds the memory
    /// of connections that are still sending their header.
    pub max_header_bytes: usize,
    /// A request body that sends nothing for this many seconds is cut off with `408`.
    pub body_idle_timeout_seconds: u64,
    /// A request body must arrive whole within this many seconds of its header; else `408`. Cuts off bodies
    /// that trickle forever.
    pub body_timeout_seconds: u64,
    /// Most open connections. When full, the oldest connection that has not delivered a complete request
    /// header (or sits idle between requests) is closed to admit a new one; if there is none, the new one is
    /// closed. Lowered at start to fit under the process's open-file limit.
    pub max_connections: usize,
    /// Most request-body bytes being received at once, over all requests; past it a request gets `503` with
    /// `Retry-After` instead of being buffered. At least `max_body_bytes`.
    pub max_body_bytes_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            role: Role::All,
            bind: "127.0.0.1:8080".into(),
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace_seconds: 30,
            public_url: None,
            header_timeout_seconds: 10,
            max_header_bytes: 32 * 1024,
            body_idle_timeout_seconds: 10,
            body_timeout_seconds: 120,
            max_connections: 1024,
            max_body_bytes_in_flight: 256 * 1024 * 1024,
        }
    }
}

/// A process's part in a deployment (`[server] role`, `--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The HTTP API and the workers in one process.
    All,
    /// The HTTP API only: validates, stores and streams; ready while any worker process is alive.
    Api,
    /// Workers only: claims and runs jobs for its models; serves `/healthz`, `/readyz` and `/metrics`.
    Worker,
}

impl Role {
    /// Whether this process serves the API.
    pub fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }

    /// Whether this process runs jobs.
    pub fn runs_jobs(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "all" => Ok(Role::All),
            "api" => Ok(Role::Api),
            "worker" => Ok(Role::Worker),
            other => Err(format!("unknown role `{other}`: one of all, api, worker")),
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Folder for images (and, by default, the SQLite file).
    pub data_dir: PathBuf,
    /// sqlx database URL; `sqlite://relative/path.db` resolves against the config file's folder.
    pub database_url: String,
    /// Finished jobs and their images are deleted this long after they end; 0 keeps them forever.
    pub retention_hours: f64,
    /// Where images and edit inputs are kept: `local` (under `data_dir`, a local or shared folder; the default)
    /// or `s3` (an S3-compatible bucket, described in `[storage.s3]`).
    pub backend: StorageBackend,
    /// `[storage.s3]`: the bucket, for `backend = "s3"`.
    pub s3: Option<S3Config>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: "data".into(),
            database_url: "sqlite://data/denoised.db".into(),
            retention_hours: 168.0,
            backend: StorageBackend::Local,
            s3: None,
        }
    }
}

/// `storage.backend`: which store keeps images and edit inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Files under `data_dir` (a local disk, or a folder every server mounts).
    #[default]
    Local,
    /// Objects in an S3-compatible bucket (`[storage.s3]`).
    S3,
}

/// `[storage.s3]`: an S3-compatible bucket (AWS, MinIO, R2, …). Keys left out here come from the usual
/// `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT`, …), then from the instance's or container's role.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The bucket's name. It must exist: the server does not create it.
    pub bucket: String,
    /// Folder inside the bucket that every key goes under (`denoised/prod`); empty: the bucket's root.
    pub prefix: String,
    /// The service's address for a non-AWS store (`http://127.0.0.1:9000` for MinIO, an R2 account URL);
    /// unset: AWS (or `AWS_ENDPOINT`).
    pub endpoint: Option<String>,
    /// The bucket's region; unset: `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Access key id; set together with `secret_access_key`, or neither (then `AWS_*` variables are used).
    pub access_key_id: Option<String>,
    /// Secret access key (redacted wherever the config is printed).
    pub secret_access_key: Option<Secret>,
    /// Allow a plain `http://` endpoint (a store on the same host or network); off, only `https://`.
    pub allow_http: bool,
}

/// A config value that must never be printed: its `Debug` says `<redacted>`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that hands it to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Path of the ONNX Runtime shared library. `ORT_DYLIB_PATH` takes precedence when set.
    pub onnxruntime_library: PathBuf,
    /// Most MiB the CUDA provider's memory arena may hold per session's device (unset: no limit).
    pub cuda_memory_limit_mib: Option<u64>,
    /// How the CUDA memory arena grows: `next_power_of_two` (default) or `same_as_requested`.
    pub cuda_arena_extend: ArenaExtend,
    /// cuDNN's convolution algorithm search: `heuristic` (default), `exhaustive` or `default`.
    pub cudnn_conv_algo_search: ConvSearch,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            onnxruntime_library: ".ort/libonnxruntime.so".into(),
            cuda_memory_limit_mib: None,
            cuda_arena_extend: ArenaExtend::default(),
            cudnn_conv_algo_search: ConvSearch::default(),
        }
    }
}

impl RuntimeConfig {
    /// The CUDA provider's options for `cuda:N` workers.
    pub fn cuda_options(&self) -> CudaOptions {
        CudaOptions {
            memory_limit: self.cuda_memory_limit_mib.map(|mib| usize::try_from(mib << 20).unwrap_or(usize::MAX)),
            arena_extend: self.cuda_arena_extend,
            conv_search: self.cudnn_conv_algo_search,
        }
    }
}

/// `[queue]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// How long a worker's claim on a job lasts without renewal. A crashed process's jobs run again after this.
    pub lease_seconds: u64,
    /// Attempts before a job whose worker keeps dying is failed.
    pub max_attempts: u32,
    /// How often the queue is polled for jobs submitted by other processes and for expired leases.
    pub poll_millis: u64,
    /// A running job is stopped and failed with `timeout` after this long.
    pub job_timeout_seconds: u64,
    /// Jobs waiting at most; beyond it submissions get `429` with `Retry-After`.
    pub max_queued: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { lease_seconds: 30, max_attempts: 3, poll_millis: 1000, job_timeout_seconds: 900, max_queued: 1000 }
    }
}

/// `[limits]`: what a single request may ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most denoising steps per job.
    pub max_steps: u32,
    /// Most images per job.
    pub max_images: u32,
    /// Longest image side in pixels.
    pub max_side: u32,
    /// Longest prompt, in characters.
    pub max_prompt_chars: usize,
    /// Longest side of an uploaded picture, in pixels (checked before decoding).
    pub max_input_side: u32,
    /// Most pixels of an uploaded picture (checked before decoding, so decompression bombs are refused).
    pub max_input_pixels: u64,
    /// Most queued plus running jobs one API key may have; beyond it its submissions get `429`.
    pub max_outstanding_per_key: u64,
    /// Most request-body bytes one API key may have in flight at once (with `[auth]` on); past it its requests
    /// get `429` with `Retry-After`, so one tenant's uploads cannot take the whole
    /// `server.max_body_bytes_in_flight`. At least `server.max_body_bytes`.
    pub max_body_bytes_in_flight_per_key: usize,
    /// Most bytes one API key may keep stored (its jobs' images and uploads, until they are deleted or
    /// retention removes them); past it its submissions get `429 storage_quota_exceeded`.
    pub max_stored_bytes_per_key: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_steps: 150,
            max_images: 8,
            max_side: 2048,
            max_prompt_chars: 4000,
            max_input_side: 8192,
            max_input_pixels: 4096 * 4096,
            max_outstanding_per_key: 100,
            max_body_bytes_in_flight_per_key: 64 * 1024 * 1024,
            max_stored_bytes_per_key: 1024 * 1024 * 1024,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require `Authorization: Bearer <key>` on every route but `/healthz`, `/readyz`, `/openapi.json` and
    /// `/docs`. Keys are made with `denoised keys create`.
    pub enabled: bool,
    /// Serve without authentication on a non-loopback address. Only the `--allow-unauthenticated` flag sets
    /// it, so that no config file can quietly expose an open server.
    #[serde(skip)]
    pub allow_unauthenticated: bool,
}

/// `[webhooks]`: how job events are delivered to clients' URLs (see `crate::webhooks`). Its `Debug` leaves
/// the secret out.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// `whsec_<base64 of 24–64 bytes>`: signs the deliveries of jobs submitted without an API key (with
    /// `[auth]` off). Without it such jobs cannot have a webhook. Jobs of a key are signed with that key's own
    /// secret (`denoised keys create` prints it).
    pub secret: Option<String>,
    /// Seconds one delivery attempt may take (connecting, sending, the receiver's answer).
    pub timeout_seconds: u64,
    /// Attempts per event at most, the first included; then the delivery is `failed`.
    pub max_attempts: u32,
    /// No attempt starts later than this many seconds after the event.
    pub retry_for_seconds: u64,
    /// The wait after the first failed attempt, in milliseconds; each later wait is four times the one
    /// before (less up to a quarter of jitter), up to `backoff_max_seconds`.
    pub backoff_initial_millis: u64,
    /// The longest wait between two attempts, in seconds.
    pub backoff_max_seconds: u64,
    /// Allow targets on loopback, private, link-local and other non-public addresses. Off, a URL whose host
    /// is or resolves to one is refused at submission and at delivery (SSRF protection); turn it on only
    /// where every client is trusted, e.g. tests with a receiver on loopback.
    pub allow_private_targets: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            secret: None,
            timeout_seconds: 10,
            max_attempts: 8,
            retry_for_seconds: 24 * 3600,
            backoff_initial_millis: 5000,
            backoff_max_seconds: 6 * 3600,
            allow_private_targets: false,
        }
    }
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout_seconds", &self.timeout_seconds)
            .field("max_attempts", &self.max_attempts)
            .field("retry_for_seconds", &self.retry_for_seconds)
            .field("backoff_initial_millis", &self.backoff_initial_millis)
            .field("backoff_max_seconds", &self.backoff_max_seconds)
            .field("allow_private_targets", &self.allow_private_targets)
            .finish()
    }
}

/// `[watermark]`: Tree-Ring watermarks written into the starting noise of text-to-image jobs, and their
/// detection (`POST /v1/watermarks/detect`). Its `Debug` leaves the secret out.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatermarkConfig {
    /// The server's own watermark secret (16 characters or more); unset: the server has no watermark, only
    /// API keys made or updated with `--watermark` do.
    pub secret: Option<String>,
    /// Watermark every text-to-image job that does not say `"watermark": false`: with its key's watermark
    /// when the key has one, else with the server's.
    pub default_on: bool,
    /// Ring radius, in latent frequency units (1 to half the latent side, exclusive).
    pub radius: u32,
    /// The latent channel that carries the rings.
    pub channel: u32,
    /// Factor on the ring values: 1 is the paper's; more survives more, and changes pictures more.
    pub strength: f64,
    /// DDIM inversion steps of a detection when the request names none (requests may name up to
    /// `limits.max_steps`; this default is not bound by it).
    pub inversion_steps: u32,
    /// A key is reported as detected when its p-value is below this: the false-positive rate per key tested.
    pub p_value_threshold: f64,
    /// How long `POST /v1/watermarks/detect` waits for its answer before a `503`.
    pub detect_timeout_seconds: u64,
    /// Detections waiting for the detector thread at most; more get a `503` with `Retry-After`.
    pub max_queued_detections: usize,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        Self {
            secret: None,
            default_on: false,
            radius: 4,
            channel: 0,
            strength: 1.0,
            inversion_steps: 20,
            p_value_threshold: 0.01,
            detect_timeout_seconds: 60,
            max_queued_detections: 8,
        }
    }
}

impl std::fmt::Debug for WatermarkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatermarkConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("default_on", &self.default_on)
            .field("radius", &self.radius)
            .field("channel", &self.channel)
            .field("strength", &self.strength)
            .field("inversion_steps", &self.inversion_steps)
            .field("p_value_threshold", &self.p_value_threshold)
            .field("detect_timeout_seconds", &self.detect_timeout_seconds)
            .field("max_queued_detections", &self.max_queued_detections)
            .finish()
    }
}

impl WatermarkConfig {
    fn validate(&self) -> Result<(), String> {
        if self.secret.as_ref().is_some_and(|s| s.chars().count() < 16) {
            return Err("secret must have at least 16 characters".into());
        }
        if self.radius == 0 || self.radius > 63 {
            return Err("radius must be between 1 and 63 (and below half the latent side of each request)".into());
        }
        if !(self.strength > 0.0 && self.strength <= 100.0) {
            return Err("strength must be in (0, 100]".into());
        }
        if self.inversion_steps == 0 || self.inversion_steps > 1000 {
            return Err("inversion_steps must be between 1 and 1000".into());
        }
        if !(self.p_value_threshold > 0.0 && self.p_value_threshold < 1.0) {
            return Err("p_value_threshold must be in (0, 1)".into());
        }
        if self.detect_timeout_seconds == 0 || self.max_queued_detections == 0 {
            return Err("detect_timeout_seconds and max_queued_detections must be at least 1".into());
        }
        Ok(())
    }
}

/// `[content_credentials]`: when both paths are set, every output picture (PNG, JPEG or WebP) carries a C2PA
/// manifest signed with this certificate chain and private key (see [`crate::credentials`]). Both unset: no
/// credentials. Only the worker processes sign; the files are read and checked once at start-up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentCredentialsConfig {
    /// PEM file with the signing certificate first, then its intermediates (not the root).
    pub certificate_chain: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8).
    pub private_key: Option<PathBuf>,
    /// Signature algorithm matching the key: `es256` (the default), `es384`, `es512`, `ps256`, `ps384`,
    /// `ps512` or `ed25519`.
    pub algorithm: Option<String>,
    /// PEM file of root certificates to trust when an edit's input carries credentials of its own: the
    /// validation of that history recorded in the new manifest then says whether its signer is trusted
    /// (unset: it says `signingCredential.untrusted` for every input signer).
    pub trust_anchors: Option<PathBuf>,
}

impl ContentCredentialsConfig {
    fn validate(&self) -> Result<(), String> {
        if self.certificate_chain.is_some() != self.private_key.is_some() {
            return Err("certificate_chain and private_key must be set together".into());
        }
        if let Some(algorithm) = &self.algorithm {
            if algorithm.parse::<c2pa::SigningAlg>().is_err() {
                return Err(format!(
                    "algorithm `{algorithm}` is not one of es256, es384, es512, ps256, ps384, ps512, ed25519"
                ));
            }
        }
        Ok(())
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub log: String,
    /// One JSON object per log line instead of human-readable text.
    pub json: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log: "info,ort=warn".into(), json: false }
    }
}

/// `[[models]]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The id clients send as `model`.
    pub name: String,
    /// An optimum Stable Diffusion export folder.
    pub path: PathBuf,
    /// Guidance scale used when a request gives none (default 7.5, Stable Diffusion's).
    #[serde(default)]
    pub guidance_scale: Option<f32>,
    /// Steps used when a request gives none (default 20).
    #[serde(default)]
    pub steps: Option<u32>,
    /// Largest image area (width × height, pixels) a request may ask of this model; default four times its
    /// native area. Memory and time grow with the area (attention faster than linearly), so this, not
    /// `limits.max_side` alone, is what keeps one request from taking the machine.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Work budget of one job: images × steps × area (pixels); default the work of eight images of the
    /// largest area at 50 steps.
    #[serde(default)]
    pub max_pixel_steps: Option<u64>,
}

/// `[[workers]]`: one or more worker threads with the same device and thread count (see
/// [`crate::worker::layout`] for how `"auto"` resolves).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// `cpu`, or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Intra-op threads for each worker's sessions: a number, or `"auto"` (the default).
    #[serde(default)]
    pub threads: Amount,
    /// Workers made from this entry: a number (default 1), or `"auto"`.
    #[serde(default = "one")]
    pub count: Amount,
    /// Images one denoiser call may carry for several jobs (a cohort of text-to-image jobs on the same
    /// schedule, see [`crate::engine::pipeline::cohort`]); 1 runs every job alone.
    #[serde(default = "default_max_batch")]
    pub max_batch: u32,
}

impl Default for WorkerConfig {
    /// The layout used when the config has no `[[workers]]`: CPU workers filling every core.
    fn default() -> Self {
        Self { device: default_device(), threads: Amount::Auto, count: Amount::Auto, max_batch: default_max_batch() }
    }
}

fn default_device() -> String {
    "cpu".into()
}

/// Images per shared denoiser call unless configured.
fn default_max_batch() -> u32 {
    4
}

fn one() -> Amount {
    Amount::Fixed(1)
}

/// Command-line flags that override the most common keys.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--role`
    pub role: Option<Role>,
    /// `--bind`
    pub bind: Option<String>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--database-url`
    pub database_url: Option<String>,
    /// `--allow-unauthenticated`
    pub allow_unauthenticated: bool,
}

impl Config {
    /// Reads `path`, applies `DENOISED_…` variables from `env`, then `overrides`, and validates.
    /// Relative paths resolve against the config file's folder.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml_str(&text, &path.display().to_string(), &base, env, overrides)
    }

    /// Like [`Config::load`] on text already read; `base` is the folder relative paths resolve against.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut tree: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.to_string(), message: e.to_string() })?;
        let parse = |tree: &toml::Table, origin: &str| -> Result<Config, ConfigError> {
            toml::Value::Table(tree.clone())
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse { origin: origin.to_string(), message: e.to_string() })
        };
        let mut config = parse(&tree, origin)?;
        let env: BTreeMap<String, String> =
            env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_PATH_ENV).collect();
        // Applied one at a time so that an error names the variable that caused it.
        for (key, value) in &env {
            let origin = format!("environment variable {key}");
            apply_env_override(&mut tree, &key[ENV_PREFIX.len()..], value)
                .map_err(|message| ConfigError::Parse { origin: origin.clone(), message })?;
            config = parse(&tree, &origin)?;
        }
        if let Some(role) = overrides.role {
            config.server.role = role;
        }
        if let Some(bind) = &overrides.bind {
            config.server.bind = bind.clone();
        }
        if let Some(dir) = &overrides.data_dir {
            config.storage.data_dir = dir.clone();
        }
        if let Some(url) = &overrides.database_url {
            config.storage.database_url = url.clone();
        }
        config.auth.allow_unauthenticated = overrides.allow_unauthenticated;
        if config.workers.is_empty() {
            config.workers.push(WorkerConfig::default());
        }
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        self.storage.data_dir = resolve(&self.storage.data_dir);
        self.runtime.onnxruntime_library = resolve(&self.runtime.onnxruntime_library);
        for model in &mut self.models {
            model.path = resolve(&model.path);
        }
        let credentials = &mut self.content_credentials;
        for path in [&mut credentials.certificate_chain, &mut credentials.private_key, &mut credentials.trust_anchors] {
            if let Some(p) = path.as_mut() {
                *p = resolve(p);
            }
        }
        if let Some(rest) = self.storage.database_url.strip_prefix("sqlite://") {
            let (file, query) = rest.split_once('?').map_or((rest, None), |(f, q)| (f, Some(q)));
            if !file.is_empty() && !file.starts_with(':') && !Path::new(file).is_absolute() {
                let absolute = resolve(Path::new(file));
                self.storage.database_url = match query {
                    Some(q) => format!("sqlite://{}?{q}", absolute.display()),
                    None => format!("sqlite://{}", absolute.display()),
                };
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        if let Some(url) = &self.server.public_url {
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            if !scheme_ok || url.contains(['?', '#']) || url.chars().any(char::is_whitespace) {
                return Err(ConfigError::Invalid(format!(
                    "server.public_url `{url}` must be an http:// or https:// address without query or fragment"
                )));
            }
        }
        if self.models.is_empty() {
            return Err(ConfigError::Invalid("no [[models]] configured".into()));
        }
        let mut names = std::collections::HashSet::new();
        for model in &self.models {
            if model.name.trim().is_empty() {
                return Err(ConfigError::Invalid("models.name must not be empty".into()));
            }
            if model.guidance_scale.is_some_and(|g| !(0.0..=50.0).contains(&g)) {
                return Err(ConfigError::Invalid(format!(
                    "models `{}`: guidance_scale must be between 0 and 50",
                    model.name
                )));
            }
            if model.steps.is_some_and(|s| s == 0 || s > self.limits.max_steps) {
                return Err(ConfigError::Invalid(format!(
                    "models `{}`: steps must be between 1 and limits.max_steps",
                    model.name
                )));
            }
            if !names.insert(model.name.as_str()) {
                return Err(ConfigError::Invalid(format!("models.name `{}` is configured twice", model.name)));
            }
        }
        self.worker_specs()?;
        if self.queue.lease_seconds == 0 {
            return Err(ConfigError::Invalid("queue.lease_seconds must be at least 1".into()));
        }
        if !(self.storage.retention_hours >= 0.0 && self.storage.retention_hours.is_finite()) {
            return Err(ConfigError::Invalid("storage.retention_hours must be 0 or more".into()));
        }
        if self.queue.job_timeout_seconds == 0 || self.queue.max_queued == 0 {
            return Err(ConfigError::Invalid(
                "queue.job_timeout_seconds and queue.max_queued must be at least 1".into(),
            ));
        }
        if self.queue.max_attempts == 0 {
            return Err(ConfigError::Invalid("queue.max_attempts must be at least 1".into()));
        }
        if self.limits.max_outstanding_per_key == 0 {
            return Err(ConfigError::Invalid("limits.max_outstanding_per_key must be at least 1".into()));
        }
        self.validate_server()?;
        self.validate_storage()?;
        self.validate_webhooks()?;
        self.watermark.validate().map_err(|e| ConfigError::Invalid(format!("watermark.{e}")))?;
        self.content_credentials.validate().map_err(|e| ConfigError::Invalid(format!("content_credentials.{e}")))?;
        if self.limits.max_images == 0 || self.limits.max_steps == 0 || self.limits.max_side < 8 {
            return Err(ConfigError::Invalid("limits must allow at least one image, one step and 8 px".into()));
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        if server.header_timeout_seconds == 0
            || server.body_idle_timeout_seconds == 0
            || server.body_timeout_seconds == 0
        {
            return Err(ConfigError::Invalid(
                "server.header_timeout_seconds, body_idle_timeout_seconds and body_timeout_seconds must be at least 1"
                    .into(),
            ));
        }
        if server.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid("server.max_header_bytes must be at least 8192".into()));
        }
        if server.max_connections == 0 {
            return Err(ConfigError::Invalid("server.max_connections must be at least 1".into()));
        }
        if server.max_body_bytes_in_flight < server.max_body_bytes
            || self.limits.max_body_bytes_in_flight_per_key < server.max_body_bytes
        {
            return Err(ConfigError::Invalid(
                "server.max_body_bytes_in_flight and limits.max_body_bytes_in_flight_per_key must be at least \
                 server.max_body_bytes, or no largest body could ever be received"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        let storage = &self.storage;
        match (storage.backend, &storage.s3) {
            (StorageBackend::Local, None) => Ok(()),
            (StorageBackend::Local, Some(_)) => Err(ConfigError::Invalid(
                "[storage.s3] is configured but storage.backend is \"local\": set backend = \"s3\" to use the \
                 bucket, or remove the table"
                    .into(),
            )),
            (StorageBackend::S3, None) => Err(ConfigError::Invalid(
                "storage.backend = \"s3\" needs a [storage.s3] table with at least `bucket`".into(),
            )),
            (StorageBackend::S3, Some(s3)) => {
                s3.validate().map_err(|e| ConfigError::Invalid(format!("storage.s3.{e}")))
            }
        }
    }

    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let hooks = &self.webhooks;
        if let Some(secret) = &hooks.secret {
            crate::webhooks::Secret::parse(secret).map_err(|e| {
                ConfigError::Invalid(format!("webhooks.secret: {e} (e.g. `whsec_` + base64 of 32 random bytes)"))
            })?;
        }
        if hooks.timeout_seconds == 0 || hooks.max_attempts == 0 || hooks.backoff_initial_millis == 0 {
            return Err(ConfigError::Invalid(
                "webhooks.timeout_seconds, max_attempts and backoff_initial_millis must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Refuses to serve without authentication on an address other machines can reach, unless the operator
    /// said so with `--allow-unauthenticated`.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let addr = self.bind_addr()?;
        if !self.auth.enabled && !self.auth.allow_unauthenticated && !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "refusing to serve on {addr} without authentication: set [auth] enabled = true (and create keys \
                 with `denoised keys create`), bind a loopback address, or pass --allow-unauthenticated"
            )));
        }
        Ok(())
    }

    /// The `[[workers]]` entries with their devices parsed.
    pub fn worker_entries(&self) -> Result<Vec<WorkerEntry>, ConfigError> {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let device =
                    Device::parse(&w.device).map_err(|e| ConfigError::Invalid(format!("workers[{i}].device: {e}")))?;
                if w.max_batch == 0 {
                    return Err(ConfigError::Invalid(format!("workers[{i}].max_batch: must be at least 1")));
                }
                Ok(WorkerEntry { device, count: w.count, threads: w.threads, max_batch: w.max_batch as usize })
            })
            .collect()
    }

    /// The worker threads this process starts: the `[[workers]]` entries resolved against the cores it may
    /// use ([`layout::resolve`]).
    pub fn worker_specs(&self) -> Result<Vec<WorkerSpec>, ConfigError> {
        layout::resolve(&self.worker_entries()?, layout::available_cores())
            .map_err(|e| ConfigError::Invalid(format!("workers: {e}")))
    }

    /// The parsed listen address.
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.bind.parse().map_err(|e| ConfigError::Invalid(format!("server.bind `{}`: {e}", self.server.bind)))
    }
}

impl S3Config {
    /// Checks the keys one by one; the error starts with the key's name.
    fn validate(&self) -> Result<(), String> {
        let bucket = &self.bucket;
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !bucket_ok {
            return Err(format!(
                "bucket `{bucket}` is not a bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, \
                 starting and ending with a letter or digit"
            ));
        }
        let prefix = self.prefix.trim_matches('/');
        if !prefix.is_empty()
            && prefix.split('/').any(|part| part.is_empty() || part == "." || part == ".." || part.contains('\\'))
        {
            return Err(format!("prefix `{}` must be folder names separated by `/`", self.prefix));
        }
        if let Some(endpoint) = &self.endpoint {
            if endpoint.starts_with("http://") {
                if !self.allow_http {
                    return Err(format!(
                        "endpoint `{endpoint}` is plain http: set storage.s3.allow_http = true to allow it"
                    ));
                }
            } else if !endpoint.starts_with("https://") {
                return Err(format!("endpoint `{endpoint}` must start with https:// (or http:// with allow_http)"));
            }
        }
        if self.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err("region must not be empty (leave it out for AWS_REGION or us-east-1)".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(
                "access_key_id and secret_access_key: set both, or neither (then AWS_* variables are used)".into()
            );
        }
        Ok(())
    }
}

/// Applies one `SECTION__KEY` (or `MODELS__0__PATH`) override to the raw TOML tree. The value is read as a
/// TOML scalar when it parses as one (numbers, booleans), else taken as a string.
fn apply_env_override(tree: &mut toml::Table, key: &str, value: &str) -> Result<(), String> {
    let parts: Vec<String> = key.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(String::is_empty) {
        return Err(format!("malformed key `{key}`: use SECTION__KEY, e.g. DENOISED_SERVER__BIND"));
    }
    let parsed = parse_scalar(value);
    let mut node = tree;
    let mut i = 0;
    while i < parts.len() {
        let part = &parts[i];
        let last = i + 1 == parts.len();
        if last {
            node.insert(part.clone(), parsed);
            return Ok(());
        }
        let next_is_index = parts[i + 1].parse::<usize>().ok();
        match next_is_index {
            Some(index) => {
                let entry = node.entry(part.clone()).or_insert_with(|| toml::Value::Array(Vec::new()));
                let array = entry.as_array_mut().ok_or_else(|| format!("`{part}` is not an array"))?;
                while array.len() <= index {
                    array.push(toml::Value::Table(toml::Table::new()));
                }
                if i + 2 == parts.len() {
                    return Err(format!("`{key}` names an array element, not a key inside it"));
                }
                node = array[index].as_table_mut().ok_or_else(|| format!("`{part}[{index}]` is not a table"))?;
                i += 2;
            }
            None => {
                let entry = node.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                node = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
                i += 1;
            }
        }
    }
    Ok(())
}

fn parse_scalar(value: &str) -> toml::Value {
    if let Ok(b) = value.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = value.parse::<f64>() {
        if value.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
bind = "127.0.0.1:8080"
[storage]
data_dir = "data"
database_url = "sqlite://data/denoised.db"
[[models]]
name = "m"
path = "models/m"
[[workers]]
device = "cpu"
threads = 2
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml_str(text, "test.toml", Path::new("/srv/app"), env, &Overrides::default())
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.storage.data_dir, PathBuf::from("/srv/app/data"));
        assert_eq!(c.models[0].path, PathBuf::from("/srv/app/models/m"));
        assert_eq!(c.storage.database_url, "sqlite:///srv/app/data/denoised.db");
        assert_eq!(c.runtime.onnxruntime_library, PathBuf::from("/srv/app/.ort/libonnxruntime.so"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load(&format!("{MINIMAL}\n[queue]\nlease_secs = 3\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("lease_secs"), "{err}");
        let err = load(&MINIMAL.replace("threads = 2", "threads = 2\ngpu = 1"), &[]).unwrap_err().to_string();
        assert!(err.contains("gpu"), "{err}");
    }

    #[test]
    fn environment_overrides_keys_including_array_entries() {
        let c = load(
            MINIMAL,
            &[
                ("DENOISED_SERVER__BIND", "0.0.0.0:9000"),
                ("DENOISED_QUEUE__LEASE_SECONDS", "7"),
                ("DENOISED_WORKERS__0__THREADS", "4"),
                ("DENOISED_MODELS__0__PATH", "/abs/model"),
                ("OTHER_VAR", "ignored"),
                ("DENOISED_CONFIG", "/elsewhere/config.toml"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.bind, "0.0.0.0:9000");
        assert_eq!(c.queue.lease_seconds, 7);
        assert_eq!(c.workers[0].threads, Amount::Fixed(4));
        assert_eq!(c.models[0].path, PathBuf::from("/abs/model"));
    }

    #[test]
    fn unknown_environment_keys_are_errors() {
        let err = load(MINIMAL, &[("DENOISED_SERVER__BINDD", "x")]).unwrap_err().to_string();
        assert!(err.contains("bindd") && err.contains("DENOISED_SERVER__BINDD"), "{err}");
    }

    #[test]
    fn flags_win_over_file_and_environment() {
        let overrides = Overrides { bind: Some("127.0.0.1:1".into()), ..Default::default() };
        let env = vec![("DENOISED_SERVER__BIND".to_string(), "127.0.0.1:2".to_string())];
        let c = Config::from_toml_str(MINIMAL, "t", Path::new("/x"), env, &overrides).unwrap();
        assert_eq!(c.server.bind, "127.0.0.1:1");
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(load(&MINIMAL.replace("\"cpu\"", "\"tpu\""), &[]).unwrap_err().to_string().contains("workers[0]"));
        assert!(load(&MINIMAL.replace("127.0.0.1:8080", "nope"), &[]).is_err());
        assert!(load(&MINIMAL.replace("threads = 2", "threads = 0"), &[]).is_err());
        let zero_outstanding = load(MINIMAL, &[("DENOISED_LIMITS__MAX_OUTSTANDING_PER_KEY", "0")]).unwrap_err();
        assert!(zero_outstanding.to_string().contains("max_outstanding_per_key"), "{zero_outstanding}");
        let small_budget = load(MINIMAL, &[("DENOISED_SERVER__MAX_BODY_BYTES_IN_FLIGHT", "1024")]).unwrap_err();
        assert!(small_budget.to_string().contains("max_body_bytes_in_flight"), "{small_budget}");
        assert!(load(MINIMAL, &[("DENOISED_SERVER__HEADER_TIMEOUT_SECONDS", "0")]).is_err());
        assert!(load(MINIMAL, &[("DENOISED_SERVER__MAX_CONNECTIONS", "0")]).is_err());
        for bad in ["images.example.com", "ftp://images.example.com", "https://x.example/?q=1", "https://a b"] {
            let error = load(MINIMAL, &[("DENOISED_SERVER__PUBLIC_URL", bad)]).unwrap_err();
            assert!(error.to_string().contains("public_url"), "{bad}: {error}");
        }
        let good = load(MINIMAL, &[("DENOISED_SERVER__PUBLIC_URL", "https://images.example.com/")]).unwrap();
        assert_eq!(good.server.public_url.as_deref(), Some("https://images.example.com/"));
        let short_secret = load(MINIMAL, &[("DENOISED_WEBHOOKS__SECRET", "whsec_c2hvcnQ=")]).unwrap_err();
        assert!(short_secret.to_string().contains("webhooks.secret"), "{short_secret}");
        assert!(!short_secret.to_string().contains("c2hvcnQ"), "the secret is not repeated: {short_secret}");
        let good_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let with_secret = load(MINIMAL, &[("DENOISED_WEBHOOKS__SECRET", good_secret)]).unwrap();
        assert!(!format!("{with_secret:?}").contains(good_secret), "Debug must redact webhooks.secret");
        assert!(load(MINIMAL, &[("DENOISED_WEBHOOKS__TIMEOUT_SECONDS", "0")]).is_err());
        let unknown_auth_key = load(MINIMAL, &[("DENOISED_AUTH__ENABLE", "true")]).unwrap_err();
        assert!(unknown_auth_key.to_string().contains("enable"), "{unknown_auth_key}");
    }

    #[test]
    fn the_shipped_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let c = Config::load(&path, Vec::new(), &Overrides::default()).unwrap();
        assert!(!c.models.is_empty());
        assert!(!c.workers.is_empty());
        c.check_exposure().unwrap();
        let docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/config.toml");
        let c = Config::from_toml_str(
            &std::fs::read_to_string(docker).unwrap(),
            "docker/config.toml",
            Path::new("/srv/denoised"),
            Vec::new(),
            &Overrides::default(),
        )
        .unwrap();
        assert!(c.auth.enabled, "the container listens on every interface, so it must require keys");
        c.check_exposure().unwrap();
    }

    #[test]
    fn storage_is_local_by_default_and_s3_reads_its_table() {
        let local = load(MINIMAL, &[]).unwrap();
        assert_eq!(local.storage.backend, StorageBackend::Local);
        assert!(local.storage.s3.is_none());
        let text = format!(
            "{MINIMAL}\n[storage.s3]\nbucket = \"images\"\nprefix = \"prod/\"\nendpoint = \"http://127.0.0.1:9000\"\n\
             allow_http = true\naccess_key_id = \"AKID\"\nsecret_access_key = \"hunter2-secret\"\n"
        );
        let c = load(&text, &[("DENOISED_STORAGE__BACKEND", "s3")]).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::S3);
        let s3 = c.storage.s3.as_ref().unwrap();
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("images", "prod/"));
        assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), "hunter2-secret");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2") && shown.contains("<redacted>"), "{shown}");
        let from_env = load(
            MINIMAL,
            &[("DENOISED_STORAGE__BACKEND", "s3"), ("DENOISED_STORAGE__S3__BUCKET", "from-env"), ("X", "y")],
        )
        .unwrap();
        assert_eq!(from_env.storage.s3.unwrap().bucket, "from-env");
    }

    #[test]
    fn bad_storage_settings_are_named() {
        let s3 = |keys: &str| format!("{MINIMAL}\n[storage.s3]\n{keys}\n");
        let as_s3 = [("DENOISED_STORAGE__BACKEND", "s3")];
        let cases = [
            (MINIMAL.to_string(), &as_s3[..], "[storage.s3]"),
            (s3("bucket = \"images\""), &[][..], "storage.backend is \"local\""),
            (s3("bucket = \"Bad_Name\""), &as_s3[..], "storage.s3.bucket"),
            (s3("bucket = \"images\"\nprefix = \"a/../b\""), &as_s3[..], "storage.s3.prefix"),
            (s3("bucket = \"images\"\nendpoint = \"http://minio:9000\""), &as_s3[..], "allow_http"),
            (s3("bucket = \"images\"\nendpoint = \"minio:9000\""), &as_s3[..], "storage.s3.endpoint"),
            (s3("bucket = \"images\"\naccess_key_id = \"AKID\""), &as_s3[..], "secret_access_key"),
            (s3("bucket = \"images\"\nregion = \"\""), &as_s3[..], "storage.s3.region"),
            (s3("bucket = \"images\"\nsecret = \"x\""), &as_s3[..], "secret"),
        ];
        for (text, env, expected) in cases {
            let error = load(&text, env).unwrap_err().to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
        let bad_backend = load(MINIMAL, &[("DENOISED_STORAGE__BACKEND", "gcs")]).unwrap_err().to_string();
        assert!(bad_backend.contains("gcs"), "{bad_backend}");
    }

    #[test]
    fn cuda_provider_options_come_from_the_runtime_section() {
        let defaults = load(MINIMAL, &[]).unwrap().runtime.cuda_options();
        assert_eq!(defaults, CudaOptions::default());
        assert_eq!((defaults.memory_limit, defaults.conv_search), (None, ConvSearch::Heuristic));
        let text = format!(
            "{MINIMAL}[runtime]\ncuda_memory_limit_mib = 2048\ncuda_arena_extend = \"same_as_requested\"\n\
             cudnn_conv_algo_search = \"exhaustive\"\n"
        );
        let options = load(&text, &[]).unwrap().runtime.cuda_options();
        assert_eq!(
            options,
            CudaOptions {
                memory_limit: Some(2048 << 20),
                arena_extend: ArenaExtend::SameAsRequested,
                conv_search: ConvSearch::Exhaustive
            }
        );
        let err = load(&format!("{MINIMAL}[runtime]\ncudnn_conv_algo_search = \"fast\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("heuristic"), "{err}");
    }

    #[test]
    fn workers_take_numbers_or_auto_and_default_to_filling_the_cores() {
        let none = load(&MINIMAL.replace("[[workers]]\ndevice = \"cpu\"\nthreads = 2\n", ""), &[]).unwrap();
        assert_eq!(none.workers.len(), 1);
        assert_eq!((none.workers[0].count, none.workers[0].threads), (Amount::Auto, Amount::Auto));
        let specs = none.worker_specs().unwrap();
        assert_eq!(specs.len(), layout::available_cores());
        assert!(specs.iter().all(|s| s.device == Device::Cpu && s.threads == 1));

        let fixed = load(MINIMAL, &[]).unwrap();
        assert_eq!((fixed.workers[0].count, fixed.workers[0].threads), (Amount::Fixed(1), Amount::Fixed(2)));
        assert_eq!(fixed.worker_specs().unwrap(), [WorkerSpec { device: Device::Cpu, threads: 2, max_batch: 4 }]);

        let env = [("DENOISED_WORKERS__0__THREADS", "auto"), ("DENOISED_WORKERS__0__COUNT", "3")];
        let overridden = load(MINIMAL, &env).unwrap();
        assert_eq!((overridden.workers[0].count, overridden.workers[0].threads), (Amount::Fixed(3), Amount::Auto));
        assert_eq!(overridden.worker_specs().unwrap().len(), 3);

        let err = load(&MINIMAL.replace("threads = 2", "threads = \"many\""), &[]).unwrap_err().to_string();
        assert!(err.contains("auto"), "{err}");
        let ambiguous = format!("{MINIMAL}[[workers]]\ncount = \"auto\"\n[[workers]]\ncount = \"auto\"\n");
        let err = load(&ambiguous, &[]).unwrap_err().to_string();
        assert!(err.contains("count = \"auto\""), "{err}");
    }

    #[test]
    fn open_servers_on_public_addresses_need_the_flag() {
        let mut c = load(MINIMAL, &[("DENOISED_SERVER__BIND", "0.0.0.0:8080")]).unwrap();
        let err = c.check_exposure().unwrap_err().to_string();
        assert!(err.contains("--allow-unauthenticated"), "{err}");
        c.auth.allow_unauthenticated = true;
        c.check_exposure().unwrap();
        c.auth.allow_unauthenticated = false;
        c.auth.enabled = true;
        c.check_exposure().unwrap();
        let local = load(MINIMAL, &[("DENOISED_SERVER__BIND", "[::1]:8080")]).unwrap();
        local.check_exposure().unwrap();
    }
}
