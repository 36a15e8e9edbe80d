//! The parameters stored with a job: what the API validated and what a worker needs to run it again,
//! identically, after any number of restarts.
//!
//! [`JobParams`] is a serde enum tagged by kind. In the database the tag is the `kind` column and the
//! variant's fields are the JSON of the `params` column — the layout every release has written — so rows
//! written before the enum existed read back unchanged (`tests/stored_rows.rs` opens such a database).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::engine::image::OutputFormat;
use crate::engine::input::ResizeMode;
use crate::engine::pipeline::{DiffEditOptions, EditMode, EditRequest, GenerateRequest, ScheduleKey};
use crate::engine::preview::PreviewMode;
use crate::engine::scheduler::flow_euler::flow_start_call;
use crate::engine::scheduler::{start_call, Parameterization, SchedulerKind};
use crate::engine::watermark::{RingKey, WatermarkSpec};

/// A job's parameters, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "params", rename_all = "lowercase")]
pub enum JobParams {
    /// Text to image.
    Generate(GenerateParams),
    /// An edit of a stored input picture.
    Edit(EditParams),
    /// A stored row this release cannot read (hand-edited, or written by a newer release). Kept as it was so
    /// the job can still be listed, shown and failed with a clear error instead of being lost.
    #[serde(skip)]
    Unreadable {
        /// The stored kind.
        kind: String,
        /// The stored parameters.
        raw: serde_json::Value,
        /// Why they do not read.
        error: String,
    },
}

impl JobParams {
    /// The stored `kind` column.
    pub fn kind(&self) -> &str {
        match self {
            JobParams::Generate(_) => "generate",
            JobParams::Edit(_) => "edit",
            JobParams::Unreadable { kind, .. } => kind,
        }
    }

