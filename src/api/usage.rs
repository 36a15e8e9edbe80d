//! `GET /v1/usage`: what a key has used against its limits (admins: every live key).

use axum::extract::State;
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, AppJson, ErrorBody};
use super::AppState;
use crate::auth::{KeyInfo, Principal};

/// Usage of the keys the caller may see.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageList {
    /// Always `list`.
    pub object: &'static str,
    /// The caller's own key, or every live key for an admin.
    pub data: Vec<KeyUsage>,
}

/// One key's consumption against its share and limits.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyUsage {
    /// The key's public id.
    pub key_id: String,
    /// Its name.
    pub name: String,
    /// Its share of the workers when keys compete (1 unless set).
    pub weight: u32,
    /// Submissions per minute, when limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateUsage>,
    /// Image-steps (`n × steps`) submitted in the last 24 hours.
    pub image_steps_24h: u64,
    /// Its `daily_image_steps`, when limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_image_steps: Option<u64>,
    /// Jobs queued or running, and the most it may have (`limits.max_outstanding_per_key`).
    pub outstanding_jobs: u64,
    /// See `outstanding_jobs`.
    pub max_outstanding_jobs: u64,
    /// Bytes of images and uploads its jobs keep, and the most (`limits.max_stored_bytes_per_key`).
    pub stored_bytes: u64,
    /// See `stored_bytes`.
    pub max_stored_bytes: u64,
}

/// Where a key's submission rate stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct RateUsage {
    /// Submissions per minute.
    pub limit: u32,
    /// Submissions it could make now.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_seconds: u64,
}

/// A key's consumption against its limits (admin keys: every live key's).
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "jobs",
    responses(
        (status = 200, description = "Usage of the caller's key, or of every live key for an admin", body = UsageList),
        (status = 401, description = "No valid key", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    )
)]
pub async fn usage(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<AppJson<UsageList>, ApiError> {
    let keys: Vec<KeyInfo> = state.auth.keys.list().await.map_err(ApiError::internal)?;
    let visible = keys.into_iter().filter(|k| k.revoked_at.is_none() && who.can_see(Some(&k.id)));
    let mut data = Vec::new();
    for key in visible {
        let used = state.jobs.store().usage(&key.id).await?;
        let rate = match key.limits.rate_per_minute {
            Some(limit) => {
                let now = state.jobs.store().rate_state(&key.id, limit).await?;
                Some(RateUsage { limit, remaining: now.remaining, reset_seconds: now.reset_seconds })
            }
            None => None,
        };
        data.push(KeyUsage {
            key_id: key.id,
            name: key.name,
            weight: key.limits.weight,
            rate,
            image_steps_24h: used.image_steps_24h,
            daily_image_steps: key.limits.daily_image_steps,
            outstanding_jobs: used.outstanding,
            max_outstanding_jobs: state.limits.max_outstanding_per_key,
            stored_bytes: used.stored_bytes,
            max_stored_bytes: state.limits.max_stored_bytes_per_key,
        });
    }
    Ok(AppJson(UsageList { object: "list", data }))
}
