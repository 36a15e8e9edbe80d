//! Opening the SQLite backend: one file (WAL, `synchronous=FULL`), a pool for reads and one connection for
//! every write, so concurrent writers queue in order inside the process instead of polling SQLite's lock.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::super::error::StoreError;
use super::submit::GroupCommit;

/// How long a statement waits for another connection's write lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `PRAGMA auto_vacuum`'s value for `INCREMENTAL`.
const INCREMENTAL_VACUUM: i64 = 2;

/// Connections per pool for a database file. SQLite serialises writers anyway; a few connections let reads
/// (status polls, image lookups) proceed while a write waits.
const MAX_CONNECTIONS: u32 = 8;

/// The read pool and the one write connection of a SQLite database.
#[derive(Debug, Clone)]
pub(crate) struct SqlitePools {
    /// Reads (and, for in-memory databases, everything).
    pub(crate) read: SqlitePool,
    /// Every write.
    pub(crate) write: SqlitePool,
    /// Submissions, committed in groups on the write connection.
    pub(crate) submissions: super::submit::GroupCommit,
}

/// Opens (creating if missing, with its parent folder) the database at `url` and applies the migrations.
///
/// Accepts `sqlite://path/to/file.db` (relative or absolute: `sqlite:///abs/path.db`) and `sqlite::memory:`
/// (for tests: one connection, since each in-memory connection is its own database). Files are opened with
/// WAL, `synchronous=FULL` (a job is on disk before the API answers 202), a 5 s busy timeout, foreign keys on
/// and incremental auto-vacuum (a database made before it is vacuumed once, here, to switch), so that
/// [`reclaim_space`] can shrink the file.
pub(crate) async fn open(url: &str) -> Result<SqlitePools, StoreError> {
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let mut options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        .synchronous(SqliteSynchronous::Full);
    if in_memory {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        return Ok(SqlitePools { submissions: GroupCommit::start(pool.clone()), write: pool.clone(), read: pool });
    }
    // Readers open the file as it is: WAL is a property of the file, set by the write connection, and asking
    // for it (or for auto_vacuum) again on each new reader needs the write lock, which the group commit holds
    // most of the time under load (a reader opened then waited out the busy timeout's sleeps: up to seconds).
    let read_options = options.clone();
    options = options.journal_mode(SqliteJournalMode::Wal).auto_vacuum(SqliteAutoVacuum::Incremental);
    create_parent_dir(options.get_filename()).await?;
    // No ping before each use: a connection to a local file does not go stale the way a network one does
    // (a broken one fails its next statement anyway), and the ping was one more round trip to the
    // connection's thread on every claim, write and group commit.
    let write =
        SqlitePoolOptions::new().max_connections(1).test_before_acquire(false).connect_with(options.clone()).await?;
    sqlx::migrate!("./migrations/sqlite").run(&write).await?;
    let (mode,): (i64,) = sqlx::query_as("PRAGMA auto_vacuum").fetch_one(&write).await?;
    if mode != INCREMENTAL_VACUUM {
        sqlx::query("PRAGMA auto_vacuum = INCREMENTAL").execute(&write).await?;
        sqlx::query("VACUUM").execute(&write).await?;
    }
    // Every reader is opened now, not under the first burst of requests.
    let read = SqlitePoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .min_connections(MAX_CONNECTIONS)
        .test_before_acquire(false)
        .connect_with(read_options)
        .await?;
    Ok(SqlitePools { read, submissions: GroupCommit::start(write.clone()), write })
}

/// Returns the pages freed by deletions to the file system, so the file shrinks instead of keeping its
/// largest size.
pub(crate) async fn reclaim_space(pools: &SqlitePools) -> Result<(), StoreError> {
    sqlx::query("PRAGMA incremental_vacuum").execute(&pools.write).await?;
    Ok(())
}

/// Creates the folder that will hold the SQLite file, since SQLite creates the file but not its folder.
async fn create_parent_dir(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => tokio::fs::create_dir_all(parent)
            .await
            .map_err(|source| StoreError::CreateDir { path: parent.to_owned(), source }),
        _ => Ok(()),
    }
}
