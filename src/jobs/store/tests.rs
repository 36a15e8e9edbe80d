//! Tests of every queue transition, against real SQLite files in temporary folders and, when
//! `TEST_POSTGRES_URL` names a PostgreSQL server, against a fresh schema on it: every test that is not about
//! one backend's files or settings runs on both (the `sqlite::` and `postgres::` modules at the end).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

use super::*;
use crate::jobs::params::JobParams;
use crate::jobs::time;

const LEASE: Duration = Duration::from_secs(60);

fn url(dir: &TempDir) -> String {
    // A nested folder that does not exist yet: connect must create it.
    format!("sqlite://{}", dir.path().join("data/db/jobs.db").display())
}

async fn store(dir: &TempDir) -> JobStore {
    JobStore::connect(&url(dir)).await.expect("connect")
}

/// A fresh database for one test: a SQLite file in a temporary folder, or a new schema on the PostgreSQL
/// server that `TEST_POSTGRES_URL` names.
enum TestDb {
    Sqlite(TempDir),
    Postgres(String),
}

impl TestDb {
    fn sqlite() -> Self {
        TestDb::Sqlite(tempfile::tempdir().unwrap())
    }

    /// `None` (said loudly) when `TEST_POSTGRES_URL` is unset; under `CI=true` that is a failure.
    async fn postgres() -> Option<Self> {
        match std::env::var("TEST_POSTGRES_URL") {
            Ok(base) => {
                Some(TestDb::Postgres(crate::jobs::store::postgres::fresh_schema(&base).await.expect("a fresh schema")))
            }
            Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("TEST_POSTGRES_URL is not set: the PostgreSQL store tests cannot run in CI")
            }
            Err(_) => {
                eprintln!("*** SKIPPED: TEST_POSTGRES_URL is not set, so this store test ran on SQLite only");
                None
            }
        }
    }

    /// A new connection to this database (a second one stands for a second process).
    async fn connect(&self) -> JobStore {
        let url = match self {
            TestDb::Sqlite(dir) => url(dir),
            TestDb::Postgres(url) => url.clone(),
        };
        JobStore::connect(&url).await.expect("connect")
    }
}

/// Runs each named `async fn(TestDb)` once on SQLite and once on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::TestDb::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(db) = super::TestDb::postgres().await {
                        super::$name(db).await
                    }
                }
            )*
        }
    };
}

// The webhook outbox's tests (they use the macro above).
mod webhooks;

fn params() -> JobParams {
    let stored = json!({
        "prompt": "a red fox", "negative_prompt": "", "width": 64, "height": 64, "steps": 4,
        "guidance_scale": 7.5, "scheduler": "euler", "seed": 1, "n": 1, "output_format": "png"
    });
    JobParams::decode("generate", &stored.to_string()).unwrap()
}

fn new_job(priority: i32) -> NewJob {
    NewJob {
        model: "tiny-sd".into(),
        params: params(),
        priority,
        max_attempts: 3,
        owner: None,
        input_bytes: 0,
        cost: 4,
        webhook: None,
    }
}

fn image(index: u32, seed: u64) -> NewImage {
    NewImage {
        index,
        seed,
        width: 64,
        height: 48,
        format: "png".into(),
        path: format!("images/{index}.png"),
        sha256: "ab".repeat(32),
        bytes: 1234,
    }
}

async fn lease_expires_at(store: &JobStore, id: Uuid) -> Option<i64> {
    on_read!(store, pool, _d => sqlx::query_scalar("SELECT lease_expires_at FROM jobs WHERE id = $1")
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap())
}

async fn pragma(store: &JobStore, name: &str) -> String {
    let row: (sqlx::types::JsonValue,) =
        sqlx::query_as(&format!("SELECT json_quote(({name}))")).fetch_one(sqlite_read(store)).await.unwrap();
    row.0.to_string().trim_matches('"').to_owned()
}

fn sqlite_read(store: &JobStore) -> &sqlx::SqlitePool {
    match &store.backend {
        Backend::Sqlite(pools) => &pools.read,
        Backend::Postgres(_) => panic!("a SQLite-only test"),
    }
}

fn sqlite_write(store: &JobStore) -> &sqlx::SqlitePool {
    match &store.backend {
        Backend::Sqlite(pools) => &pools.write,
        Backend::Postgres(_) => panic!("a SQLite-only test"),
    }
}

/// Sets the fair-share passes of `owners`, as if they had been served that much.
async fn set_passes(write: &sqlx::SqlitePool, owners: &[(&str, f64)]) {
    for (owner, pass) in owners {
        sqlx::query(
            "INSERT INTO fair_share (owner, pass) VALUES ($1, $2) ON CONFLICT (owner) DO UPDATE SET pass = excluded.pass",
        )
        .bind(owner)
        .bind(pass)
        .execute(write)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn connect_creates_file_and_folder_with_durable_settings() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    assert!(dir.path().join("data/db/jobs.db").is_file());
    store.ping().await.unwrap();
    assert_eq!(pragma(&store, "SELECT journal_mode FROM pragma_journal_mode").await, "wal");
    // 2 = FULL.
    assert_eq!(pragma(&store, "SELECT synchronous FROM pragma_synchronous").await, "2");
    assert_eq!(pragma(&store, "SELECT foreign_keys FROM pragma_foreign_keys").await, "1");
    assert_eq!(pragma(&store, "SELECT timeout FROM pragma_busy_timeout").await, "5000");
    // Connecting again to a migrated database is a no-op.
    store.close().await;
    JobStore::connect(&url(&dir)).await.unwrap().ping().await.unwrap();
}

#[tokio::test]
async fn in_memory_database_works() {
    let store = JobStore::connect("sqlite::memory:").await.unwrap();
    let job = store.insert(new_job(0)).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap(), Some(job));
    assert!(store.claim("w", LEASE).await.unwrap().is_some());
}

async fn insert_then_get(db: TestDb) {
    let store = db.connect().await;
    let before = time::now_millis();
    let job = store.insert(new_job(7)).await.unwrap();
    assert_eq!(job.id.get_version_num(), 7);
    assert_eq!(job.params.kind(), "generate");
    assert!(matches!(job.params, JobParams::Generate(_)));
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.model, "tiny-sd");
    assert_eq!(job.params, new_job(7).params);
    assert_eq!(job.priority, 7);
    assert_eq!((job.attempts, job.max_attempts), (0, 3));
    assert_eq!(job.lease_owner, None);
    assert_eq!((job.error_code.as_deref(), job.error_message.as_deref()), (None, None));
    assert!(job.created_at >= before && job.created_at <= time::now_millis());
    assert_eq!((job.started_at, job.finished_at), (None, None));
    assert_eq!(store.get(job.id).await.unwrap(), Some(job));
    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
}

