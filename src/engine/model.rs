//! An optimum diffusion export on disk (Stable Diffusion 1.x/2.x, SDXL, LCM, SD3, Flux): what it is ([`ModelInfo`], read from its JSON files alone) and
//! its loaded graphs ([`LoadedModel`], one per worker, since sessions are never shared).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::denoiser::DenoiserKind;
use super::error::EngineError;
use super::family::{lists_component, EncoderSpec, Family, FamilyTraits, TokenizerKind};
use super::graph::{Element, Graph};
use super::preview::ApproxDecoder;
use super::runtime::SessionFactory;
use super::scheduler::{FlowSigmas, RunOptions, SchedulerConfig, SchedulerKind};
use super::text_encoder::TextEncoder;

/// What a model can be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Text to image.
    TextToImage,
    /// SDEdit image to image.
    Img2img,
    /// Repaint a masked region.
    Inpaint,
    /// Extend the canvas (inpainting of a padded image).
    Outpaint,
    /// InstructPix2Pix instruction edits.
    Instruct,
}

/// Everything about a model that can be known without loading its graphs: enough to validate requests.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The export folder.
    pub path: PathBuf,
    /// The diffusers pipeline class named in `model_index.json`.
    pub pipeline_class: String,
    /// The model's family and its conditioning flags (from `model_index.json`).
    pub traits: FamilyTraits,
    /// The text encoders the family reads and the export has, in the order the pipeline combines them.
    pub text_encoders: Vec<EncoderSpec>,
    /// The T5 sequence length (`max_sequence_length`: SD3 256, Flux 512), for families with a T5 encoder.
    pub max_sequence_length: Option<usize>,
    /// `joint_attention_dim` of a transformer (the width of SD3's text states, and of the zeros that replace
    /// a missing T5).
    pub joint_attention_dim: Option<usize>,
    /// `time_cond_proj_dim` of the U-Net config (width of `timestep_cond`), when set.
    pub time_cond_proj_dim: Option<usize>,
    /// The scheduler config shipped with the model.
    pub scheduler_config: SchedulerConfig,
    /// The scheduler family the model ships with.
    pub default_scheduler: SchedulerKind,
    /// `scaling_factor` of the VAE (latents are divided by it before decoding).
    pub vae_scaling_factor: f32,
    /// `shift_factor` of the VAE (SD3, Flux; 0 otherwise): decoding takes `latents / scaling + shift`,
    /// encoding gives `(mean - shift) * scaling`.
    pub vae_shift_factor: f32,
    /// Pixels per latent cell (8 for Stable Diffusion).
    pub vae_scale_factor: u32,
    /// Channels of the latent space (4 for Stable Diffusion).
    pub latent_channels: u32,
    /// Channels the denoiser takes per latent cell (4 plain, 9 inpainting, 8 InstructPix2Pix; 16 for SD3 and
    /// Flux, whose packed input has 4 × 16).
    pub unet_in_channels: u32,
    /// Latent cells per transformer token along each side (SD3's `patch_size`, Flux's 2×2 packing); 1 for
    /// U-Nets.
    pub patch_size: u32,
    /// Image sides must be multiples of this: the VAE factor times the U-Net's total downsampling (exported
    /// graphs have no resize path for sizes the U-Net cannot halve evenly), or times the patch size.
    pub size_multiple: u32,
    /// Native image width and height in pixels (`sample_size * vae_scale_factor`; Flux: 128 latent cells).
    pub native_size: u32,
    /// What requests it can serve.
    pub capabilities: Vec<Capability>,
}

impl ModelInfo {
    /// The model's family.
    pub fn family(&self) -> Family {
        self.traits.family
    }

    /// Whether the model can serve `capability`.
    pub fn can(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }

    /// The scheduler options of a `width` × `height` run: the image sequence length the flow-matching
    /// schedulers shift by, and the family's starting sigmas (SD3: the scheduler's own, Flux: linear).
    pub fn run_options(&self, width: u32, height: u32) -> RunOptions {
        let cell = self.vae_scale_factor * self.patch_size;
        let tokens = (width / cell.max(1)) as usize * (height / cell.max(1)) as usize;
        match self.family() {
            Family::StableDiffusion3 => RunOptions { image_seq_len: Some(tokens), flow_sigmas: FlowSigmas::Scheduler },
            Family::Flux => RunOptions { image_seq_len: Some(tokens), flow_sigmas: FlowSigmas::Linear },
            _ => RunOptions::default(),
        }
    }

    /// `Ok` when the model can serve `capability`, else [`missing_capability`]'s error.
    pub fn require(&self, capability: Capability) -> Result<(), EngineError> {
        if self.can(capability) {
            Ok(())
        } else {
            Err(missing_capability(self, capability))
        }
    }
}

impl Capability {
    /// The name used in API documents and error messages (`text_to_image`, `img2img`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::TextToImage => "text_to_image",
            Capability::Img2img => "img2img",
            Capability::Inpaint => "inpaint",
            Capability::Outpaint => "outpaint",
            Capability::Instruct => "instruct",
        }
    }
}

/// What a model can do, from its U-Net's input channels: `latent` (plain: text to image, and with a VAE
/// encoder img2img plus inpainting/outpainting by Blended Latent Diffusion), `2·latent + 1` (inpainting
/// U-Net: latents, mask, masked-image latents) or `2·latent` (InstructPix2Pix: latents, image latents).
/// The editing U-Nets need the VAE encoder. `Err` says why the combination is unusable.
pub fn capabilities_for(
    unet_in_channels: u32,
    latent_channels: u32,
    has_vae_encoder: bool,
) -> Result<Vec<Capability>, String> {
    let needs_encoder =
        |what: &str| format!("{what} U-Net ({unet_in_channels} channels) needs `vae_encoder/model.onnx`");
    if unet_in_channels == latent_channels {
        let mut caps = vec![Capability::TextToImage];
        if has_vae_encoder {
            caps.extend([Capability::Img2img, Capability::Inpaint, Capability::Outpaint]);
        }
        Ok(caps)
    } else if unet_in_channels == 2 * latent_channels + 1 {
        if !has_vae_encoder {
            return Err(needs_encoder("an inpainting"));
        }
        Ok(vec![Capability::Inpaint, Capability::Outpaint])
    } else if unet_in_channels == 2 * latent_channels {
        if !has_vae_encoder {
            return Err(needs_encoder("an InstructPix2Pix"));
        }
        Ok(vec![Capability::Instruct])
    } else {
        Err(format!(
            "U-Net takes {unet_in_channels} channels; supported: {latent_channels} (plain), {} (inpainting), {} \
             (InstructPix2Pix)",
            2 * latent_channels + 1,
            2 * latent_channels
        ))
    }
}

/// The error for a request that needs `wanted` from a model that lacks it, naming what the model can do.
pub fn missing_capability(info: &ModelInfo, wanted: Capability) -> EngineError {
    let can: Vec<&str> = info.capabilities.iter().map(|c| c.as_str()).collect();
    EngineError::InvalidRequest(format!(
        "model {} cannot do {} (its denoiser takes {} channels); it can do: {}",
        info.path.file_name().map_or_else(|| info.path.display().to_string(), |n| n.to_string_lossy().into_owned()),
        wanted.as_str(),
        info.unet_in_channels,
        can.join(", ")
    ))
}

