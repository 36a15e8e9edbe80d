//! DiffEdit masks (Couairon et al., 2022, "DiffEdit: Diffusion-based semantic image editing with mask
//! guidance"): the region to repaint is where the denoiser's noise predictions under the prompt describing
//! the picture (`source_prompt`) and under the prompt describing the wanted picture (`prompt`) differ; the
//! inpainting pipeline then repaints that region.
//!
//! The mask is computed as diffusers 0.36's `StableDiffusionDiffEditPipeline.generate_mask` computes it: the
//! picture's VAE mean (times the scaling factor) is noised to `encode_strength` of the schedule with
//! `samples` noise draws; for each draw the denoiser predicts the noise under both prompts;
//! `|ε_target − ε_source|` is averaged over the draws and the latent channels; the map is clamped at
//! `threshold × its mean`, divided by that, and binarised at 0.5 (above = repaint). The latent-grid mask is
//! then upsampled (nearest) to the picture, so that the inpainting pipeline's own nearest downsampling gives
//! back exactly the latent mask.
//!
//! Differences from diffusers, all deliberate: (1) both guided predictions use the same negative prompt, so
//! `ε_target − ε_source = scale · (c_target − c_source)`: the unconditional branch cancels and is not run,
//! and the difference is multiplied by the guidance scale (which the threshold, relative to the mean, then
//! cancels too); (2) the draws run one at a time (a batch of two rows per denoiser call, bounded memory,
//! progress per draw) instead of one batch of `4 × samples` rows; (3) a map that is zero everywhere
//! (identical prompts) gives an empty mask, where diffusers divides 0 by 0 and marks everything; (4) the
//! draws come from their own generator seeded with the job's seed (`seed`, image 0's), one `[1, C, h, w]`
//! draw per sample, and the images keep their own generators: a DiffEdit job's pictures are exactly those
//! of an inpainting job with the same seed and the returned mask.

use image::{GrayImage, RgbImage};
use ndarray::{concatenate, Array2, ArrayD, ArrayView2, ArrayViewD, Axis};

use super::conditioning::{assemble, classifier_guidance, Branch, SizeConditioning};
use super::denoise::{predict, Guidance};
use super::edit::{edit, scaled_latents, EditMode, EditRequest};
use super::noise::BatchNoise;
use super::prompt::{encode_prompt, Prompts};
use super::text_to_image::build_scheduler;
use super::StepObserver;
use crate::engine::error::EngineError;
use crate::engine::image::image_to_tensor;
use crate::engine::model::{Capability, LoadedModel, ModelInfo};
use crate::engine::preview::PreviewMode;
use crate::engine::rng::NoiseSource;

/// diffusers' `mask_encode_strength` default.
pub const DEFAULT_ENCODE_STRENGTH: f32 = 0.5;
/// diffusers' `num_maps_per_mask` default.
pub const DEFAULT_SAMPLES: u32 = 10;
/// diffusers' `mask_thresholding_ratio` default.
pub const DEFAULT_THRESHOLD: f32 = 3.0;
/// The most noise draws a mask may average.
pub const MAX_SAMPLES: u32 = 32;

/// How a DiffEdit mask is computed.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffEditOptions {
    /// What the input picture shows (the request's `prompt` is what it should show).
    pub source_prompt: String,
    /// In (0, 1]: how far into the schedule the picture is noised for the predictions.
    pub encode_strength: f32,
    /// Noise draws averaged, 1–[`MAX_SAMPLES`].
    pub samples: u32,
    /// Positive: the map is clamped at `threshold × mean` before binarising at half of that.
    pub threshold: f32,
}

impl DiffEditOptions {
    /// Options with diffusers' defaults for `source_prompt`.
    pub fn new(source_prompt: impl Into<String>) -> Self {
        Self {
            source_prompt: source_prompt.into(),
            encode_strength: DEFAULT_ENCODE_STRENGTH,
            samples: DEFAULT_SAMPLES,
            threshold: DEFAULT_THRESHOLD,
        }
    }

    fn check(&self) -> Result<(), EngineError> {
        let bad = |what: &str| Err(EngineError::InvalidRequest(format!("DiffEdit: {what}")));
        if self.source_prompt.trim().is_empty() {
            return bad("the source prompt is empty");
        }
        if !(self.encode_strength > 0.0 && self.encode_strength <= 1.0) {
            return bad("the encode strength must be in (0, 1]");
        }
        if !(1..=MAX_SAMPLES).contains(&self.samples) {
            return bad("samples must be between 1 and 32");
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return bad("the threshold must be positive");
        }
        Ok(())
    }
}