/// Submissions sent together share SQLite commits, and each still gets its own answer: exact limits across
/// the group (the count sees the earlier members' inserts), one job for one idempotency key, and refusals
/// that leave nothing behind.
/// The SQLite claims that pick the owner first (a worker's, and a cohort companion's of one batch key within
/// a cost) take, at every step of a mixed queue (owners with and without keys, three priorities, two batch
/// keys, three costs, uneven fair-share passes), the job the one-statement order names.
#[tokio::test]
async fn the_owner_first_claim_takes_the_job_the_ordered_claim_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let write = sqlite_write(&store).clone();
    let owners = [None, Some("a"), Some("b"), Some("c"), Some("")];
    let mut state = 12345u64;
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    for _ in 0..90 {
        let owner = owners[next(owners.len() as u64) as usize].map(str::to_owned);
        let priority = next(3) as i32 - 1;
        store.insert(NewJob { owner, priority, ..new_job(0) }).await.unwrap();
    }
    sqlx::query("UPDATE jobs SET batch_key = 'k' || (rowid % 2), cost = 4 * (rowid % 3)")
        .execute(&write)
        .await
        .unwrap();
    set_passes(&write, &[("a", 3.0), ("b", 1.5), ("c", 3.0), ("", 0.5)]).await;
    let ordered = format!(
        "SELECT ({}) AS id, $1 AS a, $2 AS b, $3 AS c",
        next_job_sql(&ClaimFilter::Models(Some(r#"["tiny-sd"]"#.into())), Dialect::Sqlite)
    );
    let owner_first = format!(
        "SELECT ({}) AS id, $1 AS a, $2 AS b, $3 AS c",
        next_job_sql(&ClaimFilter::Models(None), Dialect::Sqlite)
    );
    let companion_filter = ClaimFilter::Companion { batch_key: String::new(), max_cost: 0 };
    let companion =
        format!("SELECT ({}) AS id, $1 AS a, $2 AS b, $3 AS c", next_job_sql(&companion_filter, Dialect::Sqlite));
    let ordered_companion = format!(
        "SELECT (SELECT j.id FROM jobs j LEFT JOIN fair_share f ON f.owner = COALESCE(j.owner, '') \
         WHERE j.status = 'queued' AND j.batch_key = $4 AND j.cost <= $5 {}) AS id, $1 AS a, $2 AS b, $3 AS c",
        ordered_claim!("")
    );
    let mut found = 0;
    for step in 0..91 {
        let mut named = Vec::new();
        let cases = [
            (&ordered, Some(r#"["tiny-sd"]"#.to_owned()), None),
            (&owner_first, None, None),
            (&ordered_companion, Some("k1".to_owned()), Some(4i64)),
            (&companion, Some("k1".to_owned()), Some(4i64)),
        ];
        for (sql, text, number) in cases {
            let row: (Option<String>, i64, i64, i64) = sqlx::query_as(sql)
                .bind(0i64)
                .bind(0i64)
                .bind(0i64)
                .bind(text)
                .bind(number)
                .fetch_one(&write)
                .await
                .unwrap();
            named.push(row.0);
        }
        let (expected, fast) = (named[0].clone(), named[1].clone());
        assert_eq!(fast, expected, "step {step}");
        assert_eq!(named[3], named[2], "companion, step {step}");
        found += usize::from(named[2].is_some());
        let claimed = store.claim("w", LEASE).await.unwrap().map(|job| job.id.to_string());
        assert_eq!(claimed, expected, "step {step}");
    }
    assert!(found > 20, "companions were found at {found} steps only")
}

/// The rows of `kept` (a table SQLite's triggers keep) equal those of `counted` (the same numbers from the
/// rows themselves) `when` something changed; returns them.
async fn kept_like_counted<T>(store: &JobStore, kept: &str, counted: &str, when: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin + PartialEq + std::fmt::Debug,
{
    let pool = sqlite_read(store);
    let kept: Vec<T> = sqlx::query_as(kept).fetch_all(pool).await.unwrap();
    let counted: Vec<T> = sqlx::query_as(counted).fetch_all(pool).await.unwrap();
    assert_eq!(kept, counted, "after {when}");
    kept
}

/// SQLite's per-priority queue counts (`queue_levels`, kept by triggers) match the queued rows after every
/// kind of change: submissions at several priorities, claims, a release, a cancel, a deletion, a failure,
/// start-up recovery and a group of submissions.
#[tokio::test]
async fn the_queue_counts_follow_every_change_to_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    async fn check(store: &JobStore, when: &str) {
        kept_like_counted::<(i64, i64)>(
            store,
            "SELECT priority, queued FROM queue_levels WHERE queued > 0 ORDER BY priority",
            "SELECT priority, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY priority ORDER BY priority",
            when,
        )
        .await;
    }
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(store.insert(new_job(i % 3 - 1)).await.unwrap().id);
    }
    check(&store, "inserts").await;
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    let second = store.claim("w", LEASE).await.unwrap().unwrap();
    check(&store, "claims").await;
    assert!(store.release(claimed.id, "w").await.unwrap());
    check(&store, "a release").await;
    assert!(store.cancel_queued(ids[0]).await.unwrap());
    check(&store, "a cancel").await;
    assert!(store.delete(ids[3]).await.unwrap());
    check(&store, "a deletion").await;
    assert!(store.fail(second.id, "w", "boom", "failed").await.unwrap());
    check(&store, "a failure").await;
    store.claim("w", LEASE).await.unwrap().unwrap();
    store.recover_all_running().await.unwrap();
    check(&store, "recovery").await;
    let limits = SubmitLimits { max_queued: 1000, ..SubmitLimits::NONE };
    let group = (0..20).map(|i| store.submit(new_job(i % 2), None, limits));
    for outcome in futures_util::future::join_all(group).await {
        assert!(matches!(outcome.unwrap(), Submission::Created(_)));
    }
    check(&store, "a group of submissions").await;
    let queued = store.count_by_status().await.unwrap();
    assert!(queued.queued > 0);
}

/// SQLite's per-key totals (`owner_totals`, kept by triggers) agree with counting and summing the rows, which
/// PostgreSQL still does, after every kind of change: inserts with uploads, claims, completions with images,
/// a failure, a cancel, a release, recovery, deletions of a finished and of a queued job, retention, and
/// grouped submissions; and `usage` reports them.
#[tokio::test]
async fn the_per_key_totals_follow_every_change_to_jobs_and_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    async fn check(store: &JobStore, when: &str) {
        let kept = kept_like_counted::<(String, i64, i64)>(
            store,
            "SELECT owner, outstanding, stored_bytes FROM owner_totals \
             WHERE outstanding <> 0 OR stored_bytes <> 0 ORDER BY owner",
            "SELECT * FROM (SELECT j.owner AS owner, SUM(j.status IN ('queued', 'running')) AS outstanding, \
                 SUM(j.input_bytes) + COALESCE((SELECT SUM(i.bytes) FROM images i JOIN jobs k ON k.id = i.job_id \
                                                WHERE k.owner = j.owner), 0) AS stored \
                 FROM jobs j WHERE j.owner IS NOT NULL GROUP BY j.owner) \
             WHERE outstanding <> 0 OR stored <> 0 ORDER BY owner",
            when,
        )
        .await;
        for (owner, outstanding, stored) in kept {
            let usage = store.usage(&owner).await.unwrap();
            assert_eq!(
                (usage.outstanding as i64, usage.stored_bytes as i64),
                (outstanding, stored),
                "usage of {owner}"
            );
        }
    }
    let owners = [Some("a"), Some("b"), None];
    let mut ids = Vec::new();
    for i in 0..12u64 {
        let owner = owners[(i % 3) as usize].map(str::to_owned);
        ids.push(store.insert(NewJob { owner, input_bytes: 100 * i, ..new_job(0) }).await.unwrap().id);
    }
    check(&store, "inserts").await;
    let first = store.claim("w", LEASE).await.unwrap().unwrap();
    let second = store.claim("w", LEASE).await.unwrap().unwrap();
    let third = store.claim("w", LEASE).await.unwrap().unwrap();
    check(&store, "claims").await;
    assert!(store.complete(first.id, "w", &[image(0, 1), image(1, 2)]).await.unwrap());
    check(&store, "a completion with images").await;
    assert!(store.fail(second.id, "w", "boom", "failed").await.unwrap());
    check(&store, "a failure").await;
    assert!(store.release(third.id, "w").await.unwrap());
    check(&store, "a release").await;
    assert!(store.cancel_queued(ids[4]).await.unwrap());
    check(&store, "a cancel").await;
    store.claim("w", LEASE).await.unwrap().unwrap();
    store.recover_all_running().await.unwrap();
    check(&store, "recovery").await;
    assert!(store.delete(first.id).await.unwrap());
    check(&store, "deleting a job with images").await;
    assert!(store.delete(ids[7]).await.unwrap());
    check(&store, "deleting a queued job").await;
    let done = store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(store.complete(done.id, "w", &[image(0, 3)]).await.unwrap());
    store.delete_finished_before(time::now_millis() + 1, 100).await.unwrap();
    check(&store, "retention").await;
    let limits = SubmitLimits { max_queued: 1000, max_outstanding_per_owner: 1000, ..SubmitLimits::NONE };
    let group = (0..20u64).map(|i| {
        let owner = owners[(i % 3) as usize].map(str::to_owned);
        store.submit(NewJob { owner, input_bytes: 7 * i, ..new_job(0) }, None, limits)
    });
    for outcome in futures_util::future::join_all(group).await {
        assert!(matches!(outcome.unwrap(), Submission::Created(_)));
    }
    check(&store, "a group of submissions").await;
}

/// Migration `0015` fills `owner_totals` from the jobs and images a database already holds: its filling
/// statement, run on a store whose totals were emptied, gives what counting the rows gives.
#[tokio::test]
async fn the_per_key_totals_are_filled_from_existing_rows_by_their_migration() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    for i in 0..9u64 {
        let owner = [Some("a"), Some("b"), None][(i % 3) as usize].map(str::to_owned);
        store.insert(NewJob { owner, input_bytes: 10 * i, ..new_job(0) }).await.unwrap();
    }
    for seed in 0..2 {
        let job = store.claim("w", LEASE).await.unwrap().unwrap();
        assert!(store.complete(job.id, "w", &[image(0, seed)]).await.unwrap());
    }
    let migration = include_str!("../../../migrations/sqlite/0015_owner_totals.sql");
    let start = migration.find("INSERT INTO owner_totals").unwrap();
    let filling = &migration[start..start + migration[start..].find(';').unwrap()];
    let write = sqlite_write(&store);
    sqlx::query("DELETE FROM owner_totals").execute(write).await.unwrap();
    sqlx::query(filling).execute(write).await.unwrap();
    let kept = kept_like_counted::<(String, i64, i64)>(
        &store,
        "SELECT owner, outstanding, stored_bytes FROM owner_totals ORDER BY owner",
        "SELECT j.owner, SUM(j.status IN ('queued', 'running')), \
             SUM(j.input_bytes) + COALESCE((SELECT SUM(i.bytes) FROM images i JOIN jobs k ON k.id = i.job_id \
                                            WHERE k.owner = j.owner), 0) \
         FROM jobs j WHERE j.owner IS NOT NULL GROUP BY j.owner ORDER BY j.owner",
        "the migration's filling",
    )
    .await;
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().any(|(_, _, stored)| *stored > 1234), "image bytes are counted: {kept:?}");
}

