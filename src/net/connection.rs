//! Serving one connection: hyper's HTTP/1 connection with a deadline for each request header (which also
//! closes kept-alive connections left idle), a cap on the header's size, and two ways to end early:
//! eviction by the connection table, and server shutdown.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::registry::Ticket;
use super::service::Tracked;
use super::ConnectionSettings;

/// hyper's connection builder with our deadlines and sizes.
pub fn builder(settings: &ConnectionSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_header_size(settings.max_header_bytes);
    builder
}

/// How long a connection without a request in progress gets to flush what it has written before it is
/// dropped, once evicted.
const EVICTION_GRACE: Duration = Duration::from_millis(100);

/// The same at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Serves `stream` until the client leaves, the connection is evicted while it has no request in progress,
/// or shutdown (which drops a connection without a request in progress and lets one with a request finish
/// it). `_open` is held until the connection is closed, so that shutdown can wait for every connection.
pub async fn serve(
    stream: TcpStream,
    ticket: Ticket,
    app: Router,
    builder: Arc<http1::Builder>,
    mut stop: watch::Receiver<bool>,
    _open: watch::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let ticket = Arc::new(ticket);
    let connection = builder.serve_connection(TokioIo::new(stream), Tracked::new(app, ticket.clone()));
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    let mut drop_at: Option<Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = ticket.evicted() => close(connection.as_mut(), &ticket, &mut drop_at, EVICTION_GRACE),
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                close(connection.as_mut(), &ticket, &mut drop_at, SHUTDOWN_GRACE);
            }
            () = tokio::time::sleep_until(drop_at.unwrap_or_else(Instant::now)), if drop_at.is_some() => return,
        }
    }
}

/// Asks hyper to close the connection once its request (if any) is answered. hyper closes an idle
/// connection at once, but not one part-way through a header: that one is dropped when `grace` ends.
fn close(
    connection: Pin<&mut http1::Connection<TokioIo<TcpStream>, Tracked>>,
    ticket: &Ticket,
    drop_at: &mut Option<Instant>,
    grace: Duration,
) {
    connection.graceful_shutdown();
    if ticket.is_pending() {
        let at = Instant::now() + grace;
        *drop_at = Some(drop_at.map_or(at, |earlier| earlier.min(at)));
    }
}
