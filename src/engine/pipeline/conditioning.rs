//! What the U-Net gets besides the sample and the timestep, for a whole batch: the text's hidden states and,
//! depending on the graph, SDXL's pooled `text_embeds` and `time_ids` (original size, crop, target size or
//! aesthetic score) and the guidance-scale embedding `timestep_cond` of consistency-distilled U-Nets.
//!
//! The batch is laid out branch by branch (for classifier-free guidance `[negative × n, positive × n]`);
//! every input follows the same layout.

use ndarray::{concatenate, Array2, ArrayD, Axis, IxDyn};

use super::denoise::Guidance;
use super::prompt::{PromptEmbedding, Prompts};
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
/// that take the guidance scale as an embedding (`timestep_cond`), which run one branch.
pub(super) fn classifier_guidance(model: &LoadedModel, scale: f32, rescale: f32) -> Guidance {
    if scale > 1.0 && model.unet_extras.timestep_cond.is_none() {
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

/// The U-Net's conditioning inputs for a whole batch, `[branches × n, …]` each.
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
}

impl UnetConditioning {
    /// The named feeds for one U-Net call.
    pub(super) fn feeds(&self) -> Vec<(&'static str, Feed)> {
        let mut feeds = vec![("encoder_hidden_states", Feed::Float(self.encoder_hidden_states.clone()))];
        let optional = [("text_embeds", &self.text_embeds), ("time_ids", &self.time_ids)];
        for (name, value) in optional.into_iter().chain([("timestep_cond", &self.timestep_cond)]) {
            if let Some(value) = value {
                feeds.push((name, Feed::Float(value.clone())));
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
    };
    if let Some(kind) = model.unet_extras.time_ids {
        let pooled: Vec<&ArrayD<f32>> = chosen
            .iter()
            .map(|p| p.pooled.as_ref().ok_or_else(|| fail("no pooled text embedding")))
            .collect::<Result<_, _>>()?;
        let rows: Vec<ArrayD<f32>> = branches.iter().map(|b| row(size.time_ids(kind, *b))).collect();
        conditioning.text_embeds = Some(stack(&pooled, n)?);
        conditioning.time_ids = Some(stack(&rows.iter().collect::<Vec<_>>(), n)?);
    }
    if let Some(dim) = model.unet_extras.timestep_cond {
        let embedding = row(guidance_embedding(guidance_scale - 1.0, dim));
        conditioning.timestep_cond = Some(stack(&vec![&embedding; branches.len()], n)?);
    }
    Ok(conditioning)
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