/// SQLite's index-seek test of whether an owner has queued jobs, used when an owner joins the fair-share
/// rotation, agrees with reading the rows, for owners with and without queued jobs, with and without a key
/// (`''` also stands for jobs without an owner), as the queue drains; so does the lowest pass among waiting
/// owners that a joining owner starts from.
#[tokio::test]
async fn an_owner_joining_the_rotation_is_judged_by_seeks_like_by_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let write = sqlite_write(&store).clone();
    let owners = [None, Some("a"), Some("b"), Some("")];
    for i in 0..40usize {
        let owner = owners[(i * 7 + i / 3) % owners.len()].map(str::to_owned);
        store.insert(NewJob { owner, priority: (i % 3) as i32 - 1, ..new_job(0) }).await.unwrap();
    }
    set_passes(&write, &[("a", 3.0), ("b", 1.5), ("c", 0.25), ("", 2.0)]).await;
    let by_seeks = concat!("SELECT ", super::submit::waiting_sqlite!("$1"));
    let by_rows = "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND COALESCE(owner, '') = $1)";
    let lowest_by_seeks = concat!(
        "SELECT COALESCE(MIN(f.pass), 0.0) FROM fair_share f WHERE ",
        super::submit::waiting_sqlite!("f.owner")
    );
    let lowest_by_rows = "SELECT COALESCE(MIN(f.pass), 0.0) FROM fair_share f \
        WHERE f.owner IN (SELECT COALESCE(owner, '') FROM jobs WHERE status = 'queued')";
    let mut seen = HashSet::new();
    for step in 0..41 {
        for owner in ["", "a", "b", "c"] {
            let seeks: bool = sqlx::query_scalar(by_seeks).bind(owner).fetch_one(&write).await.unwrap();
            let rows: bool = sqlx::query_scalar(by_rows).bind(owner).fetch_one(&write).await.unwrap();
            assert_eq!(seeks, rows, "owner {owner:?}, step {step}");
            seen.insert((owner, rows));
        }
        let seeks: f64 = sqlx::query_scalar(lowest_by_seeks).fetch_one(&write).await.unwrap();
        let rows: f64 = sqlx::query_scalar(lowest_by_rows).fetch_one(&write).await.unwrap();
        assert_eq!(seeks, rows, "lowest pass, step {step}");
        store.claim("w", LEASE).await.unwrap();
    }
    assert!(seen.contains(&("a", true)) && seen.contains(&("a", false)) && seen.contains(&("", true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submissions_sent_together_share_commits_with_exact_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let commits_before = sqlite_commits(&store);
    let limits = SubmitLimits { max_queued: 150, ..SubmitLimits::NONE };
    let answers = futures_util::future::join_all((0..200).map(|i| {
        let store = store.clone();
        async move {
            let key = format!("k{}", i % 40);
            let idempotency =
                (i < 120).then(|| crate::jobs::model::IdempotencyKey::from((key.as_str(), Duration::from_secs(60))));
            store.submit(new_job(0), idempotency, limits).await.unwrap()
        }
    }))
    .await;
    let commits = sqlite_commits(&store) - commits_before;
    assert!(commits < 100, "200 submissions took {commits} commits: they were not grouped");
    let created: HashSet<Uuid> =
        answers.iter().filter_map(|a| if let Submission::Created(job) = a { Some(job.id) } else { None }).collect();
    let (mut replayed, mut full) = (0, 0);
    for answer in &answers {
        match answer {
            Submission::Created(_) => {}
            Submission::Replayed(job) => {
                replayed += 1;
                assert!(created.contains(&job.id), "a replay points at a job that was created");
            }
            Submission::QueueFull { .. } => full += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 40 keys make 40 jobs for the first 120 requests, the other 80 requests make 80: 120 jobs fit, no more.
    assert_eq!((created.len(), replayed, full), (120, 80, 0));
    assert_eq!(store.count_by_status().await.unwrap().queued, 120);

    let more = futures_util::future::join_all((0..60).map(|_| {
        let store = store.clone();
        async move { store.submit(new_job(0), None, limits).await.unwrap() }
    }))
    .await;
    let fitted = more.iter().filter(|a| matches!(a, Submission::Created(_))).count();
    assert_eq!(fitted, 30, "the queue limit of 150 held across grouped submissions");
    assert!(more.iter().all(|a| matches!(a, Submission::Created(_) | Submission::QueueFull { queued: 150 })));
    assert_eq!(store.count_by_status().await.unwrap().queued, 150);
}

/// Submissions with no state of their own are inserted by one statement per group; each caller must still
/// get its own job, those with state of their own (a key's limits, a webhook) go through alone in the same
/// group, and every owner joins the fair-share rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_inserts_plain_submissions_together_and_each_caller_gets_its_own_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let commits_before = sqlite_commits(&store);
    let keyed = SubmitLimits { max_queued: 1000, max_outstanding_per_owner: 100, ..SubmitLimits::NONE };
    let plain = SubmitLimits { max_queued: 1000, ..SubmitLimits::NONE };
    let answers = futures_util::future::join_all((0..120_u64).map(|i| {
        let store = store.clone();
        async move {
            let stored = json!({
                "prompt": format!("prompt {i}"), "negative_prompt": "", "width": 64, "height": 64, "steps": 4,
                "guidance_scale": 7.5, "scheduler": "euler", "seed": i, "n": 1, "output_format": "png"
            });
            let params = JobParams::decode("generate", &stored.to_string()).unwrap();
            let owner = (i % 3 != 0).then(|| format!("owner-{}", i % 5));
            let webhook = (i % 7 == 0).then(|| JobWebhook { url: format!("http://hooks.test/{i}"), started: false });
            let new = NewJob { params, priority: (i % 2) as i32, owner, webhook, ..new_job(0) };
            let limits = if i % 4 == 0 { keyed } else { plain };
            (i, store.submit(new, None, limits).await.unwrap())
        }
    }))
    .await;
    let commits = sqlite_commits(&store) - commits_before;
    assert!(commits < 60, "120 submissions took {commits} commits: they were not grouped");
    for (i, answer) in &answers {
        let Submission::Created(job) = answer else { panic!("submission {i}: {answer:?}") };
        let stored = store.get(job.id).await.unwrap().unwrap();
        assert_eq!(stored.params.generation().map(|g| g.seed), Some(*i), "submission {i} got another caller's job");
        assert_eq!(stored.priority, (i % 2) as i32);
        assert_eq!(stored.owner, (i % 3 != 0).then(|| format!("owner-{}", i % 5)));
        let hook = store.webhook_state(job.id).await.unwrap().map(|w| w.url);
        assert_eq!(hook, (i % 7 == 0).then(|| format!("http://hooks.test/{i}")), "submission {i}'s webhook");
    }
    assert_eq!(store.count_by_status().await.unwrap().queued, 120);
    let Backend::Sqlite(pools) = &store.backend else { panic!("a SQLite store") };
    let owners: Vec<(String,)> =
        sqlx::query_as("SELECT owner FROM fair_share ORDER BY owner").fetch_all(&pools.read).await.unwrap();
    let owners: Vec<String> = owners.into_iter().map(|(o,)| o).collect();
    assert_eq!(owners, ["", "owner-0", "owner-1", "owner-2", "owner-3", "owner-4"]);

    // A key's stored-bytes quota holds inside a group: its totals are read once and counted up as its
    // submissions are accepted.
    let quota = SubmitLimits { max_queued: 1000, max_stored_bytes_per_owner: 1000, ..SubmitLimits::NONE };
    let answers = futures_util::future::join_all((0..10).map(|_| {
        let store = store.clone();
        async move { store.submit(NewJob { input_bytes: 300, ..owned_by("q") }, None, quota).await.unwrap() }
    }))
    .await;
    let created = answers.iter().filter(|a| matches!(a, Submission::Created(_))).count();
    assert_eq!(created, 3, "{answers:?}");
    assert!(answers.iter().all(|a| matches!(a, Submission::Created(_) | Submission::OverQuota { stored: 900 })));
}

/// When the many-row insert of a group fails (here a trigger refuses one row), nothing of it is kept and
/// each submission is tried alone: only the one at fault fails, every other is created exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_row_fails_alone_and_its_group_is_inserted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    sqlx::query(
        "CREATE TRIGGER poison BEFORE INSERT ON jobs WHEN NEW.model = 'poison' \
         BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
    )
    .execute(sqlite_write(&store))
    .await
    .unwrap();
    let limits = SubmitLimits { max_queued: 1000, ..SubmitLimits::NONE };
    let answers = futures_util::future::join_all((0..40).map(|i| {
        let store = store.clone();
        async move {
            let model = if i % 7 == 3 { "poison" } else { "tiny-sd" };
            (i, store.submit(NewJob { model: model.into(), ..new_job(0) }, None, limits).await)
        }
    }))
    .await;
    let mut created = HashSet::new();
    for (i, answer) in answers {
        match answer {
            Ok(Submission::Created(job)) if i % 7 != 3 => assert!(created.insert(job.id)),
            Err(error) if i % 7 == 3 => assert!(error.to_string().contains("poisoned row"), "{error}"),
            other => panic!("submission {i}: {other:?}"),
        }
    }
    assert_eq!(created.len(), 34);
    assert_eq!(store.count_by_status().await.unwrap().queued, 34, "each job inserted once");
}

/// A submission that cannot be written (here: the store was closed) is an error for its caller, not a job.
#[tokio::test]
async fn a_submission_to_a_closed_store_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    store.close().await;
    let err = store.submit(new_job(0), None, SubmitLimits::NONE).await.unwrap_err();
    assert!(matches!(err, StoreError::Group(_) | StoreError::Closed), "{err}");
    let reopened = JobStore::connect(&url(&dir)).await.unwrap();
    assert_eq!(reopened.count_by_status().await.unwrap().queued, 0, "nothing was written");
}

