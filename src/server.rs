//! Wiring: load the runtime and models, open the store, start workers, dispatcher and HTTP, and shut them
//! down in order on SIGINT/SIGTERM.

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
use crate::config::Config;
use crate::engine::runtime::{Device, Runtime};
use crate::jobs::{JobRules, JobStore, Jobs};
use crate::models::ModelRegistry;
use crate::net::body::budget::BodyBudget;
use crate::net::body::{BodyDeadlines, BodyRules};
use crate::net::ConnectionSettings;
use crate::storage::ImageFiles;
use crate::worker::dispatcher::{DispatchSettings, Dispatcher};
use crate::worker::pool::{WorkerPool, WorkerSpec};

/// A server that has bound its socket and loaded its models, ready to run.
pub struct Server {
    listener: TcpListener,
    connections: ConnectionSettings,
    state: AppState,
    dispatcher: Dispatcher,
    pool: Arc<WorkerPool>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    retention: Option<Duration>,
}

impl Server {
    /// Does every fallible start-up step: ONNX Runtime, models, database (with recovery of expired leases),
    /// worker threads, and the listening socket.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        crate::telemetry::metrics_handle();
        config.check_exposure()?;
        let library = Runtime::library_path(&config.runtime.onnxruntime_library);
        let runtime = Runtime::load(&library)?;
        info!(library = %runtime.library().display(), "ONNX Runtime loaded");
        let registry = Arc::new(ModelRegistry::load(&config.models)?);
        std::fs::create_dir_all(&config.storage.data_dir)
            .with_context(|| format!("creating data_dir {}", config.storage.data_dir.display()))?;
        let (store, keys) = open_store(config).await?;
        let specs = config
            .workers
            .iter()
            .map(|w| {
                Ok(WorkerSpec { device: Device::parse(&w.device).map_err(anyhow::Error::msg)?, threads: w.threads })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let rules = job_rules(config, specs.len());
        let files = ImageFiles::open(&config.storage).await.context("opening image storage")?;
        let jobs = Jobs::new(store, files, rules, stop_rx.clone());
        let (runtime_for_pool, registry_for_pool) = (runtime.clone(), registry.clone());
        let (progress, bus) = (jobs.progress().clone(), jobs.bus().clone());
        let pool = tokio::task::spawn_blocking(move || {
            WorkerPool::start(&runtime_for_pool, &registry_for_pool, &specs, progress, bus)
        })
        .await??;
        let pool = Arc::new(pool);
        let addr = config.bind_addr()?;
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let state = AppState {
            jobs: jobs.clone(),
            models: registry,
            limits: config.limits.clone(),
            http: http_settings(config),
            workers_ready: pool.ready_flag(),
            auth: AuthState { enabled: config.auth.enabled, keys },
        };
        let connections = ConnectionSettings::from_config(&config.server);
        let dispatcher = Dispatcher {
            jobs,
            pool: pool.clone(),
            settings: DispatchSettings {
                lease: Duration::from_secs(config.queue.lease_seconds),
                poll: Duration::from_millis(config.queue.poll_millis.max(10)),
                shutdown_grace: Duration::from_secs(config.server.shutdown_grace_seconds),
                job_timeout: Duration::from_secs(config.queue.job_timeout_seconds),
            },
            process_id: uuid::Uuid::new_v4().to_string(),
        };
        let retention = (config.storage.retention_hours > 0.0)
            .then(|| Duration::from_secs_f64(config.storage.retention_hours * 3600.0));
        Ok(Self { listener, connections, state, dispatcher, pool, stop_tx, stop_rx, retention })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves: stops accepting, lets running jobs finish (or hands them back),
    /// then returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = (self.stop_tx, self.stop_rx);
        let dispatcher = tokio::spawn(self.dispatcher.run(stop_rx.clone()));
        let sweeper = self
            .retention
            .map(|keep| tokio::spawn(crate::retention::run(self.state.jobs.clone(), keep, stop_rx.clone())));
        let ready = self.state.workers_ready.clone();
        let app = api::app(self.state);
        info!(addr = %self.listener.local_addr()?, max_connections = self.connections.max_connections, "listening");
        let server = crate::net::serve(self.listener, app, self.connections, stop_rx);
        let signal = tokio::spawn(async move {
            shutdown.await;
            info!("shutting down");
            ready.store(false, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        });
        server.await;
        dispatcher.await?;
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        signal.abort();
        let pool = self.pool;
        tokio::task::spawn_blocking(move || drop(pool)).await?;
        info!("stopped");
        Ok(())
    }
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
