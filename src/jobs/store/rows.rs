//! Rows as both databases return them (text ids, i64 integers), and their checked conversion into the
//! store's Rust types: one set of row types serves SQLite and PostgreSQL, because both schemas use the same
//! column types.

use sqlx::FromRow;
use uuid::Uuid;

use super::super::error::StoreError;
use super::super::model::{ImageRecord, Job, JobStatus, NewImage};
use super::super::params::JobParams;

/// Seeds are u64 but the databases' integers are i64: store the i64 with the same 64 bits (two's complement), so
/// every seed round-trips exactly (seeds above `i64::MAX` read negative in raw SQL).
pub(super) fn seed_to_db(seed: u64) -> i64 {
    seed as i64
}

/// The inverse of [`seed_to_db`].
pub(super) fn seed_from_db(stored: i64) -> u64 {
    stored as u64
}

pub(super) fn one_job(rows: Vec<JobRow>) -> Result<Option<Job>, StoreError> {
    if rows.len() > 1 {
        return Err(StoreError::corrupt("jobs", format!("a single-row statement returned {} rows", rows.len())));
    }
    rows.into_iter().next().map(Job::try_from).transpose()
}

pub(super) fn parse_uuid(table: &'static str, text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::corrupt(table, format!("bad id {text:?}: {e}")))
}

pub(super) fn parse_ids(rows: Vec<(String,)>) -> Result<Vec<Uuid>, StoreError> {
    rows.iter().map(|(id,)| parse_uuid("jobs", id)).collect()
}

pub(super) fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    text.parse().map_err(|e| StoreError::corrupt("jobs", format!("{e}")))
}

pub(super) fn to_u32(table: &'static str, column: &str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::corrupt(table, format!("{column} = {value} does not fit a u32")))
}

pub(super) fn non_negative(table: &'static str, column: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(table, format!("{column} = {value} is negative")))
}

/// A `jobs` row as the databases return it, converted (and checked) into a [`Job`].
#[derive(FromRow)]
pub(super) struct JobRow {
    pub(super) id: String,
    kind: String,
    status: String,
    model: String,
    params: String,
    priority: i64,
    attempts: i64,
    max_attempts: i64,
    lease_owner: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    pub(super) owner: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        Ok(Job {
            id: parse_uuid("jobs", &row.id)?,
            status: parse_status(&row.status)?,
            model: row.model,
            params: JobParams::decode(&row.kind, &row.params)
                .map_err(|e| StoreError::corrupt("jobs", format!("params of {}: {e}", row.id)))?,
            priority: i32::try_from(row.priority)
                .map_err(|_| StoreError::corrupt("jobs", format!("priority {} does not fit an i32", row.priority)))?,
            attempts: to_u32("jobs", "attempts", row.attempts)?,
            max_attempts: to_u32("jobs", "max_attempts", row.max_attempts)?,
            lease_owner: row.lease_owner,
            error_code: row.error_code,
            error_message: row.error_message,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            owner: row.owner,
        })
    }
}

/// An `images` row as the databases return it, converted (and checked) into an [`ImageRecord`].
#[derive(FromRow)]
pub(super) struct ImageRow {
    job_id: String,
    idx: i64,
    seed: i64,
    width: i64,
    height: i64,
    format: String,
    path: String,
    sha256: String,
    bytes: i64,
    created_at: i64,
}

impl TryFrom<ImageRow> for ImageRecord {
    type Error = StoreError;

    fn try_from(row: ImageRow) -> Result<Self, StoreError> {
        let image = NewImage {
            index: to_u32("images", "idx", row.idx)?,
            seed: seed_from_db(row.seed),
            width: to_u32("images", "width", row.width)?,
            height: to_u32("images", "height", row.height)?,
            format: row.format,
            path: row.path,
            sha256: row.sha256,
            bytes: non_negative("images", "bytes", row.bytes)?,
        };
        Ok(ImageRecord { job_id: parse_uuid("images", &row.job_id)?, image, created_at: row.created_at })
    }
}