/// How many group commits `store`'s SQLite submission task has made.
fn sqlite_commits(store: &JobStore) -> u64 {
    match &store.backend {
        Backend::Sqlite(pools) => pools.submissions.commits(),
        Backend::Postgres(_) => panic!("a SQLite store"),
    }
}

#[tokio::test]
async fn insert_rejects_zero_max_attempts() {
    let store = JobStore::connect("sqlite::memory:").await.unwrap();
    let err = store.insert(NewJob { max_attempts: 0, ..new_job(0) }).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
}

async fn companions_share_the_batch_key_and_fit_the_batch(db: TestDb) {
    let store = db.connect().await;
    let with = |steps: u32, n: u32, scheduler: &str| {
        let stored = json!({
            "prompt": "a red fox", "negative_prompt": "", "width": 64, "height": 64, "steps": steps,
            "guidance_scale": 7.5, "scheduler": scheduler, "seed": 1, "n": n, "output_format": "png"
        });
        let params = JobParams::decode("generate", &stored.to_string()).unwrap();
        NewJob { cost: params.image_steps(), params, ..new_job(0) }
    };
    let first = store.insert(with(4, 1, "euler")).await.unwrap();
    let other_steps = store.insert(with(8, 1, "euler")).await.unwrap();
    let other_scheduler = store.insert(with(4, 1, "ddim")).await.unwrap();
    let too_many = store.insert(with(4, 3, "euler")).await.unwrap();
    let fits = store.insert(with(4, 2, "euler")).await.unwrap();
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.id, first.id);
    let key = claimed.params.batch_key(&claimed.model).unwrap();
    // Room for two more images at 4 steps: 8 image-steps.
    let companion = store.claim_companion("w", LEASE, &key, 8).await.unwrap().unwrap();
    assert_eq!(companion.id, fits.id, "the first job of the same key that fits");
    assert_eq!((companion.status, companion.lease_owner.as_deref()), (JobStatus::Running, Some("w")));
    assert_eq!(store.claim_companion("w", LEASE, &key, 8).await.unwrap(), None, "3 images do not fit");
    assert_eq!(store.claim_companion("w", LEASE, &key, 12).await.unwrap().map(|j| j.id), Some(too_many.id));
    let rest: HashSet<Uuid> =
        [store.claim("w", LEASE).await.unwrap().unwrap().id, store.claim("w", LEASE).await.unwrap().unwrap().id].into();
    assert_eq!(rest, [other_steps.id, other_scheduler.id].into());
}

