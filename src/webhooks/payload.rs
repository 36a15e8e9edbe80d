//! The body of a delivery: the event as the SSE streams send it (`type`, `job_id` and the event's fields, see
//! [`JobEvent`]) plus `timestamp`, the RFC 3339 time of the event. A terminal event's body is built from the
//! job's stored end state, which never changes, so every attempt sends the same bytes.

use crate::jobs::bus::{
    CancelledEvent, CompletedEvent, EventKind, EventOwner, ImageInfo, JobEvent, MaskInfo, StartedEvent,
};
use crate::jobs::store::ClaimedDelivery;
use crate::jobs::time::rfc3339_from_millis;
use crate::jobs::{ImageRecord, Job, JobStatus};

/// Why a delivery has no body to send (it is given up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The row names an event this release does not know.
    #[error("unknown event `{0}`")]
    UnknownEvent(String),
    /// The job is not in the state its terminal event says (the row was written by something else).
    #[error("job is {status}, not {event}")]
    StateMismatch {
        /// The event.
        event: String,
        /// The job's status.
        status: JobStatus,
    },
    /// The JSON could not be written (a bug).
    #[error("serialising the event failed: {0}")]
    Json(String),
}

/// The JSON body of `delivery` about `job` (with its `images` for `completed`); image URLs are absolute under
/// `public_url` when it is set.
pub fn body(
    delivery: &ClaimedDelivery,
    job: &Job,
    images: &[ImageRecord],
    public_url: Option<&str>,
) -> Result<Vec<u8>, PayloadError> {
    let mismatch = || PayloadError::StateMismatch { event: delivery.event.clone(), status: job.status };
    let kind = match delivery.event.as_str() {
        "started" => EventKind::Started(StartedEvent { attempt: delivery.job_attempt.unwrap_or(job.attempts) }),
        "completed" if job.status == JobStatus::Succeeded => {
            let images = images
                .iter()
                .map(|record| {
                    let mut info = ImageInfo::from(record);
                    if let Some(base) = public_url {
                        info.url = format!("{base}{}", info.url);
                    }
                    info
                })
                .collect();
            let mask = crate::jobs::has_computed_mask(&job.params).then(|| {
                let mut mask = MaskInfo::of(job.id);
                if let Some(base) = public_url {
                    mask.url = format!("{base}{}", mask.url);
                }
                mask
            });
            EventKind::Completed(CompletedEvent { images, mask })
        }
        "failed" if job.status == JobStatus::Failed => {
            EventKind::failed(job.error_code.clone().unwrap_or_default(), job.error_message.clone().unwrap_or_default())
        }
        "cancelled" if job.status == JobStatus::Cancelled => EventKind::Cancelled(CancelledEvent {}),
        "completed" | "failed" | "cancelled" => return Err(mismatch()),
        other => return Err(PayloadError::UnknownEvent(other.to_string())),
    };
    let event = JobEvent { id: 0, job_id: job.id, owner: EventOwner::Unknown, kind };
    let mut json = serde_json::to_value(&event).map_err(|e| PayloadError::Json(e.to_string()))?;
    if let Some(object) = json.as_object_mut() {
        object.insert("timestamp".into(), rfc3339_from_millis(delivery.created_at).into());
    }
    serde_json::to_vec(&json).map_err(|e| PayloadError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobParams, NewImage};

    fn job(status: JobStatus) -> Job {
        let params = serde_json::json!({
            "prompt": "p", "negative_prompt": "", "width": 64, "height": 64, "steps": 2,
            "guidance_scale": 7.5, "scheduler": "euler", "seed": 1, "n": 1, "output_format": "png"
        });
        Job {
            id: uuid::Uuid::now_v7(),
            status,
            model: "tiny-sd".into(),
            params: JobParams::decode("generate", &params.to_string()).unwrap(),
            priority: 0,
            attempts: 2,
            max_attempts: 3,
            lease_owner: None,
            error_code: Some("inference_error".into()),
            error_message: Some("boom".into()),
            created_at: 0,
            started_at: None,
            finished_at: None,
            owner: None,
        }
    }

    fn delivery(job: &Job, event: &str) -> ClaimedDelivery {
        ClaimedDelivery {
            id: format!("msg_{}_{event}", job.id.simple()),
            job_id: job.id,
            event: event.into(),
            job_attempt: (event == "started").then_some(1),
            attempts: 1,
            created_at: 1_700_000_000_000,
        }
    }

    fn parsed(bytes: Vec<u8>) -> serde_json::Value {
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn bodies_are_the_sse_events_with_a_timestamp() {
        let done = job(JobStatus::Succeeded);
        let image = ImageRecord {
            job_id: done.id,
            image: NewImage {
                index: 0,
                seed: 7,
                width: 64,
                height: 64,
                format: "png".into(),
                path: "x.png".into(),
                sha256: "00".repeat(32),
                bytes: 1,
            },
            created_at: 0,
        };
        let completed = parsed(body(&delivery(&done, "completed"), &done, std::slice::from_ref(&image), None).unwrap());
        assert_eq!(completed["type"], "completed");
        assert_eq!(completed["job_id"], done.id.to_string());
        assert_eq!(completed["timestamp"], "2023-11-14T22:13:20.000Z");
        assert_eq!(completed["images"][0]["url"], format!("/v1/jobs/{}/images/0", done.id));
        assert_eq!(completed["images"][0]["seed"], 7);
        let absolute =
            parsed(body(&delivery(&done, "completed"), &done, &[image], Some("https://img.example")).unwrap());
        assert_eq!(absolute["images"][0]["url"], format!("https://img.example/v1/jobs/{}/images/0", done.id));
        let started = parsed(body(&delivery(&done, "started"), &done, &[], None).unwrap());
        assert_eq!((started["type"].as_str(), started["attempt"].as_u64()), (Some("started"), Some(1)));

        let failed = job(JobStatus::Failed);
        let body_of_failed = parsed(body(&delivery(&failed, "failed"), &failed, &[], None).unwrap());
        assert_eq!(body_of_failed["code"], "inference_error");
        assert_eq!(body_of_failed["message"], "boom");
        let cancelled = job(JobStatus::Cancelled);
        let body_of_cancelled = parsed(body(&delivery(&cancelled, "cancelled"), &cancelled, &[], None).unwrap());
        assert_eq!(body_of_cancelled["type"], "cancelled");
    }

    #[test]
    fn a_terminal_event_must_match_the_job() {
        let running = job(JobStatus::Running);
        assert!(matches!(
            body(&delivery(&running, "completed"), &running, &[], None),
            Err(PayloadError::StateMismatch { .. })
        ));
        assert!(matches!(
            body(&delivery(&running, "exploded"), &running, &[], None),
            Err(PayloadError::UnknownEvent(_))
        ));
    }
}
