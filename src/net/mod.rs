//! The HTTP listener, our own instead of `axum::serve`, so that what clients do with connections is
//! bounded: a deadline for every request header (also closing idle kept-alive connections), a cap on
//! open connections that evicts connections without a complete header first, an accept loop that backs
//! off when the process runs out of file descriptors, and request bodies that must keep arriving and fit
//! a byte budget ([`body`]). Graceful shutdown works as with `axum::serve`: stop accepting, drop idle
//! connections, let requests in progress finish, return when every connection has closed.

pub mod accept;
pub mod body;
pub mod connection;
pub mod fd_limit;
pub mod registry;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use registry::Registry;

/// What the listener enforces, from `[server]`.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// `server.header_timeout_seconds`.
    pub header_timeout: Duration,
    /// `server.max_header_bytes`.
    pub max_header_bytes: usize,
    /// `server.max_connections`, lowered to fit the open-file limit ([`fd_limit::connection_cap`]).
    pub max_connections: usize,
}

impl ConnectionSettings {
    /// The settings of `server`, with the open-file limit raised as far as allowed and the connection cap
    /// kept under it.
    pub fn from_config(server: &crate::config::ServerConfig) -> Self {
        let max_connections = match fd_limit::raise_to_hard() {
            Ok(files) => {
                let cap = fd_limit::connection_cap(server.max_connections, files);
                if cap < server.max_connections {
                    tracing::warn!(
                        files,
                        configured = server.max_connections,
                        cap,
                        "server.max_connections lowered to stay under the open-file limit"
                    );
                }
                cap
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the open-file limit; keeping server.max_connections");
                server.max_connections
            }
        };
        Self {
            header_timeout: Duration::from_secs(server.header_timeout_seconds),
            max_header_bytes: server.max_header_bytes,
            max_connections,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true (or its sender is dropped), then waits for every
/// connection to close.
pub async fn serve(listener: TcpListener, app: Router, settings: ConnectionSettings, mut stop: watch::Receiver<bool>) {
    let registry = Registry::new(settings.max_connections);
    let builder = Arc::new(connection::builder(&settings));
    let (all_closed, open) = watch::channel(());
    let mut backoff = accept::Backoff::default();
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = accept::next(&listener, &registry, &mut backoff) => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let ticket = tokio::select! {
            ticket = admission(&registry) => ticket,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let Some(ticket) = ticket else {
            metrics::counter!("denoised_connections_refused_total").increment(1);
            continue;
        };
        let task = connection::serve(stream, ticket, app.clone(), builder.clone(), stop.clone(), open.clone());
        tokio::spawn(task);
    }
    drop(listener);
    drop(open);
    all_closed.closed().await;
}

/// A slot for a connection just accepted: at once if there is room or a pending connection to evict,
/// after a wait if the pending ones are all within their head start (the listener's queue holds the
/// rest meanwhile), `None` if every connection has a request in progress.
async fn admission(registry: &Arc<Registry>) -> Option<registry::Ticket> {
    loop {
        match registry.admit() {
            Ok(ticket) => return Some(ticket),
            Err(registry::Full::Busy) => return None,
            Err(registry::Full::Until(at)) => tokio::time::sleep_until(at.into()).await,
        }
    }
}