async fn a_lone_owners_position_is_counted_like_the_claim_order(db: TestDb) {
    let store = db.connect().await;
    let mut ids = Vec::new();
    for priority in [0, 5, 0, -1, 0, 5] {
        ids.push(store.insert(new_job(priority)).await.unwrap().id);
    }
    let order = store.queued_order().await.unwrap();
    for id in &ids {
        let expected = order.iter().position(|queued| queued == id).map(|p| p as u64);
        assert_eq!(store.position_among_own(*id).await.unwrap(), Some(expected), "{id}");
    }
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(store.position_among_own(claimed.id).await.unwrap(), Some(None), "not queued");
    assert_eq!(store.position_among_own(Uuid::now_v7()).await.unwrap(), Some(None), "no such job");
    // Another owner at the same priority: the rotation decides, so the count does not answer.
    store.insert(NewJob { owner: Some("someone".into()), ..new_job(0) }).await.unwrap();
    assert_eq!(store.position_among_own(ids[0]).await.unwrap(), None);
    assert!(store.position_among_own(ids[3]).await.unwrap().is_some(), "alone at priority -1");
}

async fn claim_takes_highest_priority_then_oldest(db: TestDb) {
    let store = db.connect().await;
    let low_old = store.insert(new_job(0)).await.unwrap();
    let high = store.insert(new_job(5)).await.unwrap();
    let low_new = store.insert(new_job(0)).await.unwrap();
    let negative = store.insert(new_job(-3)).await.unwrap();

    let before = time::now_millis();
    let first = store.claim("worker-a", LEASE).await.unwrap().unwrap();
    assert_eq!(first.id, high.id);
    assert_eq!(first.status, JobStatus::Running);
    assert_eq!(first.lease_owner.as_deref(), Some("worker-a"));
    assert_eq!(first.attempts, 1);
    let started = first.started_at.unwrap();
    assert!(started >= before);
    let expires = lease_expires_at(&store, first.id).await.unwrap();
    assert_eq!(expires - started, 60_000);
    assert_eq!(store.get(high.id).await.unwrap(), Some(first));

    let order: Vec<Uuid> = [
        store.claim("worker-b", LEASE).await.unwrap().unwrap().id,
        store.claim("worker-b", LEASE).await.unwrap().unwrap().id,
        store.claim("worker-b", LEASE).await.unwrap().unwrap().id,
    ]
    .into();
    assert_eq!(order, vec![low_old.id, low_new.id, negative.id]);
    assert_eq!(store.claim("worker-b", LEASE).await.unwrap(), None);
}

async fn complete_is_fenced_and_stores_images_atomically(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    let claimed = store.claim("owner", LEASE).await.unwrap().unwrap();

    // A wrong owner changes nothing.
    assert!(!store.complete(job.id, "intruder", &[image(0, 1)]).await.unwrap());
    assert_eq!(store.get(job.id).await.unwrap(), Some(claimed));
    assert!(store.images(job.id).await.unwrap().is_empty());

    // A failing image insert (duplicate index) rolls the status change back too.
    assert!(store.complete(job.id, "owner", &[image(0, 1), image(0, 2)]).await.is_err());
    assert_eq!(store.get(job.id).await.unwrap().unwrap().status, JobStatus::Running);
    assert!(store.images(job.id).await.unwrap().is_empty());

    assert!(store.complete(job.id, "owner", &[image(0, 11), image(1, 12)]).await.unwrap());
    let done = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.lease_owner.as_deref(), Some("owner"));
    assert!(done.finished_at.unwrap() >= done.started_at.unwrap());
    assert_eq!(lease_expires_at(&store, job.id).await, None);
    assert_eq!(store.images(job.id).await.unwrap().len(), 2);

    // A finished job accepts no further transition, even from its owner.
    assert!(!store.complete(job.id, "owner", &[]).await.unwrap());
    assert!(!store.fail(job.id, "owner", "x", "y").await.unwrap());
    assert!(!store.release(job.id, "owner").await.unwrap());
    assert!(!store.renew(job.id, "owner", LEASE).await.unwrap());
    assert_eq!(store.get(job.id).await.unwrap(), Some(done));
}

async fn fail_is_fenced_and_records_the_error(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    assert!(!store.fail(job.id, "owner", "oom", "out of memory").await.unwrap()); // still queued
    store.claim("owner", LEASE).await.unwrap().unwrap();
    assert!(!store.fail(job.id, "intruder", "oom", "out of memory").await.unwrap());
    assert_eq!(store.get(job.id).await.unwrap().unwrap().status, JobStatus::Running);

    assert!(store.fail(job.id, "owner", "oom", "out of memory").await.unwrap());
    let failed = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error_code.as_deref(), Some("oom"));
    assert_eq!(failed.error_message.as_deref(), Some("out of memory"));
    assert!(failed.finished_at.is_some());
    assert_eq!(lease_expires_at(&store, job.id).await, None);
    assert_eq!(store.claim("owner", LEASE).await.unwrap(), None);
}

async fn release_requeues_without_charging_an_attempt(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    let later = store.insert(new_job(0)).await.unwrap();
    store.claim("owner", LEASE).await.unwrap().unwrap();
    assert!(!store.release(job.id, "intruder").await.unwrap());

    assert!(store.release(job.id, "owner").await.unwrap());
    let released = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(released.status, JobStatus::Queued);
    assert_eq!(released.attempts, 0);
    assert_eq!(released.lease_owner, None);
    assert_eq!(released.started_at, None);
    assert_eq!(lease_expires_at(&store, job.id).await, None);
    // It keeps its place ahead of younger jobs.
    assert_eq!(store.queue_position(job.id).await.unwrap(), Some(0));
    assert_eq!(store.queue_position(later.id).await.unwrap(), Some(1));

    let again = store.claim("other", LEASE).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (job.id, 1));
    // The old owner's fence no longer matches.
    assert!(!store.release(job.id, "owner").await.unwrap());
}

async fn renew_extends_the_lease_for_its_owner_only(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    store.claim("owner", Duration::from_millis(50)).await.unwrap().unwrap();
    let first = lease_expires_at(&store, job.id).await.unwrap();

    assert!(!store.renew(job.id, "intruder", LEASE).await.unwrap());
    assert_eq!(lease_expires_at(&store, job.id).await, Some(first));

    assert!(store.renew(job.id, "owner", LEASE).await.unwrap());
    let renewed = lease_expires_at(&store, job.id).await.unwrap();
    assert!(renewed >= first + 59_000, "{first} -> {renewed}");
    // A renewed lease survives the reaper after the original lease would have ended.
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(store.recover_expired().await.unwrap().is_empty());
    assert_eq!(store.get(job.id).await.unwrap().unwrap().status, JobStatus::Running);

    assert!(!store.renew(Uuid::now_v7(), "owner", LEASE).await.unwrap());
}

async fn expired_leases_are_requeued_then_failed_past_max_attempts(db: TestDb) {
    let store = db.connect().await;
    let short = Duration::from_millis(600);
    let job = store.insert(NewJob { max_attempts: 2, ..new_job(1) }).await.unwrap();
    let healthy = store.insert(new_job(0)).await.unwrap();

    // Attempt 1: the worker dies; the healthy job's lease is still valid.
    assert_eq!(store.claim("dead-1", short).await.unwrap().unwrap().id, job.id);
    assert_eq!(store.claim("alive", LEASE).await.unwrap().unwrap().id, healthy.id);
    assert!(store.recover_expired().await.unwrap().is_empty(), "lease not yet expired");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = store.recover_expired().await.unwrap();
    assert_eq!(report.requeued, vec![job.id]);
    assert!(report.failed.is_empty());
    let requeued = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(requeued.status, JobStatus::Queued);
    assert_eq!(requeued.attempts, 1, "the lost attempt stays charged");
    assert_eq!((requeued.lease_owner, requeued.started_at), (None, None));
    assert_eq!(store.get(healthy.id).await.unwrap().unwrap().status, JobStatus::Running);

    // The zombie worker can no longer touch it.
    assert!(!store.complete(job.id, "dead-1", &[image(0, 1)]).await.unwrap());

    // Attempt 2 (the last): the worker dies again.
    let second = store.claim("dead-2", short).await.unwrap().unwrap();
    assert_eq!((second.id, second.attempts), (job.id, 2));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = store.recover_expired().await.unwrap();
    assert_eq!(report.failed, vec![job.id]);
    assert!(report.requeued.is_empty());
    let failed = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error_code.as_deref(), Some(MAX_ATTEMPTS_EXCEEDED));
    assert_eq!(failed.error_message.as_deref(), Some("lease expired on attempt 2 of 2"));
    assert!(failed.finished_at.is_some());
    assert_eq!(store.claim("w", LEASE).await.unwrap(), None);
    assert!(!store.complete(job.id, "dead-2", &[]).await.unwrap());
}