    /// The stored `params` column.
    pub fn encode(&self) -> String {
        match self {
            JobParams::Unreadable { raw, .. } => raw.to_string(),
            typed => serde_json::to_value(typed)
                .ok()
                .and_then(|mut v| v.get_mut("params").map(serde_json::Value::take))
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// Reads the `kind` and `params` columns back. Text that is not JSON at all is an error (the row is
    /// corrupt); JSON that does not fit the kind becomes [`JobParams::Unreadable`].
    pub fn decode(kind: &str, params: &str) -> Result<Self, serde_json::Error> {
        let raw: serde_json::Value = serde_json::from_str(params)?;
        let tagged = serde_json::json!({"kind": kind, "params": raw});
        Ok(serde_json::from_value(tagged).unwrap_or_else(|e| JobParams::Unreadable {
            kind: kind.to_string(),
            raw,
            error: e.to_string(),
        }))
    }

    /// The generation fields every readable kind has.
    pub fn generation(&self) -> Option<&GenerateParams> {
        match self {
            JobParams::Generate(p) => Some(p),
            JobParams::Edit(p) => Some(&p.generate),
            JobParams::Unreadable { .. } => None,
        }
    }

    /// Steps a client sees for the job (edits at partial strength run fewer than `steps`).
    pub fn visible_steps(&self) -> u32 {
        match self {
            JobParams::Generate(p) => p.steps,
            JobParams::Edit(p) => p.visible_steps(),
            JobParams::Unreadable { .. } => 0,
        }
    }

    /// Jobs with the same key may share their denoiser calls on one worker (see
    /// [`crate::engine::pipeline::cohort`]): text to image for the same `model`, picture size, step count,
    /// scheduler and guidance on or off. `None` for jobs that always run alone (edits).
    pub fn batch_key(&self, model: &str) -> Option<String> {
        match self {
            JobParams::Generate(p) => {
                let scheduler = SchedulerKind::from_request_name(&p.scheduler)?;
                let key = ScheduleKey::new(p.width, p.height, p.steps, scheduler, p.guidance_scale);
                Some(format!("{model}|{}", key.label()))
            }
            JobParams::Edit(_) | JobParams::Unreadable { .. } => None,
        }
    }

    /// What the job costs against its key's daily compute: image-steps, `n × ` the steps it runs.
    pub fn image_steps(&self) -> u64 {
        let n = match self {
            JobParams::Generate(p) => p.n,
            JobParams::Edit(p) => p.generate.n,
            JobParams::Unreadable { .. } => 0,
        };
        u64::from(n) * u64::from(self.visible_steps())
    }

    /// A stored input of the job (an edit's picture, or the client's latents; relative to `data_dir`), whose
    /// folder holds all of them and goes with the job.
    pub fn input_path(&self) -> Option<&str> {
        match self {
            JobParams::Edit(p) => Some(&p.image_path),
            JobParams::Generate(p) => p.latents_path.as_deref(),
            JobParams::Unreadable { .. } => None,
        }
    }

    /// The generation fields, to change them before the job is stored.
    pub fn generation_mut(&mut self) -> Option<&mut GenerateParams> {
        match self {
            JobParams::Generate(p) => Some(p),
            JobParams::Edit(p) => Some(&mut p.generate),
            JobParams::Unreadable { .. } => None,
        }
    }

    /// The parameters as clients see them: every field, except that `latents` becomes its presence flag
    /// `has_latents` and the stored input paths are left out.
    pub fn public_view(&self) -> serde_json::Value {
        let mut view = match self {
            JobParams::Generate(p) => serde_json::to_value(p),
            JobParams::Edit(p) => serde_json::to_value(p),
            JobParams::Unreadable { raw, .. } => Ok(raw.clone()),
        }
        .unwrap_or_default();
        if let Some(map) = view.as_object_mut() {
            let had = map.remove("latents").is_some() | map.remove("latents_path").is_some();
            map.remove("image_path");
            map.remove("mask_path");
            map.remove("original_path");
            // The watermark shows as whose it is; its secret never leaves the server.
            if let Some(watermark) = map.get_mut("watermark") {
                let key = watermark.get("key").cloned().unwrap_or_default();
                *watermark = serde_json::json!({ "key": key });
            }
            map.insert("has_latents".into(), serde_json::Value::Bool(had));
        }
        view
    }
}

/// Edit modes, as clients name them and as jobs store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EditKind {
    /// SDEdit: keep the composition, redraw per the prompt.
    Img2img,
    /// Repaint the masked region.
    Inpaint,
    /// Extend the canvas by `left`/`right`/`top`/`bottom` pixels.
    Outpaint,
    /// InstructPix2Pix: the prompt is an instruction.
    Instruct,
}

impl EditKind {
    /// The name clients send and jobs store.
    pub fn name(self) -> &'static str {
        match self {
            EditKind::Img2img => "img2img",
            EditKind::Inpaint => "inpaint",
            EditKind::Outpaint => "outpaint",
            EditKind::Instruct => "instruct",
        }
    }

    /// The engine pipeline that runs it (outpainting is inpainting of a padded canvas).
    pub fn pipeline(self) -> EditMode {
        match self {
            EditKind::Img2img => EditMode::Img2img,
            EditKind::Inpaint | EditKind::Outpaint => EditMode::Inpaint,
            EditKind::Instruct => EditMode::Instruct,
        }
    }
}

/// Stored parameters of a text-to-image job. Every default is resolved before storing (the seed too), so a
/// retried job produces the same pictures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// What to draw.
    pub prompt: String,
    /// What to avoid.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// Guidance rescale in [0, 1].
    #[serde(default)]
    pub guidance_rescale: f32,
    /// Canonical scheduler name.
    pub scheduler: String,
    /// Seed of the first image; image `i` uses `seed + i`.
    pub seed: u64,
    /// Number of images.
    pub n: u32,
    /// Encoding of the stored images.
    pub output_format: OutputFormat,
    /// JPEG quality (1–100) when the client chose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_quality: Option<u8>,
    /// Denoiser calls between step previews (0: none).
    #[serde(default)]
    pub preview_every: u32,
    /// How previews are rendered.
    #[serde(default)]
    pub preview: PreviewMode,
    /// Base64 `.npy` float32 initial latents as the client sent them. The jobs service moves them to a file
    /// ([`GenerateParams::latents_path`]) before the job is stored; rows of release 0.1 still carry them
    /// here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<String>,
    /// The client's initial latents as a `.npy` file, relative to `data_dir`: blobs live outside the job
    /// row, so listings and status reads never load them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents_path: Option<String>,
    /// The Tree-Ring watermark written into the starting noise, when the job has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<WatermarkParams>,
}

