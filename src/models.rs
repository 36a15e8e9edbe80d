//! The configured models, described once at start-up from their export folders.

use crate::config::ModelConfig;
use crate::engine::model::ModelInfo;
use crate::engine::EngineError;

/// One configured model: the id clients use and what its export folder says about it.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// The id clients send as `model`.
    pub name: String,
    /// What the export is and can do.
    pub info: ModelInfo,
    /// Guidance scale for requests that give none (the config's, else the family's).
    pub default_guidance_scale: Option<f32>,
    /// Steps for requests that give none (the config's, else the family's).
    pub default_steps: Option<u32>,
    /// Largest image area a request may ask for (pixels).
    pub max_pixels: u64,
    /// Largest images × steps × area of one job.
    pub max_pixel_steps: u64,
}

/// Default `max_pixels`: four times the native area.
const AREA_FACTOR: u64 = 4;
/// Default `max_pixel_steps`: this many images of the largest area at [`BUDGET_STEPS`] steps.
const BUDGET_IMAGES: u64 = 8;
/// See [`BUDGET_IMAGES`].
const BUDGET_STEPS: u64 = 50;

/// Every configured model, in config order (the first is the default).
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    models: Vec<ServedModel>,
}

impl ModelRegistry {
    /// Reads every model folder; any unreadable or unsupported model fails start-up.
    pub fn load(configs: &[ModelConfig]) -> Result<Self, EngineError> {
        let models = configs
            .iter()
            .map(|c| {
                let info = ModelInfo::read(&c.path)?;
                let native = u64::from(info.native_size) * u64::from(info.native_size);
                let max_pixels = c.max_pixels.unwrap_or(AREA_FACTOR * native);
                Ok(ServedModel {
                    name: c.name.clone(),
                    default_guidance_scale: c.guidance_scale.or(info.family().default_guidance_scale()),
                    default_steps: c.steps.or(info.family().default_steps()),
                    info,
                    max_pixels,
                    max_pixel_steps: c.max_pixel_steps.unwrap_or(BUDGET_IMAGES * BUDGET_STEPS * max_pixels),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self { models })
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<&ServedModel> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The model used when a request names none.
    pub fn default_model(&self) -> Option<&ServedModel> {
        self.models.first()
    }

    /// All models, in config order.
    pub fn all(&self) -> &[ServedModel] {
        &self.models
    }

    /// Comma-separated ids, for error messages.
    pub fn names(&self) -> String {
        self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}
