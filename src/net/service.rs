//! The bridge from hyper to the axum application that also tells the connection table when a request
//! starts (its header has arrived whole) and when it ends (its response has been sent or dropped), so
//! that only connections without a request in progress are ever evicted.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tower::Service as _;

use super::registry::{RequestGuard, Ticket};

/// The hyper service of one connection.
#[derive(Clone)]
pub struct Tracked {
    app: Router,
    ticket: Arc<Ticket>,
}

impl Tracked {
    /// `app`, serving the connection that holds `ticket`.
    pub fn new(app: Router, ticket: Arc<Ticket>) -> Self {
        Self { app, ticket }
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = self.ticket.begin_request();
        let answer = self.app.clone().call(request.map(Body::new));
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Body::new(UntilSent { body, _guard: guard })))
        })
    }
}

/// A response body that holds the request's guard until hyper has sent (or dropped) it.
struct UntilSent {
    body: Body,
    _guard: RequestGuard,
}

impl http_body::Body for UntilSent {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
