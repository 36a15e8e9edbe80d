//! DDIM inversion of a picture: the VAE encoder's mean (times the scaling factor), then the DDIM update run
//! backwards ([`DdimInverse`]) with the empty prompt and no guidance, to the noise at the last training
//! timestep. Watermark detection reads the starting noise's pattern from it.
//!
//! Only diffusion (epsilon or v-prediction) text-to-image models with a VAE encoder invert this way; flow
//! matching (SD3, Flux) is refused.

use image::RgbImage;
use ndarray::ArrayD;

use super::conditioning::{assemble, branches, SizeConditioning};
use super::denoise::{denoise, Denoise, Guidance};
use super::edit::scaled_latents;
use super::noise::BatchNoise;
use super::prompt::encode_prompts;
use super::StepObserver;
use crate::engine::error::EngineError;
use crate::engine::image::image_to_tensor;
use crate::engine::model::{Capability, LoadedModel, ModelInfo};
use crate::engine::scheduler::ddim_inverse::DdimInverse;
use crate::engine::scheduler::Parameterization;

/// Whether `info`'s model can be inverted with DDIM (and so carry a detectable watermark).
pub fn can_invert(info: &ModelInfo) -> Result<(), EngineError> {
    info.require(Capability::TextToImage)?;
    if info.family().parameterization() == Parameterization::FlowMatching {
        return Err(EngineError::InvalidRequest("flow-matching models cannot be inverted with DDIM".into()));
    }
    Ok(())
}

/// The noise `[1, C, h, w]` that `steps` DDIM steps would turn into `image` (whose sides must be multiples of
/// the VAE factor).
pub fn invert(
    model: &mut LoadedModel,
    image: &RgbImage,
    steps: usize,
    observer: &mut dyn StepObserver,
) -> Result<ArrayD<f32>, EngineError> {
    can_invert(&model.info)?;
    let (width, height) = image.dimensions();
    let factor = model.info.vae_scale_factor * model.info.patch_size;
    if width == 0 || height == 0 || width % factor != 0 || height % factor != 0 {
        return Err(EngineError::InvalidRequest(format!("width and height must be positive multiples of {factor}")));
    }
    let latents = scaled_latents(model, image_to_tensor(image).view())?;
    let prompts = encode_prompts(model, "", None, false)?;
    let size = SizeConditioning::for_picture(width, height);
    let conditioning = assemble(model, &prompts, branches(Guidance::Off), 1, &size, 1.0)?;
    let mut scheduler =
        DdimInverse::new(&model.info.scheduler_config, steps).map_err(|e| EngineError::Scheduler(e.to_string()))?;
    let run = Denoise {
        latents,
        start: 0,
        conditioning: &conditioning,
        guidance: Guidance::Off,
        extra_channels: None,
        blend: None,
        size: (width, height),
    };
    // DDIM draws no noise; the source is never read.
    denoise(model, &mut scheduler, run, &mut BatchNoise::new(&[0]), observer)
}
