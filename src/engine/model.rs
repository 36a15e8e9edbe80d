//! An optimum Stable Diffusion export on disk: what it is ([`ModelInfo`], read from its JSON files alone) and
//! its loaded graphs ([`LoadedModel`], one per worker, since sessions are never shared).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::EngineError;
use super::family::{lists_component, Family, FamilyTraits, UnetExtras};
use super::graph::{Element, Graph};
use super::preview::ApproxDecoder;
use super::runtime::SessionFactory;
use super::scheduler::{Parameterization, SchedulerConfig, SchedulerKind};
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
    /// The text encoders (graph folder, tokenizer folder) the family reads, in concatenation order.
    pub text_encoders: Vec<(&'static str, &'static str)>,
    /// `time_cond_proj_dim` of the U-Net config (width of `timestep_cond`), when set.
    pub time_cond_proj_dim: Option<usize>,
    /// The scheduler config shipped with the model.
    pub scheduler_config: SchedulerConfig,
    /// The scheduler family the model ships with.
    pub default_scheduler: SchedulerKind,
    /// `scaling_factor` of the VAE (latents are divided by it before decoding).
    pub vae_scaling_factor: f32,
    /// Pixels per latent cell (8 for Stable Diffusion).
    pub vae_scale_factor: u32,
    /// Channels of the latent space (4 for Stable Diffusion).
    pub latent_channels: u32,
    /// Channels the U-Net takes (4 plain, 9 inpainting, 8 InstructPix2Pix).
    pub unet_in_channels: u32,
    /// Image sides must be multiples of this: the VAE factor times the U-Net's total downsampling (exported
    /// graphs have no resize path for sizes the U-Net cannot halve evenly).
    pub size_multiple: u32,
    /// Native image width and height in pixels (`unet.sample_size * vae_scale_factor`).
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
        "model {} cannot do {} (its U-Net takes {} channels); it can do: {}",
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
    };
    if keep.is_empty() {
        return Err(format!("no supported mode for a family {} export with this U-Net", traits.family.as_str()));
    }
    Ok(keep)
}

/// Checks that the graphs and tokenizers the family needs exist, so that an incomplete export fails at
/// start-up with the missing file named, rather than in a worker.
fn require_components(dir: &Path, text_encoders: &[(&str, &str)]) -> Result<(), String> {
    let mut files: Vec<String> = vec!["unet/model.onnx".into(), "vae_decoder/model.onnx".into()];
    for (graph, tokenizer) in text_encoders {
        files.push(format!("{graph}/model.onnx"));
        files.push(format!("{tokenizer}/vocab.json"));
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
        let has_text_encoder = lists_component(&index, "text_encoder") || path.join("text_encoder").is_dir();
        let text_encoders = traits.family.text_encoders(has_text_encoder);
        let scheduler_path = path.join("scheduler").join("scheduler_config.json");
        let scheduler_json = read_json(&scheduler_path)?;
        let scheduler_config: SchedulerConfig = serde_json::from_value(scheduler_json)
            .map_err(|e| EngineError::Model { path: scheduler_path.clone(), message: e.to_string() })?;
        let class = scheduler_config.class_name.clone().unwrap_or_default();
        let default_scheduler = SchedulerKind::from_class_name(&class).ok_or_else(|| EngineError::Model {
            path: scheduler_path.clone(),
            message: format!("scheduler class `{class}` is not supported"),
        })?;
        // Every supported pipeline runs a diffusion U-Net: a flow-matching default scheduler would produce noise.
        default_scheduler
            .check_model(Parameterization::Diffusion)
            .map_err(|e| model_err(format!("{e} (pipeline `{pipeline_class}`)")))?;
        // Building once checks every config value now rather than at the first request.
        super::scheduler::build(default_scheduler, &scheduler_config, 10)
            .map_err(|e| EngineError::Model { path: scheduler_path, message: e.to_string() })?;

        require_components(path, &text_encoders).map_err(model_err)?;
        let vae = read_optional_json(&path.join("vae_decoder").join("config.json"))?;
        let unet = read_optional_json(&path.join("unet").join("config.json"))?;
        let vae_scaling_factor = number(&vae, "scaling_factor").unwrap_or(0.18215) as f32;
        let vae_blocks =
            vae.as_ref().and_then(|c| c.get("block_out_channels")).and_then(Value::as_array).map_or(4, |a| a.len());
        let vae_scale_factor = 1u32 << vae_blocks.saturating_sub(1).min(6);
        let latent_channels = number(&vae, "latent_channels").unwrap_or(4.0) as u32;
        let unet_in_channels = number(&unet, "in_channels").unwrap_or(4.0) as u32;
        let sample_size = number(&unet, "sample_size").unwrap_or(64.0) as u32;
        let unet_levels =
            unet.as_ref().and_then(|c| c.get("block_out_channels")).and_then(Value::as_array).map_or(4, |a| a.len());
        let size_multiple = vae_scale_factor << unet_levels.saturating_sub(1).min(6);
        let has_vae_encoder = path.join("vae_encoder").join("model.onnx").is_file();
        let capabilities = capabilities_for(unet_in_channels, latent_channels, has_vae_encoder)
            .and_then(|caps| family_capabilities(&traits, caps))
            .map_err(model_err)?;
        let time_cond_proj_dim = number(&unet, "time_cond_proj_dim").map(|d| d as usize);
        Ok(Self {
            path: path.to_path_buf(),
            pipeline_class,
            traits,
            text_encoders,
            time_cond_proj_dim,
            scheduler_config,
            default_scheduler,
            vae_scaling_factor,
            vae_scale_factor,
            latent_channels,
            unet_in_channels,
            size_multiple,
            native_size: sample_size * vae_scale_factor,
            capabilities,
        })
    }
}

