//! The webhook fields of a submission (`webhook_url`, `webhook_events`), resolved into the job's webhook:
//! the job's own URL or its key's default, a secret that will sign it (the key's, or `[webhooks] secret` for
//! jobs without a key), and a target that passes the SSRF check. Every refusal is a `422` naming the field.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;
use crate::auth::Principal;
use crate::jobs::store::JobWebhook;
use crate::webhooks::target;

/// An event a webhook can be told about. The terminal one (`completed`, `failed` or `cancelled`) is always
/// sent; listing `started` adds the moment a worker takes the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// A worker took the job (once per attempt).
    Started,
    /// The job succeeded (always sent).
    Completed,
    /// The job failed (always sent).
    Failed,
    /// The job was cancelled (always sent).
    Cancelled,
}

/// The webhook of a job submitted by `who` with `url` and `events`; `None` when neither the request nor
/// the key names a URL.
pub async fn job_webhook(
    state: &AppState,
    who: &Principal,
    url: Option<&str>,
    events: Option<&[WebhookEvent]>,
) -> Result<Option<JobWebhook>, ApiError> {
    let key = match &who.key_id {
        Some(id) => state.auth.keys.webhook(id).await.map_err(ApiError::internal)?,
        None => None,
    };
    let (url, from_key) = match (url, key.as_ref().and_then(|k| k.url.as_deref())) {
        (Some(own), _) => (own, false),
        (None, Some(default)) => (default, true),
        (None, None) if events.is_some_and(|e| !e.is_empty()) => {
            return Err(ApiError::field(
                "webhook_events",
                "webhook_events needs a webhook_url (or an API key with a default one: \
                 `denoised keys update NAME --webhook-url URL`)",
            ))
        }
        (None, None) => return Ok(None),
    };
    match (&who.key_id, &key) {
        (Some(_), Some(key)) if key.has_secret => {}
        (Some(_), _) => {
            return Err(ApiError::field(
                "webhook_url",
                format!(
                    "API key `{name}` has no webhook signing secret (it was made before webhooks existed); an \
                     operator can give it one with `denoised keys rotate-webhook-secret {name}`",
                    name = who.name
                ),
            ))
        }
        (None, _) if state.webhooks.secret.is_some() => {}
        (None, _) => {
            return Err(ApiError::field(
                "webhook_url",
                "jobs submitted without an API key are signed with the server's webhook secret, and none is \
                 configured: set `[webhooks] secret = \"whsec_<base64 of 32 random bytes>\"` in config.toml \
                 (or DENOISED_WEBHOOKS__SECRET), or turn on [auth] so that each key signs with its own secret",
            ))
        }
    }
    let checked = target::check(url, state.webhooks.allow_private_targets).await.map_err(|e| {
        let message =
            if from_key { format!("this API key's default webhook URL is refused: {e}") } else { e.to_string() };
        ApiError::field("webhook_url", message)
    })?;
    let started = events.is_some_and(|e| e.contains(&WebhookEvent::Started));
    Ok(Some(JobWebhook { url: checked.to_string(), started }))
}