async fn recover_all_running_ignores_lease_deadlines(db: TestDb) {
    let store = db.connect().await;
    let a = store.insert(new_job(1)).await.unwrap();
    let b = store.insert(NewJob { max_attempts: 1, ..new_job(0) }).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    let report = store.recover_all_running().await.unwrap();
    assert_eq!(report.requeued, vec![a.id]);
    assert_eq!(report.failed, vec![b.id]);
}

async fn cancel_queued_and_finish_cancelled(db: TestDb) {
    let store = db.connect().await;
    let queued = store.insert(new_job(0)).await.unwrap();
    assert!(store.cancel_queued(queued.id).await.unwrap());
    assert!(!store.cancel_queued(queued.id).await.unwrap());
    let cancelled = store.get(queued.id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());
    assert_eq!(store.claim("w", LEASE).await.unwrap(), None);

    let running = store.insert(new_job(0)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(!store.cancel_queued(running.id).await.unwrap());
    assert!(!store.finish_cancelled(running.id, "intruder").await.unwrap());
    assert!(store.finish_cancelled(running.id, "w").await.unwrap());
    assert_eq!(store.get(running.id).await.unwrap().unwrap().status, JobStatus::Cancelled);
}

/// Two stores on one file stand for two processes; 50 claims race for 20 jobs.
async fn concurrent_claims_from_two_stores_hand_out_each_job_once(db: TestDb) {
    let first = db.connect().await;
    let second = db.connect().await;
    let mut inserted = HashSet::new();
    for i in 0..20 {
        inserted.insert(first.insert(new_job(i % 3)).await.unwrap().id);
    }

    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = if i % 2 == 0 { first.clone() } else { second.clone() };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let owner = format!("worker-{i}");
                let job = store.claim(&owner, LEASE).await.expect("claim");
                job.map(|job| (job.id, owner, job.lease_owner))
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        if let Some((id, owner, lease_owner)) = task.await.unwrap() {
            assert_eq!(lease_owner.as_deref(), Some(owner.as_str()));
            claimed.push((id, owner));
        }
    }

    assert_eq!(claimed.len(), 20, "every job claimed, none twice");
    let ids: HashSet<Uuid> = claimed.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, inserted);
    for (id, owner) in &claimed {
        let job = second.get(*id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.attempts, 1);
        assert_eq!(job.lease_owner.as_ref(), Some(owner));
    }
    let counts = first.count_by_status().await.unwrap();
    assert_eq!((counts.queued, counts.running), (0, 20));
}

async fn inserted_job_survives_reconnect(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(2)).await.unwrap();
    drop(store);
    let reopened = db.connect().await;
    assert_eq!(reopened.get(job.id).await.unwrap(), Some(job));
}

async fn images_round_trip_including_seeds_above_i64_max(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    let big = NewImage { bytes: u64::from(u32::MAX) * 4, ..image(1, u64::MAX) };
    // Given out of order on purpose: reads come back by index.
    let given = [big.clone(), image(2, 0), image(0, i64::MAX as u64 + 1)];
    assert!(store.complete(job.id, "w", &given).await.unwrap());

    let records = store.images(job.id).await.unwrap();
    assert_eq!(records.iter().map(|r| r.image.index).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(records[0].image.seed, 9_223_372_036_854_775_808);
    assert_eq!(records[1].image.seed, u64::MAX);
    assert_eq!(records[2].image.seed, 0);
    let one = store.image(job.id, 1).await.unwrap().unwrap();
    assert_eq!(one, records[1]);
    assert_eq!(one.image, big);
    assert_eq!(one.job_id, job.id);
    assert!(one.created_at >= job.created_at);
    assert_eq!(store.image(job.id, 3).await.unwrap(), None);
    assert!(store.images(Uuid::now_v7()).await.unwrap().is_empty());

    // The raw column holds the i64 bit pattern.
    let raw: i64 = on_read!(store, pool, _d => sqlx::query_scalar("SELECT seed FROM images WHERE job_id = $1 AND idx = 1")
        .bind(job.id.to_string())
        .fetch_one(pool)
        .await
        .unwrap());
    assert_eq!(raw, -1);

    // Deleting a job deletes its images (foreign keys are on).
    on_write!(store, pool, _d => sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(job.id.to_string())
        .execute(pool)
        .await
        .unwrap()
        .rows_affected());
    assert!(store.images(job.id).await.unwrap().is_empty());
}

async fn oversized_image_is_rejected_before_touching_the_job(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    store.claim("w", LEASE).await.unwrap().unwrap();
    let huge = NewImage { bytes: u64::MAX, ..image(0, 0) };
    let err = store.complete(job.id, "w", &[huge]).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
    assert_eq!(store.get(job.id).await.unwrap().unwrap().status, JobStatus::Running);
}

async fn queue_position_follows_claim_order(db: TestDb) {
    let store = db.connect().await;
    let a = store.insert(new_job(0)).await.unwrap();
    let b = store.insert(new_job(0)).await.unwrap();
    let urgent = store.insert(new_job(9)).await.unwrap();
    let c = store.insert(new_job(0)).await.unwrap();
    let position = |id| {
        let store = store.clone();
        async move { store.queue_position(id).await.unwrap() }
    };
    assert_eq!(position(urgent.id).await, Some(0));
    assert_eq!(position(a.id).await, Some(1));
    assert_eq!(position(b.id).await, Some(2));
    assert_eq!(position(c.id).await, Some(3));

    store.claim("w", LEASE).await.unwrap().unwrap(); // takes `urgent`
    assert_eq!(position(urgent.id).await, None, "running jobs have no position");
    assert_eq!(position(a.id).await, Some(0));
    assert_eq!(position(c.id).await, Some(2));
    assert_eq!(position(Uuid::now_v7()).await, None);
}

async fn count_by_status_counts_every_state(db: TestDb) {
    let store = db.connect().await;
    assert_eq!(store.count_by_status().await.unwrap(), StatusCounts::default());
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(store.insert(new_job(0)).await.unwrap().id);
    }
    for _ in 0..4 {
        store.claim("w", LEASE).await.unwrap().unwrap();
    }
    assert!(store.complete(ids[0], "w", &[]).await.unwrap());
    assert!(store.fail(ids[1], "w", "e", "m").await.unwrap());
    assert!(store.finish_cancelled(ids[2], "w").await.unwrap());
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(counts, StatusCounts { queued: 2, running: 1, succeeded: 1, failed: 1, cancelled: 1 });
    assert_eq!(counts.total(), 6);
    assert_eq!(counts.get(JobStatus::Queued), 2);
}

async fn list_is_newest_first_filterable_and_paginated(db: TestDb) {
    let store = db.connect().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(store.insert(new_job(0)).await.unwrap().id);
    }
    let owner = "worker-a";
    let claimed = store.claim(owner, LEASE).await.unwrap().unwrap();
    let all = store.list(None, None, None, 10).await.unwrap();
    assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), ids.iter().rev().copied().collect::<Vec<_>>());
    let page1 = store.list(None, None, None, 2).await.unwrap();
    let page2 = store.list(None, None, Some(page1[1].id), 2).await.unwrap();
    assert_eq!(page1.len(), 2);
    assert_eq!(page2[0].id, ids[2]);
    let running = store.list(Some(JobStatus::Running), None, None, 10).await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, claimed.id);
}