/// A DiffEdit run's result: the pictures and the mask they were inpainted with.
#[derive(Debug, Clone)]
pub struct DiffEditOutput {
    /// One picture per requested image.
    pub images: Vec<RgbImage>,
    /// White = repainted, black = kept; the picture's size.
    pub mask: GrayImage,
}

/// Whether `info`'s model can run DiffEdit: it inpaints, with a plain U-Net (the mask's predictions need no
/// mask input; 9-channel inpainting U-Nets are refused).
pub fn can_diffedit(info: &ModelInfo) -> Result<(), EngineError> {
    info.require(Capability::Inpaint)?;
    if info.unet_in_channels != info.latent_channels {
        return Err(EngineError::InvalidRequest(format!(
            "DiffEdit needs a plain {}-channel denoiser; this one takes {} channels",
            info.latent_channels, info.unet_in_channels
        )));
    }
    Ok(())
}

/// Computes the mask of `request` (an `Inpaint` edit whose `diffedit` options are set, whose `mask` is
/// ignored) and inpaints with it. Progress counts the mask's draws first, then the inpainting's calls.
pub fn diffedit(
    model: &mut LoadedModel,
    request: &EditRequest,
    observer: &mut dyn StepObserver,
) -> Result<DiffEditOutput, EngineError> {
    let options = request
        .diffedit
        .as_ref()
        .ok_or_else(|| EngineError::InvalidRequest("DiffEdit needs a source prompt".into()))?;
    if request.mode != EditMode::Inpaint {
        return Err(EngineError::InvalidRequest("DiffEdit runs inpainting only".into()));
    }
    let inpaint_calls = {
        let scheduler = build_scheduler(&model.info, &request.base)?;
        let start = scheduler
            .start_call_for_strength(f64::from(request.strength))
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        scheduler.timesteps().len().saturating_sub(start)
    };
    let samples = options.samples as usize;
    let total = samples + inpaint_calls;
    let mask = semantic_mask(model, request, options, &mut Phase { inner: observer, offset: 0, total })?;
    let mut inpaint = request.clone();
    inpaint.mask = Some(mask.clone());
    inpaint.diffedit = None;
    let images = edit(model, &inpaint, &mut Phase { inner: observer, offset: samples, total })?;
    Ok(DiffEditOutput { images, mask })
}

/// The DiffEdit mask of `request`'s picture for `options.source_prompt` → `request.base.prompt`, at the
/// picture's size (white = repaint). Reports each draw as a step of `options.samples`.
pub fn semantic_mask(
    model: &mut LoadedModel,
    request: &EditRequest,
    options: &DiffEditOptions,
    observer: &mut dyn StepObserver,
) -> Result<GrayImage, EngineError> {
    can_diffedit(&model.info)?;
    options.check()?;
    let base = &request.base;
    let (width, height) = request.image.dimensions();
    let factor = model.info.vae_scale_factor * model.info.patch_size;
    if width == 0 || height == 0 || width % factor != 0 || height % factor != 0 {
        return Err(EngineError::InvalidRequest(format!("width and height must be positive multiples of {factor}")));
    }
    let latents = scaled_latents(model, image_to_tensor(&request.image).view())?;
    let scheduler = build_scheduler(&model.info, base)?;
    let start = scheduler
        .start_call_for_strength(f64::from(options.encode_strength))
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
    let t =
        scheduler.timesteps().get(start).copied().ok_or_else(|| {
            EngineError::InvalidRequest(format!("the encode strength leaves no step of {}", base.steps))
        })?;
    // The batch is [source, target]: the source prompt in the "negative" slot, the target in the "positive".
    let prompts = Prompts {
        positive: encode_prompt(model, &base.prompt)?,
        negative: Some(encode_prompt(model, &options.source_prompt)?),
    };
    let size = SizeConditioning::for_picture(width, height);
    let conditioning = assemble(model, &prompts, &[Branch::Negative, Branch::Positive], 1, &size, base.guidance_scale)?;
    let scale = match classifier_guidance(model, base.guidance_scale, 0.0) {
        Guidance::Classifier { scale, .. } => scale,
        _ => 1.0,
    };
    let shape_err = |e: ndarray::ShapeError| EngineError::InvalidRequest(e.to_string());
    let (h, w) = (latents.shape()[2], latents.shape()[3]);
    let mut map = Array2::<f32>::zeros((h, w));
    let mut generator = BatchNoise::new(&[base.seed]);
    let samples = options.samples as usize;
    let mut bound = None;
    for draw in 0..samples {
        if observer.should_stop() {
            return Err(EngineError::Cancelled);
        }
        let mut values = vec![0f32; latents.len()];
        generator.fill_normal(&mut values);
        let noise = ArrayD::from_shape_vec(latents.raw_dim(), values).map_err(shape_err)?;
        let noisy = scheduler.add_noise(latents.view(), noise.view(), start);
        let pair = concatenate(Axis(0), &[noisy.view(), noisy.view()]).map_err(shape_err)?;
        let sample = scheduler.scale_model_input(pair.view(), start);
        let predicted = predict(model, sample, t, &conditioning, &mut bound, draw + 1 == samples)?;
        if predicted.shape() != pair.shape() {
            return Err(EngineError::Inference {
                graph: model.denoiser.name(),
                message: format!("output has shape {:?}, expected {:?}", predicted.shape(), pair.shape()),
            });
        }
        let source = predicted.slice_axis(Axis(0), (0..1).into());
        let target = predicted.slice_axis(Axis(0), (1..2).into());
        accumulate(&mut map, source, target, scale)?;
        observer.on_step(draw + 1, samples, None);
    }
    map.mapv_inplace(|v| v / samples as f32);
    let binary = threshold(map.view(), options.threshold);
    Ok(upsample(binary.view(), model.info.vae_scale_factor))
}

