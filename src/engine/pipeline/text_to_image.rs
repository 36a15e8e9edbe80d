//! Text to image, as diffusers' `StableDiffusionPipeline` computes it: encode the prompt and the negative
//! prompt, start from seeded (or given) unit-Gaussian latents scaled by the scheduler's initial sigma, run
//! the denoising loop with classifier-free guidance on the batch `[uncond × n, cond × n]`, then decode.

use image::RgbImage;
use ndarray::{concatenate, s, Array, ArrayD, Axis, Ix4, IxDyn};

use super::guidance::{guide, rescale};
use super::noise::BatchNoise;
use super::StepObserver;
use crate::engine::error::EngineError;
use crate::engine::graph::Feed;
use crate::engine::image::tensor_to_images;
use crate::engine::model::LoadedModel;
use crate::engine::preview::{self, PreviewMode};
use crate::engine::rng::NoiseSource;
use crate::engine::scheduler::{self, SchedulerKind};

/// A fully validated text-to-image request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (empty: the unconditional embedding of "").
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
    let info = &model.info;
    let factor = info.vae_scale_factor;
    if request.width % factor != 0 || request.height % factor != 0 || request.width == 0 || request.height == 0 {
        return Err(EngineError::InvalidRequest(format!("width and height must be positive multiples of {factor}")));
    }
    let n = request.images as usize;
    if n == 0 {
        return Err(EngineError::InvalidRequest("at least one image".into()));
    }
    let shape =
        [n, info.latent_channels as usize, (request.height / factor) as usize, (request.width / factor) as usize];
    let mut noise = BatchNoise::new(&request.seeds());
    let initial = match &request.latents {
        Some(given) => {
            if given.shape() != shape {
                return Err(EngineError::InvalidRequest(format!(
                    "latents have shape {:?}, expected {:?}",
                    given.shape(),
                    shape
                )));
            }
            given.clone()
        }
        None => {
            let mut values = vec![0f32; shape.iter().product()];
            noise.fill_normal(&mut values);
            ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| EngineError::InvalidRequest(e.to_string()))?
        }
    };

    let guided = request.guidance_scale > 1.0;
    let embeddings = encode_prompts(model, request, n, guided)?;

    let mut sched = scheduler::build(request.scheduler, &model.info.scheduler_config, request.steps as usize)
        .map_err(|e| EngineError::Scheduler(e.to_string()))?;
    let mut latents = initial * sched.init_noise_sigma() as f32;
    let timesteps: Vec<f64> = sched.timesteps().to_vec();
    let total = timesteps.len();
    let timestep_spec = model.unet.input("timestep").cloned();
    let batch = if guided { 2 * n } else { n };

    for (call, &t) in timesteps.iter().enumerate() {
        if observer.should_stop() {
            return Err(EngineError::Cancelled);
        }
        let model_input = if guided {
            concatenate(Axis(0), &[latents.view(), latents.view()])
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?
        } else {
            latents.clone()
        };
        let scaled = sched.scale_model_input(model_input.view(), call);
        let timestep = match timestep_spec.as_ref().map(|s| s.rank()) {
            Some(0) => ArrayD::from_elem(IxDyn(&[]), t as f32),
            _ => ArrayD::from_elem(IxDyn(&[batch]), t as f32),
        };
        let mut outputs = model.unet.run(vec![
            ("sample", Feed::Float(scaled)),
            ("timestep", Feed::Float(timestep)),
            ("encoder_hidden_states", Feed::Float(embeddings.clone())),
        ])?;
        let predicted = outputs
            .remove(&model.unet_output)
            .ok_or_else(|| EngineError::Inference { graph: "unet", message: "no output".into() })?;
        let guided_prediction = if guided {
            let uncond = predicted.slice_axis(Axis(0), (0..n).into());
            let cond = predicted.slice_axis(Axis(0), (n..2 * n).into());
            let guided = guide(uncond.view(), cond.view(), request.guidance_scale);
            rescale(guided, cond.view(), request.guidance_rescale)
        } else {
            predicted
        };
        let out = sched.step(guided_prediction.view(), call, latents.view(), &mut noise);
        let preview = observer.preview_wanted(call + 1, total).and_then(|mode| {
            let estimate = out.pred_original_sample.as_ref().unwrap_or(&out.prev_sample);
            render_preview(model, estimate, mode, request.width, request.height)
        });
        latents = out.prev_sample;
        observer.on_step(call + 1, total, preview);
    }
    decode(model, latents)
}

