//! A request body that must keep arriving and fit the budget: each chunk is charged to the request's
//! [`Account`] as it arrives; a chunk over the budget, a pause longer than the idle deadline, or a body
//! still unfinished at the total deadline ends it with a [`Cut`], which is also recorded for the layer
//! that answers the request (the extractor that was reading only sees a failed read).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::budget::Account;
use super::{BodyDeadlines, BodyError, Cut};

/// Where a guarded body records why it was cut off.
pub type CutRecord = Arc<OnceLock<Cut>>;

/// The wrapper around a request body.
#[derive(Debug)]
pub struct GuardedBody {
    inner: Body,
    account: Arc<Account>,
    deadlines: BodyDeadlines,
    idle: Pin<Box<Sleep>>,
    total: Pin<Box<Sleep>>,
    record: CutRecord,
}

impl GuardedBody {
    /// Guards `inner`; both deadlines start now.
    pub fn new(inner: Body, account: Arc<Account>, deadlines: BodyDeadlines, record: CutRecord) -> Self {
        let now = Instant::now();
        Self {
            inner,
            account,
            deadlines,
            idle: Box::pin(tokio::time::sleep_until(now + deadlines.idle)),
            total: Box::pin(tokio::time::sleep_until(now + deadlines.total)),
            record,
        }
    }

    fn cut(&self, cut: Cut) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let _ = self.record.set(cut);
        Poll::Ready(Some(Err(BodyError::Cut(cut))))
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(cut) = self.record.get() {
            return Poll::Ready(Some(Err(BodyError::Cut(*cut))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(cut) = self.account.take(data.len()) {
                        return self.cut(cut);
                    }
                }
                let next = Instant::now() + self.deadlines.idle;
                self.idle.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(BodyError::Read(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.total.as_mut().poll(cx).is_ready() {
                    return self.cut(Cut::TooSlow(self.deadlines.total));
                }
                if self.idle.as_mut().poll(cx).is_ready() {
                    return self.cut(Cut::Stalled(self.deadlines.idle));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use http_body_util::BodyExt;

    use super::*;
    use crate::net::body::budget::BodyBudget;

    const DEADLINES: BodyDeadlines =
        BodyDeadlines { idle: Duration::from_millis(200), total: Duration::from_millis(500) };

    fn guarded(inner: Body, budget: &BodyBudget) -> (GuardedBody, CutRecord) {
        let record = CutRecord::default();
        let account = Arc::new(budget.account(Some("k".into())));
        (GuardedBody::new(inner, account, DEADLINES, record.clone()), record)
    }

    #[tokio::test]
    async fn a_body_that_stops_sending_is_cut_off() {
        let (mut body, record) = guarded(
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>()),
            &BodyBudget::new(10, 10),
        );
        let error = body.frame().await.expect("an error").expect_err("cut off");
        assert!(matches!(error, BodyError::Cut(Cut::Stalled(_))), "{error}");
        assert_eq!(record.get(), Some(&Cut::Stalled(DEADLINES.idle)));
    }

    #[tokio::test]
    async fn a_body_that_trickles_is_cut_off_at_the_total_deadline() {
        let trickle = futures::stream::iter(0..100).then(|_| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"x"))
        });
        let (body, record) = guarded(Body::from_stream(trickle), &BodyBudget::new(1000, 1000));
        let error = body.collect().await.expect_err("cut off");
        assert!(matches!(error, BodyError::Cut(Cut::TooSlow(_))), "{error}");
        assert_eq!(record.get(), Some(&Cut::TooSlow(DEADLINES.total)));
    }

    #[tokio::test]
    async fn a_body_over_the_budget_is_cut_off_and_gives_its_bytes_back() {
        let budget = BodyBudget::new(10, 8);
        let (body, record) = guarded(Body::from(vec![0u8; 9]), &budget);
        assert!(body.collect().await.is_err());
        assert_eq!(record.get(), Some(&Cut::KeyBudget { limit: 8 }));
        assert_eq!(budget.in_flight(), 0);
        let (body, _) = guarded(Body::from(vec![0u8; 8]), &budget);
        assert_eq!(body.collect().await.expect("fits").to_bytes().len(), 8);
    }
}