/// A model's graphs loaded into one worker's sessions.
pub struct LoadedModel {
    /// The model's description.
    pub info: ModelInfo,
    /// The text encoders with their tokenizers, in the order their hidden states are concatenated.
    pub text_encoders: Vec<TextEncoder>,
    /// U-Net graph.
    pub unet: Graph,
    /// The U-Net's inputs beyond sample, timestep and text (SDXL `text_embeds`/`time_ids`, `timestep_cond`).
    pub unet_extras: UnetExtras,
    /// VAE decoder graph.
    pub vae_decoder: Graph,
    /// VAE encoder, when the export has one (needed by every edit).
    pub vae_encoder: Option<VaeEncoder>,
    /// Cheap decoder for step previews.
    pub preview: ApproxDecoder,
    /// Name of the U-Net's output.
    pub unet_output: String,
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
        let layer = info.family().hidden_layer();
        let text_encoders = info
            .text_encoders
            .iter()
            .map(|names| TextEncoder::load(factory, &dir, *names, layer))
            .collect::<Result<Vec<_>, _>>()?;
        let unet = Graph::open(factory, &dir.join("unet").join("model.onnx"), "unet")?;
        let vae_decoder = Graph::open(factory, &dir.join("vae_decoder").join("model.onnx"), "vae_decoder")?;
        let encoder_path = dir.join("vae_encoder").join("model.onnx");
        let vae_encoder = if encoder_path.is_file() {
            let graph = Graph::open(factory, &encoder_path, "vae_encoder")?;
            let bad = |message: String| EngineError::Model { path: encoder_path.clone(), message };
            require_input(&graph, "sample", true).map_err(bad)?;
            let output = pick_output(&graph, &["latent_parameters", "latent_sample", "latent_dist"]).map_err(bad)?;
            Some(VaeEncoder { graph, output })
        } else {
            None
        };
        if vae_encoder.is_none() && info.capabilities.iter().any(|c| *c != Capability::TextToImage) {
            return Err(EngineError::Model { path: encoder_path, message: "file not found".into() });
        }

        let bad = |graph: &Graph, message: String| EngineError::Model {
            path: dir.join(graph.name()).join("model.onnx"),
            message,
        };
        for (name, float) in [("sample", true), ("timestep", false), ("encoder_hidden_states", true)] {
            require_input(&unet, name, float).map_err(|m| bad(&unet, m))?;
        }
        let unet_extras =
            UnetExtras::from_graph(&info.traits, &unet, info.time_cond_proj_dim).map_err(|m| bad(&unet, m))?;
        if unet_extras.time_ids.is_some() && !text_encoders.iter().any(|e| e.pooled_output.is_some()) {
            return Err(EngineError::Model {
                path: dir.join("text_encoder_2").join("model.onnx"),
                message: "no `text_embeds` output for the U-Net's pooled text input".into(),
            });
        }
        require_input(&vae_decoder, "latent_sample", true).map_err(|m| bad(&vae_decoder, m))?;

        let unet_output = pick_output(&unet, &["out_sample", "sample"]).map_err(|m| bad(&unet, m))?;
        let vae_output = pick_output(&vae_decoder, &["sample"]).map_err(|m| bad(&vae_decoder, m))?;
        let preview = ApproxDecoder::load(&dir, factory, info.latent_channels as usize)?;
        Ok(Self { info, text_encoders, unet, unet_extras, vae_decoder, vae_encoder, preview, unet_output, vae_output })
    }
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