/// A job's watermark: whose key and where the pattern goes. The key's secret is stored with the job so that a
/// retry writes the same pattern even if the key changes meanwhile and a worker needs no key lookup; clients
/// never see it ([`JobParams::public_view`] shows only `watermark.key`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WatermarkParams {
    /// The API key id whose watermark it is, or `server` for the server's own (`[watermark]` in the config).
    pub key: String,
    /// The watermark secret (hex), from which the ring values are derived.
    pub secret: String,
    /// Ring radius in latent frequency units.
    pub radius: u32,
    /// Latent channel.
    pub channel: u32,
    /// Factor on the ring values (1: the paper's; rows written before it existed have 1).
    #[serde(default = "unit_strength")]
    pub strength: f64,
}

/// The strength of watermarks stored without one.
fn unit_strength() -> f64 {
    1.0
}

impl std::fmt::Debug for WatermarkParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatermarkParams")
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("radius", &self.radius)
            .field("channel", &self.channel)
            .field("strength", &self.strength)
            .finish()
    }
}

impl WatermarkParams {
    /// The engine's key for these parameters.
    pub fn ring_key(&self) -> RingKey {
        RingKey::derive(
            self.secret.as_bytes(),
            WatermarkSpec { radius: self.radius, channel: self.channel, strength: self.strength },
        )
    }
}

impl GenerateParams {
    /// Rebuilds the engine request, with the bytes of [`GenerateParams::latents_path`] when the job has that
    /// file. Fails only if the stored data was tampered with or the scheduler name is no longer known.
    pub fn to_request(&self, latents_file: Option<&[u8]>) -> Result<GenerateRequest, String> {
        let scheduler = SchedulerKind::from_request_name(&self.scheduler)
            .ok_or_else(|| format!("unknown scheduler `{}`", self.scheduler))?;
        let npy = match (latents_file, &self.latents) {
            (Some(bytes), _) => Some(bytes.to_vec()),
            (None, Some(b64)) => {
                Some(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("latents: {e}"))?)
            }
            (None, None) => None,
        };
        let latents =
            npy.map(|bytes| crate::engine::npy::read_f32(&bytes).map_err(|e| format!("latents: {e}"))).transpose()?;
        Ok(GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            guidance_rescale: self.guidance_rescale,
            scheduler,
            seed: self.seed,
            images: self.n,
            latents,
            watermark: self.watermark.as_ref().map(|w| Box::new(w.ring_key())),
        })
    }
}

/// Stored parameters of an edit job: the generation parameters plus the edit and where its prepared input
/// picture and mask (already at the final size) are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditParams {
    /// Prompt, size (of the final canvas), steps, guidance, scheduler, seed, images, format, previews.
    #[serde(flatten)]
    pub generate: GenerateParams,
    /// The edit mode.
    pub mode: EditKind,
    /// How much of the picture is redrawn.
    pub strength: f32,
    /// InstructPix2Pix image guidance.
    pub image_guidance_scale: f32,
    /// Feathering of the pixel blend (plain-model inpainting).
    pub mask_blur: u32,
    /// How the input was fitted to the size.
    pub resize_mode: ResizeMode,
    /// The prepared picture, relative to `data_dir`.
    pub image_path: String,
    /// The prepared mask (white = repaint), relative to `data_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_path: Option<String>,
    /// The stored picture as the client sent it (before any resizing), which content credentials record as
    /// the edit's parent; jobs stored before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_path: Option<String>,
    /// DiffEdit (`mask: "auto"`): the mask is computed from the prompts when the job runs; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffedit: Option<DiffEditParams>,
}

/// Stored DiffEdit settings, every default resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffEditParams {
    /// What the input picture shows.
    pub source_prompt: String,
    /// How far into the schedule the picture is noised for the mask's predictions, in (0, 1].
    pub mask_encode_strength: f32,
    /// Noise draws averaged, 1–32.
    pub mask_samples: u32,
    /// Clamp ratio of the difference map before binarising (> 0).
    pub mask_threshold: f32,
}

