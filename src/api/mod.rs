//! The HTTP front end: routes, shared state and the OpenAPI document. It validates, stores and reads;
//! it never runs a model.

pub mod auth;
pub mod body_guard;
pub mod edits;
pub mod error;
pub mod events;
pub mod form;
pub mod health;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod page;
pub mod schedulers;
pub mod submit;
pub mod usage;
pub mod validation;
pub mod watermarks;
pub mod webhook;
pub mod workers;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::{Extension, Router};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::KeyStore;
use crate::config::LimitsConfig;
use crate::jobs::Jobs;
use crate::models::ModelRegistry;
use error::{ApiError, BodyLimit};

/// What every handler can reach beside the jobs service.
#[derive(Clone)]
pub struct AppState {
    /// A job's life: submit, find, cancel, delete, follow, wait.
    pub jobs: Jobs,
    /// Served models.
    pub models: Arc<ModelRegistry>,
    /// Request limits.
    pub limits: LimitsConfig,
    /// What the HTTP layer itself is configured with.
    pub http: HttpSettings,
    /// True while every worker has its models loaded.
    pub workers_ready: Arc<AtomicBool>,
    /// API keys.
    pub auth: AuthState,
    /// Webhook settings (the SSRF check's allowances, the secret of jobs without a key).
    pub webhooks: crate::webhooks::WebhookSettings,
    /// Watermark settings and the detector.
    pub watermark: crate::watermark::WatermarkState,
}

/// The HTTP layer's own settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// `server.public_url` without a trailing slash: the prefix of absolute URLs handed to clients.
    pub public_url: Option<String>,
    /// The budget and deadlines of request bodies.
    pub bodies: crate::net::body::BodyRules,
}

impl HttpSettings {
    /// The URL clients are given for `path`: absolute under `server.public_url` when set, else the path.
    pub fn url(&self, path: &str) -> String {
        match &self.public_url {
            Some(base) => format!("{base}{path}"),
            None => path.to_string(),
        }
    }
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
        (name = "watermarks", description = "Tree-Ring watermark detection"),
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
        .routes(routes!(jobs::get_mask))
        .routes(routes!(models::list_models))
        .routes(routes!(schedulers::list_schedulers))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(workers::list_workers))
        .routes(routes!(usage::usage))
        .routes(routes!(watermarks::detect_watermark))
}

/// The OpenAPI document, generated from the handlers (what `denoised openapi` prints and `/openapi.json`
/// serves): the routes' own annotations, plus the bearer scheme and the links between operations.
pub fn openapi() -> serde_json::Value {
    let mut spec = api_router().split_for_parts().1;
    auth::document(&mut spec);
    body_guard::document(&mut spec);
    let mut json = serde_json::to_value(&spec).unwrap_or_default();
    document_links(&mut json);
    json
}

/// OpenAPI links from each submission's `202` to the operations on the job it created, so that generated
/// clients and stateful testers know that `id` in the answer is the `{id}` of `/v1/jobs/{id}…`. Written as
/// JSON because utoipa 5.5 serialises `Link` with snake_case keys (`operation_id`), which is not OpenAPI.
fn document_links(spec: &mut serde_json::Value) {
    let targets = [
        ("GetJob", "get_job"),
        ("CancelJob", "cancel_job"),
        ("DeleteJob", "delete_job"),
        ("JobEvents", "job_events"),
        ("FirstImage", "get_image"),
    ];
    for path in ["/v1/images", "/v1/edits"] {
        let Some(accepted) = spec.pointer_mut(&format!("/paths/{}/post/responses/202", path.replace('/', "~1"))) else {
            continue;
        };
        let links: serde_json::Map<String, serde_json::Value> = targets
            .iter()
            .map(|(name, operation)| {
                let mut parameters = serde_json::json!({"id": "$response.body#/id"});
                if *operation == "get_image" {
                    parameters["index"] = "0".into();
                }
                let link = serde_json::json!({
                    "operationId": operation,
                    "parameters": parameters,
                    "description": format!("`{operation}` on the job this request created"),
                });
                (name.to_string(), link)
            })
            .collect();
        accepted["links"] = serde_json::Value::Object(links);
    }
}

/// The HTTP face of a `worker` process: liveness, readiness (its models loaded, the database answering) and
/// metrics (behind the same authentication as the API), nothing else.
pub fn worker_app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(health::healthz))
        .route("/readyz", axum::routing::get(health::readyz))
        .route("/metrics", axum::routing::get(metrics::metrics))
        .fallback(|| async { ApiError::NotFound("a worker process serves only /healthz, /readyz and /metrics".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .with_state(state)
}

/// The complete HTTP application.
pub fn app(state: AppState) -> Router {
    let limit = state.http.max_body_bytes;
    let router = api_router().split_for_parts().0;
    router
        .merge(
            SwaggerUi::new("/docs")
                .external_url_unchecked("/openapi.json", openapi())
                .config(utoipa_swagger_ui::Config::default().validator_url("none")),
        )
        .merge(page::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(state.clone(), body_guard::guard))
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
