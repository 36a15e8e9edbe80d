//! Following jobs: the one implementation of "follow a job to its end" that the event streams, the OpenAI
//! routes' blocking answers and their image streams all use.
//!
//! A follow first yields what is already known (replaying what a reconnecting client missed after its
//! `Last-Event-ID`), then the progress bus; the store is the source of truth for jobs run by another process
//! (their end, their queue position, their start). It ends after a terminal event, when the server shuts
//! down, when the caller's `until` future resolves (e.g. its key was revoked), or when it is dropped — a
//! dropped [`Follow`] closes its channel and the task behind it releases the bus subscription at once. A slow
//! reader skips intermediate progress, never a lifecycle event.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use super::bus::{
    AllJobsFollower, CompletedEvent, EventKind, EventOwner, ImageInfo, JobEvent, MaskInfo, Snapshot, StartedEvent,
};
use super::service::{Jobs, JobsError};
use super::{Job, JobStatus};
use crate::auth::Principal;

/// How often a follow re-reads a queued job's position (and notices jobs finished by another process).
const POLL: Duration = Duration::from_millis(500);

/// The all-jobs stream fell so far behind that lifecycle events were lost; the client should reconnect with
/// `Last-Event-ID` to have them replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream fell {missed} lifecycle events behind; reconnect with Last-Event-ID")]
pub struct Lagged {
    /// Events missed.
    pub missed: u64,
}

/// A stream of events (see the module documentation for when it ends).
#[derive(Debug)]
pub struct Follow {
    rx: mpsc::Receiver<Result<JobEvent, Lagged>>,
}

impl Follow {
    /// The next event, or `None` once the follow has ended.
    pub async fn next(&mut self) -> Option<Result<JobEvent, Lagged>> {
        self.rx.recv().await
    }
}

impl tokio_stream::Stream for Follow {
    type Item = Result<JobEvent, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

type Sender = mpsc::Sender<Result<JobEvent, Lagged>>;

/// A future that never resolves: for follows that only end with their job or the server.
pub fn forever() -> impl Future<Output = ()> + Send + 'static {
    std::future::pending()
}

