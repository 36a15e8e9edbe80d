//! A job's life, in one place: [`Jobs`] (the service every route and the dispatcher go through: submit,
//! find, cancel, delete, follow, wait, and the outcomes workers record), the durable store under it (the
//! only code that speaks SQL to the `jobs` and `images` tables), the event bus and live progress that
//! followers read, and the typed parameters each job stores.
//!
//! The API inserts jobs here (durably, before answering `202 Accepted`); the dispatcher claims them under a
//! lease, renews the lease while a worker runs, and completes, fails or releases them with fenced updates;
//! a reaper re-queues jobs whose lease expired. See [`JobStore`] for the operations and `migrations/` for
//! the schema.

pub mod bus;
mod error;
mod follow;
mod model;
pub mod params;
mod positions;
pub mod progress;
mod service;
pub mod store;
pub mod time;

pub use error::StoreError;
pub use follow::{forever, Follow, Lagged};
pub use model::{
    IdempotencyKey, ImageRecord, Job, JobStatus, KeyLimits, NewImage, NewJob, RateState, RecoverReport, StatusCounts,
    Submission, SubmitLimits, UnknownJobStatus,
};
pub use params::JobParams;
pub use positions::QueuePositions;
pub use service::{
    has_computed_mask, Cancelled, EditInputs, Idempotency, JobRequest, JobRules, Jobs, JobsError, LiveState, Priority,
    Submitted, IDEMPOTENCY_WINDOW,
};
pub use store::{JobStore, MAX_ATTEMPTS_EXCEEDED};