/// Adds `scale · |target − source|`, averaged over the channels, to `map` `[h, w]`; the predictions are
/// `[1, C, h, w]`.
pub fn accumulate(
    map: &mut Array2<f32>,
    source: ArrayViewD<'_, f32>,
    target: ArrayViewD<'_, f32>,
    scale: f32,
) -> Result<(), EngineError> {
    let (h, w) = map.dim();
    let shape = source.shape();
    if shape.len() != 4 || shape[0] != 1 || shape[2] != h || shape[3] != w || target.shape() != shape {
        return Err(EngineError::InvalidRequest(format!(
            "DiffEdit: predictions {:?} and {:?} do not fit a {h}x{w} map",
            source.shape(),
            target.shape()
        )));
    }
    let channels = shape[1].max(1) as f32;
    for (index, s) in source.indexed_iter() {
        let (y, x) = (index[2], index[3]);
        map[[y, x]] += scale * (target[&index] - s).abs() / channels;
    }
    Ok(())
}

/// diffusers' thresholding of the averaged map: clamp to `[0, ratio · mean]`, divide by `ratio · mean`, and
/// mark (1) what lies above 0.5 — a cell is marked when its value exceeds `ratio / 2` times the mean. A map
/// with no positive mean (identical prompts) marks nothing.
pub fn threshold(map: ArrayView2<'_, f32>, ratio: f32) -> Array2<f32> {
    let mean = map.mean().unwrap_or(0.0);
    let clamp = mean * ratio;
    if !(clamp.is_finite() && clamp > 0.0) {
        return Array2::zeros(map.raw_dim());
    }
    map.mapv(|v| if v.clamp(0.0, clamp) / clamp <= 0.5 { 0.0 } else { 1.0 })
}

/// A latent-grid mask `[h, w]` (1 = repaint) as a picture `factor` times larger, each cell a block of white
/// (255) or black (0).
pub fn upsample(binary: ArrayView2<'_, f32>, factor: u32) -> GrayImage {
    let (h, w) = binary.dim();
    let factor = factor.max(1);
    GrayImage::from_fn(w as u32 * factor, h as u32 * factor, |x, y| {
        let on = binary[[(y / factor) as usize, (x / factor) as usize]] >= 0.5;
        image::Luma([if on { 255 } else { 0 }])
    })
}

/// An observer for one phase of a run reported as one: steps `1..=n` of the phase are steps
/// `offset + 1..=offset + n` of `total`.
struct Phase<'o> {
    inner: &'o mut dyn StepObserver,
    offset: usize,
    total: usize,
}

