//! Request bodies under hostile clients: a body must keep arriving ([`guarded::GuardedBody`]: a deadline
//! between chunks and one for the whole body) and the bytes being received at once are counted against a
//! server-wide and a per-key budget ([`budget::BodyBudget`]), so that stalled or concurrent uploads cannot
//! take more memory than configured.

pub mod budget;
pub mod collect;
pub mod guarded;

use std::time::Duration;

/// Why a request body was cut off before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Cut {
    /// Nothing arrived for `body_idle_timeout_seconds`.
    #[error("the request body sent nothing for {0:?}")]
    Stalled(Duration),
    /// The whole body took longer than `body_timeout_seconds`.
    #[error("the request body did not arrive whole within {0:?}")]
    TooSlow(Duration),
    /// The server's budget of bytes in flight is spent.
    #[error("the server is already receiving its limit of {limit} request-body bytes")]
    ServerBudget {
        /// `server.max_body_bytes_in_flight`.
        limit: usize,
    },
    /// The key's budget of bytes in flight is spent.
    #[error("this API key is already sending its limit of {limit} request-body bytes")]
    KeyBudget {
        /// `limits.max_body_bytes_in_flight_per_key`.
        limit: usize,
    },
}

/// The error a guarded body yields.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Cut off by a deadline or the budget.
    #[error(transparent)]
    Cut(Cut),
    /// The connection failed (the client went away, or sent a malformed chunk).
    #[error("reading the request body: {0}")]
    Read(axum::Error),
}

/// The two body deadlines, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadlines {
    /// `server.body_idle_timeout_seconds`.
    pub idle: Duration,
    /// `server.body_timeout_seconds`.
    pub total: Duration,
}

/// What the body layer needs: the budget and the deadlines.
#[derive(Debug, Clone)]
pub struct BodyRules {
    /// Bytes in flight, server-wide and per key.
    pub budget: budget::BodyBudget,
    /// How long a body may pause, and take in all.
    pub deadlines: BodyDeadlines,
}
