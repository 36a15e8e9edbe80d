//! The VAE at both ends of a pipeline: encoding pictures into latents (edits), decoding latents into
//! pictures, and step previews.

use image::RgbImage;
use ndarray::{s, Array, ArrayD, ArrayView4, Axis, Ix4};

use crate::engine::error::EngineError;
use crate::engine::graph::Feed;
use crate::engine::image::tensor_to_images;
use crate::engine::model::LoadedModel;
use crate::engine::preview::{self, PreviewMode};

/// The mean of the VAE's latent distribution for `pixels` `[b, 3, H, W]` in [-1, 1]: `[b, C, H/f, W/f]`,
/// **not** multiplied by the scaling factor. Encodes one picture at a time (bounded memory).
pub fn encode_mean(model: &mut LoadedModel, pixels: ArrayView4<'_, f32>) -> Result<ArrayD<f32>, EngineError> {
    let channels = model.info.latent_channels as usize;
    let Some(encoder) = model.vae_encoder.as_mut() else {
        return Err(EngineError::InvalidRequest("the model has no VAE encoder".into()));
    };
    let fail = |message: String| EngineError::Inference { graph: "vae_encoder", message };
    let mut means = Vec::with_capacity(pixels.shape()[0]);
    for i in 0..pixels.shape()[0] {
        let one = pixels.slice(s![i..i + 1, .., .., ..]).to_owned().into_dyn();
        let mut outputs = encoder.graph.run(vec![("sample", Feed::Float(one))])?;
        let params = outputs.remove(&encoder.output).ok_or_else(|| fail("no latent output".into()))?;
        let got = params.shape().get(1).copied().unwrap_or(0);
        // mean ‖ logvar (2C channels), or already C channels.
        if params.ndim() != 4 || (got != channels && got != 2 * channels) {
            return Err(fail(format!(
                "latent output has shape {:?}, expected {channels} or {} channels",
                params.shape(),
                2 * channels
            )));
        }
        means.push(params.slice_axis(Axis(1), (0..channels).into()).to_owned());
    }
    let views: Vec<_> = means.iter().map(|m| m.view()).collect();
    ndarray::concatenate(Axis(0), &views).map_err(|e| fail(e.to_string()))
}

/// Whether decoding adds the VAE's `shift_factor` after dividing by its scaling factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShiftOnDecode {
    /// `latents / scaling + shift`: every pipeline (a no-op where the VAE has no shift).
    Add,
    /// `latents / scaling`: diffusers 0.36's `StableDiffusion3InpaintPipeline` forgets the shift, and the
    /// engine follows it so that its pictures are optimum's.
    Omit,
}

/// The VAE decoder's input for diffusion latents: `latents / scaling (+ shift)`.
fn vae_input(model: &LoadedModel, latents: ArrayD<f32>, shift: ShiftOnDecode) -> ArrayD<f32> {
    let scaled = latents / model.info.vae_scaling_factor;
    match shift {
        ShiftOnDecode::Add if model.info.vae_shift_factor != 0.0 => scaled + model.info.vae_shift_factor,
        _ => scaled,
    }
}

/// Decodes latents one image at a time (bounded memory for large batches) into pictures.
pub(super) fn decode(
    model: &mut LoadedModel,
    latents: ArrayD<f32>,
    shift: ShiftOnDecode,
) -> Result<Vec<RgbImage>, EngineError> {
    let scaled = vae_input(model, latents, shift);
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

/// A preview of the first image of `latents` (diffusion latents, unpacked). A preview that fails is skipped:
/// it must never fail the job.
pub(super) fn render_preview(
    model: &mut LoadedModel,
    latents: &ArrayD<f32>,
    mode: PreviewMode,
    width: u32,
    height: u32,
) -> Option<RgbImage> {
    let first = latents.slice_axis(Axis(0), (0..1).into()).to_owned();
    // Without an approximation for this latent space (16-channel SD3/Flux latents), previews use the VAE.
    let mode = if model.preview.is_available() { mode } else { PreviewMode::Vae };
    let decoded = match mode {
        PreviewMode::Approx => model.preview.decode(&first).ok()?,
        PreviewMode::Vae => {
            let scaled = vae_input(model, first, ShiftOnDecode::Add);
            let mut outputs = model.vae_decoder.run(vec![("latent_sample", Feed::Float(scaled))]).ok()?;
            outputs.remove(&model.vae_output)?.into_dimensionality::<Ix4>().ok()?
        }
    };
    preview::to_picture(&decoded, width, height)
}