/// Text embeddings for the U-Net: `[uncond × n, cond × n]` with guidance, `[cond × n]` without.
fn encode_prompts(
    model: &mut LoadedModel,
    request: &GenerateRequest,
    n: usize,
    guided: bool,
) -> Result<ArrayD<f32>, EngineError> {
    let mut texts = Vec::new();
    if guided {
        texts.push(request.negative_prompt.as_str());
    }
    texts.push(request.prompt.as_str());
    let max_len = model.tokenizer.max_length();
    let mut ids = Vec::with_capacity(texts.len() * max_len);
    for text in &texts {
        ids.extend(model.tokenizer.encode_padded(text)?.into_iter().map(i64::from));
    }
    let input_ids = ArrayD::from_shape_vec(IxDyn(&[texts.len(), max_len]), ids)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    // One text-encoder call per prompt keeps exports with a fixed batch of 1 working.
    let mut hidden = Vec::with_capacity(texts.len());
    for row in 0..texts.len() {
        let one = input_ids.slice(s![row..row + 1, ..]).to_owned().into_dyn();
        let mut outputs = model.text_encoder.run(vec![("input_ids", Feed::Int(one))])?;
        let h = outputs
            .remove(&model.text_output)
            .ok_or_else(|| EngineError::Inference { graph: "text_encoder", message: "no hidden states".into() })?;
        hidden.push(h);
    }
    let mut parts = Vec::with_capacity(texts.len() * n);
    for h in &hidden {
        for _ in 0..n {
            parts.push(h.view());
        }
    }
    concatenate(Axis(0), &parts).map_err(|e| EngineError::Inference { graph: "text_encoder", message: e.to_string() })
}

/// A preview of the first image of `latents` (diffusion latents). A preview that fails is skipped: it must
/// never fail the job.
fn render_preview(
    model: &mut LoadedModel,
    latents: &ArrayD<f32>,
    mode: PreviewMode,
    width: u32,
    height: u32,
) -> Option<RgbImage> {
    let first = latents.slice_axis(Axis(0), (0..1).into()).to_owned();
    let decoded = match mode {
        PreviewMode::Approx => model.preview.decode(&first).ok()?,
        PreviewMode::Vae => {
            let scaled = first / model.info.vae_scaling_factor;
            let mut outputs = model.vae_decoder.run(vec![("latent_sample", Feed::Float(scaled))]).ok()?;
            outputs.remove(&model.vae_output)?.into_dimensionality::<Ix4>().ok()?
        }
    };
    preview::to_picture(&decoded, width, height)
}

/// Decodes latents one image at a time (bounded memory for large batches) into pictures.
fn decode(model: &mut LoadedModel, latents: ArrayD<f32>) -> Result<Vec<RgbImage>, EngineError> {
    let scaled = latents / model.info.vae_scaling_factor;
    let mut images = Vec::with_capacity(scaled.shape()[0]);
    for i in 0..scaled.shape()[0] {
        let one = scaled.slice_axis(Axis(0), (i..i + 1).into()).to_owned();
        let mut outputs = model.vae_decoder.run(vec![("latent_sample", Feed::Float(one))])?;
        let sample = outputs
            .remove(&model.vae_output)
            .ok_or_else(|| EngineError::Inference { graph: "vae_decoder", message: "no sample".into() })?;
        let sample: Array<f32, Ix4> = sample
            .into_dimensionality()
            .map_err(|e| EngineError::Inference { graph: "vae_decoder", message: e.to_string() })?;
        images.extend(tensor_to_images(sample.view()));
    }
    Ok(images)
}
