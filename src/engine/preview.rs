//! Step previews: a cheap picture of the predicted clean latents while a job runs.
//!
//! `approx` uses the model's own preview decoder when it ships one (`preview_decoder/model.onnx`, a tiny
//! network from diffusion latents to pixels in [-1, 1]; or a linear latent→RGB map in
//! `preview_decoder/config.json`), else the well-known linear approximation of the Stable Diffusion 1.x/2.x
//! latent space. `vae` runs the full VAE decoder. Both take diffusion latents (not divided by the VAE
//! scaling factor) and give a picture resized to the output size, capped at [`MAX_PREVIEW_SIDE`].

use std::path::Path;

use image::imageops::FilterType;
use image::RgbImage;
use ndarray::{Array4, ArrayD, Axis, Ix4};
use serde_json::Value;

use super::error::EngineError;
use super::graph::{Feed, Graph};
use super::image::tensor_to_images;
use super::runtime::SessionFactory;

/// Longest side of a preview picture.
pub const MAX_PREVIEW_SIDE: u32 = 512;

/// How a preview is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewMode {
    /// The cheap approximate decoder.
    #[default]
    Approx,
    /// The full VAE decoder.
    Vae,
}

/// Latent→RGB factors of the Stable Diffusion 1.x/2.x latent space (rows: latent channels; columns: R, G, B;
/// output in about [-1, 1]), the approximation image UIs use for live previews.
const SD_LATENT_RGB: [[f32; 3]; 4] =
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]];

/// The approximate decoder of one model.
pub enum ApproxDecoder {
    /// A linear map per latent cell: `rgb = latents · weights + bias`.
    Linear {
        /// One row of R, G, B weights per latent channel.
        weights: Vec<[f32; 3]>,
        /// Added to each output channel.
        bias: [f32; 3],
    },
    /// A small ONNX network shipped with the model.
    Network(Box<Graph>),
    /// No approximation for this latent space (16-channel SD3/Flux latents without a shipped preview decoder):
    /// approximate previews fall back to the full VAE.
    Unavailable,
}

impl std::fmt::Debug for ApproxDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApproxDecoder::Linear { .. } => write!(f, "ApproxDecoder::Linear"),
            ApproxDecoder::Network(_) => write!(f, "ApproxDecoder::Network"),
            ApproxDecoder::Unavailable => write!(f, "ApproxDecoder::Unavailable"),
        }
    }
}

impl ApproxDecoder {
    /// Loads the model's preview decoder from `model_dir/preview_decoder/`, or falls back to the SD linear map
    /// for 4-channel latents ([`ApproxDecoder::Unavailable`] for others).
    pub fn load(model_dir: &Path, factory: &SessionFactory, latent_channels: usize) -> Result<Self, EngineError> {
        let dir = model_dir.join("preview_decoder");
        let network = dir.join("model.onnx");
        if network.is_file() {
            return Ok(ApproxDecoder::Network(Box::new(Graph::open(factory, &network, "preview_decoder")?)));
        }
        if let Some(linear) = read_linear(&dir.join("config.json"), latent_channels) {
            return Ok(linear);
        }
        if latent_channels != SD_LATENT_RGB.len() {
            return Ok(ApproxDecoder::Unavailable);
        }
        Ok(ApproxDecoder::Linear { weights: SD_LATENT_RGB.to_vec(), bias: [0.0; 3] })
    }

    /// Whether [`Self::decode`] can run (false for [`ApproxDecoder::Unavailable`]).
    pub fn is_available(&self) -> bool {
        !matches!(self, ApproxDecoder::Unavailable)
    }

