//! Image editing pipelines: img2img (SDEdit), inpainting (9-channel U-Nets, or Blended Latent Diffusion with
//! plain 4-channel U-Nets), and InstructPix2Pix (8-channel U-Nets). Outpainting is inpainting on a padded
//! canvas, prepared by [`outpaint_canvas`].

use image::{GrayImage, RgbImage};
use ndarray::{concatenate, Array4, ArrayD, ArrayView4, Axis};

use super::conditioning::{assemble, branches, classifier_guidance, SizeConditioning, UnetConditioning};
use super::denoise::{denoise, initial_noise, Denoise, Guidance, LatentBlend};
use super::mask::{binarise, blend_pixels, feather, latent_mask, masked_pixels};
use super::noise::BatchNoise;
use super::prompt::encode_prompts;
use super::text_to_image::{build_scheduler, latent_shape};
use super::vae::{decode, encode_mean, ShiftOnDecode};
use super::{GenerateRequest, RunExtras, StepObserver};
use crate::engine::error::EngineError;
use crate::engine::family::Family;
use crate::engine::image::image_to_tensor;
use crate::engine::model::{Capability, LoadedModel};
use crate::engine::rng::NoiseSource;
use crate::engine::scheduler::Scheduler;

/// Which edit to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditMode {
    /// SDEdit: noise the encoded image to the strength's start timestep and denoise from there.
    Img2img,
    /// Repaint the white region of the mask.
    Inpaint,
    /// InstructPix2Pix: the prompt is an instruction.
    Instruct,
}

/// A validated edit request. `base.width`/`base.height` equal the image size (already resized by the caller).
#[derive(Debug, Clone)]
pub struct EditRequest {
    /// Prompt, guidance, scheduler, seed, images, optional starting noise (`latents`, unit Gaussian).
    pub base: GenerateRequest,
    /// The edit.
    pub mode: EditMode,
    /// The input picture, `base.width` × `base.height`.
    pub image: RgbImage,
    /// White = repaint, black = keep; same size as `image`. Required for `Inpaint`.
    pub mask: Option<GrayImage>,
    /// In (0, 1]: how far into the noise schedule the image is pushed (img2img, inpaint; instruct ignores it).
    pub strength: f32,
    /// InstructPix2Pix image guidance.
    pub image_guidance_scale: f32,
    /// Feathering, in pixels, of the blend of decoded pixels back into the original (4-channel inpainting
    /// only). The feather runs inwards from the mask's edge, so pixels outside the mask are always kept
    /// exactly; 0 = hard edge.
    pub mask_blur: u32,
    /// DiffEdit: compute the mask from the prompts instead of taking `mask` (run with
    /// [`super::diffedit::diffedit`], which returns the mask with the pictures). `None` for every other edit.
    pub diffedit: Option<super::diffedit::DiffEditOptions>,
}

/// Runs an edit and returns one picture per requested image (`base.images`, per-image seeds as for generation).
///
/// As diffusers 0.36's `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline` and
/// `StableDiffusionInstructPix2PixPipeline` compute it, with two deliberate differences: the VAE encoder's
/// **mean** is used where diffusers draws a sample (deterministic edits), and `base.latents`, when given, is
/// the unit-Gaussian noise of the run (what diffusers draws from its generator), for every mode. Guidance
/// rescale is not applied: none of these diffusers pipelines applies it. Steps are reported relative to the
/// first call the strength leaves (img2img at strength 0.5 over 10 steps reports 1..=5 of 5).
pub fn edit(
    model: &mut LoadedModel,
    request: &EditRequest,
    observer: &mut dyn StepObserver,
) -> Result<Vec<RgbImage>, EngineError> {
    edit_with(model, request, RunExtras::default(), observer)
}

/// [`edit`] with [`RunExtras`]. SDXL models run the same modes with their own conditioning (diffusers'
/// `StableDiffusionXLImg2ImgPipeline` and `StableDiffusionXLInpaintPipeline`: `time_ids` from the picture
/// size, or the refiner's aesthetic scores). SD3 (`StableDiffusion3Img2ImgPipeline`,
/// `StableDiffusion3InpaintPipeline`: latent blending with its 16-channel transformer, decoded without the VAE
/// shift as diffusers 0.36 does) and Flux (`FluxImg2ImgPipeline`; no inpainting) encode pictures as
/// `(mean - shift_factor) * scaling_factor` and noise them with the flow schedule's `scale_noise`.
pub fn edit_with(
    model: &mut LoadedModel,
    request: &EditRequest,
    extras: RunExtras<'_>,
    observer: &mut dyn StepObserver,
) -> Result<Vec<RgbImage>, EngineError> {
    let wanted = match request.mode {
        EditMode::Img2img => Capability::Img2img,
        EditMode::Inpaint => Capability::Inpaint,
        EditMode::Instruct => Capability::Instruct,
    };
    model.info.require(wanted)?;
    if request.diffedit.is_some() {
        return Err(EngineError::InvalidRequest(
            "a DiffEdit request runs through `diffedit`, which returns its mask".into(),
        ));
    }
    let base = &request.base;
    let shape = latent_shape(&model.info, base)?;
    if request.image.dimensions() != (base.width, base.height) {
        return Err(EngineError::InvalidRequest(format!(
            "image is {}x{}, the request says {}x{}",
            request.image.width(),
            request.image.height(),
            base.width,
            base.height
        )));
    }
    let mut generators = BatchNoise::new(&base.seeds());
    let noise = initial_noise(base.latents.as_ref(), &shape, &mut generators)?;
    let mut sched = build_scheduler(&model.info, base)?;
    let negative = extras.negative_prompt(base).map(str::to_string);
    let mut job = Job {
        request,
        n: shape[0],
        noise,
        generators,
        step_noise: extras.step_noise,
        negative,
        pixels: image_to_tensor(&request.image),
    };
    match request.mode {
        EditMode::Img2img => job.img2img(model, sched.as_mut(), observer),
        EditMode::Inpaint => job.inpaint(model, sched.as_mut(), observer),
        EditMode::Instruct => job.instruct(model, sched.as_mut(), observer),
    }
}

