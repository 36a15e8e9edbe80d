//! The HTTP front end: routes, shared state and the OpenAPI document. It validates, stores and reads;
//! it never runs a model.

pub mod auth;
pub mod edits;
pub mod error;
pub mod events;
pub mod health;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod schedulers;
pub mod submit;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::{Extension, Router};
use tokio::sync::{watch, Notify};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::KeyStore;
use crate::config::{LimitsConfig, QueueConfig};
use crate::jobs::JobStore;
use crate::models::ModelRegistry;
use crate::storage::ImageFiles;
use crate::worker::events::EventBus;
use crate::worker::progress::ProgressBoard;
use error::{ApiError, BodyLimit};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The job store.
    pub store: JobStore,
    /// Served models.
    pub models: Arc<ModelRegistry>,
    /// Live progress of running jobs.
    pub progress: ProgressBoard,
    /// Events for followers of jobs.
    pub bus: EventBus,
    /// Number of worker threads (for wait estimates).
    pub workers: usize,
    /// Turns true when the server shuts down; open event streams end then.
    pub shutdown: watch::Receiver<bool>,
    /// Stored image files.
    pub files: ImageFiles,
    /// Wakes the dispatcher when a job is submitted.
    pub wake: Arc<Notify>,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Queue settings (attempts per job).
    pub queue: QueueConfig,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// True while every worker has its models loaded.
    pub workers_ready: Arc<AtomicBool>,
    /// API keys.
    pub auth: AuthState,
}

/// Whether requests need a key, and where keys are checked.
#[derive(Clone)]
pub struct AuthState {
    /// `[auth] enabled`.
    pub enabled: bool,
    /// The key table.
    pub keys: KeyStore,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "denoised",
        description = "HTTP inference server for diffusion image generation: submit a job, follow it, fetch the images.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "images", description = "Submit generation jobs"),
        (name = "jobs", description = "Follow jobs and download their images"),
        (name = "models", description = "Served models"),
        (name = "health", description = "Liveness and readiness"),
        (name = "openai", description = "OpenAI-compatible image endpoints"),
    )
)]
struct ApiDoc;

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(images::create_image_job))
        .routes(routes!(edits::create_edit_job))
        .routes(routes!(openai::generations))
        .routes(routes!(openai::edits))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(jobs::get_job, jobs::delete_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(events::job_events))
        .routes(routes!(events::all_events))
        .routes(routes!(jobs::get_image))
        .routes(routes!(models::list_models))
        .routes(routes!(schedulers::list_schedulers))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
}

/// The OpenAPI document, generated from the handlers (what `denoised openapi` prints).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut spec = api_router().split_for_parts().1;
    auth::document(&mut spec);
    spec
}

/// The complete HTTP application.
pub fn app(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let (router, mut spec) = api_router().split_for_parts();
    auth::document(&mut spec);
    router
        .merge(
            SwaggerUi::new("/docs")
                .url("/openapi.json", spec)
                .config(utoipa_swagger_ui::Config::default().validator_url("none")),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(BodyLimit(limit)))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let route = request
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map_or_else(|| request.uri().path().to_string(), |p| p.as_str().to_string());
            tracing::info_span!("http", method = %request.method(), route = %route, key = tracing::field::Empty)
        }))
        .with_state(state)
}
