//! The job store's types: what goes into the queue, what comes out, and the states in between.
//!
//! Timestamps are `i64` unix milliseconds (UTC); format them with [`super::time::rfc3339_from_millis`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::params::JobParams;

/// Where a job is in its life: `queued → running → succeeded | failed | cancelled`, with `running → queued`
/// when a lease expires or a worker releases the job at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// Claimed by a worker that holds a lease on it.
    Running,
    /// Finished with images.
    Succeeded,
    /// Finished with an error (see the job's `error_code`).
    Failed,
    /// Stopped at a client's request.
    Cancelled,
}

impl JobStatus {
    /// Every status, in life-cycle order; for metrics that report a gauge per status.
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled];

    /// The lowercase name used in the database, in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// True for the states a job never leaves (so SSE streams can end and clients can stop polling).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`JobStatus`] from text that is not one of its lowercase names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownJobStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownJobStatus;

    /// Parses the exact lowercase names produced by [`JobStatus::as_str`] (e.g. a `?status=` filter).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| UnknownJobStatus(s.to_owned()))
    }
}

/// A job to enqueue, as the HTTP layer builds it from a validated request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The model that must run it.
    pub model: String,
    /// The validated request parameters, typed by kind, handed back to the worker unchanged.
    pub params: JobParams,
    /// Higher runs first; among jobs of equal priority, owners take turns by weight (fair sharing), and
    /// each owner's jobs run oldest first.
    pub priority: i32,
    /// How many claims the job may use before an expired lease fails it (at least 1).
    pub max_attempts: u32,
    /// The id of the API key that submits it (`None` when authentication is off); only that key (and admin
    /// keys) may see the job.
    pub owner: Option<String>,
    /// Bytes of the files stored beside the job (an edit's pictures, client latents), for storage quotas.
    pub input_bytes: u64,
    /// What it costs against its owner's daily compute: image-steps (`n × steps`).
    pub cost: u64,
    /// Where the job's events are delivered, if anywhere (recorded in the job's insert transaction).
    #[serde(default)]
    pub webhook: Option<super::store::JobWebhook>,
}

/// A job as stored: the queue's answer to `get`, `claim` and friends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// UUID v7, so ids sort by creation time.
    pub id: Uuid,
    /// Where the job is in its life cycle.
    pub status: JobStatus,
    /// See [`NewJob::model`].
    pub model: String,
    /// See [`NewJob::params`].
    pub params: JobParams,
    /// See [`NewJob::priority`].
    pub priority: i32,
    /// Claims charged so far, including the current one while running (a graceful release gives it back).
    pub attempts: u32,
    /// See [`NewJob::max_attempts`].
    pub max_attempts: u32,
    /// The worker holding (or that last held and finished) the job; `None` while queued.
    pub lease_owner: Option<String>,
    /// Machine-readable failure reason once failed, e.g. `"max_attempts_exceeded"`.
    pub error_code: Option<String>,
    /// Human-readable failure detail once failed.
    pub error_message: Option<String>,
    /// When the job was inserted (unix milliseconds, UTC).
    pub created_at: i64,
    /// When the current or last attempt started (unix milliseconds, UTC); `None` while queued.
    pub started_at: Option<i64>,
    /// When the job reached a terminal state (unix milliseconds, UTC).
    pub finished_at: Option<i64>,
    /// See [`NewJob::owner`].
    pub owner: Option<String>,
}

/// An image a worker has written to disk, recorded with the job's completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewImage {
    /// Position of the image in the job's output (0-based, unique per job).
    pub index: u32,
    /// The seed that produced this image, so a client can reproduce it.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// File format, e.g. `"png"`.
    pub format: String,
    /// Location of the file, relative to the server's `data_dir`.
    pub path: String,
    /// Hex SHA-256 of the file, for ETags and integrity checks.
    pub sha256: String,
    /// File size in bytes.
    pub bytes: u64,
}

/// A stored image of a finished job, for the image endpoints: what the worker recorded, with its job and
/// when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The job that produced the image.
    pub job_id: Uuid,
    /// The image as recorded.
    #[serde(flatten)]
    pub image: NewImage,
    /// When the image was recorded (unix milliseconds, UTC).
    pub created_at: i64,
}

/// Number of jobs in each status, for queue-depth metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// Jobs waiting for a worker.
    pub queued: u64,
    /// Jobs held by a worker.
    pub running: u64,
    /// Jobs finished with images.
    pub succeeded: u64,
    /// Jobs finished with an error.
    pub failed: u64,
    /// Jobs cancelled.
    pub cancelled: u64,
}

impl StatusCounts {
    /// The count for one status, so metrics code can loop over [`JobStatus::ALL`].
    pub fn get(&self, status: JobStatus) -> u64 {
        match status {
            JobStatus::Queued => self.queued,
            JobStatus::Running => self.running,
            JobStatus::Succeeded => self.succeeded,
            JobStatus::Failed => self.failed,
            JobStatus::Cancelled => self.cancelled,
        }
    }

