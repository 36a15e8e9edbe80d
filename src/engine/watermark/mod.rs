//! Tree-Ring watermarks (Wen et al. 2023, "Tree-Ring Watermarks: Fingerprints for Diffusion Images that are
//! Invisible and Robust"), the "rings" variant: a key is written into the 2-D Fourier transform of one
//! channel of a job's starting noise, and read back by inverting a picture to its noise with DDIM.
//!
//! - [`pattern`]: the key (a secret's deterministic ring values) and the ring geometry of a latent plane.
//! - [`fourier`]: the 2-D FFT of a latent plane (rustfft).
//! - [`inject`]: writes the pattern into starting noise `[n, C, h, w]`.
//! - [`stats`]: the noncentral chi-square distribution of the paper's test.
//! - [`detect`]: distance and p-value of inverted latents against a key.
//!
//! Synchronous and model-free: the inversion itself is a pipeline ([`crate::engine::pipeline::invert`]).

pub mod detect;
pub mod fourier;
pub mod inject;
pub mod pattern;
pub mod stats;

pub use detect::{score, Score};
pub use inject::inject;
pub use pattern::{RingKey, WatermarkSpec};

/// Why a watermark cannot be written or read on latents of some shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatermarkError {
    /// The latents are not `[n, C, h, w]`, or lack the key's channel.
    #[error("latents of shape {shape:?} have no channel {channel} to watermark")]
    NoChannel {
        /// The latents' shape.
        shape: Vec<usize>,
        /// The key's channel.
        channel: usize,
    },
    /// The ring radius does not fit the plane: it must be below half the shorter side (the Nyquist
    /// frequency), or rings would reach frequencies that are their own mirror image.
    #[error("ring radius {radius} does not fit {height}x{width} latents (it must be below {limit})")]
    RadiusTooLarge {
        /// The key's radius.
        radius: u32,
        /// Latent height.
        height: usize,
        /// Latent width.
        width: usize,
        /// The exclusive upper bound for this plane.
        limit: usize,
    },
}
