//! What the denoiser gets besides the sample and the timestep, for a whole batch: the text's hidden states and,
//! depending on the graph, SDXL's pooled `text_embeds` and `time_ids` (original size, crop, target size or
//! aesthetic score), the guidance-scale embedding `timestep_cond` of consistency-distilled U-Nets, the
//! transformers' `pooled_projections`, and Flux's `img_ids`/`txt_ids` and `guidance`.
//!
//! The batch is laid out branch by branch (for classifier-free guidance `[negative × n, positive × n]`);
//! every input follows the same layout.

use ndarray::{concatenate, Array2, ArrayD, Axis, IxDyn};

use super::denoise::Guidance;
use super::packing::{image_ids, text_ids};
use super::prompt::{PromptEmbedding, Prompts};
use crate::engine::denoiser::DenoiserKind;
use crate::engine::error::EngineError;
use crate::engine::family::TimeIds;
use crate::engine::graph::Feed;
use crate::engine::model::LoadedModel;

/// Which prompt a branch of the U-Net batch is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// The prompt.
    Positive,
    /// The negative prompt (the unconditional branch).
    Negative,
}

/// The branches of `guidance`, in batch order.
pub(super) fn branches(guidance: Guidance) -> &'static [Branch] {
    match guidance {
        Guidance::Off => &[Branch::Positive],
        Guidance::Classifier { .. } => &[Branch::Negative, Branch::Positive],
        Guidance::InstructPix2Pix { .. } => &[Branch::Positive, Branch::Negative, Branch::Negative],
    }
}

/// Classifier-free guidance for `scale`, as diffusers decides it: on when `scale > 1`, except for U-Nets
/// that take the guidance scale as an embedding (`timestep_cond`) and Flux (a `guidance` input, or none for
/// schnell), which run one branch.
pub(super) fn classifier_guidance(model: &LoadedModel, scale: f32, rescale: f32) -> Guidance {
    let embedded = match model.denoiser_kind {
        DenoiserKind::Unet(extras) => extras.timestep_cond.is_some(),
        DenoiserKind::Flux { .. } => true,
        DenoiserKind::Sd3 => false,
    };
    if scale > 1.0 && !embedded {
        Guidance::Classifier { scale, rescale }
    } else {
        Guidance::Off
    }
}

/// SDXL's size micro-conditioning: sizes are (height, width) in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizeConditioning {
    /// The "original" size of the training picture the model should imitate.
    pub original: (u32, u32),
    /// Top-left corner of the crop (top, left).
    pub crop_top_left: (u32, u32),
    /// The size being generated.
    pub target: (u32, u32),
    /// Aesthetic score of the positive branch (refiner only).
    pub aesthetic_score: f32,
    /// Aesthetic score of the negative branch (refiner only).
    pub negative_aesthetic_score: f32,
}

