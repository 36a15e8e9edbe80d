//! The delivery task: every process that has the job store runs one. It claims due deliveries from the
//! outbox under a lease, sends each (signed, with [`Deliverer`]), and records the outcome: delivered,
//! retried later with backoff, or given up. Several processes on one database share the work (claims skip
//! rows another process holds); an attempt cut short by a crash is due again when its lease ends, with the
//! same `webhook-id`, so deliveries are at least once.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::backoff::unit_random;
use super::client::{truncate, AttemptError, Deliverer};
use super::{payload, Secret, WebhookSettings};
use crate::jobs::store::{AttemptOutcome, ClaimedDelivery};
use crate::jobs::time::now_millis;
use crate::jobs::JobStore;

/// How often the outbox is checked for due deliveries.
const POLL: Duration = Duration::from_millis(500);

/// Attempts in flight at once per process (one slow receiver does not hold up the others).
const IN_FLIGHT: usize = 16;

/// Lease beyond the attempt's own timeout: room to record the outcome before another process may retry.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// What every attempt of this process needs.
#[derive(Clone)]
struct Context {
    store: JobStore,
    deliverer: Deliverer,
    settings: WebhookSettings,
    owner: String,
}

/// The delivery task of one process, built (its HTTP client too) but not started.
pub struct Sender {
    context: Context,
}

impl Sender {
    /// The task of process `owner` (unique per process run: it fences the attempts) on `store`'s outbox.
    pub fn new(store: JobStore, settings: WebhookSettings, owner: String) -> Result<Self, reqwest::Error> {
        let deliverer = Deliverer::new(settings.timeout, settings.allow_private_targets)?;
        Ok(Self { context: Context { store, deliverer, settings, owner } })
    }

    /// Starts sending; the task stops claiming when `stop` turns true and ends once its attempts in flight
    /// have ended (each within `[webhooks] timeout_seconds`).
    pub fn spawn(self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(run(self.context, stop))
    }
}

async fn run(context: Context, mut stop: watch::Receiver<bool>) {
    let mut in_flight = JoinSet::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let free = IN_FLIGHT.saturating_sub(in_flight.len());
        if free > 0 {
            let lease_until = now_millis().saturating_add(
                i64::try_from((context.settings.timeout + LEASE_MARGIN).as_millis()).unwrap_or(i64::MAX),
            );
            match context.store.claim_deliveries(&context.owner, lease_until, free as u32).await {
                Ok(claimed) => {
                    for delivery in claimed {
                        in_flight.spawn(attempt(context.clone(), delivery));
                    }
                }
                Err(e) => warn!(error = %e, "reading the webhook outbox failed"),
            }
        }
        tokio::select! {
            changed = stop.changed() => if changed.is_err() {
                break; // the server is gone
            },
            _ = tokio::time::sleep(POLL) => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// One attempt of `delivery`, recorded.
async fn attempt(context: Context, delivery: ClaimedDelivery) {
    let outcome = match send(&context, &delivery).await {
        Ok(()) => AttemptOutcome::Delivered,
        Err(Failure::Final(error)) => AttemptOutcome::GaveUp { error },
        Err(Failure::Retryable(AttemptError(error))) => {
            let elapsed = Duration::from_millis(now_millis().saturating_sub(delivery.created_at).max(0) as u64);
            match context.settings.retry.next(delivery.attempts, elapsed, unit_random()) {
                Some(wait) => AttemptOutcome::Retry {
                    at: now_millis().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
                    error,
                },
                None => AttemptOutcome::GaveUp { error },
            }
        }
    };
    let (id, job, event, attempts) = (&delivery.id, delivery.job_id, &delivery.event, delivery.attempts);
    match &outcome {
        AttemptOutcome::Delivered => info!(%job, id, event, attempts, "webhook delivered"),
        AttemptOutcome::Retry { error, at } => {
            debug!(%job, id, event, attempts, error, retry_in_ms = at - now_millis(), "webhook attempt failed")
        }
        AttemptOutcome::GaveUp { error } => warn!(%job, id, event, attempts, error, "webhook delivery gave up"),
    }
    let label = match outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Retry { .. } => "retry",
        AttemptOutcome::GaveUp { .. } => "failed",
    };
    metrics::counter!("denoised_webhook_attempts_total", "outcome" => label).increment(1);
    match context.store.record_attempt(id, &context.owner, attempts, &outcome).await {
        Ok(true) => {}
        Ok(false) => debug!(%job, id, "webhook attempt not recorded: the row was deleted or its lease taken over"),
        Err(e) => warn!(%job, id, error = %e, "recording a webhook attempt failed; it will be retried"),
    }
}

/// Why an attempt did not deliver.
enum Failure {
    /// Nothing to retry: the delivery cannot be made (no job, no secret, an unreadable row).
    Final(String),
    /// The receiver did not take it; another attempt may.
    Retryable(AttemptError),
}

/// Builds, signs and sends `delivery`.
async fn send(context: &Context, delivery: &ClaimedDelivery) -> Result<(), Failure> {
    let store = &context.store;
    let database = |e: crate::jobs::StoreError| Failure::Retryable(AttemptError(format!("database: {e}")));
    let target = store.delivery_target(delivery.job_id).await.map_err(database)?;
    let job = store.get(delivery.job_id).await.map_err(database)?;
    let (Some(target), Some(job)) = (target, job) else {
        return Err(Failure::Final("the job was deleted".into()));
    };
    let secret = match &target.owner {
        Some(_) => match target.key_secret.as_deref().map(Secret::parse) {
            Some(Ok(secret)) => secret,
            Some(Err(e)) => return Err(Failure::Final(format!("the key's webhook secret is unusable: {e}"))),
            None => {
                return Err(Failure::Final(
                    "the job's API key has no webhook secret (`denoised keys rotate-webhook-secret` makes one)".into(),
                ))
            }
        },
        None => match &context.settings.secret {
            Some(secret) => secret.clone(),
            None => return Err(Failure::Final("no [webhooks] secret is configured to sign it".into())),
        },
    };
    let images = if delivery.event == "completed" { store.images(job.id).await.map_err(database)? } else { Vec::new() };
    let body = payload::body(delivery, &job, &images, context.settings.public_url.as_deref())
        .map_err(|e| Failure::Final(e.to_string()))?;
    let timestamp = now_millis().div_euclid(1000);
    let signature = secret.sign(&delivery.id, timestamp, &body);
    context
        .deliverer
        .attempt(&target.url, &delivery.id, timestamp, &signature, body)
        .await
        .map_err(|AttemptError(e)| Failure::Retryable(AttemptError(truncate(e))))
}
