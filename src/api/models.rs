//! `GET /v1/models`: the models this server runs and what each can do.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::AppJson;
use super::validation::{DEFAULT_GUIDANCE, DEFAULT_STEPS};
use super::AppState;
use crate::engine::family::Family;
use crate::engine::model::Capability;
use crate::engine::scheduler::SchedulerKind;

/// The model list, in the OpenAI list shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models; the first is the default.
    pub data: Vec<ModelCard>,
}

/// One model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    /// The id to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// The model family (`sd`, `sdxl`, `lcm`, `sd3`, `flux`), from the export's pipeline class and graphs.
    #[schema(value_type = String, example = "sdxl")]
    pub family: Family,
    /// What it can do.
    #[schema(value_type = Vec<String>, example = json!(["text_to_image"]))]
    pub capabilities: Vec<Capability>,
    /// Native width in pixels (the default).
    pub width: u32,
    /// Native height in pixels (the default).
    pub height: u32,
    /// Sizes must be multiples of this.
    pub size_multiple: u32,
    /// Largest `width × height` a request may ask for.
    pub max_pixels: u64,
    /// Largest `n × steps × width × height` of one job.
    pub max_pixel_steps: u64,
    /// Steps used when a request gives none.
    pub default_steps: u32,
    /// Guidance scale used when a request gives none.
    pub default_guidance_scale: f32,
    /// Scheduler used when a request names none.
    pub default_scheduler: String,
    /// Scheduler names a request may use.
    pub schedulers: Vec<String>,
    /// The diffusers pipeline class of the export.
    pub pipeline: String,
}

/// List the served models.
#[utoipa::path(get, path = "/v1/models", tag = "models", responses((status = 200, description = "The models", body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> AppJson<ModelList> {
    let data = state
        .models
        .all()
        .iter()
        .map(|m| ModelCard {
            id: m.name.clone(),
            object: "model",
            family: m.info.family(),
            capabilities: m.info.capabilities.clone(),
            width: m.info.native_size,
            height: m.info.native_size,
            size_multiple: m.info.size_multiple,
            max_pixels: m.max_pixels,
            max_pixel_steps: m.max_pixel_steps,
            default_steps: m.default_steps.unwrap_or(DEFAULT_STEPS),
            default_guidance_scale: m.default_guidance_scale.unwrap_or(DEFAULT_GUIDANCE),
            default_scheduler: m.info.default_scheduler.name().to_string(),
            schedulers: SchedulerKind::all_for(m.info.default_scheduler.parameterization())
                .map(|k| k.name().to_string())
                .collect(),
            pipeline: m.info.pipeline_class.clone(),
        })
        .collect();
    AppJson(ModelList { object: "list", data })
}
