//! Opening the PostgreSQL backend, and its notification channels: a fleet of processes shares one database,
//! and `LISTEN/NOTIFY` tells them at once what would otherwise wait for the next poll.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use super::super::error::StoreError;

/// Connections per process. Every statement is short; a fleet of processes each with this many stays well
/// under PostgreSQL's default `max_connections` (100) for a dozen processes.
const MAX_CONNECTIONS: u32 = 8;

/// How long to wait for a connection before a statement fails (and the API answers 503).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Lock key serialising submissions, so that the queue and per-key limits counted inside the insert's
/// transaction cannot be overshot by racing submissions from any process (SQLite's `BEGIN IMMEDIATE`).
pub(crate) const SUBMIT_LOCK: i64 = 0x6465_6e6f_6973_6564; // "denoised"

/// Lock key serialising event writes, so event ids commit in the order they were drawn and a reader that
/// has seen id N never later finds a smaller id appearing.
pub(crate) const EVENTS_LOCK: i64 = 0x6465_6e6f_6973_6566;

/// Channel notified when a job becomes claimable (submitted, handed back, re-queued).
pub const QUEUE_CHANNEL: &str = "denoised_queue";
/// Channel notified, with a job id as payload, when a running job must stop (cancelled or deleted).
pub const STOP_CHANNEL: &str = "denoised_stop";
/// Channel notified when job events were written (the payload stays empty; readers read the table).
pub const EVENTS_CHANNEL: &str = "denoised_events";

/// Connects to `url` (`postgres://user:password@host:port/database`; `?options[search_path]=schema` selects
/// a schema) and applies the migrations. Concurrent processes may start together: migrations take
/// PostgreSQL's advisory migration lock.
pub(crate) async fn open(url: &str) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)?.application_name("denoised");
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations/postgres").run(&pool).await?;
    Ok(pool)
}

/// A listener on `channels`, on its own connection (reconnecting by itself after a connection loss; a
/// reconnect may lose notifications, so listeners also poll).
pub async fn listen(pool: &PgPool, channels: &[&str]) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channels.iter().copied()).await?;
    Ok(listener)
}

/// Prefix of the throw-away schemas [`fresh_schema`] makes.
const TEST_SCHEMA_PREFIX: &str = "dn_test_";

/// Makes an empty schema on the server at `base_url` and returns a URL that selects it, so that each test
/// (or each process of a multi-process test) gets a database of its own on one shared server. Schemas left
/// by runs more than an hour old are dropped on the way.
pub async fn fresh_schema(base_url: &str) -> Result<String, StoreError> {
    let pool = PgPoolOptions::new().max_connections(1).connect(base_url).await?;
    let now = super::super::time::now_millis() / 1000;
    let stale: Vec<(String,)> = sqlx::query_as("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1")
        .bind(format!("{TEST_SCHEMA_PREFIX}%"))
        .fetch_all(&pool)
        .await?;
    for (name,) in stale {
        let made = name.trim_start_matches(TEST_SCHEMA_PREFIX).split('_').next().and_then(|s| s.parse::<i64>().ok());
        if made.is_some_and(|made| made < now - 3600) {
            // Another run may drop it at the same time: ignore failures.
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(&pool).await;
        }
    }
    let schema = format!("{TEST_SCHEMA_PREFIX}{now}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\"")).execute(&pool).await?;
    pool.close().await;
    let separator = if base_url.contains('?') { '&' } else { '?' };
    Ok(format!("{base_url}{separator}options[search_path]={schema}"))
}
