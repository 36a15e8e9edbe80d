//! Wiring: load the runtime and models, open the store, start workers, dispatcher and HTTP, and shut them
//! down in order on SIGINT/SIGTERM. The process's [`Role`] decides which parts run: an `api` process loads no
//! model and runs no worker; a `worker` process serves only health and metrics over HTTP.

use crate::credentials::ContentCredentials;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::api::{self, AppState, AuthState, HttpSettings};
use crate::auth::KeyStore;
use crate::config::{Config, Role};
use crate::engine::runtime::Runtime;
use crate::fleet::{Fleet, FleetRole};
use crate::jobs::store::WorkerRegistration;
use crate::jobs::{JobRules, JobStore, Jobs};
use crate::models::ModelRegistry;
use crate::net::body::budget::BodyBudget;
use crate::net::body::{BodyDeadlines, BodyRules};
use crate::net::ConnectionSettings;
use crate::storage::ImageFiles;
use crate::watermark::{Detector, WatermarkState};
use crate::webhooks::sender::Sender;
use crate::webhooks::WebhookSettings;
use crate::worker::dispatcher::{DispatchSettings, Dispatcher};
use crate::worker::pool::{WorkerPool, WorkerSpec};

/// A server that has bound its socket and loaded its models, ready to run.
pub struct Server {
    listener: TcpListener,
    connections: ConnectionSettings,
    state: AppState,
    role: Role,
    /// The workers and their dispatcher, unless this is an `api` process.
    workers: Option<(Dispatcher, Arc<WorkerPool>)>,
    /// What this process registers as, when it runs jobs.
    registration: Option<WorkerRegistration>,
    /// Sends the outbox's due webhook deliveries (every process that has the store runs one).
    webhooks: Sender,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    retention: Option<Duration>,
}

