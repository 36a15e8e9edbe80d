//! The registry of worker processes: each registers when it starts, beats while it runs, and leaves when it
//! stops, so that `GET /v1/workers` lists the fleet and an `api` process knows whether any worker is alive.

use serde::Serialize;
use utoipa::ToSchema;

use super::super::error::StoreError;
use super::super::time::now_millis;
use super::JobStore;

/// What a worker process says about itself when it registers.
#[derive(Debug, Clone)]
pub struct WorkerRegistration {
    /// Unique per process run (the dispatcher's lease-owner prefix).
    pub id: String,
    /// The machine's host name.
    pub host: String,
    /// The process id on that machine.
    pub pid: u32,
    /// The denoised version it runs.
    pub version: String,
    /// The models it has loaded (it claims only their jobs).
    pub models: Vec<String>,
    /// Its workers' devices, one entry per worker thread (`cpu`, `cuda:0`, …).
    pub devices: Vec<String>,
}

/// A registered worker process, as `GET /v1/workers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct WorkerInfo {
    /// Unique per process run; the prefix of the `lease_owner` of the jobs it runs.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// denoised version.
    pub version: String,
    /// Models it serves.
    pub models: Vec<String>,
    /// Its worker threads' devices.
    pub devices: Vec<String>,
    /// When it started (unix milliseconds).
    pub started_at: i64,
    /// Its last heartbeat (unix milliseconds).
    pub heartbeat_at: i64,
    /// Whether its last heartbeat is recent enough to count it alive.
    pub alive: bool,
}

impl JobStore {
    /// Registers (or re-registers) a worker process, with a heartbeat now.
    pub async fn register_worker(&self, worker: &WorkerRegistration) -> Result<(), StoreError> {
        let now = now_millis();
        let models = serde_json::Value::from(worker.models.clone()).to_string();
        let devices = serde_json::Value::from(worker.devices.clone()).to_string();
        on_write!(self, pool, _d => sqlx::query(
            "INSERT INTO workers (id, host, pid, version, models, devices, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&worker.id)
        .bind(&worker.host)
        .bind(i64::from(worker.pid))
        .bind(&worker.version)
        .bind(models)
        .bind(devices)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Records that worker `id` is alive now; `false` if it is not registered (then register again).
    pub async fn worker_heartbeat(&self, id: &str) -> Result<bool, StoreError> {
        let result = on_write!(self, pool, _d => sqlx::query("UPDATE workers SET heartbeat_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now_millis())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(result == 1)
    }

    /// Removes a worker that stops cleanly, and any worker silent for longer than `forget_after_millis`
    /// (crashed processes), so the list does not grow without end.
    pub async fn remove_worker(&self, id: &str, forget_after_millis: i64) -> Result<(), StoreError> {
        on_write!(self, pool, _d => sqlx::query("DELETE FROM workers WHERE id = $1 OR heartbeat_at < $2")
            .bind(id)
            .bind(now_millis().saturating_sub(forget_after_millis))
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Every registered worker, oldest first; those that beat within `alive_millis` count as alive.
    pub async fn workers(&self, alive_millis: i64) -> Result<Vec<WorkerInfo>, StoreError> {
        type Row = (String, String, i64, String, String, String, i64, i64);
        let rows: Vec<Row> = on_read!(self, pool, _d => sqlx::query_as(
            "SELECT id, host, pid, version, models, devices, started_at, heartbeat_at FROM workers \
             ORDER BY started_at, id",
        )
        .fetch_all(pool)
        .await?);
        let cutoff = now_millis().saturating_sub(alive_millis);
        rows.into_iter()
            .map(|(id, host, pid, version, models, devices, started_at, heartbeat_at)| {
                let list = |column: &str, text: &str| {
                    serde_json::from_str::<Vec<String>>(text)
                        .map_err(|e| StoreError::corrupt("workers", format!("{column} of {id}: {e}")))
                };
                Ok(WorkerInfo {
                    pid: u32::try_from(pid).map_err(|_| StoreError::corrupt("workers", format!("pid {pid}")))?,
                    models: list("models", &models)?,
                    devices: list("devices", &devices)?,
                    alive: heartbeat_at >= cutoff,
                    id,
                    host,
                    version,
                    started_at,
                    heartbeat_at,
                })
            })
            .collect()
    }
}
