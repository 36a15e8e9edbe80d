//! Text to image, as diffusers' `StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
//! `LatentConsistencyModelPipeline`, `StableDiffusion3Pipeline` and `FluxPipeline` compute it: encode the
//! prompt and the negative prompt, start from seeded (or given) unit-Gaussian latents scaled by the
//! scheduler's initial sigma (1 for flow matching), run the denoising loop with classifier-free guidance on
//! the batch `[uncond × n, cond × n]` (one branch for guidance-embedding U-Nets and Flux), then decode. The
//! family only changes the conditioning ([`super::conditioning`]), the denoiser's feed
//! ([`crate::engine::denoiser`]) and the schedule's options ([`ModelInfo::run_options`]).

use image::RgbImage;
use ndarray::ArrayD;

use super::conditioning::{assemble, branches, classifier_guidance, SizeConditioning, UnetConditioning};
use super::denoise::{denoise, initial_noise, Denoise, Guidance};
use super::noise::BatchNoise;
use super::prompt::encode_prompts;
use super::vae::{decode, ShiftOnDecode};
use super::{RunExtras, StepObserver};
use crate::engine::error::EngineError;
use crate::engine::model::{Capability, LoadedModel, ModelInfo};
use crate::engine::rng::NoiseSource;
use crate::engine::scheduler::{self, SchedulerKind};
use crate::engine::watermark::{inject, RingKey};

/// A fully validated text-to-image request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from. Empty means none: the encoding of `""`, or zeros for models that set
    /// `force_zeros_for_empty_prompt` (SDXL base); see [`super::RunExtras::encode_empty_negative`].
    pub negative_prompt: String,
    /// Output width in pixels (a multiple of the VAE scale factor).
    pub width: u32,
    /// Output height in pixels (a multiple of the VAE scale factor).
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale; at or below 1 guidance is off (one U-Net batch instead of two).
    pub guidance_scale: f32,
    /// Guidance rescale in [0, 1] (0: off); counters over-exposure with zero-terminal-SNR models.
    pub guidance_rescale: f32,
    /// Scheduler family.
    pub scheduler: SchedulerKind,
    /// Seed of image 0; image `i` uses `seed + i` (wrapping).
    pub seed: u64,
    /// Images in this job.
    pub images: u32,
    /// Unit-Gaussian starting latents `[images, C, height/f, width/f]` instead of seeded ones.
    pub latents: Option<ArrayD<f32>>,
    /// A Tree-Ring key written into the starting latents (seeded or given) of every image; `None` leaves them
    /// exactly as drawn. Edits ignore it.
    pub watermark: Option<Box<RingKey>>,
}

impl GenerateRequest {
    /// Per-image seeds.
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.images as u64).map(|i| self.seed.wrapping_add(i)).collect()
    }
}

/// Runs the whole pipeline and returns one picture per requested image.
pub fn text_to_image(
    model: &mut LoadedModel,
    request: &GenerateRequest,
    observer: &mut dyn StepObserver,
) -> Result<Vec<RgbImage>, EngineError> {
    text_to_image_with(model, request, RunExtras::default(), observer)
}

/// [`text_to_image`] with [`RunExtras`].
pub fn text_to_image_with(
    model: &mut LoadedModel,
    request: &GenerateRequest,
    extras: RunExtras<'_>,
    observer: &mut dyn StepObserver,
) -> Result<Vec<RgbImage>, EngineError> {
    let Prepared { latents, mut scheduler, mut noise, conditioning, guidance } =
        prepare(model, request, extras.negative_prompt(request))?;
    let run = Denoise {
        latents,
        start: 0,
        conditioning: &conditioning,
        guidance,
        extra_channels: None,
        blend: None,
        size: (request.width, request.height),
    };
    let step_noise: &mut dyn NoiseSource = match extras.step_noise {
        Some(given) => given,
        None => &mut noise,
    };
    let latents = denoise(model, scheduler.as_mut(), run, step_noise, observer)?;
    decode(model, latents, ShiftOnDecode::Add)
}