impl DiffEditParams {
    /// The engine's options.
    pub fn options(&self) -> DiffEditOptions {
        DiffEditOptions {
            source_prompt: self.source_prompt.clone(),
            encode_strength: self.mask_encode_strength,
            samples: self.mask_samples,
            threshold: self.mask_threshold,
        }
    }
}

impl EditParams {
    /// Rebuilds the engine request with the stored picture, mask and latents file (already read by the
    /// caller).
    pub fn to_request(
        &self,
        image: image::RgbImage,
        mask: Option<image::GrayImage>,
        latents_file: Option<&[u8]>,
    ) -> Result<EditRequest, String> {
        Ok(EditRequest {
            base: self.generate.to_request(latents_file)?,
            mode: self.mode.pipeline(),
            image,
            mask,
            strength: self.strength,
            image_guidance_scale: self.image_guidance_scale,
            mask_blur: self.mask_blur,
            diffedit: self.diffedit.as_ref().map(DiffEditParams::options),
        })
    }

    /// Steps the client will see: img2img and partial-strength inpainting run `strength` of the schedule,
    /// counted as the engine's scheduler family counts them (diffusers' `int(n · strength)` steps for the
    /// diffusion families; SD3 and Flux start at `int(n − n · strength)`). A DiffEdit job first makes one
    /// denoiser call per mask sample, and counts them as steps too.
    pub fn visible_steps(&self) -> u32 {
        let mask_steps = self.diffedit.as_ref().map_or(0, |d| d.mask_samples);
        self.edit_steps() + mask_steps
    }

    /// The steps of the edit itself.
    fn edit_steps(&self) -> u32 {
        let steps = self.generate.steps;
        if self.mode == EditKind::Instruct {
            return steps;
        }
        let n = steps as usize;
        let strength = f64::from(self.strength);
        let flow = SchedulerKind::from_request_name(&self.generate.scheduler)
            .is_some_and(|k| k.parameterization() == Parameterization::FlowMatching);
        let start = if flow { flow_start_call(n, strength) } else { start_call(n, 1, n, strength) };
        start.map_or(steps, |start| (n - start) as u32).clamp(1, steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generate row as release 0.1 stored it (kind column, params column).
    const GENERATE_ROW: &str = r#"{"prompt":"a fox","negative_prompt":"","width":64,"height":64,"steps":4,
        "guidance_scale":7.5,"guidance_rescale":0.0,"scheduler":"ddim","seed":11,"n":1,"output_format":"png",
        "preview_every":1,"preview":"approx","latents":"AAAA"}"#;

    /// An edit row as release 0.1 stored it: the generation fields flattened beside the edit's.
    const EDIT_ROW: &str = r#"{"prompt":"a fox","negative_prompt":"","width":64,"height":64,"steps":10,
        "guidance_scale":7.5,"scheduler":"euler","seed":12,"n":1,"output_format":"webp","mode":"img2img",
        "strength":0.6,"image_guidance_scale":1.5,"mask_blur":4,"resize_mode":"crop",
        "image_path":"inputs/8a3f87f3-ca86-4eac-bd52-03872f21b516/image.png"}"#;

    #[test]
    fn the_batch_key_is_the_engines_schedule_key_in_its_stored_form() {
        let params = JobParams::decode("generate", GENERATE_ROW).unwrap();
        // The form queued rows already carry: it must not change between releases.
        assert_eq!(params.batch_key("tiny-sd").as_deref(), Some("tiny-sd|64x64|4|ddim|guided"));
        let JobParams::Generate(generate) = &params else { unreachable!() };
        let without_latents = GenerateParams { latents: None, ..generate.clone() };
        let request = without_latents.to_request(None).unwrap();
        let engine = ScheduleKey::of(&request).label();
        assert_eq!(params.batch_key("tiny-sd"), Some(format!("tiny-sd|{engine}")));
        let mut unguided = generate.clone();
        unguided.guidance_scale = 1.0;
        assert_eq!(JobParams::Generate(unguided).batch_key("m").as_deref(), Some("m|64x64|4|ddim|unguided"));
        let edit = JobParams::decode("edit", EDIT_ROW).unwrap();
        assert_eq!(edit.batch_key("m"), None, "edits run alone");
    }