impl Jobs {
    /// Follows `who`'s job `id`, starting after event `after` (0: from the start).
    pub async fn follow(
        &self,
        who: &Principal,
        id: Uuid,
        after: u64,
        until: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Follow, JobsError> {
        // Subscribe before reading the job, so nothing falls in between.
        let rx = self.bus.subscribe(id);
        let job = match self.find(who, id).await {
            Ok(job) => job,
            Err(e) => {
                drop(rx);
                self.bus.release(id);
                return Err(e);
            }
        };
        let (tx, out) = mpsc::channel(16);
        let follower = OneJob { jobs: self.clone(), id, rx, last: after, position: None, started_seen: false };
        drop(job);
        tokio::spawn(follower.run(tx, until));
        Ok(Follow { rx: out })
    }

    /// Waits up to `limit` for job `id` (already known to be `who`'s) to end and returns it as stored.
    /// Ends early with [`JobsError::ShuttingDown`] at shutdown, or [`JobsError::Deleted`].
    pub async fn wait(&self, who: &Principal, id: Uuid, limit: Duration) -> Result<Job, JobsError> {
        let mut follow = self.follow(who, id, 0, forever()).await?;
        let drained = tokio::time::timeout(limit, async { while follow.next().await.is_some() {} }).await;
        drop(follow);
        match self.store.get(id).await? {
            Some(job) if job.status.is_terminal() => Ok(job),
            None => Err(JobsError::Deleted(id)),
            Some(_) if drained.is_err() => Err(JobsError::TimedOut(id)),
            Some(_) => Err(JobsError::ShuttingDown(id)),
        }
    }

    /// Follows every job `who` may see; lifecycle events after `after` are replayed first.
    pub fn follow_all(&self, who: Principal, after: u64, until: impl Future<Output = ()> + Send + 'static) -> Follow {
        let scope = if who.admin { None } else { Some(who.key_id.clone().unwrap_or_default()) };
        let (lifecycle, progress, counted) = self.bus.subscribe_all(scope.as_deref());
        let replay = if after > 0 { self.bus.replay_after(after) } else { Vec::new() };
        let (tx, out) = mpsc::channel(64);
        let follower =
            AllJobs { jobs: self.clone(), visibility: Visibility::new(who), lifecycle, progress, _counted: counted };
        tokio::spawn(follower.run(replay, tx, until));
        Follow { rx: out }
    }

    /// The terminal event of a job that the database says has ended.
    async fn terminal_from_store(&self, job: &Job) -> Option<EventKind> {
        match job.status {
            JobStatus::Succeeded => {
                let images = self.store.images(job.id).await.ok()?;
                let mask = super::has_computed_mask(&job.params).then(|| MaskInfo::of(job.id));
                Some(EventKind::Completed(CompletedEvent {
                    images: images.iter().map(ImageInfo::from).collect(),
                    mask,
                }))
            }
            JobStatus::Failed => Some(EventKind::failed(
                job.error_code.clone().unwrap_or_default(),
                job.error_message.clone().unwrap_or_default(),
            )),
            JobStatus::Cancelled => Some(EventKind::CANCELLED),
            JobStatus::Queued | JobStatus::Running => None,
        }
    }
}

/// What a task following one job carries.
struct OneJob {
    jobs: Jobs,
    id: Uuid,
    rx: watch::Receiver<Snapshot>,
    last: u64,
    position: Option<u64>,
    started_seen: bool,
}

/// Whether the follow goes on after a step.
enum Next {
    Continue,
    End,
}

impl OneJob {
    async fn run(mut self, tx: Sender, until: impl Future<Output = ()> + Send + 'static) {
        tokio::pin!(until);
        let mut shutdown = self.jobs.shutdown.clone();
        let mut poll = tokio::time::interval(POLL);
        let (mut bus_open, mut check_store) = (true, true);
        loop {
            if let Next::End = self.send_snapshot(&tx).await {
                break;
            }
            if check_store {
                check_store = false;
                if let Next::End = self.check_store(&tx).await {
                    break;
                }
            }
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                changed = self.rx.changed(), if bus_open => if changed.is_err() {
                    // The job's entry was dropped (terminal or deleted): drain the final snapshot, then ask the store.
                    bus_open = false;
                    check_store = true;
                },
                _ = poll.tick() => check_store = true,
                _ = &mut until => break,
                _ = shutdown.changed() => break,
                _ = tx.closed() => break,
            }
        }
        let id = self.id;
        drop(self.rx);
        self.jobs.bus.release(id);
    }

    /// Sends what the bus has that the client has not seen.
    async fn send_snapshot(&mut self, tx: &Sender) -> Next {
        let snapshot = self.rx.borrow_and_update().clone();
        for event in &snapshot.lifecycle {
            match event.kind {
                EventKind::Queued(ref q) => self.position = Some(q.position),
                EventKind::Started(_) => self.started_seen = true,
                _ => {}
            }
        }
        for event in snapshot.after(self.last) {
            let terminal = event.kind.is_terminal();
            self.last = event.id;
            if tx.send(Ok(event)).await.is_err() || terminal {
                return Next::End;
            }
        }
        if snapshot.is_terminal() {
            Next::End
        } else {
            Next::Continue
        }
    }

