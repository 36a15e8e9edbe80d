//! The webhook outbox on both backends: each terminal transition queues its job's delivery in the same
//! transaction (and a fenced-out one queues nothing), `started` waits in front of the terminal event, claims
//! are leased and fenced, retries keep the delivery's id, and two senders never take the same delivery.

use super::*;

/// A job whose webhook goes to a test URL, with `started` when asked.
fn hooked(started: bool) -> NewJob {
    NewJob { webhook: Some(JobWebhook { url: "http://hooks.test/x".into(), started }), ..new_job(0) }
}

/// Every delivery of `job`: (id, event, status, attempts), oldest first.
async fn deliveries(store: &JobStore, job: Uuid) -> Vec<(String, String, String, i64)> {
    on_read!(store, pool, _d => sqlx::query_as(
        "SELECT id, event, status, attempts FROM webhook_deliveries WHERE job_id = $1 ORDER BY created_at, id",
    )
    .bind(job.to_string())
    .fetch_all(pool)
    .await
    .unwrap())
}

/// The one pending delivery `job` should have, as (id, event).
async fn pending(store: &JobStore, job: Uuid) -> Option<(String, String)> {
    let rows = deliveries(store, job).await;
    assert!(rows.len() <= 1, "{rows:?}");
    rows.into_iter().next().map(|(id, event, status, attempts)| {
        assert_eq!((status.as_str(), attempts), ("pending", 0));
        (id, event)
    })
}

/// A sender's lease a minute from now.
fn lease() -> i64 {
    time::now_millis() + 60_000
}