    #[test]
    fn rows_of_the_previous_layout_decode_to_their_kind_and_encode_back_the_same() {
        for (kind, row) in [("generate", GENERATE_ROW), ("edit", EDIT_ROW)] {
            let params = JobParams::decode(kind, row).unwrap();
            assert_eq!(params.kind(), kind);
            let stored: serde_json::Value = serde_json::from_str(row).unwrap();
            let again: serde_json::Value = serde_json::from_str(&params.encode()).unwrap();
            for (key, value) in stored.as_object().unwrap() {
                match value.as_f64() {
                    // Stored as f32: compare at that precision.
                    Some(number) => {
                        assert_eq!(again[key].as_f64().map(|v| v as f32), Some(number as f32), "{kind}.{key}")
                    }
                    None => assert_eq!(&again[key], value, "{kind}.{key}"),
                }
            }
            assert_eq!(JobParams::decode(kind, &params.encode()).unwrap(), params);
        }
        let JobParams::Edit(mut edit) = JobParams::decode("edit", EDIT_ROW).unwrap() else { panic!("not an edit") };
        assert_eq!((edit.mode, edit.visible_steps()), (EditKind::Img2img, 6));
        // SD3 and Flux count from the start index: 8 steps at 0.6 run 5 (diffusion schedulers: 4).
        (edit.generate.steps, edit.strength) = (8, 0.6);
        assert_eq!(edit.visible_steps(), 4);
        edit.generate.scheduler = "flow_euler".into();
        assert_eq!(edit.visible_steps(), 5);
    }

    #[test]
    fn the_public_view_hides_blobs_and_paths() {
        let view = JobParams::decode("generate", GENERATE_ROW).unwrap().public_view();
        assert_eq!(view["has_latents"], true);
        assert!(view.get("latents").is_none());
        let view = JobParams::decode("edit", EDIT_ROW).unwrap().public_view();
        assert!(view.get("image_path").is_none() && view["mode"] == "img2img" && view["has_latents"] == false);
    }

    #[test]
    fn a_watermark_shows_whose_it_is_but_never_its_secret() {
        let JobParams::Generate(mut params) = JobParams::decode("generate", GENERATE_ROW).unwrap() else {
            panic!("not a generate row")
        };
        params.latents = None;
        assert!(params.to_request(None).unwrap().watermark.is_none(), "rows without one have none");
        let secret = "5eb63bbbe01eeed093cb22bb8f5acdc3".to_string();
        params.watermark = Some(WatermarkParams {
            key: "a1b2c3d4e5f6".into(),
            secret: secret.clone(),
            radius: 4,
            channel: 3,
            strength: 1.0,
        });
        let params = JobParams::Generate(params);
        let view = params.public_view().to_string();
        assert!(view.contains("a1b2c3d4e5f6") && !view.contains(&secret), "{view}");
        assert!(!format!("{params:?}").contains(&secret), "Debug must not show the secret");
        let again = JobParams::decode("generate", &params.encode()).unwrap();
        let request = again.generation().unwrap().to_request(None).unwrap();
        let expected = RingKey::derive(secret.as_bytes(), WatermarkSpec { radius: 4, channel: 3, strength: 1.0 });
        assert_eq!(request.watermark, Some(Box::new(expected)));
    }

    #[test]
    fn rows_that_do_not_fit_are_kept_unreadable_and_non_json_is_an_error() {
        let unknown = JobParams::decode("upscale", r#"{"factor": 4}"#).unwrap();
        assert!(matches!(&unknown, JobParams::Unreadable { kind, .. } if kind == "upscale"));
        assert_eq!(unknown.encode(), r#"{"factor":4}"#, "kept exactly as stored");
        assert_eq!(unknown.visible_steps(), 0);
        let wrong = JobParams::decode("edit", GENERATE_ROW).unwrap();
        assert!(matches!(wrong, JobParams::Unreadable { .. }), "an edit row without the edit's fields");
        assert!(JobParams::decode("generate", "not json").is_err());
    }
}
