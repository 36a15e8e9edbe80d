//! The one error type of the job store.

use std::path::PathBuf;

/// Everything that can go wrong in [`JobStore`](super::JobStore), so that callers (the HTTP layer, the
/// dispatcher) can tell a bad request from a database outage without matching on sqlx internals.
///
/// Note that a *lost lease* is not an error: fenced transitions return `Ok(false)` for that.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The parent folder of the SQLite file did not exist and could not be created.
    #[error("cannot create the database folder {path}: {source}")]
    CreateDir {
        /// The folder we tried to create.
        path: PathBuf,
        /// Why the file system refused.
        source: std::io::Error,
    },
    /// The database could not be reached or a statement failed (includes a malformed database URL and
    /// `SQLITE_BUSY` past the busy timeout; see [`StoreError::is_busy`]).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations at connect failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A value given to the store cannot be stored (e.g. `max_attempts` of 0, a size above `i64::MAX`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A row read back does not fit the Rust types (a bad UUID, an unknown status, a negative count):
    /// someone wrote to the database behind the store's back, or a migration is missing.
    #[error("corrupt row in table {table}: {detail}")]
    Corrupt {
        /// The table the row came from.
        table: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The shared transaction of a group of submissions could not be opened or committed: every submission
    /// of the group gets the same cause.
    #[error("{0}")]
    Group(std::sync::Arc<StoreError>),
    /// The store was closed (or its group-commit task ended) before the request could be written.
    #[error("the job store is closed")]
    Closed,
}

impl StoreError {
    /// True when the failure is SQLite reporting the database busy or locked past the busy timeout: a
    /// transient condition under heavy write contention that callers may retry or report as 503.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                // SQLITE_BUSY = 5, SQLITE_LOCKED = 6; extended codes keep the primary code in the low byte.
                db.code().and_then(|code| code.parse::<i32>().ok()).is_some_and(|code| matches!(code & 0xff, 5 | 6))
            }
            StoreError::Database(sqlx::Error::PoolTimedOut) => true,
            StoreError::Group(cause) => cause.is_busy(),
            _ => false,
        }
    }

    pub(crate) fn corrupt(table: &'static str, detail: impl Into<String>) -> Self {
        StoreError::Corrupt { table, detail: detail.into() }
    }
}