    /// Decodes diffusion latents `[b, C, h, w]` into `[b, 3, H, W]` in about [-1, 1].
    pub fn decode(&mut self, latents: &ArrayD<f32>) -> Result<Array4<f32>, EngineError> {
        let latents = latents
            .view()
            .into_dimensionality::<Ix4>()
            .map_err(|e| EngineError::InvalidRequest(format!("preview latents: {e}")))?;
        match self {
            ApproxDecoder::Linear { weights, bias } => {
                let (b, c, h, w) = latents.dim();
                let channels = c.min(weights.len());
                Ok(Array4::from_shape_fn((b, 3, h, w), |(i, rgb, y, x)| {
                    bias[rgb] + (0..channels).map(|k| latents[[i, k, y, x]] * weights[k][rgb]).sum::<f32>()
                }))
            }
            ApproxDecoder::Network(graph) => {
                let input = graph.inputs().first().map(|s| s.name.clone()).unwrap_or_else(|| "latent_sample".into());
                let output = graph.outputs().first().map(|s| s.name.clone()).unwrap_or_else(|| "sample".into());
                let mut out = graph.run(vec![(input.as_str(), Feed::Float(latents.to_owned().into_dyn()))])?;
                out.remove(&output)
                    .ok_or_else(|| EngineError::Inference { graph: "preview_decoder", message: "no output".into() })?
                    .into_dimensionality::<Ix4>()
                    .map_err(|e| EngineError::Inference { graph: "preview_decoder", message: e.to_string() })
            }
            ApproxDecoder::Unavailable => Err(EngineError::InvalidRequest(
                "no approximate preview for this latent space: use VAE previews".into(),
            )),
        }
    }
}

fn read_linear(config: &Path, latent_channels: usize) -> Option<ApproxDecoder> {
    let value: Value = serde_json::from_str(&std::fs::read_to_string(config).ok()?).ok()?;
    let linear = value.get("linear").or_else(|| value.get("linear_fallback"))?;
    let weights: Vec<[f32; 3]> = linear
        .get("weights_4x3")
        .or_else(|| linear.get("weights"))?
        .as_array()?
        .iter()
        .map(|row| {
            let row = row.as_array()?;
            Some([row.first()?.as_f64()? as f32, row.get(1)?.as_f64()? as f32, row.get(2)?.as_f64()? as f32])
        })
        .collect::<Option<_>>()?;
    if weights.len() != latent_channels {
        return None;
    }
    let bias = match linear.get("bias_3").or_else(|| linear.get("bias")).and_then(Value::as_array) {
        Some(b) if b.len() == 3 => [b[0].as_f64()? as f32, b[1].as_f64()? as f32, b[2].as_f64()? as f32],
        _ => [0.0; 3],
    };
    Some(ApproxDecoder::Linear { weights, bias })
}

/// Turns decoded `[b, 3, H, W]` (first image only) into a picture of `width`×`height`, capped at
/// [`MAX_PREVIEW_SIDE`] on the long side.
pub fn to_picture(decoded: &Array4<f32>, width: u32, height: u32) -> Option<RgbImage> {
    let first = decoded.index_axis(Axis(0), 0).insert_axis(Axis(0));
    let picture = tensor_to_images(first.view()).into_iter().next()?;
    let scale = (MAX_PREVIEW_SIDE as f32 / width.max(height) as f32).min(1.0);
    let (w, h) = (((width as f32 * scale).round() as u32).max(1), ((height as f32 * scale).round() as u32).max(1));
    if picture.dimensions() == (w, h) {
        return Some(picture);
    }
    Some(image::imageops::resize(&picture, w, h, FilterType::Triangle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn linear_preview_is_resized_to_the_output() {
        let mut decoder = ApproxDecoder::Linear { weights: SD_LATENT_RGB.to_vec(), bias: [0.0; 3] };
        let latents = ArrayD::from_shape_fn(IxDyn(&[2, 4, 8, 12]), |i| (i[1] as f32 - 1.5) * 0.5 + i[3] as f32 * 0.05);
        let decoded = decoder.decode(&latents).unwrap();
        assert_eq!(decoded.dim(), (2, 3, 8, 12));
        let picture = to_picture(&decoded, 96, 64).unwrap();
        assert_eq!(picture.dimensions(), (96, 64));
        let big = to_picture(&decoded, 2048, 1024).unwrap();
        assert_eq!(big.dimensions(), (512, 256));
    }

    #[test]
    fn linear_weights_come_from_the_model_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"linear_fallback": {"weights_4x3": [[1,0,0],[0,1,0],[0,0,1],[0,0,0]], "bias_3": [0.5, 0, 0]}}"#,
        )
        .unwrap();
        let Some(ApproxDecoder::Linear { weights, bias }) = read_linear(&dir.path().join("config.json"), 4) else {
            panic!("linear decoder expected");
        };
        assert_eq!(weights[1], [0.0, 1.0, 0.0]);
        assert_eq!(bias, [0.5, 0.0, 0.0]);
        assert!(read_linear(&dir.path().join("config.json"), 8).is_none(), "channel count must match");
    }
}
