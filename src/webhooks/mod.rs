//! Signed webhooks: a job may name a URL (or inherit its API key's default) that is told, by an HTTP `POST`
//! signed per the Standard Webhooks specification, when the job ends (and, if asked, when it starts).
//!
//! - [`signing`]: secrets (`whsec_…`) and the `webhook-signature` value;
//! - [`address`] and [`target`]: which URLs may be called at all (SSRF protection), checked at submission;
//! - [`client`]: the HTTP client that repeats the address check on every connection and follows no
//!   redirect;
//! - [`backoff`]: when a failed delivery is retried and when it is given up;
//! - [`payload`]: the body of a delivery, the event as the SSE streams send it plus `timestamp`;
//! - [`sender`]: the task, in every process, that sends due deliveries from the store's outbox
//!   (`crate::jobs::store` writes a terminal event's row in the transaction that ends the job).

pub mod address;
pub mod backoff;
pub mod client;
pub mod payload;
pub mod sender;
pub mod signing;
pub mod target;

use std::time::Duration;

pub use backoff::RetryPolicy;
pub use signing::{Secret, SecretError};
pub use target::TargetError;

use crate::config::WebhooksConfig;

/// The webhook settings every part shares, validated from `[webhooks]` once at start-up. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Signs deliveries of jobs submitted without a key.
    pub secret: Option<Secret>,
    /// One attempt's time limit.
    pub timeout: Duration,
    /// When to retry and when to give up.
    pub retry: RetryPolicy,
    /// Whether non-public addresses may be targets.
    pub allow_private_targets: bool,
    /// `server.public_url` without a trailing slash: image URLs in deliveries are absolute under it.
    pub public_url: Option<String>,
}

impl WebhookSettings {
    /// The settings of `config` (already validated: a bad secret was refused at load, and is ignored here).
    pub fn from_config(config: &WebhooksConfig, public_url: Option<&str>) -> Self {
        Self {
            secret: config.secret.as_deref().and_then(|s| Secret::parse(s).ok()),
            timeout: Duration::from_secs(config.timeout_seconds),
            retry: RetryPolicy {
                max_attempts: config.max_attempts,
                retry_for: Duration::from_secs(config.retry_for_seconds),
                initial: Duration::from_millis(config.backoff_initial_millis),
                max_delay: Duration::from_secs(config.backoff_max_seconds).max(Duration::from_millis(1)),
            },
            allow_private_targets: config.allow_private_targets,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_string()),
        }
    }
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self::from_config(&WebhooksConfig::default(), None)
    }
}
