//! The durable job store: the only module that speaks SQL.
//!
//! The API inserts jobs here (durably, before answering `202 Accepted`); the dispatcher claims them under a
//! lease, renews the lease while a worker runs, and completes, fails or releases them with fenced updates;
//! a reaper re-queues jobs whose lease expired. See [`JobStore`] for the operations and
//! `migrations/` for the schema.

mod error;
mod model;
pub mod params;
mod positions;
mod store;
pub mod time;

pub use error::StoreError;
pub use model::{
    ImageRecord, Job, JobStatus, NewImage, NewJob, RecoverReport, StatusCounts, Submission, SubmitLimits,
    UnknownJobStatus,
};
pub use positions::QueuePositions;
pub use store::{JobStore, MAX_ATTEMPTS_EXCEEDED};
