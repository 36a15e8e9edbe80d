//! The denoiser graph of each family and how the loop feeds it: a U-Net (`sample`, a timestep on the 0–1000
//! scale, text states and the [`UnetExtras`]), SD3's joint-attention transformer (`hidden_states`, a per-row
//! timestep on the 0–1000 scale, `pooled_projections`) or Flux's transformer (2×2-packed `hidden_states`,
//! the timestep as σ = t/1000, position ids and, for dev, the `guidance` embedding input).

use super::family::{Family, FamilyTraits, UnetExtras};
use super::graph::{Element, Graph};

/// How the loop feeds the model's denoiser, checked against the graph's inputs at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenoiserKind {
    /// A U-Net with the family's extra inputs.
    Unet(UnetExtras),
    /// `SD3Transformer2DModel`: unpacked latents, `pooled_projections`.
    Sd3,
    /// `FluxTransformer2DModel`: packed latents, `img_ids`/`txt_ids`, and `guidance` when the graph has a
    /// guidance embedding (dev; schnell has none).
    Flux {
        /// Whether the graph takes `guidance`.
        guidance: bool,
    },
}

const SD3_INPUTS: [&str; 4] = ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"];
const FLUX_INPUTS: [&str; 6] =
    ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids"];

impl DenoiserKind {
    /// Reads the kind from the graph's inputs for `traits`' family; `Err` is a one-line reason naming the
    /// input. `cond_dim_config` is the U-Net config's `time_cond_proj_dim`.
    pub fn from_graph(traits: &FamilyTraits, graph: &Graph, cond_dim_config: Option<usize>) -> Result<Self, String> {
        match traits.family {
            Family::StableDiffusion3 => {
                check_inputs(graph, &SD3_INPUTS, &[], "sd3")?;
                Ok(DenoiserKind::Sd3)
            }
            Family::Flux => {
                check_inputs(graph, &FLUX_INPUTS, &["guidance"], "flux")?;
                Ok(DenoiserKind::Flux { guidance: graph.input("guidance").is_some() })
            }
            _ => UnetExtras::from_graph(traits, graph, cond_dim_config).map(DenoiserKind::Unet),
        }
    }

    /// The name of the latent input (`sample` or `hidden_states`).
    pub fn sample_input(self) -> &'static str {
        match self {
            DenoiserKind::Unet(_) => "sample",
            DenoiserKind::Sd3 | DenoiserKind::Flux { .. } => "hidden_states",
        }
    }

    /// The value fed as `timestep` for the scheduler's timestep `t`: `t` itself, or σ = t/1000 in float32
    /// for Flux (whose graph multiplies by 1000 again, as diffusers' pipeline does).
    pub fn timestep_value(self, t: f64) -> f32 {
        match self {
            DenoiserKind::Flux { .. } => t as f32 / 1000.0,
            _ => t as f32,
        }
    }

    /// Whether latents go in and come out 2×2-packed (Flux).
    pub fn packs_latents(self) -> bool {
        matches!(self, DenoiserKind::Flux { .. })
    }

    /// The U-Net's extras (none for the transformers).
    pub fn unet_extras(self) -> UnetExtras {
        match self {
            DenoiserKind::Unet(extras) => extras,
            _ => UnetExtras { time_ids: None, timestep_cond: None },
        }
    }
}

/// `required` must all be there (the integer id inputs as integers, the rest as floats), and nothing but
/// `required` and `optional` may be.
fn check_inputs(graph: &Graph, required: &[&str], optional: &[&str], family: &str) -> Result<(), String> {
    for name in required {
        if graph.input(name).is_none() {
            return Err(format!("transformer input `{name}` is missing (family {family})"));
        }
    }
    for spec in graph.inputs() {
        let name = spec.name.as_str();
        if !required.contains(&name) && !optional.contains(&name) {
            return Err(format!("transformer input `{name}` is not supported for family {family}"));
        }
        let ids = name.ends_with("_ids");
        let ok = if ids {
            matches!(spec.element, Element::I64 | Element::I32 | Element::F32)
        } else {
            spec.element.is_float()
        };
        if !ok {
            return Err(format!("transformer input `{name}` has element type {:?}", spec.element));
        }
    }
    Ok(())
}
