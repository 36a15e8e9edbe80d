//! The authentication layer: every request but the public ones must carry `Authorization: Bearer <key>`
//! (when `[auth] enabled`); handlers receive the caller as an `Extension<Principal>`.
//!
//! The key itself is never logged: failures name only the reason, successes record the key's name.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::openai::OpenAiError;
use super::AppState;
use crate::auth::Principal;

/// Routes anyone may call: probes, the API description and its viewer.
pub fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/openapi.json" | "/docs")
        || path.starts_with("/docs/")
        || path.starts_with(super::page::PREFIX)
}

/// Routes that answer errors in OpenAI's shape.
pub(crate) fn speaks_openai(path: &str) -> bool {
    path.starts_with("/v1/images/generations") || path.starts_with("/v1/images/edits")
}

/// Establishes the caller (or refuses the request) and passes it on as an extension.
pub async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if is_public(&path) {
        return next.run(request).await;
    }
    let principal = if state.auth.enabled {
        let header = request.headers().get(header::AUTHORIZATION).cloned();
        match caller(&state, header).await {
            Ok(principal) => principal,
            Err(error) if speaks_openai(&path) => return OpenAiError(error).into_response(),
            Err(error) => return error.into_response(),
        }
    } else {
        Principal::anonymous()
    };
    if path == "/metrics" && !principal.admin {
        return ApiError::Forbidden("/metrics needs an admin key".into()).into_response();
    }
    tracing::Span::current().record("key", principal.name.as_str());
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// How often an open event stream re-checks that its key has not been revoked.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `who` may still be served: `false` once its key has been revoked (a database error counts as
/// still allowed, so a hiccup does not cut every stream).
pub async fn still_allowed(state: &AppState, who: &Principal) -> bool {
    match &who.key_id {
        Some(id) if state.auth.enabled => state.auth.keys.is_live(id).await.unwrap_or(true),
        _ => true,
    }
}

/// Resolves once `who`'s key has been revoked (checked every [`RECHECK`]); never without keys. Open streams
/// end on it.
pub async fn revoked(state: AppState, who: Principal) {
    if who.key_id.is_none() || !state.auth.enabled {
        return std::future::pending().await;
    }
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
    loop {
        recheck.tick().await;
        if !still_allowed(&state, &who).await {
            return;
        }
    }
}

async fn caller(state: &AppState, authorization: Option<header::HeaderValue>) -> Result<Principal, ApiError> {
    let Some(value) = authorization else {
        return Err(ApiError::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into()));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <key>`".into()))?;
    match state.auth.keys.authenticate(presented).await {
        Ok(Some(principal)) => Ok(principal),
        Ok(None) => Err(ApiError::Unauthorized("invalid API key (unknown, revoked or malformed)".into())),
        Err(crate::auth::KeyError::Store(e)) => Err(e.into()),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Adds the bearer scheme to the OpenAPI document, and to every non-public operation its security
/// requirement and `401` answer (`403` too for `/metrics`), so no route can be left undocumented.
pub fn document(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("dn_<id>_<secret>")
        .description(Some("An API key made with `denoised keys create`; required when `[auth] enabled = true`."))
        .build();
    spec.components.get_or_insert_with(Default::default).add_security_scheme("bearer", SecurityScheme::Http(scheme));
    let answer = |description: &str, body: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name(body))).build())
            .build()
    };
    for (path, item) in spec.paths.paths.iter_mut() {
        if is_public(path) {
            continue;
        }
        let body = if speaks_openai(path) { "OpenAiErrorBody" } else { "ErrorBody" };
        let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch];
        for operation in operations.into_iter().flatten() {
            operation.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
            let responses = &mut operation.responses.responses;
            responses.entry("401".into()).or_insert_with(|| {
                answer("No API key, or one that is malformed, unknown or revoked (with `[auth] enabled`)", body).into()
            });
            if path == "/metrics" {
                responses.entry("403".into()).or_insert_with(|| answer("The key is not an admin key", body).into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_probes_the_api_description_and_the_page_are_public() {
        for path in ["/healthz", "/readyz", "/openapi.json", "/docs", "/docs/index.html", "/", "/page/app.js"] {
            assert!(is_public(path), "{path}");
        }
        for path in ["/v1/images", "/v1/jobs", "/metrics", "/v1/events", "/docsx", "/healthz/x", "/pagex", "/v1"] {
            assert!(!is_public(path), "{path}");
        }
    }
}