async fn delete_removes_the_job_and_fences_out_its_worker(db: TestDb) {
    let store = db.connect().await;
    let job = store.insert(new_job(0)).await.unwrap();
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.id, job.id);
    assert!(store.delete(job.id).await.unwrap());
    assert!(store.get(job.id).await.unwrap().is_none());
    assert!(!store.complete(job.id, "w", &[]).await.unwrap());
    assert!(!store.delete(job.id).await.unwrap());
}

async fn idempotency_keys_return_the_same_job_within_the_window(db: TestDb) {
    let store = db.connect().await;
    let (first, created) = store.insert_idempotent(new_job(0), "key-1", Duration::from_secs(3600)).await.unwrap();
    assert!(created);
    let (again, created) = store.insert_idempotent(new_job(0), "key-1", Duration::from_secs(3600)).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    let (other, created) = store.insert_idempotent(new_job(0), "key-2", Duration::from_secs(3600)).await.unwrap();
    assert!(created);
    assert_ne!(other.id, first.id);
    // Past the window the key is free again.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (fresh, created) = store.insert_idempotent(new_job(0), "key-1", Duration::from_millis(1)).await.unwrap();
    assert!(created);
    assert_ne!(fresh.id, first.id);
    // Racing requests with one key get one job.
    let store = Arc::new(store);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(
                async move { store.insert_idempotent(new_job(0), "race", Duration::from_secs(60)).await.unwrap() },
            )
        })
        .collect();
    let mut ids = HashSet::new();
    let mut creations = 0;
    for h in handles {
        let (job, created) = h.await.unwrap();
        ids.insert(job.id);
        creations += usize::from(created);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(creations, 1);
}

async fn the_queue_order_follows_claim_order(db: TestDb) {
    let store = db.connect().await;
    let low = store.insert(new_job(0)).await.unwrap();
    let high = store.insert(new_job(5)).await.unwrap();
    let later = store.insert(new_job(0)).await.unwrap();
    assert_eq!(store.queued_order().await.unwrap(), vec![high.id, low.id, later.id]);
    assert_eq!(store.queued_order().await.unwrap().len(), 3);
    let positions = crate::jobs::QueuePositions::new(store.clone());
    assert_eq!(positions.get(later.id, 1).await.unwrap(), Some(2));
    assert_eq!(store.claim("w", LEASE).await.unwrap().unwrap().id, high.id);
    assert_eq!(store.queued_order().await.unwrap().len(), 2);
    assert_eq!(store.queued_order().await.unwrap(), vec![low.id, later.id]);
    // Same generation, shortly after: the shared snapshot answers (stale by design).
    assert_eq!(positions.get(later.id, 1).await.unwrap(), Some(2));
    // A new lifecycle generation re-reads it.
    assert_eq!(positions.get(later.id, 2).await.unwrap(), Some(1));
    // A job missing from the snapshot (queued since) re-reads it too.
    let newest = store.insert(new_job(0)).await.unwrap();
    assert_eq!(positions.get(newest.id, 2).await.unwrap(), Some(2));
    // Past the maximum age, changes by other processes show without a new generation.
    assert!(store.cancel_queued(low.id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(positions.get(later.id, 2).await.unwrap(), Some(0));
}

fn owned_by(owner: &str) -> NewJob {
    NewJob { owner: Some(owner.into()), ..new_job(0) }
}

async fn owners_keep_their_own_idempotency_keys_listings_and_counts(db: TestDb) {
    let store = db.connect().await;
    let window = Duration::from_secs(3600);
    let (a, created_a) = store.insert_idempotent(owned_by("alice"), "same", window).await.unwrap();
    let (b, created_b) = store.insert_idempotent(owned_by("bob"), "same", window).await.unwrap();
    assert!(created_a && created_b, "one tenant's Idempotency-Key must not return another tenant's job");
    assert_ne!(a.id, b.id);
    let (anonymous, created) = store.insert_idempotent(new_job(0), "same", window).await.unwrap();
    assert!(created);
    assert_ne!(anonymous.id, a.id);
    let (again, created) = store.insert_idempotent(owned_by("alice"), "same", window).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, a.id);
    assert_eq!(again.owner.as_deref(), Some("alice"));

    let second = store.insert(owned_by("alice")).await.unwrap();
    let listed: Vec<_> = store.list(None, Some("alice"), None, 10).await.unwrap().iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![second.id, a.id]);
    assert_eq!(store.list(None, None, None, 10).await.unwrap().len(), 4);
}

async fn limits_are_checked_inside_the_write_and_replays_pass_them(db: TestDb) {
    let store = Arc::new(db.connect().await);
    let limits = SubmitLimits { max_queued: 100, max_outstanding_per_owner: 3, ..SubmitLimits::NONE };
    // Twenty racing submissions from one owner: exactly three get in.
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.submit(owned_by("alice"), None, limits).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    for handle in handles {
        match handle.await.unwrap() {
            Submission::Created(_) => created += 1,
            Submission::OwnerBusy { outstanding } => assert_eq!(outstanding, 3),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 3);
    // Another owner is not held back; a replay of an existing key is answered even at the limit.
    let window = Duration::from_secs(60);
    let first = store.submit(owned_by("bob"), Some(("k", window).into()), limits).await.unwrap();
    let Submission::Created(job) = first else { panic!("{first:?}") };
    for _ in 0..2 {
        store.submit(owned_by("bob"), None, limits).await.unwrap();
    }
    assert_eq!(
        store.submit(owned_by("bob"), Some(("k", window).into()), limits).await.unwrap(),
        Submission::Replayed(job)
    );
    assert!(matches!(
        store.submit(owned_by("bob"), Some(("k2", window).into()), limits).await.unwrap(),
        Submission::OwnerBusy { .. }
    ));
    // The queue-depth limit counts every owner.
    let tight = SubmitLimits { max_queued: 6, ..SubmitLimits::NONE };
    assert_eq!(store.submit(new_job(0), None, tight).await.unwrap(), Submission::QueueFull { queued: 6 });
    // Cancelling frees a slot.
    let listed = store.list(None, Some("alice"), None, 10).await.unwrap();
    assert!(store.cancel_queued(listed[0].id).await.unwrap());
    assert!(matches!(store.submit(owned_by("alice"), None, limits).await.unwrap(), Submission::Created(_)));
}

async fn retention_deletes_only_finished_jobs_older_than_the_cutoff(db: TestDb) {
    let store = db.connect().await;
    let done = store.insert(new_job(0)).await.unwrap();
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.id, done.id);
    assert!(store.complete(done.id, "w", &[image(0, 1)]).await.unwrap());
    let waiting = store.insert(new_job(0)).await.unwrap();
    assert!(store.delete_finished_before(time::now_millis() - 60_000, 10).await.unwrap().is_empty());
    let deleted = store.delete_finished_before(time::now_millis() + 1, 10).await.unwrap();
    assert_eq!(deleted.iter().map(|j| j.id).collect::<Vec<_>>(), vec![done.id]);
    assert!(store.get(done.id).await.unwrap().is_none());
    assert!(store.images(done.id).await.unwrap().is_empty());
    assert!(store.get(waiting.id).await.unwrap().is_some());
}

#[tokio::test]
async fn the_file_shrinks_after_retention_deletes_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let file = dir.path().join("data/db/jobs.db");
    let size = |store: JobStore| {
        let file = file.clone();
        async move {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(sqlite_read(&store)).await.unwrap();
            std::fs::metadata(&file).unwrap().len()
        }
    };
    let mut big = match params() {
        JobParams::Generate(p) => p,
        _ => unreachable!(),
    };
    big.prompt = "x".repeat(20_000);
    for _ in 0..200 {
        let job = store.insert(NewJob { params: JobParams::Generate(big.clone()), ..new_job(0) }).await.unwrap();
        assert!(store.cancel_queued(job.id).await.unwrap());
    }
    let full = size(store.clone()).await;
    assert!(full > 4_000_000, "{full} bytes");
    assert_eq!(store.delete_finished_before(time::now_millis() + 1, 1000).await.unwrap().len(), 200);
    store.reclaim_space().await.unwrap();
    let after = size(store.clone()).await;
    assert!(after < full / 10, "the file kept {after} of its {full} bytes");
}