async fn every_terminal_transition_queues_its_delivery_with_the_job(db: TestDb) {
    let store = db.connect().await;
    let expect = |job: Uuid, event: &str| Some((message_id(job, event, None), event.to_string()));

    let completed = store.insert(hooked(false)).await.unwrap();
    assert_eq!(
        store.webhook_state(completed.id).await.unwrap(),
        Some(WebhookState {
            url: "http://hooks.test/x".into(),
            event: None,
            status: DeliveryStatus::Pending,
            attempts: 0,
            last_error: None
        })
    );
    store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(!store.complete(completed.id, "intruder", &[image(0, 1)]).await.unwrap());
    assert_eq!(pending(&store, completed.id).await, None, "a fenced-out completion queues nothing");
    assert!(store.complete(completed.id, "w", &[image(0, 1)]).await.unwrap());
    assert_eq!(pending(&store, completed.id).await, expect(completed.id, "completed"));

    let failed = store.insert(hooked(false)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(store.fail(failed.id, "w", "oom", "out of memory").await.unwrap());
    assert_eq!(pending(&store, failed.id).await, expect(failed.id, "failed"));

    let cancelled_queued = store.insert(hooked(false)).await.unwrap();
    assert!(store.cancel_queued(cancelled_queued.id).await.unwrap());
    assert_eq!(pending(&store, cancelled_queued.id).await, expect(cancelled_queued.id, "cancelled"));

    let cancelled_running = store.insert(hooked(false)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(!store.finish_cancelled(cancelled_running.id, "intruder").await.unwrap());
    assert!(store.finish_cancelled(cancelled_running.id, "w").await.unwrap());
    assert_eq!(pending(&store, cancelled_running.id).await, expect(cancelled_running.id, "cancelled"));

    let reaped = store.insert(NewJob { max_attempts: 1, ..hooked(false) }).await.unwrap();
    store.claim("dead", LEASE).await.unwrap().unwrap();
    assert_eq!(store.recover_all_running().await.unwrap().failed, vec![reaped.id]);
    assert_eq!(pending(&store, reaped.id).await, expect(reaped.id, "failed"));

    let revoked = store.insert(NewJob { owner: Some("alice".into()), ..hooked(false) }).await.unwrap();
    assert_eq!(store.cancel_queued_of("alice").await.unwrap(), 1);
    assert_eq!(pending(&store, revoked.id).await, expect(revoked.id, "cancelled"));

    let plain = store.insert(new_job(0)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(store.complete(plain.id, "w", &[]).await.unwrap());
    assert_eq!(deliveries(&store, plain.id).await, Vec::new(), "a job without a webhook queues nothing");
    assert_eq!(store.webhook_state(plain.id).await.unwrap(), None);

    let state = store.webhook_state(completed.id).await.unwrap().unwrap();
    assert_eq!((state.event.as_deref(), state.status, state.attempts), (Some("completed"), DeliveryStatus::Pending, 0));
}

async fn deliveries_are_leased_retried_under_the_same_id_and_delivered(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(hooked(false)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(store.complete(job.id, "w", &[image(0, 1)]).await.unwrap());

    let first = store.claim_deliveries("s1", lease(), 10).await.unwrap();
    assert_eq!(first.len(), 1);
    let delivery = first[0].clone();
    assert_eq!((delivery.job_id, delivery.event.as_str(), delivery.attempts), (job.id, "completed", 1));
    assert_eq!(delivery.id, message_id(job.id, "completed", None));
    assert!(store.claim_deliveries("s2", lease(), 10).await.unwrap().is_empty(), "leased to s1");
    let target = store.delivery_target(job.id).await.unwrap().unwrap();
    assert_eq!((target.url.as_str(), target.owner, target.key_secret), ("http://hooks.test/x", None, None));

    // Another sender's outcome is fenced out; the holder's retry makes it due again at the time given.
    let retry = AttemptOutcome::Retry { at: time::now_millis() - 1, error: "the receiver answered 500".into() };
    assert!(!store.record_attempt(&delivery.id, "s2", 1, &AttemptOutcome::Delivered).await.unwrap());
    assert!(store.record_attempt(&delivery.id, "s1", 1, &retry).await.unwrap());
    let state = store.webhook_state(job.id).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts), (DeliveryStatus::Pending, 1));
    assert_eq!(state.last_error.as_deref(), Some("the receiver answered 500"));

    let later = AttemptOutcome::Retry { at: time::now_millis() + 60_000, error: "timeout".into() };
    let second = store.claim_deliveries("s2", lease(), 10).await.unwrap();
    assert_eq!((second[0].id.as_str(), second[0].attempts), (delivery.id.as_str(), 2), "same id on a retry");
    assert!(store.record_attempt(&delivery.id, "s2", 2, &later).await.unwrap());
    assert!(store.claim_deliveries("s1", lease(), 10).await.unwrap().is_empty(), "not due before its time");

    // Due again: delivered on the third attempt.
    on_write!(store, pool, _d => sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = 0")
        .execute(pool)
        .await
        .unwrap()
        .rows_affected());
    let third = store.claim_deliveries("s1", lease(), 10).await.unwrap();
    assert_eq!(third[0].attempts, 3);
    assert!(store.record_attempt(&delivery.id, "s1", 3, &AttemptOutcome::Delivered).await.unwrap());
    let state = store.webhook_state(job.id).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts, state.last_error), (DeliveryStatus::Delivered, 3, None));
    assert!(store.claim_deliveries("s1", lease(), 10).await.unwrap().is_empty());
    assert!(!store.record_attempt(&delivery.id, "s1", 3, &AttemptOutcome::Delivered).await.unwrap());
}

async fn an_attempt_cut_short_is_claimed_again_when_its_lease_ends(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(hooked(false)).await.unwrap();
    assert!(store.cancel_queued(job.id).await.unwrap());
    // s1 claims with a lease that has already ended (it crashed mid-attempt).
    let first = store.claim_deliveries("s1", time::now_millis() - 1, 10).await.unwrap();
    let again = store.claim_deliveries("s2", lease(), 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id.as_str(), again[0].attempts), (first[0].id.as_str(), 2));
    // The crashed sender's late outcome is fenced out; the new holder gives up.
    assert!(!store.record_attempt(&first[0].id, "s1", 1, &AttemptOutcome::Delivered).await.unwrap());
    let gave_up = AttemptOutcome::GaveUp { error: "no answer within 10 s".into() };
    assert!(store.record_attempt(&again[0].id, "s2", 2, &gave_up).await.unwrap());
    let state = store.webhook_state(job.id).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts), (DeliveryStatus::Failed, 2));
    assert_eq!(state.last_error.as_deref(), Some("no answer within 10 s"));
    assert!(store.claim_deliveries("s3", lease(), 10).await.unwrap().is_empty(), "failed is final");
}

