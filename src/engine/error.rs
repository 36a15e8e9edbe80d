//! The engine's one error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine, from loading a model folder to running a graph.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The ONNX Runtime shared library is missing or unusable.
    #[error("ONNX Runtime library {path}: {message}")]
    Runtime {
        /// The library path that was tried.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A device string or execution provider is unusable.
    #[error("device `{device}`: {message}")]
    Device {
        /// The configured device.
        device: String,
        /// What went wrong.
        message: String,
    },
    /// A model folder is incomplete or inconsistent.
    #[error("model {path}: {message}")]
    Model {
        /// The model folder or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer files could not be turned into a tokenizer, or tokenizing failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The scheduler config is unsupported.
    #[error("scheduler: {0}")]
    Scheduler(String),
    /// A request cannot be run by this model (wrong sizes, shapes, …). Normally caught at submission.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// ONNX Runtime failed while running a graph.
    #[error("running {graph}: {message}")]
    Inference {
        /// Which graph (`unet`, `vae_decoder`, …).
        graph: &'static str,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The job was cancelled between two steps.
    #[error("cancelled")]
    Cancelled,
    /// Encoding or decoding an image failed.
    #[error("image: {0}")]
    Image(String),
}

impl EngineError {
    /// Short stable code for job records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Runtime { .. } => "runtime_error",
            EngineError::Device { .. } => "device_error",
            EngineError::Model { .. } => "model_error",
            EngineError::Tokenizer(_) => "tokenizer_error",
            EngineError::Scheduler(_) => "scheduler_error",
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::Inference { .. } => "inference_error",
            EngineError::Cancelled => "cancelled",
            EngineError::Image(_) => "image_error",
        }
    }
}