impl StepObserver for Phase<'_> {
    fn on_step(&mut self, step: usize, _total: usize, preview: Option<RgbImage>) {
        self.inner.on_step(self.offset + step, self.total, preview);
    }

    fn preview_wanted(&self, step: usize, _total: usize) -> Option<PreviewMode> {
        self.inner.preview_wanted(self.offset + step, self.total)
    }

    fn should_stop(&self) -> bool {
        self.inner.should_stop()
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array4;

    use super::*;

    fn predictions(f: impl Fn(usize, usize, usize) -> f32) -> ArrayD<f32> {
        Array4::from_shape_fn((1, 4, 8, 8), |(_, c, y, x)| f(c, y, x)).into_dyn()
    }

    #[test]
    fn identical_predictions_give_an_empty_mask() {
        let eps = predictions(|c, y, x| (c * 64 + y * 8 + x) as f32 * 0.01 - 1.0);
        let mut map = Array2::zeros((8, 8));
        accumulate(&mut map, eps.view(), eps.view(), 7.5).unwrap();
        assert!(map.iter().all(|v| *v == 0.0));
        let mask = threshold(map.view(), DEFAULT_THRESHOLD);
        assert!(mask.iter().all(|v| *v == 0.0), "0/0 must not mark everything");
        assert!(upsample(mask.view(), 8).pixels().all(|p| p[0] == 0));
    }

    #[test]
    fn a_local_difference_gives_a_mask_there() {
        let source = predictions(|c, y, x| ((c + y * 3 + x * 5) % 7) as f32 * 0.1);
        // The target differs in rows 2..4, columns 5..8 (in one channel more than the others), plus a faint
        // difference everywhere.
        let target = predictions(|c, y, x| {
            let local = if (2..4).contains(&y) && (5..8).contains(&x) { 1.0 + c as f32 } else { 0.0 };
            ((c + y * 3 + x * 5) % 7) as f32 * 0.1 + local + 0.01
        });
        let mut map = Array2::zeros((8, 8));
        accumulate(&mut map, source.view(), target.view(), 1.0).unwrap();
        let mask = threshold(map.view(), DEFAULT_THRESHOLD);
        for ((y, x), v) in mask.indexed_iter() {
            let inside = (2..4).contains(&y) && (5..8).contains(&x);
            assert_eq!(*v, if inside { 1.0 } else { 0.0 }, "{y},{x}");
        }
        let picture = upsample(mask.view(), 8);
        assert_eq!(picture.dimensions(), (64, 64));
        assert_eq!((picture.get_pixel(40, 16)[0], picture.get_pixel(39, 16)[0]), (255, 0));
        assert_eq!((picture.get_pixel(63, 31)[0], picture.get_pixel(63, 32)[0]), (255, 0));
        // Scaling the difference (the guidance scale) changes nothing.
        let mut scaled = Array2::zeros((8, 8));
        accumulate(&mut scaled, source.view(), target.view(), 7.5).unwrap();
        assert_eq!(threshold(scaled.view(), DEFAULT_THRESHOLD), mask);
    }

    #[test]
    fn the_threshold_marks_cells_above_half_the_ratio_times_the_mean() {
        // Mean 1: with ratio 3 a cell is marked above 1.5; with ratio 1, above 0.5; with ratio 6, above 3.
        let map = Array2::from_shape_vec((1, 5), vec![0.0, 0.5, 1.0, 1.5, 2.0]).unwrap();
        let marked = |ratio: f32| threshold(map.view(), ratio).into_raw_vec_and_offset().0;
        assert_eq!(marked(3.0), [0.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(marked(1.0), [0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(marked(6.0), [0.0; 5]);
        // A cell far above the clamp counts once, like one just above it.
        let peaked = Array2::from_shape_vec((1, 4), vec![0.0, 0.0, 0.0, 100.0]).unwrap();
        assert_eq!(threshold(peaked.view(), 3.0).into_raw_vec_and_offset().0, [0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn mismatched_predictions_are_an_error() {
        let mut map = Array2::zeros((4, 4));
        let eps = predictions(|_, _, _| 0.0);
        assert!(accumulate(&mut map, eps.view(), eps.view(), 1.0).is_err());
    }

    #[test]
    fn options_are_checked() {
        assert!(DiffEditOptions::new("a red circle").check().is_ok());
        for bad in [
            DiffEditOptions::new(" "),
            DiffEditOptions { encode_strength: 0.0, ..DiffEditOptions::new("x") },
            DiffEditOptions { samples: 33, ..DiffEditOptions::new("x") },
            DiffEditOptions { threshold: 0.0, ..DiffEditOptions::new("x") },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phases_count_as_one_run() {
        #[derive(Default)]
        struct Seen(Vec<(usize, usize)>);
        impl StepObserver for Seen {
            fn on_step(&mut self, step: usize, total: usize, _preview: Option<RgbImage>) {
                self.0.push((step, total));
            }
        }
        let mut seen = Seen::default();
        Phase { inner: &mut seen, offset: 0, total: 5 }.on_step(2, 2, None);
        Phase { inner: &mut seen, offset: 2, total: 5 }.on_step(3, 3, None);
        assert_eq!(seen.0, [(2, 5), (5, 5)]);
    }
}