/// Narrows the capabilities the U-Net allows to what the family's pipelines do: the SDXL refiner (aesthetic
/// `time_ids`) only edits, SDXL has no InstructPix2Pix here, and LCM runs text to image only (diffusers'
/// LCM img2img schedules strength differently).
fn family_capabilities(traits: &FamilyTraits, caps: Vec<Capability>) -> Result<Vec<Capability>, String> {
    let keep: Vec<Capability> = match traits.family {
        Family::StableDiffusion => caps,
        Family::StableDiffusionXl => caps
            .into_iter()
            .filter(|c| *c != Capability::Instruct)
            .filter(|c| !(traits.requires_aesthetics_score && *c == Capability::TextToImage))
            .collect(),
        Family::LatentConsistency => caps.into_iter().filter(|c| *c == Capability::TextToImage).collect(),
        // SD3 inpaints by latent blending (its 16-channel transformer); InstructPix2Pix has no SD3 variant.
        Family::StableDiffusion3 => caps.into_iter().filter(|c| *c != Capability::Instruct).collect(),
        // FluxPipeline and FluxImg2ImgPipeline; Flux inpainting (FluxInpaint/Fill) is not implemented.
        Family::Flux => {
            caps.into_iter().filter(|c| matches!(c, Capability::TextToImage | Capability::Img2img)).collect()
        }
    };
    if keep.is_empty() {
        return Err(format!("no supported mode for a family {} export with this U-Net", traits.family.as_str()));
    }
    Ok(keep)
}

