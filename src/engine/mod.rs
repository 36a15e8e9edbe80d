//! The synchronous inference engine: everything needed to turn a prompt into pixels, with no knowledge of
//! HTTP, tokio or the job store. Usable as a library on its own.

pub mod denoiser;
pub mod error;
pub mod family;
pub mod graph;
pub mod image;
pub mod input;
pub mod model;
pub mod npy;
pub mod pipeline;
pub mod preview;
pub mod rng;
pub mod runtime;
pub mod scheduler;
pub mod t5_tokenizer;
pub mod text_cache;
pub mod text_encoder;
pub mod tokenizer;
pub mod watermark;

pub use error::EngineError;
