//! Tree-Ring watermarks in the server: which watermark a job gets, and the detector thread that answers
//! `POST /v1/watermarks/detect`. The maths lives in the engine ([`crate::engine::watermark`]).

pub mod detector;

use std::sync::Arc;

pub use detector::{DetectError, Detection, Detector};

use crate::config::WatermarkConfig;
use crate::engine::watermark::{RingKey, WatermarkSpec};
use crate::jobs::params::WatermarkParams;

/// The key id that stands for the server's own watermark in jobs and detection answers.
pub const SERVER_KEY: &str = "server";

/// What the HTTP layer needs: the `[watermark]` settings and the detector (absent in an `api` process,
/// which loads no model).
#[derive(Clone)]
pub struct WatermarkState {
    /// `[watermark]`.
    pub config: WatermarkConfig,
    /// The detector thread, where this process loads models.
    pub detector: Option<Arc<Detector>>,
}

impl WatermarkState {
    /// Where new watermarks go, from the config.
    pub fn spec(&self) -> WatermarkSpec {
        WatermarkSpec { radius: self.config.radius, channel: self.config.channel, strength: self.config.strength }
    }

    /// A job's watermark parameters for `key` (an API key id or [`SERVER_KEY`]) and its secret.
    pub fn params(&self, key: &str, secret: &str) -> WatermarkParams {
        let spec = self.spec();
        WatermarkParams {
            key: key.to_string(),
            secret: secret.to_string(),
            radius: spec.radius,
            channel: spec.channel,
            strength: spec.strength,
        }
    }

    /// The server's own watermark, when `[watermark] secret` is set.
    pub fn server(&self) -> Option<WatermarkParams> {
        self.config.secret.as_deref().map(|secret| self.params(SERVER_KEY, secret))
    }

    /// The engine key of `secret` with the configured spec (what detection scores against).
    pub fn ring_key(&self, secret: &str) -> RingKey {
        RingKey::derive(secret.as_bytes(), self.spec())
    }
}
