//! denoised: an HTTP inference server for diffusion image generation and editing on ONNX Runtime.
//!
//! The crate is one library with a thin binary on top. [`engine`] is the synchronous inference library
//! (models, tokenizer, schedulers, pipelines, images) that knows nothing of HTTP or databases; [`jobs`] owns
//! every SQL statement; [`worker`] bridges the two with OS threads; [`api`] is the axum front end;
//! [`webhooks`] tells clients' URLs about their jobs.

pub mod api;
pub mod auth;
pub mod config;
pub mod credentials;
pub mod engine;
pub mod fleet;
pub mod jobs;
pub mod models;
pub mod net;
pub mod retention;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod watermark;
pub mod webhooks;
pub mod worker;