/// Checks that the graphs and tokenizers the family needs exist, so that an incomplete export fails at
/// start-up with the missing file named, rather than in a worker.
fn require_components(dir: &Path, family: Family, text_encoders: &[EncoderSpec]) -> Result<(), String> {
    let mut files: Vec<String> = vec![format!("{}/model.onnx", family.denoiser_dir()), "vae_decoder/model.onnx".into()];
    for spec in text_encoders {
        files.push(format!("{}/model.onnx", spec.graph));
        let vocabulary = match spec.tokenizer_kind {
            TokenizerKind::Clip => "vocab.json",
            TokenizerKind::T5 => "tokenizer.json",
        };
        files.push(format!("{}/{vocabulary}", spec.tokenizer));
    }
    match files.iter().find(|f| !dir.join(f).is_file()) {
        Some(missing) => Err(format!("missing {missing}")),
        None => Ok(()),
    }
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::Model { path: path.to_path_buf(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Model { path: path.to_path_buf(), message: e.to_string() })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, EngineError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn number(config: &Option<Value>, key: &str) -> Option<f64> {
    config.as_ref().and_then(|c| c.get(key)).and_then(Value::as_f64)
}

impl ModelInfo {
    /// Reads `model_index.json`, the scheduler config and the component configs of an export folder.
    pub fn read(path: &Path) -> Result<Self, EngineError> {
        let model_err = |message: String| EngineError::Model { path: path.to_path_buf(), message };
        if !path.is_dir() {
            return Err(model_err("folder not found".into()));
        }
        let index = read_json(&path.join("model_index.json"))?;
        let pipeline_class = index.get("_class_name").and_then(Value::as_str).unwrap_or_default().to_string();
        let traits = FamilyTraits::read(&index).map_err(model_err)?;
        let family = traits.family;
        let present = |name: &str| lists_component(&index, name) || path.join(name).is_dir();
        let text_encoders: Vec<EncoderSpec> = family
            .text_encoders(present("text_encoder"))
            .into_iter()
            .filter(|spec| !spec.optional || path.join(spec.graph).join("model.onnx").is_file())
            .collect();
        let geometry = Geometry::read(path, family)?;
        let mut info = Self {
            path: path.to_path_buf(),
            pipeline_class,
            traits,
            text_encoders,
            max_sequence_length: family.max_sequence_length(),
            joint_attention_dim: geometry.joint_attention_dim,
            time_cond_proj_dim: geometry.time_cond_proj_dim,
            scheduler_config: SchedulerConfig::default(),
            default_scheduler: SchedulerKind::FlowEuler,
            vae_scaling_factor: geometry.vae_scaling_factor,
            vae_shift_factor: geometry.vae_shift_factor,
            vae_scale_factor: geometry.vae_scale_factor,
            latent_channels: geometry.latent_channels,
            unet_in_channels: geometry.unet_in_channels,
            patch_size: geometry.patch_size,
            size_multiple: geometry.size_multiple,
            native_size: geometry.native_size,
            capabilities: Vec::new(),
        };
        (info.scheduler_config, info.default_scheduler) = read_scheduler(&info)?;
        require_components(path, family, &info.text_encoders).map_err(model_err)?;
        let has_vae_encoder = path.join("vae_encoder").join("model.onnx").is_file();
        info.capabilities = capabilities_for(info.unet_in_channels, info.latent_channels, has_vae_encoder)
            .and_then(|caps| family_capabilities(&info.traits, caps))
            .map_err(model_err)?;
        Ok(info)
    }
}

/// Reads the shipped scheduler and checks it can drive the family's denoiser; building it once (for the
/// native size) checks every config value now rather than at the first request.
fn read_scheduler(info: &ModelInfo) -> Result<(SchedulerConfig, SchedulerKind), EngineError> {
    let scheduler_path = info.path.join("scheduler").join("scheduler_config.json");
    let bad = |message: String| EngineError::Model { path: scheduler_path.clone(), message };
    let config: SchedulerConfig =
        serde_json::from_value(read_json(&scheduler_path)?).map_err(|e| bad(e.to_string()))?;
    let class = config.class_name.clone().unwrap_or_default();
    let kind = SchedulerKind::from_class_name(&class)
        .ok_or_else(|| bad(format!("scheduler class `{class}` is not supported")))?;
    // A scheduler of the wrong parameterisation runs without error and produces noise.
    kind.check_model(info.family().parameterization()).map_err(|e| EngineError::Model {
        path: info.path.clone(),
        message: format!("{e} (pipeline `{}`)", info.pipeline_class),
    })?;
    let options = info.run_options(info.native_size, info.native_size);
    super::scheduler::build_with(kind, &config, 10, &options).map_err(|e| bad(e.to_string()))?;
    Ok((config, kind))
}

/// Sizes and channel counts read from the VAE and denoiser configs.
struct Geometry {
    vae_scaling_factor: f32,
    vae_shift_factor: f32,
    vae_scale_factor: u32,
    latent_channels: u32,
    unet_in_channels: u32,
    patch_size: u32,
    size_multiple: u32,
    native_size: u32,
    time_cond_proj_dim: Option<usize>,
    joint_attention_dim: Option<usize>,
}

impl Geometry {
    fn read(path: &Path, family: Family) -> Result<Self, EngineError> {
        let vae = read_optional_json(&path.join("vae_decoder").join("config.json"))?;
        let denoiser = read_optional_json(&path.join(family.denoiser_dir()).join("config.json"))?;
        let blocks = |config: &Option<Value>| {
            config.as_ref().and_then(|c| c.get("block_out_channels")).and_then(Value::as_array).map_or(4, |a| a.len())
        };
        let vae_scale_factor = 1u32 << blocks(&vae).saturating_sub(1).min(6);
        let latent_channels = number(&vae, "latent_channels").unwrap_or(4.0) as u32;
        let in_channels = number(&denoiser, "in_channels").unwrap_or(latent_channels as f64) as u32;
        let (unet_in_channels, patch_size, sample_size) = match family {
            // Flux packs 2×2 latent cells into one 4C-wide token; diffusers' default sample size is 128.
            Family::Flux => (in_channels / 4, 2, number(&denoiser, "sample_size").unwrap_or(128.0) as u32),
            Family::StableDiffusion3 => (
                in_channels,
                number(&denoiser, "patch_size").unwrap_or(2.0) as u32,
                number(&denoiser, "sample_size").unwrap_or(128.0) as u32,
            ),
            _ => (in_channels, 1, number(&denoiser, "sample_size").unwrap_or(64.0) as u32),
        };
        let size_multiple = match family {
            Family::Flux | Family::StableDiffusion3 => vae_scale_factor * patch_size.max(1),
            _ => vae_scale_factor << blocks(&denoiser).saturating_sub(1).min(6),
        };
        Ok(Self {
            vae_scaling_factor: number(&vae, "scaling_factor").unwrap_or(0.18215) as f32,
            vae_shift_factor: number(&vae, "shift_factor").unwrap_or(0.0) as f32,
            vae_scale_factor,
            latent_channels,
            unet_in_channels,
            patch_size: patch_size.max(1),
            size_multiple,
            native_size: sample_size * vae_scale_factor,
            time_cond_proj_dim: number(&denoiser, "time_cond_proj_dim").map(|d| d as usize),
            joint_attention_dim: number(&denoiser, "joint_attention_dim").map(|d| d as usize),
        })
    }
}

/// A model's graphs loaded into one worker's sessions.
pub struct LoadedModel {
    /// The model's description.
    pub info: ModelInfo,
    /// The text encoders with their tokenizers, in the order the pipeline combines them.
    pub text_encoders: Vec<TextEncoder>,
    /// The denoiser graph: the U-Net, or SD3's / Flux's transformer.
    pub denoiser: Graph,
    /// How the denoiser is fed (its inputs beyond latents, timestep and text, read from the graph).
    pub denoiser_kind: DenoiserKind,
    /// VAE decoder graph.
    pub vae_decoder: Graph,
    /// VAE encoder, when the export has one (needed by every edit).
    pub vae_encoder: Option<VaeEncoder>,
    /// Cheap decoder for step previews.
    pub preview: ApproxDecoder,
    /// Name of the denoiser's output.
    pub denoiser_output: String,
    /// Name of the VAE decoder's image output.
    pub vae_output: String,
}

/// The VAE encoder graph and how to read the latent distribution's mean from it.
///
/// Exports name the output `latent_parameters` (mean ‖ logvar, `2·C` channels) or, in older ones,
/// `latent_sample`; the channel count of the actual output decides whether the first `C` channels are taken.
/// The engine uses the mean rather than a sample so that edits are deterministic (InstructPix2Pix uses the
/// mode, which is the mean, in diffusers too).
pub struct VaeEncoder {
    /// The graph (`sample` [b, 3, H, W] in [-1, 1] in).
    pub graph: Graph,
    /// Name of its latent output.
    pub output: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("info", &self.info).finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Opens the graphs of `info` with `factory` and checks that their inputs are the ones the pipeline feeds.
    pub fn load(info: ModelInfo, factory: &SessionFactory) -> Result<Self, EngineError> {
        let dir = info.path.clone();
        let text_encoders = info
            .text_encoders
            .iter()
            .map(|spec| TextEncoder::load(factory, &dir, spec, info.max_sequence_length))
            .collect::<Result<Vec<_>, _>>()?;
        let denoiser_dir = info.family().denoiser_dir();
        let denoiser = Graph::open(factory, &dir.join(denoiser_dir).join("model.onnx"), denoiser_dir)?;
        let vae_decoder = Graph::open(factory, &dir.join("vae_decoder").join("model.onnx"), "vae_decoder")?;
        let vae_encoder = load_vae_encoder(&info, factory)?;

        let bad = |graph: &Graph, message: String| EngineError::Model {
            path: dir.join(graph.name()).join("model.onnx"),
            message,
        };
        let denoiser_kind = DenoiserKind::from_graph(&info.traits, &denoiser, info.time_cond_proj_dim)
            .map_err(|m| bad(&denoiser, m))?;
        for (name, float) in
            [(denoiser_kind.sample_input(), true), ("timestep", false), ("encoder_hidden_states", true)]
        {
            require_input(&denoiser, name, float).map_err(|m| bad(&denoiser, m))?;
        }
        check_pooled(&info, denoiser_kind, &text_encoders)?;
        require_input(&vae_decoder, "latent_sample", true).map_err(|m| bad(&vae_decoder, m))?;

        let denoiser_output =
            pick_output(&denoiser, &["out_sample", "out_hidden_states", "sample"]).map_err(|m| bad(&denoiser, m))?;
        let vae_output = pick_output(&vae_decoder, &["sample"]).map_err(|m| bad(&vae_decoder, m))?;
        let preview = ApproxDecoder::load(&dir, factory, info.latent_channels as usize)?;
        Ok(Self {
            info,
            text_encoders,
            denoiser,
            denoiser_kind,
            vae_decoder,
            vae_encoder,
            preview,
            denoiser_output,
            vae_output,
        })
    }
}

/// The VAE encoder when the export has one; an error when a capability needs it and it is missing.
fn load_vae_encoder(info: &ModelInfo, factory: &SessionFactory) -> Result<Option<VaeEncoder>, EngineError> {
    let encoder_path = info.path.join("vae_encoder").join("model.onnx");
    if !encoder_path.is_file() {
        if info.capabilities.iter().any(|c| *c != Capability::TextToImage) {
            return Err(EngineError::Model { path: encoder_path, message: "file not found".into() });
        }
        return Ok(None);
    }
    let graph = Graph::open(factory, &encoder_path, "vae_encoder")?;
    let bad = |message: String| EngineError::Model { path: encoder_path.clone(), message };
    require_input(&graph, "sample", true).map_err(bad)?;
    let output = pick_output(&graph, &["latent_parameters", "latent_sample", "latent_dist"]).map_err(bad)?;
    Ok(Some(VaeEncoder { graph, output }))
}

/// The denoiser's pooled text input (SDXL `text_embeds`, SD3/Flux `pooled_projections`) needs an encoder with
/// a pooled output: every CLIP of SD3, the CLIP of Flux, at least one encoder of SDXL.
fn check_pooled(info: &ModelInfo, kind: DenoiserKind, encoders: &[TextEncoder]) -> Result<(), EngineError> {
    let needs_pooled = |spec: &EncoderSpec| match kind {
        DenoiserKind::Sd3 | DenoiserKind::Flux { .. } => spec.pooled.is_some(),
        DenoiserKind::Unet(_) => false,
    };
    let missing =
        info.text_encoders.iter().zip(encoders).find(|(spec, e)| needs_pooled(spec) && e.pooled_output.is_none());
    if let Some((spec, _)) = missing {
        return Err(EngineError::Model {
            path: info.path.join(spec.graph).join("model.onnx"),
            message: format!("no `{}` output for the denoiser's pooled text input", spec.pooled.unwrap_or_default()),
        });
    }
    if kind.unet_extras().time_ids.is_some() && !encoders.iter().any(|e| e.pooled_output.is_some()) {
        return Err(EngineError::Model {
            path: info.path.join("text_encoder_2").join("model.onnx"),
            message: "no `text_embeds` output for the U-Net's pooled text input".into(),
        });
    }
    Ok(())
}

fn require_input(graph: &Graph, name: &str, float: bool) -> Result<(), String> {
    let spec = graph.input(name).ok_or_else(|| format!("missing input `{name}`"))?;
    if spec.element == Element::Unsupported || (float && !spec.element.is_float()) {
        return Err(format!("input `{name}` has an unsupported element type {:?}", spec.element));
    }
    Ok(())
}

fn pick_output(graph: &Graph, names: &[&str]) -> Result<String, String> {
    for name in names {
        if graph.output(name).is_some() {
            return Ok((*name).to_string());
        }
    }
    graph.outputs().first().map(|o| o.name.clone()).ok_or_else(|| format!("no output named {}", names.join(" or ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_come_from_the_unet_channels_and_the_encoder() {
        use Capability::*;
        assert_eq!(capabilities_for(4, 4, false).unwrap(), [TextToImage]);
        assert_eq!(capabilities_for(4, 4, true).unwrap(), [TextToImage, Img2img, Inpaint, Outpaint]);
        assert_eq!(capabilities_for(9, 4, true).unwrap(), [Inpaint, Outpaint]);
        assert_eq!(capabilities_for(8, 4, true).unwrap(), [Instruct]);
        assert!(capabilities_for(9, 4, false).unwrap_err().contains("vae_encoder"));
        assert!(capabilities_for(8, 4, false).unwrap_err().contains("vae_encoder"));
        assert!(capabilities_for(7, 4, true).unwrap_err().contains("7 channels"));
    }

    #[test]
    fn a_diffusion_pipeline_with_a_flow_matching_scheduler_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline"}"#).unwrap();
        std::fs::create_dir(dir.path().join("scheduler")).unwrap();
        std::fs::write(
            dir.path().join("scheduler").join("scheduler_config.json"),
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#,
        )
        .unwrap();
        let err = ModelInfo::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("needs a flow-matching model") && err.contains("StableDiffusionPipeline"), "{err}");
    }
}