async fn an_owner_past_its_storage_quota_is_refused_and_others_are_not(db: TestDb) {
    let store = db.connect().await;
    let limits = SubmitLimits { max_stored_bytes_per_owner: 10_000, ..SubmitLimits::NONE };
    let with_inputs = |owner: &str, bytes: u64| NewJob { input_bytes: bytes, ..owned_by(owner) };
    assert!(matches!(store.submit(with_inputs("alice", 6_000), None, limits).await.unwrap(), Submission::Created(_)));
    let job = match store.submit(with_inputs("alice", 3_000), None, limits).await.unwrap() {
        Submission::Created(job) => job,
        other => panic!("{other:?}"),
    };
    // Its images count too, once recorded.
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    let mut picture = image(0, 1);
    picture.bytes = 900;
    assert!(store.complete(claimed.id, "w", &[picture]).await.unwrap());
    assert_eq!(
        store.submit(with_inputs("alice", 200), None, limits).await.unwrap(),
        Submission::OverQuota { stored: 9_900 }
    );
    assert!(matches!(store.submit(with_inputs("bob", 9_000), None, limits).await.unwrap(), Submission::Created(_)));
    assert!(store.delete(job.id).await.unwrap());
    assert!(matches!(store.submit(with_inputs("alice", 200), None, limits).await.unwrap(), Submission::Created(_)));
}

/// Claims `count` jobs as worker `w`, in order (completing each so the next claim is free to pick any).
async fn claim_ids(store: &JobStore, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let job = store.claim("w", LEASE).await.unwrap().expect("a queued job");
        assert!(store.complete(job.id, "w", &[]).await.unwrap());
        ids.push(job.id);
    }
    ids
}

async fn keys_take_turns_by_weight_after_higher_priorities(db: TestDb) {
    let store = db.connect().await;
    let keys = crate::auth::KeyStore::new(&store);
    let (a, _) = keys.create("a", false).await.unwrap();
    let (b, _) = keys.create("b", false).await.unwrap();
    let heavier = crate::auth::LimitsUpdate { weight: Some(2), ..Default::default() };
    keys.set_limits("b", heavier).await.unwrap();
    let mut owner_of = std::collections::HashMap::new();
    for _ in 0..6 {
        owner_of.insert(store.insert(owned_by(&a.id)).await.unwrap().id, "a");
    }
    for _ in 0..4 {
        owner_of.insert(store.insert(owned_by(&b.id)).await.unwrap().id, "b");
    }
    owner_of.insert(store.insert(NewJob { priority: -1, ..owned_by(&b.id) }).await.unwrap().id, "b-low");
    owner_of.insert(store.insert(NewJob { priority: 1, ..owned_by(&a.id) }).await.unwrap().id, "a-high");
    let predicted = store.queued_order().await.unwrap();
    let claimed = claim_ids(&store, 12).await;
    assert_eq!(claimed, predicted, "queue positions predict the claims");
    let owners: Vec<&str> = claimed.iter().map(|id| owner_of[id]).collect();
    // High first, low last; between them b (weight 2) gets two turns for each of a's.
    assert_eq!(owners, ["a-high", "b", "b", "a", "b", "b", "a", "a", "a", "a", "a", "b-low"]);
    assert_eq!(store.claim("w", LEASE).await.unwrap(), None);
}

async fn a_key_with_one_job_waits_for_at_most_one_job_of_a_busy_key(db: TestDb) {
    let store = db.connect().await;
    for _ in 0..50 {
        store.insert(owned_by("busy")).await.unwrap();
    }
    // The busy key has been served a while before the other one shows up.
    claim_ids(&store, 10).await;
    let single = store.insert(owned_by("quiet")).await.unwrap();
    assert!(store.queue_position(single.id).await.unwrap().unwrap() <= 1);
    let next = claim_ids(&store, 2).await;
    assert!(next.contains(&single.id), "the single job is claimed within two claims");
}

async fn rate_and_daily_compute_are_counted_inside_the_submission(db: TestDb) {
    let store = db.connect().await;
    let rate = SubmitLimits { rate_per_minute: Some(2), ..SubmitLimits::NONE };
    for _ in 0..2 {
        assert!(matches!(store.submit(owned_by("alice"), None, rate).await.unwrap(), Submission::Created(_)));
    }
    match store.submit(owned_by("alice"), None, rate).await.unwrap() {
        Submission::RateLimited { state, retry_after_ms } => {
            assert_eq!((state.limit, state.remaining), (2, 0));
            assert!((29_000..=30_000).contains(&retry_after_ms), "{retry_after_ms}");
            assert!((59..=60).contains(&state.reset_seconds), "{state:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(store.submit(owned_by("bob"), None, rate).await.unwrap(), Submission::Created(_)));
    assert_eq!(store.rate_state("alice", 2).await.unwrap().remaining, 0);
    assert_eq!(store.rate_state("carol", 2).await.unwrap().remaining, 2);

    // Each job costs 4 image-steps; 10 a day leaves room for two.
    let daily = SubmitLimits { daily_image_steps: Some(10), ..SubmitLimits::NONE };
    for _ in 0..2 {
        assert!(matches!(store.submit(owned_by("dave"), None, daily).await.unwrap(), Submission::Created(_)));
    }
    match store.submit(owned_by("dave"), None, daily).await.unwrap() {
        Submission::ComputeExhausted { used, limit, retry_after_ms } => {
            assert_eq!((used, limit), (8, 10));
            assert!(retry_after_ms > 86_000_000 && retry_after_ms <= 86_400_000, "{retry_after_ms}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.usage("dave").await.unwrap().image_steps_24h, 8);
    assert_eq!(store.usage("dave").await.unwrap().outstanding, 2);
}

on_both_backends!(
    insert_then_get,
    claim_takes_highest_priority_then_oldest,
    complete_is_fenced_and_stores_images_atomically,
    fail_is_fenced_and_records_the_error,
    release_requeues_without_charging_an_attempt,
    renew_extends_the_lease_for_its_owner_only,
    expired_leases_are_requeued_then_failed_past_max_attempts,
    recover_all_running_ignores_lease_deadlines,
    cancel_queued_and_finish_cancelled,
    concurrent_claims_from_two_stores_hand_out_each_job_once,
    inserted_job_survives_reconnect,
    images_round_trip_including_seeds_above_i64_max,
    oversized_image_is_rejected_before_touching_the_job,
    queue_position_follows_claim_order,
    count_by_status_counts_every_state,
    list_is_newest_first_filterable_and_paginated,
    delete_removes_the_job_and_fences_out_its_worker,
    idempotency_keys_return_the_same_job_within_the_window,
    the_queue_order_follows_claim_order,
    owners_keep_their_own_idempotency_keys_listings_and_counts,
    limits_are_checked_inside_the_write_and_replays_pass_them,
    retention_deletes_only_finished_jobs_older_than_the_cutoff,
    an_owner_past_its_storage_quota_is_refused_and_others_are_not,
    keys_take_turns_by_weight_after_higher_priorities,
    a_key_with_one_job_waits_for_at_most_one_job_of_a_busy_key,
    rate_and_daily_compute_are_counted_inside_the_submission,
    companions_share_the_batch_key_and_fit_the_batch,
    a_lone_owners_position_is_counted_like_the_claim_order,
);
