//! What ties the processes of a deployment together through their shared database: the worker registry
//! (each worker process registers and beats; an `api` process is ready while any worker is alive), and on
//! PostgreSQL the notifications (`LISTEN/NOTIFY`) that wake idle workers and stop cancelled jobs at once, and
//! the event relay that gives every API process every job's events.
//!
//! The event relay has two halves. The writer takes what this process publishes (its bus's outbox: `queued`
//! from an API process; `started`, progress with previews and the end from a worker process) and appends it
//! to the `job_events` table in batches. The reader follows that table in id order — woken by `NOTIFY`,
//! polling as a safety net — and delivers each event to this process's bus with its fleet-wide id. Events
//! are kept [`EVENTS_KEPT`] and a starting process replays the last [`REPLAY`] of them, so a client can
//! resume with `Last-Event-ID` on any API process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use uuid::Uuid;

use crate::jobs::bus::{EventKind, EventOwner, JobEvent};
use crate::jobs::progress::StopReason;
use crate::jobs::store::{postgres, StoredEvent, WorkerRegistration};
use crate::jobs::time::now_millis;
use crate::jobs::{JobStore, Jobs, StoreError};

/// A worker process counts as alive while its last heartbeat is at most this old.
pub const ALIVE_MILLIS: i64 = 15_000;
/// How often a worker process beats.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A worker silent this long is dropped from the registry.
const FORGET_MILLIS: i64 = 24 * 3600 * 1000;
/// How often an `api` process re-reads whether any worker is alive.
const READINESS_POLL: Duration = Duration::from_secs(2);
/// How long events stay in the shared log.
pub const EVENTS_KEPT: Duration = Duration::from_secs(600);
/// How much of the log a starting process replays.
pub const REPLAY: Duration = Duration::from_secs(120);
/// How often the relay reads the log without a notification (a lost notification delays events by at most
/// this), and how often listeners retry a lost connection.
const SAFETY_POLL: Duration = Duration::from_secs(1);
/// Events read or written per statement at most.
const BATCH: usize = 256;

/// The fleet's background tasks of one process; they end when the server's stop signal turns true.
#[derive(Debug, Default)]
pub struct Fleet {
    tasks: Vec<JoinHandle<()>>,
}

/// What a process takes part in.
#[derive(Debug)]
pub struct FleetRole {
    /// Registers this process as a worker process (its models and devices).
    pub worker: Option<WorkerRegistration>,
    /// Serves the API: relays the fleet's events to its followers.
    pub serves_api: bool,
    /// Serves the API without workers: its readiness is "some worker process is alive".
    pub ready_when_workers_alive: Option<Arc<AtomicBool>>,
}

impl Fleet {
    /// Starts the tasks `role` needs on `jobs`' database.
    pub fn start(jobs: &Jobs, role: FleetRole, stop: watch::Receiver<bool>) -> Self {
        let mut tasks = Vec::new();
        let store = jobs.store().clone();
        let runs_jobs = role.worker.is_some();
        if let Some(registration) = role.worker {
            tasks.push(tokio::spawn(heartbeat(store.clone(), registration, stop.clone())));
        }
        if let Some(ready) = role.ready_when_workers_alive {
            tasks.push(tokio::spawn(watch_workers(store.clone(), ready, stop.clone())));
        }
        if store.postgres().is_some() {
            if runs_jobs {
                tasks.push(tokio::spawn(listen_for_work(jobs.clone(), stop.clone())));
            }
            if let Some(outbox) = jobs.bus().take_outbox() {
                tasks.push(tokio::spawn(write_events(store.clone(), outbox, stop.clone())));
            }
            if role.serves_api {
                tasks.push(tokio::spawn(read_events(jobs.clone(), stop)));
            }
        }
        Self { tasks }
    }