impl Server {
    /// Does every fallible start-up step: ONNX Runtime, models, database (with recovery of expired leases),
    /// worker threads, and the listening socket (the parts the role needs).
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        crate::telemetry::metrics_handle();
        config.check_exposure()?;
        let role = config.server.role;
        // Every role reads the models' descriptions (the API validates against them); only workers load them.
        let registry = Arc::new(ModelRegistry::load(&config.models)?);
        std::fs::create_dir_all(&config.storage.data_dir)
            .with_context(|| format!("creating data_dir {}", config.storage.data_dir.display()))?;
        let (store, keys) = open_store(config).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let specs = config.worker_specs()?;
        let rules = job_rules(config, specs.len());
        let files = ImageFiles::open(&config.storage).await.context("opening image storage")?;
        let jobs = Jobs::new(store, files, rules, stop_rx.clone());
        let process_id = process_id();
        let mut detector = None;
        let (workers, workers_ready, registration) = if role.runs_jobs() {
            let (dispatcher, pool, runtime) = start_workers(config, &specs, &registry, &jobs, &process_id).await?;
            if role.serves_api() {
                detector = Some(Arc::new(start_detector(config, &specs, &runtime, &registry)?));
            }
            let registration = WorkerRegistration {
                id: process_id.clone(),
                host: host_name(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                models: registry.all().iter().map(|m| m.name.clone()).collect(),
                devices: specs.iter().map(|w| w.device.to_string()).collect(),
            };
            let ready = pool.ready_flag();
            (Some((dispatcher, pool)), ready, Some(registration))
        } else {
            (None, Arc::new(std::sync::atomic::AtomicBool::new(false)), None)
        };
        let addr = config.bind_addr()?;
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let state = AppState {
            jobs,
            models: registry,
            limits: config.limits.clone(),
            http: http_settings(config),
            workers_ready,
            auth: AuthState { enabled: config.auth.enabled, keys },
            webhooks: WebhookSettings::from_config(&config.webhooks, config.server.public_url.as_deref()),
            watermark: WatermarkState { config: config.watermark.clone(), detector },
        };
        let webhooks = Sender::new(state.jobs.store().clone(), state.webhooks.clone(), process_id)
            .context("building the webhook client")?;
        let connections = ConnectionSettings::from_config(&config.server);
        let retention = (config.storage.retention_hours > 0.0 && role.serves_api())
            .then(|| Duration::from_secs_f64(config.storage.retention_hours * 3600.0));
        Ok(Self { listener, connections, state, role, workers, registration, webhooks, stop_tx, stop_rx, retention })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves: stops accepting, lets running jobs finish (or hands them back),
    /// then returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = (self.stop_tx, self.stop_rx);
        let role = self.role;
        let fleet = Fleet::start(
            &self.state.jobs,
            FleetRole {
                worker: self.registration,
                serves_api: role.serves_api(),
                ready_when_workers_alive: (role == Role::Api).then(|| self.state.workers_ready.clone()),
            },
            stop_rx.clone(),
        );
        let (dispatcher, pool) = match self.workers {
            Some((dispatcher, pool)) => (Some(tokio::spawn(dispatcher.run(stop_rx.clone()))), Some(pool)),
            None => (None, None),
        };
        let webhooks = self.webhooks.spawn(stop_rx.clone());
        let sweeper = self
            .retention
            .map(|keep| tokio::spawn(crate::retention::run(self.state.jobs.clone(), keep, stop_rx.clone())));
        let ready = self.state.workers_ready.clone();
        let app = if role.serves_api() { api::app(self.state) } else { api::worker_app(self.state) };
        info!(addr = %self.listener.local_addr()?, ?role, max_connections = self.connections.max_connections, "listening");
        let server = crate::net::serve(self.listener, app, self.connections, stop_rx);
        let signal = tokio::spawn(async move {
            shutdown.await;
            info!("shutting down");
            ready.store(false, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        });
        server.await;
        if let Some(dispatcher) = dispatcher {
            dispatcher.await?;
        }
        fleet.join().await;
        webhooks.await?;
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        signal.abort();
        if let Some(pool) = pool {
            tokio::task::spawn_blocking(move || drop(pool)).await?;
        }
        info!("stopped");
        Ok(())
    }
}

/// Loads ONNX Runtime and starts the worker threads (each loading the models) and their dispatcher. A
/// `worker` process claims only jobs for its models; an `all` process claims every job (one for a model it
/// does not serve then fails clearly instead of waiting forever).
async fn start_workers(
    config: &Config,
    specs: &[WorkerSpec],
    registry: &Arc<ModelRegistry>,
    jobs: &Jobs,
    process_id: &str,
) -> anyhow::Result<(Dispatcher, Arc<WorkerPool>, Runtime)> {
    let credentials = ContentCredentials::load(&config.content_credentials)?.map(Arc::new);
    if credentials.is_some() {
        info!("content credentials on: outputs carry signed C2PA manifests");
    }
    let library = Runtime::library_path(&config.runtime.onnxruntime_library);
    let runtime = Runtime::load(&library)?.with_cuda_options(config.runtime.cuda_options());
    info!(library = %runtime.library().display(), "ONNX Runtime loaded");
    let threads: Vec<usize> = specs.iter().map(|s| s.threads).collect();
    info!(workers = specs.len(), ?threads, cores = crate::worker::layout::available_cores(), "worker layout");
    let specs = specs.to_vec();
    let (registry_for_pool, progress, bus) = (registry.clone(), jobs.progress().clone(), jobs.bus().clone());
    let runtime_for_pool = runtime.clone();
    let pool = tokio::task::spawn_blocking(move || {
        WorkerPool::start(&runtime_for_pool, &registry_for_pool, &specs, progress, bus)
    })
    .await??;
    let pool = Arc::new(pool);
    let dispatcher = Dispatcher {
        jobs: jobs.clone(),
        pool: pool.clone(),
        settings: DispatchSettings {
            lease: Duration::from_secs(config.queue.lease_seconds),
            poll: Duration::from_millis(config.queue.poll_millis.max(10)),
            shutdown_grace: Duration::from_secs(config.server.shutdown_grace_seconds),
            job_timeout: Duration::from_secs(config.queue.job_timeout_seconds),
        },
        process_id: process_id.to_string(),
        models: (config.server.role == Role::Worker).then(|| registry.all().iter().map(|m| m.name.clone()).collect()),
        credentials,
    };
    Ok((dispatcher, pool, runtime))
}

/// Starts the watermark detector thread with the first worker entry's device and threads; it loads a model
/// the first time a detection names it.
fn start_detector(
    config: &Config,
    specs: &[WorkerSpec],
    runtime: &Runtime,
    registry: &Arc<ModelRegistry>,
) -> anyhow::Result<Detector> {
    let spec = specs.first().copied().context("no worker entry to take the detector's device from")?;
    let factory = runtime.session_factory(spec.device, spec.threads);
    Detector::start(factory, registry.clone(), config.watermark.max_queued_detections)
        .context("starting the watermark detector thread")
}

/// Unique per process run: host, pid and a random suffix (the lease owners' prefix and the worker id).
fn process_id() -> String {
    format!("{}-{}-{}", host_name(), std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The machine's host name, for the worker registry.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Opens the job store (recovering jobs whose lease expired while no server ran) and the key table, and says
/// how requests will be authenticated.
async fn open_store(config: &Config) -> anyhow::Result<(JobStore, KeyStore)> {
    let store = JobStore::connect(&config.storage.database_url)
        .await
        .with_context(|| format!("opening database {}", config.storage.database_url))?;
    let recovered = store.recover_expired().await?;
    if !recovered.is_empty() {
        info!(?recovered, "recovered jobs whose lease expired while no server ran them");
    }
    let keys = KeyStore::new(&store);
    if !config.auth.enabled {
        info!("authentication is off: every caller sees every job ([auth] enabled = false)");
    } else if !keys.any_live().await? {
        tracing::warn!("[auth] is enabled but no API key exists: create one with `denoised keys create`");
    }
    Ok((store, keys))
}

/// The queue rules of the jobs service, from the config.
fn job_rules(config: &Config, workers: usize) -> JobRules {
    JobRules {
        max_attempts: config.queue.max_attempts,
        max_queued: config.queue.max_queued,
        max_outstanding_per_key: config.limits.max_outstanding_per_key,
        max_stored_bytes_per_key: config.limits.max_stored_bytes_per_key,
        workers,
    }
}

/// The HTTP layer's settings, from the config.
fn http_settings(config: &Config) -> HttpSettings {
    HttpSettings {
        max_body_bytes: config.server.max_body_bytes,
        public_url: config.server.public_url.as_ref().map(|u| u.trim_end_matches('/').to_string()),
        bodies: BodyRules {
            budget: BodyBudget::new(
                config.server.max_body_bytes_in_flight,
                config.limits.max_body_bytes_in_flight_per_key,
            ),
            deadlines: BodyDeadlines {
                idle: Duration::from_secs(config.server.body_idle_timeout_seconds),
                total: Duration::from_secs(config.server.body_timeout_seconds),
            },
        },
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
