//! The denoising loop shared by every pipeline, and the starting noise.
//!
//! Each denoiser call: copy the latents once per guidance branch, scale them for the scheduler, append the
//! pipeline's extra U-Net channels (inpainting mask and masked-image latents, InstructPix2Pix image latents),
//! run the denoiser (a U-Net, or a transformer: Flux's latents are packed only around the call), combine the
//! branches, step the scheduler, and (Blended Latent Diffusion) put the known
//! region back. Progress, previews and cancellation go through the [`StepObserver`].

use ndarray::{concatenate, ArrayD, Axis, IxDyn, Zip};

use super::conditioning::UnetConditioning;
use super::guidance::{guide, rescale};
use super::noise::BatchNoise;
use super::packing::{pack, unpack};
use super::vae::render_preview;
use super::StepObserver;
use crate::engine::error::EngineError;
use crate::engine::graph::{BoundInputs, Feed};
use crate::engine::model::LoadedModel;
use crate::engine::rng::NoiseSource;
use crate::engine::scheduler::{Scheduler, StepInput};

/// How the U-Net batch is laid out and its predictions combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Guidance {
    /// One branch `[cond × n]`: the prediction is used as is.
    Off,
    /// Classifier-free guidance on `[uncond × n, cond × n]`: `uncond + scale·(cond − uncond)`, then
    /// optionally rescaled (`rescale` 0 = off).
    Classifier {
        /// Guidance scale.
        scale: f32,
        /// Guidance rescale factor in [0, 1].
        rescale: f32,
    },
    /// InstructPix2Pix on `[text+image × n, uncond+image × n, uncond+no image × n]`:
    /// `uncond + text·(e_text − e_image) + image·(e_image − e_uncond)`.
    InstructPix2Pix {
        /// Text guidance scale.
        text: f32,
        /// Image guidance scale.
        image: f32,
    },
}

impl Guidance {
    /// Branches in the U-Net batch.
    pub(super) fn copies(self) -> usize {
        match self {
            Guidance::Off => 1,
            Guidance::Classifier { .. } => 2,
            Guidance::InstructPix2Pix { .. } => 3,
        }
    }

    /// Combines a U-Net output `[copies·n, C, h, w]` into one prediction `[n, C, h, w]`, with PyTorch's
    /// float32 operation order.
    pub(super) fn combine(self, predicted: ArrayD<f32>, n: usize) -> ArrayD<f32> {
        let branch = |i: usize| predicted.slice_axis(Axis(0), (i * n..(i + 1) * n).into());
        match self {
            Guidance::Off => predicted,
            Guidance::Classifier { scale, rescale: factor } => {
                let (uncond, cond) = (branch(0), branch(1));
                rescale(guide(uncond, cond.view(), scale), cond, factor)
            }
            Guidance::InstructPix2Pix { text, image } => {
                let (e_text, e_image, e_uncond) = (branch(0), branch(1), branch(2));
                Zip::from(&e_text)
                    .and(&e_image)
                    .and(&e_uncond)
                    .map_collect(|&t, &i, &u| (u + text * (t - i)) + image * (i - u))
            }
        }
    }
}

/// Blended Latent Diffusion (plain U-Nets inpainting): after every step the latents outside the mask are
/// replaced by the original's latents noised to the next call's timestep (the clean latents after the last
/// call), as diffusers' inpaint pipeline does for 4-channel U-Nets.
#[derive(Debug, Clone)]
pub(super) struct LatentBlend {
    /// Clean latents of the input picture, `[n, C, h, w]`.
    pub original: ArrayD<f32>,
    /// The run's unit-Gaussian noise, `[n, C, h, w]` (the same draw at every step).
    pub noise: ArrayD<f32>,
    /// 1 = repaint, 0 = keep, `[n, 1, h, w]`.
    pub mask: ArrayD<f32>,
}

impl LatentBlend {
    /// `(1 − mask)·known + mask·latents`, with `known` at the noise level of call `next` (None: clean).
    fn apply(&self, latents: ArrayD<f32>, scheduler: &dyn Scheduler, next: Option<usize>) -> ArrayD<f32> {
        let known = match next {
            Some(call) => scheduler.add_noise(self.original.view(), self.noise.view(), call),
            None => self.original.clone(),
        };
        let Some(mask) = self.mask.broadcast(latents.raw_dim()) else {
            return latents;
        };
        Zip::from(&known).and(&mask).and(&latents).map_collect(|&k, &m, &l| (1.0 - m) * k + m * l)
    }
}

/// One run of the loop: where it starts and what the U-Net gets besides the latents.
pub(super) struct Denoise<'a> {
    /// The sample entering call `start`, `[n, C, h, w]`.
    pub latents: ArrayD<f32>,
    /// First call index (img2img and inpainting start later for strength < 1).
    pub start: usize,
    /// The U-Net's text (and family-specific) inputs for the whole batch, `[copies·n, …]`.
    pub conditioning: &'a UnetConditioning,
    /// Batch layout and combination.
    pub guidance: Guidance,
    /// Channels appended after the scaled latents, `[copies·n, k, h, w]`.
    pub extra_channels: Option<ArrayD<f32>>,
    /// Known-region replacement after each step.
    pub blend: Option<LatentBlend>,
    /// Picture size, for previews.
    pub size: (u32, u32),
}