impl SizeConditioning {
    /// diffusers' defaults for a `width` × `height` picture: original = target = the picture, no crop,
    /// aesthetic scores 6.0 / 2.5.
    pub fn for_picture(width: u32, height: u32) -> Self {
        Self {
            original: (height, width),
            crop_top_left: (0, 0),
            target: (height, width),
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }

    /// The `time_ids` row of `branch`.
    pub fn time_ids(&self, kind: TimeIds, branch: Branch) -> Vec<f32> {
        let mut ids = vec![
            self.original.0 as f32,
            self.original.1 as f32,
            self.crop_top_left.0 as f32,
            self.crop_top_left.1 as f32,
        ];
        match (kind, branch) {
            (TimeIds::TargetSize, _) => ids.extend([self.target.0 as f32, self.target.1 as f32]),
            (TimeIds::AestheticScore, Branch::Positive) => ids.push(self.aesthetic_score),
            (TimeIds::AestheticScore, Branch::Negative) => ids.push(self.negative_aesthetic_score),
        }
        ids
    }
}

/// The denoiser's conditioning inputs for a whole batch, `[branches × n, …]` each (the id tables of Flux are
/// not batched).
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConditioning {
    /// `encoder_hidden_states`.
    pub encoder_hidden_states: ArrayD<f32>,
    /// SDXL's pooled `text_embeds`.
    pub text_embeds: Option<ArrayD<f32>>,
    /// SDXL's `time_ids`.
    pub time_ids: Option<ArrayD<f32>>,
    /// The guidance-scale embedding of consistency-distilled U-Nets.
    pub timestep_cond: Option<ArrayD<f32>>,
    /// SD3's and Flux's pooled text input.
    pub pooled_projections: Option<ArrayD<f32>>,
    /// Flux dev's guidance scale per row, `[b]`.
    pub guidance: Option<ArrayD<f32>>,
    /// Flux's packed-token positions `(0, row, column)`, `[(h/2)(w/2), 3]`.
    pub img_ids: Option<ArrayD<i64>>,
    /// Flux's text positions (zeros), `[seq, 3]`.
    pub txt_ids: Option<ArrayD<i64>>,
}

impl UnetConditioning {
    /// The named feeds for one U-Net call.
    pub(super) fn feeds(&self) -> Vec<(&'static str, Feed)> {
        let mut feeds = vec![("encoder_hidden_states", Feed::Float(self.encoder_hidden_states.clone()))];
        let optional = [
            ("text_embeds", &self.text_embeds),
            ("time_ids", &self.time_ids),
            ("timestep_cond", &self.timestep_cond),
            ("pooled_projections", &self.pooled_projections),
            ("guidance", &self.guidance),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                feeds.push((name, Feed::Float(value.clone())));
            }
        }
        for (name, value) in [("img_ids", &self.img_ids), ("txt_ids", &self.txt_ids)] {
            if let Some(value) = value {
                feeds.push((name, Feed::Int(value.clone())));
            }
        }
        feeds
    }
}

/// Lays out the conditioning of `branches × n` U-Net rows for `model`'s graph.
pub fn assemble(
    model: &LoadedModel,
    prompts: &Prompts,
    branches: &[Branch],
    n: usize,
    size: &SizeConditioning,
    guidance_scale: f32,
) -> Result<UnetConditioning, EngineError> {
    let fail = |message: &str| EngineError::Inference { graph: "text_encoder", message: message.into() };
    let chosen: Vec<&PromptEmbedding> = branches
        .iter()
        .map(|b| match b {
            Branch::Positive => Ok(&prompts.positive),
            Branch::Negative => prompts.negative.as_ref().ok_or_else(|| fail("no negative prompt was encoded")),
        })
        .collect::<Result<_, _>>()?;
    let hidden: Vec<&ArrayD<f32>> = chosen.iter().map(|p| &p.hidden).collect();
    let mut conditioning = UnetConditioning {
        encoder_hidden_states: stack(&hidden, n)?,
        text_embeds: None,
        time_ids: None,
        timestep_cond: None,
        pooled_projections: None,
        guidance: None,
        img_ids: None,
        txt_ids: None,
    };
    let extras = model.denoiser_kind.unet_extras();
    if let Some(kind) = extras.time_ids {
        let pooled: Vec<&ArrayD<f32>> = chosen
            .iter()
            .map(|p| p.pooled.as_ref().ok_or_else(|| fail("no pooled text embedding")))
            .collect::<Result<_, _>>()?;
        let rows: Vec<ArrayD<f32>> = branches.iter().map(|b| row(size.time_ids(kind, *b))).collect();
        conditioning.text_embeds = Some(stack(&pooled, n)?);
        conditioning.time_ids = Some(stack(&rows.iter().collect::<Vec<_>>(), n)?);
    }
    if let Some(dim) = extras.timestep_cond {
        let embedding = row(guidance_embedding(guidance_scale - 1.0, dim));
        conditioning.timestep_cond = Some(stack(&vec![&embedding; branches.len()], n)?);
    }
    if matches!(model.denoiser_kind, DenoiserKind::Sd3 | DenoiserKind::Flux { .. }) {
        let pooled: Vec<&ArrayD<f32>> = chosen
            .iter()
            .map(|p| p.pooled.as_ref().ok_or_else(|| fail("no pooled text embedding")))
            .collect::<Result<_, _>>()?;
        conditioning.pooled_projections = Some(stack(&pooled, n)?);
    }
    if let DenoiserKind::Flux { guidance } = model.denoiser_kind {
        flux_inputs(model, &mut conditioning, size, guidance.then_some(guidance_scale));
    }
    Ok(conditioning)
}

