//! Jobs stored by an earlier release stay readable: `tests/fixtures/stored-rows/` holds a database (with the
//! edit inputs and output images) written by release 0.1, before job parameters were typed
//! (`make_stored_rows.py` says how it was made). This release must show those jobs exactly as that release
//! answered for them, and run them again — a text-to-image job with client latents, an img2img edit and
//! an inpaint edit — to the same pictures.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{extra_models, fixture, wait_for_job, TestServer};
use serde_json::Value;

/// The fixture's data folder copied into a fresh temporary folder (tests never write into the fixture).
fn copy_of_fixture() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture("stored-rows/data"), dir.path());
    dir
}

fn recorded() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("stored-rows/jobs.json")).unwrap()).unwrap()
}

async fn start(dir: tempfile::TempDir) -> TestServer {
    TestServer::start_in(dir, &extra_models(&["tiny-sd-inpaint"])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_the_previous_release_read_back_as_it_showed_them() {
    let server = start(copy_of_fixture()).await;
    let client = reqwest::Client::new();
    for before in recorded()["jobs"].as_array().unwrap() {
        let id = before["id"].as_str().unwrap();
        let now: Value = client.get(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().json().await.unwrap();
        for field in ["status", "kind", "model", "params", "images", "attempts", "created_at", "finished_at"] {
            assert_eq!(now[field], before[field], "{field} of {id}");
        }
    }
    let listed: Value = client.get(server.url("/v1/jobs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_the_previous_release_run_again_to_the_same_pictures() {
    let dir = copy_of_fixture();
    let old_pictures: Vec<(String, image::RgbImage)> = recorded()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| {
            let id = job["id"].as_str().unwrap().to_string();
            let format = job["images"][0]["format"].as_str().unwrap();
            let extension = if format == "jpeg" { "jpg" } else { format };
            let path = dir.path().join(format!("images/{id}/0.{extension}"));
            (id, image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8())
        })
        .collect();
    // Back to the queue, as if the previous release had stopped before running them.
    let database = format!("sqlite://{}", dir.path().join("denoised.db").display());
    let store = sqlx::SqlitePool::connect(&database).await.unwrap();
    sqlx::query("DELETE FROM images").execute(&store).await.unwrap();
    sqlx::query(
        "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL, \
         finished_at = NULL, attempts = 0",
    )
    .execute(&store)
    .await
    .unwrap();
    store.close().await;
    std::fs::remove_dir_all(dir.path().join("images")).unwrap();

    let server = start(dir).await;
    let client = reqwest::Client::new();
    for (id, old) in old_pictures {
        let job = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let bytes =
            client.get(server.url(&format!("/v1/jobs/{id}/images/0"))).send().await.unwrap().bytes().await.unwrap();
        let new = image::load_from_memory(&bytes).unwrap().to_rgb8();
        let worst = common::max_difference(&[new], &common::as_reference(&old));
        assert!(worst <= 2.0 / 255.0, "job {id} ({}) drew another picture: {worst}", job["kind"]);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_row_this_release_cannot_read_is_shown_and_failed_not_lost() {
    let dir = copy_of_fixture();
    let id = recorded()["jobs"][0]["id"].as_str().unwrap().to_string();
    let database = format!("sqlite://{}", dir.path().join("denoised.db").display());
    let store = sqlx::SqlitePool::connect(&database).await.unwrap();
    // A kind from a newer release, back in the queue.
    sqlx::query(
        "UPDATE jobs SET kind = 'upscale', params = '{\"factor\": 4}', status = 'queued', lease_owner = NULL, \
         lease_expires_at = NULL, started_at = NULL, finished_at = NULL, attempts = 0 WHERE id = ?1",
    )
    .bind(&id)
    .execute(&store)
    .await
    .unwrap();
    sqlx::query("DELETE FROM images WHERE job_id = ?1").bind(&id).execute(&store).await.unwrap();
    store.close().await;

    let server = start(dir).await;
    let client = reqwest::Client::new();
    let job = wait_for_job(&client, &server.url(&format!("/v1/jobs/{id}")), Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "invalid_params");
    assert_eq!(job["kind"], "upscale");
    assert_eq!(job["params"]["factor"], 4, "the stored parameters are shown as they are");
    let listed: Value = client.get(server.url("/v1/jobs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 3, "the other jobs still list");
    server.shutdown().await;
}