/// Runs calls `start..` of `scheduler` and returns the final latents. Steps are reported 1-based relative to
/// `start`, out of the calls this run makes.
pub(super) fn denoise(
    model: &mut LoadedModel,
    scheduler: &mut dyn Scheduler,
    run: Denoise<'_>,
    noise: &mut dyn NoiseSource,
    observer: &mut dyn StepObserver,
) -> Result<ArrayD<f32>, EngineError> {
    let n = run.latents.shape()[0];
    let copies = run.guidance.copies();
    let timesteps: Vec<f64> = scheduler.timesteps().to_vec();
    let calls = timesteps.len();
    let total = calls.saturating_sub(run.start);
    let shape_err = |e: ndarray::ShapeError| EngineError::InvalidRequest(e.to_string());
    let mut latents = run.latents;
    let mut bound = None;

    for (call, &t) in timesteps.iter().enumerate().skip(run.start) {
        if observer.should_stop() {
            return Err(EngineError::Cancelled);
        }
        let model_input = if copies == 1 {
            latents.clone()
        } else {
            let views = vec![latents.view(); copies];
            concatenate(Axis(0), &views).map_err(shape_err)?
        };
        let mut sample = scheduler.scale_model_input(model_input.view(), call);
        if let Some(extra) = &run.extra_channels {
            sample = concatenate(Axis(1), &[sample.view(), extra.view()]).map_err(shape_err)?;
        }
        let last = call + 1 == calls;
        let predicted = predict(model, sample, t, run.conditioning, &mut bound, last)?;
        if predicted.shape() != model_input.shape() {
            return Err(EngineError::Inference {
                graph: model.denoiser.name(),
                message: format!("output has shape {:?}, expected {:?}", predicted.shape(), model_input.shape()),
            });
        }
        let prediction = run.guidance.combine(predicted, n);
        let out = scheduler.step(StepInput::new(call, prediction.view(), latents.view()), noise);
        latents = out.prev_sample;
        if let Some(blend) = &run.blend {
            let next = (call + 1 < calls).then_some(call + 1);
            latents = blend.apply(latents, scheduler, next);
        }
        let step = call + 1 - run.start;
        let preview = observer.preview_wanted(step, total).and_then(|mode| {
            let estimate = out.pred_original_sample.as_ref().unwrap_or(&latents);
            render_preview(model, estimate, mode, run.size.0, run.size.1)
        });
        observer.on_step(step, total, preview);
    }
    Ok(latents)
}

/// One denoiser call on `sample` `[b, C, h, w]` at timestep `t` (packed around the call for Flux); the
/// prediction comes back unpacked, `[b, C_out, h, w]`. The timestep goes in as the graph declares it: a
/// scalar, or one per row, in the family's scale. `conditioning` is bound to the denoiser on the first call
/// of a run and kept in `bound` for the next ones (the caller clears `bound` when the conditioning changes),
/// so only the latents and the timestep are handed over at each call. The denoiser's arena memory is kept
/// between calls and handed back after the `last` one.
pub(super) fn predict(
    model: &mut LoadedModel,
    sample: ArrayD<f32>,
    t: f64,
    conditioning: &UnetConditioning,
    bound: &mut Option<BoundInputs>,
    last: bool,
) -> Result<ArrayD<f32>, EngineError> {
    let kind = model.denoiser_kind;
    let graph = model.denoiser.name();
    let rows = sample.shape().first().copied().unwrap_or(0);
    let (h, w) = (sample.shape().get(2).copied().unwrap_or(0), sample.shape().get(3).copied().unwrap_or(0));
    let value = kind.timestep_value(t);
    let timestep = match model.denoiser.input("timestep").map(|s| s.rank()) {
        Some(0) => ArrayD::from_elem(IxDyn(&[]), value),
        _ => ArrayD::from_elem(IxDyn(&[rows]), value),
    };
    let sample = if kind.packs_latents() { pack(&sample)? } else { sample };
    let feeds = vec![(kind.sample_input(), Feed::Float(sample)), ("timestep", Feed::Float(timestep))];
    let mut inputs = match bound.take() {
        Some(inputs) => inputs,
        None => model.denoiser.bind(conditioning.feeds())?,
    };
    let outputs = model.denoiser.run_bound(&mut inputs, feeds, !last);
    *bound = Some(inputs);
    let predicted = outputs?
        .remove(&model.denoiser_output)
        .ok_or_else(|| EngineError::Inference { graph, message: "no output".into() })?;
    if kind.packs_latents() {
        unpack(&predicted, h, w)
    } else {
        Ok(predicted)
    }
}

/// The run's unit-Gaussian noise `[n, C, h, w]`: the request's `latents` when given (checked against
/// `shape`), else drawn from the per-image generators.
pub(super) fn initial_noise(
    given: Option<&ArrayD<f32>>,
    shape: &[usize],
    noise: &mut BatchNoise,
) -> Result<ArrayD<f32>, EngineError> {
    match given {
        Some(given) => {
            if given.shape() != shape {
                return Err(EngineError::InvalidRequest(format!(
                    "latents have shape {:?}, expected {:?}",
                    given.shape(),
                    shape
                )));
            }
            Ok(given.clone())
        }
        None => {
            let mut values = vec![0f32; shape.iter().product()];
            noise.fill_normal(&mut values);
            ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| EngineError::InvalidRequest(e.to_string()))
        }
    }
}