/// Flux's position ids for the picture in `size`, and `guidance` (the scale as given) when the graph takes it.
fn flux_inputs(model: &LoadedModel, conditioning: &mut UnetConditioning, size: &SizeConditioning, scale: Option<f32>) {
    let factor = model.info.vae_scale_factor.max(1);
    let (h, w) = ((size.target.0 / factor) as usize, (size.target.1 / factor) as usize);
    let rows = conditioning.encoder_hidden_states.shape()[0];
    let sequence = conditioning.encoder_hidden_states.shape().get(1).copied().unwrap_or(0);
    conditioning.img_ids = Some(image_ids(h, w));
    conditioning.txt_ids = Some(text_ids(sequence));
    conditioning.guidance = scale.map(|g| ArrayD::from_elem(IxDyn(&[rows]), g));
}

/// diffusers' `get_guidance_scale_embedding(w)` for one `w`: `dim` values, `sin(1000·w·f_k)` then
/// `cos(1000·w·f_k)` with `f_k = exp(−k·ln(10000)/(dim/2 − 1))`, zero-padded when `dim` is odd; float32
/// arithmetic in PyTorch's order.
pub fn guidance_embedding(w: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let scaled = w * 1000.0;
    let step = (10000f64.ln() as f32) / (half.saturating_sub(1).max(1) as f32);
    let angles: Vec<f32> = (0..half).map(|k| scaled * ((k as f32 * -step) as f64).exp() as f32).collect();
    let mut out: Vec<f32> = angles.iter().map(|a| (*a as f64).sin() as f32).collect();
    out.extend(angles.iter().map(|a| (*a as f64).cos() as f32));
    out.resize(dim, 0.0);
    out
}

/// A `[1, len]` array.
fn row(values: Vec<f32>) -> ArrayD<f32> {
    let len = values.len();
    Array2::from_shape_vec((1, len), values).map_or_else(|_| ArrayD::zeros(IxDyn(&[1, len])), |a| a.into_dyn())
}

/// Each of `groups` (`[1, …]`) repeated `n` times, groups in order.
pub(super) fn stack(groups: &[&ArrayD<f32>], n: usize) -> Result<ArrayD<f32>, EngineError> {
    let parts: Vec<_> = groups.iter().flat_map(|h| std::iter::repeat_n(h.view(), n)).collect();
    concatenate(Axis(0), &parts).map_err(|e| EngineError::Inference { graph: "text_encoder", message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_follow_diffusers_order() {
        let size = SizeConditioning::for_picture(96, 64);
        assert_eq!(size.time_ids(TimeIds::TargetSize, Branch::Negative), [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]);
        assert_eq!(size.time_ids(TimeIds::AestheticScore, Branch::Positive), [64.0, 96.0, 0.0, 0.0, 6.0]);
        assert_eq!(size.time_ids(TimeIds::AestheticScore, Branch::Negative), [64.0, 96.0, 0.0, 0.0, 2.5]);
    }

    #[test]
    fn guidance_embedding_is_sin_then_cos() {
        let e = guidance_embedding(0.0, 8);
        assert_eq!(e, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        let odd = guidance_embedding(1.0, 5);
        assert_eq!(odd.len(), 5);
        assert_eq!(odd[4], 0.0);
        assert!((odd[0] - 1000f32.sin()).abs() < 1e-6);
    }
}