    pub(crate) fn get_mut(&mut self, status: JobStatus) -> &mut u64 {
        match status {
            JobStatus::Queued => &mut self.queued,
            JobStatus::Running => &mut self.running,
            JobStatus::Succeeded => &mut self.succeeded,
            JobStatus::Failed => &mut self.failed,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// All jobs in the store.
    pub fn total(&self) -> u64 {
        JobStatus::ALL.into_iter().map(|s| self.get(s)).sum()
    }
}

/// What a reaper pass did, so the caller can log it and tell waiting clients about jobs that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoverReport {
    /// Jobs whose lease expired and that went back to `queued` (attempts stay charged).
    pub requeued: Vec<Uuid>,
    /// Jobs whose lease expired on their last allowed attempt and that are now `failed` with
    /// code `max_attempts_exceeded`.
    pub failed: Vec<Uuid>,
}

impl RecoverReport {
    /// True when the pass found nothing to recover (the common case; skip logging).
    pub fn is_empty(&self) -> bool {
        self.requeued.is_empty() && self.failed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_through_str_and_serde() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
            assert_eq!(serde_json::from_str::<JobStatus>(&json).unwrap(), status);
        }
        assert!("Queued".parse::<JobStatus>().is_err());
        assert!("done".parse::<JobStatus>().is_err());
        assert!(!JobStatus::Running.is_terminal());
        assert!(JobStatus::Cancelled.is_terminal());
    }
}

/// Limits that [`JobStore::submit`](super::JobStore::submit) checks inside its write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitLimits {
    /// Queued jobs at most (`u64::MAX`: unchecked).
    pub max_queued: u64,
    /// Queued plus running jobs per owner at most (`u64::MAX`: unchecked; ownerless jobs are never counted).
    pub max_outstanding_per_owner: u64,
    /// Bytes an owner may keep stored, images and inputs (`u64::MAX`: unchecked; ownerless jobs never count).
    pub max_stored_bytes_per_owner: u64,
    /// Submissions per minute the owner may make (its key's token bucket; `None`: unlimited).
    pub rate_per_minute: Option<u32>,
    /// Image-steps the owner may submit per 24 hours (`None`: unlimited).
    pub daily_image_steps: Option<u64>,
}

impl SubmitLimits {
    /// No limits.
    pub const NONE: SubmitLimits = SubmitLimits {
        max_queued: u64::MAX,
        max_outstanding_per_owner: u64::MAX,
        max_stored_bytes_per_owner: u64::MAX,
        rate_per_minute: None,
        daily_image_steps: None,
    };
}

/// An API key's share of the workers and its limits, set by operators with `denoised keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// Its share when keys compete for workers: a key of weight 3 gets three jobs claimed for each one of a
    /// key of weight 1 while both have jobs waiting.
    pub weight: u32,
    /// Submissions per minute (a token bucket holding a minute's worth); `None`: unlimited.
    pub rate_per_minute: Option<u32>,
    /// Image-steps (`n × steps`) per rolling 24 hours; `None`: unlimited.
    pub daily_image_steps: Option<u64>,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self { weight: 1, rate_per_minute: None, daily_image_steps: None }
    }
}

/// Where a key stands against its submission rate, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Submissions per minute.
    pub limit: u32,
    /// Submissions it could make right now.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_seconds: u64,
}

/// What [`JobStore::submit`](super::JobStore::submit) did.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// A new job.
    Created(Job),
    /// The job the same `Idempotency-Key` created earlier; nothing was inserted.
    Replayed(Job),
    /// Refused: `queued` jobs are already waiting.
    QueueFull {
        /// Jobs waiting.
        queued: u64,
    },
    /// Refused: the owner already has `outstanding` jobs queued or running.
    OwnerBusy {
        /// The owner's queued plus running jobs.
        outstanding: u64,
    },
    /// Refused: the `Idempotency-Key` already names a job made from a different request.
    KeyReused,
    /// Refused: the owner keeps `stored` bytes already, and this job's inputs would pass its quota.
    OverQuota {
        /// Bytes the owner's jobs keep stored.
        stored: u64,
    },
    /// Refused: the owner's submission rate is used up.
    RateLimited {
        /// Where its bucket stands (`remaining` is 0).
        state: RateState,
        /// Milliseconds until one submission is allowed again.
        retry_after_ms: u64,
    },
    /// Refused: this job's image-steps would pass the owner's daily compute.
    ComputeExhausted {
        /// Image-steps submitted in the last 24 hours.
        used: u64,
        /// The daily limit.
        limit: u64,
        /// Milliseconds until enough of the window's jobs age out for this one to fit.
        retry_after_ms: u64,
    },
}

/// A client's `Idempotency-Key` with what it is used for and how long it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyKey<'a> {
    /// The key.
    pub key: &'a str,
    /// A digest of the route and the request; a replay must bring the same one (empty: not compared).
    pub fingerprint: &'a str,
    /// How long the key keeps pointing at its job.
    pub window: std::time::Duration,
}

impl<'a> From<(&'a str, std::time::Duration)> for IdempotencyKey<'a> {
    /// A key whose requests are not compared.
    fn from((key, window): (&'a str, std::time::Duration)) -> Self {
        Self { key, fingerprint: "", window }
    }
}
