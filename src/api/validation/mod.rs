//! Request validation: pure functions over the model registry and the limits that turn a request into typed
//! job parameters, or into a [`ValidationError`] naming the field at fault. Nothing here touches the
//! network, the database or the files, so every rule is unit-tested without a server (the tests beside each
//! file); `tests/bad_requests.rs` keeps the HTTP view of the same rules.

mod detect;
mod edit;
mod generate;

pub use detect::{carries_watermark, detection, PreparedDetection};
pub use edit::{edit, PreparedEdit, AUTO_MASK};
pub use generate::{generation, DEFAULT_GUIDANCE, DEFAULT_STEPS};

use crate::models::{ModelRegistry, ServedModel};

/// Why a request cannot become a job.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A field is missing, malformed or out of range.
    #[error("{message}")]
    Field {
        /// The request field at fault (`steps`, `mask`, …).
        field: &'static str,
        /// What is wrong, for people.
        message: String,
    },
    /// The server cannot validate at all (no model configured, an image it cannot re-encode).
    #[error("{0}")]
    Internal(String),
}

impl ValidationError {
    /// The error of `field`.
    pub fn field(field: &'static str, message: impl Into<String>) -> Self {
        ValidationError::Field { field, message: message.into() }
    }

    /// The field at fault, if any.
    pub fn field_name(&self) -> Option<&'static str> {
        match self {
            ValidationError::Field { field, .. } => Some(field),
            ValidationError::Internal(_) => None,
        }
    }
}

/// The model a request names, or the first configured one.
fn named_model<'a>(models: &'a ModelRegistry, name: Option<&str>) -> Result<&'a ServedModel, ValidationError> {
    match name {
        Some(name) => models.get(name).ok_or_else(|| {
            ValidationError::field("model", format!("unknown model `{name}`; available: {}", models.names()))
        }),
        None => models.default_model().ok_or_else(|| ValidationError::Internal("no model configured".into())),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A registry of the fixture models and default limits, for the table tests.

    use crate::config::{LimitsConfig, ModelConfig};
    use crate::models::ModelRegistry;

    /// `tiny-sd` (text to image, img2img, plain inpainting) and `tiny-sd-instruct`.
    pub fn registry() -> ModelRegistry {
        let fixture = |name: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let config = |name: &str| ModelConfig { name: name.into(), path: fixture(name), ..ModelConfig::default() };
        ModelRegistry::load(&[config("tiny-sd"), config("tiny-sd-instruct")]).expect("fixture models")
    }

    /// The shipped limits.
    pub fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }
}