async fn started_goes_out_before_the_terminal_event(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(hooked(true)).await.unwrap();
    let quiet = store.insert(hooked(false)).await.unwrap();
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    store.queue_started(job.id, claimed.attempts).await.unwrap();
    store.queue_started(job.id, claimed.attempts).await.unwrap(); // a repeat changes nothing
    store.claim("w", LEASE).await.unwrap().unwrap();
    store.queue_started(quiet.id, 1).await.unwrap();
    assert_eq!(deliveries(&store, quiet.id).await, Vec::new(), "started was not asked for");
    assert!(store.complete(job.id, "w", &[]).await.unwrap());
    let rows = deliveries(&store, job.id).await;
    let events: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(events, ["started", "completed"]);
    assert_eq!(rows[0].0, message_id(job.id, "started", Some(1)));

    // While `started` is pending, the terminal event waits.
    let claimed = store.claim_deliveries("s", lease(), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].event.as_str(), claimed[0].job_attempt), ("started", Some(1)));
    assert!(store.claim_deliveries("s", lease(), 10).await.unwrap().is_empty());
    let state = store.webhook_state(job.id).await.unwrap().unwrap();
    assert_eq!(state.event.as_deref(), Some("completed"), "the view shows the terminal delivery once queued");
    assert!(store.record_attempt(&claimed[0].id, "s", 1, &AttemptOutcome::Delivered).await.unwrap());
    let terminal = store.claim_deliveries("s", lease(), 10).await.unwrap();
    assert_eq!((terminal.len(), terminal[0].event.as_str()), (1, "completed"));
}

async fn two_senders_never_claim_the_same_delivery(db: TestDb) {
    const JOBS: usize = 24;
    let store = db.connect().await;
    for _ in 0..JOBS {
        let job = store.insert(hooked(false)).await.unwrap();
        assert!(store.cancel_queued(job.id).await.unwrap());
    }
    let senders = [Arc::new(db.connect().await), Arc::new(db.connect().await)];
    let tasks: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(i, sender)| {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let claimed = sender.claim_deliveries(&format!("s{i}"), lease(), 3).await.unwrap();
                    if claimed.is_empty() {
                        return mine;
                    }
                    mine.extend(claimed.into_iter().map(|d| (d.id, d.attempts)));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let ids: HashSet<&String> = all.iter().map(|(id, _)| id).collect();
    assert_eq!((all.len(), ids.len()), (JOBS, JOBS), "each delivery claimed exactly once");
    assert!(all.iter().all(|(_, attempts)| *attempts == 1));
}

async fn deleting_a_job_drops_its_webhook_and_deliveries(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(hooked(true)).await.unwrap();
    assert!(store.cancel_queued(job.id).await.unwrap());
    assert_eq!(deliveries(&store, job.id).await.len(), 1);
    assert!(store.delete(job.id).await.unwrap());
    assert_eq!(deliveries(&store, job.id).await, Vec::new());
    assert_eq!(store.webhook_state(job.id).await.unwrap(), None);
    assert_eq!(store.delivery_target(job.id).await.unwrap(), None);
}

on_both_backends!(
    every_terminal_transition_queues_its_delivery_with_the_job,
    deliveries_are_leased_retried_under_the_same_id_and_delivered,
    an_attempt_cut_short_is_claimed_again_when_its_lease_ends,
    started_goes_out_before_the_terminal_event,
    two_senders_never_claim_the_same_delivery,
    deleting_a_job_drops_its_webhook_and_deliveries,
);