    /// Waits for the tasks to end (after the stop signal): the writer flushes what is left in the outbox and
    /// a worker process leaves the registry.
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Registers the worker process, beats every [`HEARTBEAT`] (registering again if the row went missing) and
/// leaves the registry at shutdown.
async fn heartbeat(store: JobStore, registration: WorkerRegistration, mut stop: watch::Receiver<bool>) {
    let mut registered = false;
    loop {
        let beat = if registered { store.worker_heartbeat(&registration.id).await } else { Ok(false) };
        match beat {
            Ok(true) => {}
            Ok(false) => match store.register_worker(&registration).await {
                Ok(()) => {
                    if !registered {
                        info!(id = %registration.id, models = ?registration.models, "registered as a worker process");
                    }
                    registered = true;
                }
                Err(e) => warn!(error = %e, "registering the worker process failed; retrying"),
            },
            Err(e) => warn!(error = %e, "worker heartbeat failed"),
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    if let Err(e) = store.remove_worker(&registration.id, FORGET_MILLIS).await {
        warn!(error = %e, "leaving the worker registry failed");
    }
}

/// Keeps an `api` process's readiness equal to "some worker process is alive".
async fn watch_workers(store: JobStore, ready: Arc<AtomicBool>, mut stop: watch::Receiver<bool>) {
    loop {
        let alive = match store.workers(ALIVE_MILLIS).await {
            Ok(workers) => workers.iter().any(|w| w.alive),
            Err(e) => {
                warn!(error = %e, "reading the worker registry failed");
                false
            }
        };
        if *stop.borrow() {
            break;
        }
        ready.store(alive, Ordering::SeqCst);
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(READINESS_POLL) => {}
        }
    }
    ready.store(false, Ordering::SeqCst);
}

/// Wakes the dispatcher when a job becomes claimable anywhere in the fleet, and stops a job running here
/// when a client cancels or deletes it through another process.
async fn listen_for_work(jobs: Jobs, mut stop: watch::Receiver<bool>) {
    let Some(pool) = jobs.store().postgres().cloned() else { return };
    loop {
        let mut listener = match postgres::listen(&pool, &[postgres::QUEUE_CHANNEL, postgres::STOP_CHANNEL]).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(error = %e, "listening for queue notifications failed; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(SAFETY_POLL) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                message = listener.recv() => match message {
                    Ok(note) if note.channel() == postgres::STOP_CHANNEL => {
                        if let Ok(id) = Uuid::parse_str(note.payload()) {
                            jobs.progress().stop(id, StopReason::Client);
                        }
                    }
                    Ok(_) => jobs.wake().notify_one(),
                    Err(e) => {
                        warn!(error = %e, "the notification connection failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// Appends what this process publishes to the shared log, in batches; at shutdown, what is left.
async fn write_events(store: JobStore, mut outbox: mpsc::UnboundedReceiver<JobEvent>, mut stop: watch::Receiver<bool>) {
    loop {
        let first = tokio::select! {
            event = outbox.recv() => match event { Some(event) => event, None => return },
            _ = stop.changed() => {
                // A short grace for the last events of jobs handed back or finished at shutdown.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut rest = Vec::new();
                while let Ok(event) = outbox.try_recv() {
                    rest.push(event);
                }
                for chunk in rest.chunks(BATCH) {
                    append(&store, chunk).await;
                }
                return;
            }
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match outbox.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        append(&store, &batch).await;
    }
}

/// Writes one batch, retrying a failing database a few times. Events that still cannot be written are
/// dropped with a warning: followers also read each job's state from its row, so they still see it end.
async fn append(store: &JobStore, batch: &[JobEvent]) {
    let rows: Vec<_> = batch
        .iter()
        .filter_map(|event| {
            let owner = match &event.owner {
                EventOwner::Known(owner) => Some(owner.as_deref().map(str::to_string)),
                EventOwner::Unknown => None,
            };
            serde_json::to_string(&event.kind).ok().map(|body| (event.job_id, owner, body))
        })
        .collect();
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match store.append_events(&rows).await {
            Ok(()) => return,
            Err(e) if attempt == 5 => warn!(error = %e, events = rows.len(), "dropping events the log refused"),
            Err(e) => warn!(error = %e, attempt, "writing events failed; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

/// Follows the shared log and delivers its events to this process's bus; prunes old events now and then.
async fn read_events(jobs: Jobs, mut stop: watch::Receiver<bool>) {
    let store = jobs.store().clone();
    let Some(pool) = store.postgres().cloned() else { return };
    let replay_from = now_millis().saturating_sub(REPLAY.as_millis() as i64);
    let mut last = loop {
        match store.last_event_before(replay_from).await {
            Ok(id) => break id,
            Err(e) => warn!(error = %e, "reading the event log failed; retrying"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(SAFETY_POLL) => {}
        }
    };
    let mut listener = postgres::listen(&pool, &[postgres::EVENTS_CHANNEL]).await.ok();
    let mut pruned_at = std::time::Instant::now();
    loop {
        match catch_up(&jobs, &mut last).await {
            Ok(()) => {}
            Err(e) => warn!(error = %e, "reading the event log failed"),
        }
        if pruned_at.elapsed() > EVENTS_KEPT / 10 {
            pruned_at = std::time::Instant::now();
            let cutoff = now_millis().saturating_sub(EVENTS_KEPT.as_millis() as i64);
            if let Err(e) = store.prune_events(cutoff).await {
                warn!(error = %e, "pruning the event log failed");
            }
        }
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            ok = notified => if !ok {
                listener = postgres::listen(&pool, &[postgres::EVENTS_CHANNEL]).await.ok();
            },
            _ = tokio::time::sleep(SAFETY_POLL) => {
                if listener.is_none() {
                    listener = postgres::listen(&pool, &[postgres::EVENTS_CHANNEL]).await.ok();
                }
            }
        }
    }
}

/// Delivers every event after `last`, moving `last` along.
async fn catch_up(jobs: &Jobs, last: &mut i64) -> Result<(), StoreError> {
    loop {
        let events = jobs.store().events_after(*last, BATCH as u32).await?;
        let full = events.len() == BATCH;
        for stored in events {
            *last = stored.id;
            if let Some(event) = decode(stored) {
                jobs.bus().deliver(event);
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// An event of the log as the bus carries it; `None` (logged) for a body this release cannot read.
fn decode(stored: StoredEvent) -> Option<JobEvent> {
    let kind: EventKind = match serde_json::from_str(&stored.body) {
        Ok(kind) => kind,
        Err(e) => {
            warn!(id = stored.id, error = %e, "skipping an event this release cannot read");
            return None;
        }
    };
    let owner = match stored.owner {
        Some(owner) => EventOwner::Known(owner.map(Arc::from)),
        None => EventOwner::Unknown,
    };
    Some(JobEvent { id: u64::try_from(stored.id).ok()?, job_id: stored.job_id, owner, kind })
}