/// A text-to-image run ready for its first denoiser call: what a job alone and a member of a cohort
/// ([`super::cohort`]) both start from.
pub(super) struct Prepared {
    /// The starting latents, scaled by the scheduler's initial sigma, `[n, C, h, w]`.
    pub latents: ArrayD<f32>,
    /// The request's scheduler, before its first step.
    pub scheduler: Box<dyn scheduler::Scheduler>,
    /// The per-image generators, after the starting draw (the scheduler's later draws come from them).
    pub noise: BatchNoise,
    /// The denoiser's text (and family) inputs for `[branches × n]`.
    pub conditioning: UnetConditioning,
    /// The batch layout and how its predictions combine.
    pub guidance: Guidance,
}

/// Checks `request` against the model, draws its starting noise, encodes its prompts (`negative` as
/// diffusers would receive it) and builds its scheduler.
pub(super) fn prepare(
    model: &mut LoadedModel,
    request: &GenerateRequest,
    negative: Option<&str>,
) -> Result<Prepared, EngineError> {
    model.info.require(Capability::TextToImage)?;
    let shape = latent_shape(&model.info, request)?;
    let mut noise = BatchNoise::new(&request.seeds());
    let initial = starting_noise(request, &shape, &mut noise)?;
    let guidance = classifier_guidance(model, request.guidance_scale, request.guidance_rescale);
    let prompts = encode_prompts(model, &request.prompt, negative, guidance != Guidance::Off)?;
    let size = SizeConditioning::for_picture(request.width, request.height);
    let conditioning = assemble(model, &prompts, branches(guidance), shape[0], &size, request.guidance_scale)?;
    let scheduler = build_scheduler(&model.info, request)?;
    let latents = initial * scheduler.init_noise_sigma() as f32;
    Ok(Prepared { latents, scheduler, noise, conditioning, guidance })
}

/// The unit-Gaussian starting latents of `request` (`shape`): its given `latents` or its seeded draws, with its
/// watermark written in when it has one. Every text-to-image path starts here, so none can skip the watermark.
pub(super) fn starting_noise(
    request: &GenerateRequest,
    shape: &[usize],
    generators: &mut BatchNoise,
) -> Result<ArrayD<f32>, EngineError> {
    let mut initial = initial_noise(request.latents.as_ref(), shape, generators)?;
    if let Some(key) = &request.watermark {
        inject(&mut initial, key).map_err(|e| EngineError::InvalidRequest(format!("watermark: {e}")))?;
    }
    Ok(initial)
}

/// The request's scheduler for its size (flow matching shifts by the image sequence length), refused when it
/// cannot drive the model's denoiser.
pub(super) fn build_scheduler(
    info: &ModelInfo,
    request: &GenerateRequest,
) -> Result<Box<dyn scheduler::Scheduler>, EngineError> {
    let scheduler_err = |e: scheduler::SchedulerError| EngineError::Scheduler(e.to_string());
    request.scheduler.check_model(info.family().parameterization()).map_err(scheduler_err)?;
    let options = info.run_options(request.width, request.height);
    scheduler::build_with(request.scheduler, &info.scheduler_config, request.steps as usize, &options)
        .map_err(scheduler_err)
}

/// Checks the picture size and image count of `request` and returns the latent shape `[n, C, h, w]`.
pub(super) fn latent_shape(info: &ModelInfo, request: &GenerateRequest) -> Result<[usize; 4], EngineError> {
    let factor = info.vae_scale_factor * info.patch_size;
    if request.width % factor != 0 || request.height % factor != 0 || request.width == 0 || request.height == 0 {
        return Err(EngineError::InvalidRequest(format!("width and height must be positive multiples of {factor}")));
    }
    let n = request.images as usize;
    if n == 0 {
        return Err(EngineError::InvalidRequest("at least one image".into()));
    }
    let f = info.vae_scale_factor;
    Ok([n, info.latent_channels as usize, (request.height / f) as usize, (request.width / f) as usize])
}