/// What every mode starts from.
struct Job<'r, 'x> {
    request: &'r EditRequest,
    /// Images.
    n: usize,
    /// The run's unit-Gaussian noise `[n, C, h, w]`.
    noise: ArrayD<f32>,
    /// Per-image generators (for ancestral schedulers' later draws).
    generators: BatchNoise,
    /// Replaces `generators` for the later draws when given.
    step_noise: Option<&'x mut dyn NoiseSource>,
    /// The negative prompt as diffusers receives it (`None`: absent).
    negative: Option<String>,
    /// The input picture `[1, 3, H, W]` in [-1, 1].
    pixels: Array4<f32>,
}

impl Job<'_, '_> {
    fn classifier_guidance(&self, model: &LoadedModel) -> Guidance {
        classifier_guidance(model, self.request.base.guidance_scale, 0.0)
    }

    /// The U-Net's conditioning for `guidance`'s branches; SDXL's sizes are the picture's.
    fn conditioning(&self, model: &mut LoadedModel, guidance: Guidance) -> Result<UnetConditioning, EngineError> {
        let base = &self.request.base;
        let prompts = encode_prompts(model, &base.prompt, self.negative.as_deref(), guidance != Guidance::Off)?;
        let size = SizeConditioning::for_picture(base.width, base.height);
        assemble(model, &prompts, branches(guidance), self.n, &size, base.guidance_scale)
    }

    /// Where the scheduler's later draws come from.
    fn step_noise(&mut self) -> &mut dyn NoiseSource {
        match self.step_noise.as_deref_mut() {
            Some(noise) => noise,
            None => &mut self.generators,
        }
    }

    fn start_call(&self, sched: &dyn Scheduler) -> Result<usize, EngineError> {
        sched
            .start_call_for_strength(f64::from(self.request.strength))
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }

    fn size(&self) -> (u32, u32) {
        (self.request.base.width, self.request.base.height)
    }