    /// Reads the job from the store: its end or deletion, a new queue position, or its start elsewhere.
    async fn check_store(&mut self, tx: &Sender) -> Next {
        let Ok(current) = self.jobs.store.get(self.id).await else { return Next::Continue };
        let Some(current) = current else {
            // Deleted: tell the follower it will not finish.
            let _ = tx.send(Ok(self.jobs.bus.event(self.id, EventKind::CANCELLED))).await;
            return Next::End;
        };
        if let Some(kind) = self.jobs.terminal_from_store(&current).await {
            if self.rx.borrow().is_terminal() {
                return Next::Continue; // the bus has it too: sent on the next pass, with its own id
            }
            let _ = tx.send(Ok(self.jobs.bus.event(self.id, kind))).await;
            return Next::End;
        }
        let kind = match current.status {
            JobStatus::Queued => {
                let now = self.jobs.queue_position(self.id).await.ok().flatten();
                if now.is_none() || now == self.position {
                    return Next::Continue;
                }
                self.position = now;
                let position = now.unwrap_or(0);
                EventKind::queued(position, self.jobs.queued_eta_ms(current.params.visible_steps(), position))
            }
            // On a shared bus the relay brings the real `started` event (with its fleet-wide id); one made here
            // from the row could arrive besides it.
            JobStatus::Running if !self.started_seen && !self.jobs.bus.is_shared() => {
                self.started_seen = true;
                EventKind::Started(StartedEvent { attempt: current.attempts })
            }
            _ => return Next::Continue,
        };
        let event = self.jobs.bus.event(self.id, kind);
        self.last = self.last.max(event.id);
        if tx.send(Ok(event)).await.is_err() {
            Next::End
        } else {
            Next::Continue
        }
    }
}

/// What a task following every job carries.
struct AllJobs {
    jobs: Jobs,
    visibility: Visibility,
    lifecycle: broadcast::Receiver<JobEvent>,
    progress: broadcast::Receiver<JobEvent>,
    /// Counts this stream among the followers that previews are rendered for.
    _counted: AllJobsFollower,
}

impl AllJobs {
    async fn run(mut self, replay: Vec<JobEvent>, tx: Sender, until: impl Future<Output = ()> + Send + 'static) {
        tokio::pin!(until);
        let mut shutdown = self.jobs.shutdown.clone();
        let mut last_lifecycle = 0;
        for event in replay {
            last_lifecycle = event.id;
            if !self.forward(&tx, event).await {
                return;
            }
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            let event = tokio::select! {
                event = self.lifecycle.recv() => match event {
                    Ok(event) if event.id <= last_lifecycle => continue,
                    Ok(event) => {
                        last_lifecycle = event.id;
                        event
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Too far behind to keep the no-loss promise: say so and end.
                        let _ = tx.send(Err(Lagged { missed })).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                event = self.progress.recv() => match event {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = &mut until => return,
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            };
            if !self.forward(&tx, event).await {
                return;
            }
        }
    }

    /// Sends `event` if the follower may see it; `false` once the follower has gone.
    async fn forward(&mut self, tx: &Sender, event: JobEvent) -> bool {
        !self.visibility.allows(&self.jobs, &event).await || tx.send(Ok(event)).await.is_ok()
    }
}

/// Which jobs an all-jobs stream may show, with each job's answer remembered (one store read per job).
struct Visibility {
    who: Principal,
    known: HashMap<Uuid, bool>,
}

impl Visibility {
    /// Remembered answers at most; past it the memory starts over.
    const MEMORY: usize = 16_384;

    fn new(who: Principal) -> Self {
        Self { who, known: HashMap::new() }
    }

    async fn allows(&mut self, jobs: &Jobs, event: &JobEvent) -> bool {
        if self.who.admin {
            return true;
        }
        if let EventOwner::Known(owner) = &event.owner {
            return self.who.can_see(owner.as_deref());
        }
        let job = event.job_id;
        if let Some(&known) = self.known.get(&job) {
            return known;
        }
        let visible = match jobs.store.get(job).await {
            Ok(Some(found)) => self.who.can_see(found.owner.as_deref()),
            // Deleted jobs and store errors show nothing (and are asked again next time).
            _ => return false,
        };
        if self.known.len() >= Self::MEMORY {
            self.known.clear();
        }
        self.known.insert(job, visible);
        visible
    }
}
