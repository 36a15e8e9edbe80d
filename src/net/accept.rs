//! Taking connections off the listening socket without spinning: errors that concern one connection are
//! skipped, running out of file descriptors evicts a pending connection and backs off (10 ms doubling to
//! 1 s), and the log says so once per streak instead of once per attempt.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::registry::Registry;

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The pause between failed accepts, and what has been logged about them.
#[derive(Debug)]
pub struct Backoff {
    pause: Duration,
    failures: u64,
    logged_at: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { pause: FIRST_PAUSE, failures: 0, logged_at: None }
    }
}

impl Backoff {
    /// Records a failure, logging the first of a streak and then at most every 30 s; returns how long to
    /// pause before the next attempt.
    fn fail(&mut self, error: &io::Error) -> Duration {
        self.failures += 1;
        metrics::counter!("denoised_accept_errors_total", "kind" => kind(error)).increment(1);
        if self.logged_at.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            tracing::warn!(%error, failures = self.failures, pause_ms = self.pause.as_millis() as u64,
                "accepting connections fails; backing off");
            self.logged_at = Some(Instant::now());
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
        pause
    }

    /// Records a success, ending a streak of failures.
    fn succeed(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
        }
        *self = Self::default();
    }
}

/// Waits for the next connection.
pub async fn next(listener: &TcpListener, registry: &Registry, backoff: &mut Backoff) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                backoff.succeed();
                return accepted;
            }
            Err(error) if concerns_one_connection(&error) => {}
            Err(error) => {
                if out_of_descriptors(&error) {
                    registry.evict_oldest_pending();
                }
                tokio::time::sleep(backoff.fail(&error)).await;
            }
        }
    }
}

/// Errors about a connection that was reset before it was accepted: the next accept is unaffected.
fn concerns_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// `EMFILE` (this process) or `ENFILE` (the whole system): no descriptor for the new socket.
fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

fn kind(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE) => "emfile",
        Some(libc::ENFILE) => "enfile",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "no_memory",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_told_apart() {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
        assert!(concerns_one_connection(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }

    #[test]
    fn the_pause_doubles_up_to_a_second_and_resets() {
        let mut backoff = Backoff::default();
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<_> = (0..10).map(|_| backoff.fail(&error).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.succeed();
        assert_eq!(backoff.pause, FIRST_PAUSE);
    }
}