    /// SDEdit: the picture's latents noised to the strength's first call, denoised from there.
    fn img2img(
        &mut self,
        model: &mut LoadedModel,
        sched: &mut dyn Scheduler,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, EngineError> {
        let start = self.start_call(sched)?;
        let original = repeat(&scaled_latents(model, self.pixels.view())?, self.n)?;
        let latents = sched.add_noise(original.view(), self.noise.view(), start);
        let guidance = self.classifier_guidance(model);
        let conditioning = self.conditioning(model, guidance)?;
        let run = Denoise {
            latents,
            start,
            conditioning: &conditioning,
            guidance,
            extra_channels: None,
            blend: None,
            size: self.size(),
        };
        let latents = denoise(model, sched, run, self.step_noise(), observer)?;
        decode(model, latents, ShiftOnDecode::Add)
    }

    /// Inpainting: a 9-channel U-Net gets the mask and the masked picture's latents; a plain U-Net runs
    /// Blended Latent Diffusion and the decoded pixels outside the mask are blended back from the input.
    fn inpaint(
        &mut self,
        model: &mut LoadedModel,
        sched: &mut dyn Scheduler,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, EngineError> {
        let request = self.request;
        let mask =
            request.mask.as_ref().ok_or_else(|| EngineError::InvalidRequest("inpainting needs a mask".into()))?;
        if mask.dimensions() != request.image.dimensions() {
            return Err(EngineError::InvalidRequest(format!(
                "mask is {}x{}, the image {}x{}",
                mask.width(),
                mask.height(),
                request.image.width(),
                request.image.height()
            )));
        }
        let binary = binarise(mask);
        let factor = model.info.vae_scale_factor as usize;
        let mask_latent = latent_mask(binary.view(), factor).into_dyn();
        let start = self.start_call(sched)?;
        let strength_max = request.strength == 1.0;
        let blended = model.info.unet_in_channels == model.info.latent_channels;
        let original = if blended || !strength_max {
            Some(repeat(&scaled_latents(model, self.pixels.view())?, self.n)?)
        } else {
            None
        };
        let latents = match &original {
            Some(original) if !strength_max => sched.add_noise(original.view(), self.noise.view(), start),
            _ => &self.noise * sched.init_noise_sigma() as f32,
        };
        let guidance = self.classifier_guidance(model);
        let conditioning = self.conditioning(model, guidance)?;
        let batch = guidance.copies() * self.n;
        let (extra_channels, blend) = match original {
            Some(original) if blended => {
                let blend = LatentBlend { original, noise: self.noise.clone(), mask: repeat(&mask_latent, self.n)? };
                (None, Some(blend))
            }
            _ => {
                let masked = masked_pixels(self.pixels.view(), binary.view());
                let masked_latents = scaled_latents(model, masked.view())?;
                let extra = concatenate(
                    Axis(1),
                    &[repeat(&mask_latent, batch)?.view(), repeat(&masked_latents, batch)?.view()],
                )
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
                (Some(extra), None)
            }
        };
        let run =
            Denoise { latents, start, conditioning: &conditioning, guidance, extra_channels, blend, size: self.size() };
        let latents = denoise(model, sched, run, self.step_noise(), observer)?;
        // diffusers 0.36's SD3 inpainting decodes without the VAE's shift factor; optimum's pictures follow it.
        let shift =
            if model.info.family() == Family::StableDiffusion3 { ShiftOnDecode::Omit } else { ShiftOnDecode::Add };
        let images = decode(model, latents, shift)?;
        if !blended {
            return Ok(images);
        }
        let weight = feather(binary.view(), request.mask_blur);
        Ok(images.iter().map(|generated| blend_pixels(generated, &request.image, weight.view())).collect())
    }

    /// InstructPix2Pix: every call, the U-Net also gets the picture's (unscaled) latents; three-way guidance.
    fn instruct(
        &mut self,
        model: &mut LoadedModel,
        sched: &mut dyn Scheduler,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, EngineError> {
        let base = &self.request.base;
        let image_scale = self.request.image_guidance_scale;
        // diffusers: `guidance_scale > 1 and image_guidance_scale >= 1`.
        let guided = base.guidance_scale > 1.0 && image_scale >= 1.0;
        let image_latents = repeat(&encode_mean(model, self.pixels.view())?, self.n)?;
        let (guidance, extra) = if guided {
            let zeros = ArrayD::<f32>::zeros(image_latents.raw_dim());
            let extra = concatenate(Axis(0), &[image_latents.view(), image_latents.view(), zeros.view()])
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
            (Guidance::InstructPix2Pix { text: base.guidance_scale, image: image_scale }, extra)
        } else {
            (Guidance::Off, image_latents)
        };
        let conditioning = self.conditioning(model, guidance)?;
        let latents = &self.noise * sched.init_noise_sigma() as f32;
        let run = Denoise {
            latents,
            start: 0,
            conditioning: &conditioning,
            guidance,
            extra_channels: Some(extra),
            blend: None,
            size: self.size(),
        };
        let latents = denoise(model, sched, run, self.step_noise(), observer)?;
        decode(model, latents, ShiftOnDecode::Add)
    }
}

/// The picture's latents as the diffusion works with them: `(mean - vae_shift_factor) * vae_scaling_factor`
/// (the shift is 0 before SD3), `[1, C, h, w]`.
pub fn scaled_latents(model: &mut LoadedModel, pixels: ArrayView4<'_, f32>) -> Result<ArrayD<f32>, EngineError> {
    let (scaling, shift) = (model.info.vae_scaling_factor, model.info.vae_shift_factor);
    let mean = encode_mean(model, pixels)?;
    Ok(if shift == 0.0 { mean * scaling } else { (mean - shift) * scaling })
}

/// `count` copies of a `[1, …]` array along the batch axis.
fn repeat(one: &ArrayD<f32>, count: usize) -> Result<ArrayD<f32>, EngineError> {
    let views = vec![one.view(); count];
    concatenate(Axis(0), &views).map_err(|e| EngineError::InvalidRequest(e.to_string()))
}

/// Pads `image` by the given margins (pixels) for outpainting and returns the canvas and its mask (white
/// where new content goes). The padding is filled by stretching the nearest edge pixels.
pub fn outpaint_canvas(image: &RgbImage, left: u32, right: u32, top: u32, bottom: u32) -> (RgbImage, GrayImage) {
    let (w, h) = image.dimensions();
    let (cw, ch) = (w + left + right, h + top + bottom);
    if w == 0 || h == 0 {
        return (RgbImage::new(cw, ch), GrayImage::from_pixel(cw, ch, image::Luma([255])));
    }
    let canvas = RgbImage::from_fn(cw, ch, |x, y| {
        let sx = x.saturating_sub(left).min(w - 1);
        let sy = y.saturating_sub(top).min(h - 1);
        *image.get_pixel(sx, sy)
    });
    let mask = GrayImage::from_fn(cw, ch, |x, y| {
        let inside = x >= left && x < left + w && y >= top && y < top + h;
        image::Luma([if inside { 0 } else { 255 }])
    });
    (canvas, mask)
}
