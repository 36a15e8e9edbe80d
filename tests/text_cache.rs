//! The text-encoder cache on real exports of every family that encodes text: a prompt (and the empty negative
//! prompt) encoded a second time runs no text encoder and gives identical embeddings; a new prompt runs each
//! encoder once more, for itself only; with the cache off every text runs again and the embeddings do not
//! change.

mod common;

use denoised::engine::model::{LoadedModel, ModelInfo};
use denoised::engine::pipeline::prompt::encode_prompts;
use denoised::engine::runtime::Device;
use denoised::engine::text_cache::TextCacheLimits;

fn load(fixture: &str) -> LoadedModel {
    let info = ModelInfo::read(&common::fixture(fixture)).unwrap();
    LoadedModel::load(info, &common::runtime().session_factory(Device::Cpu, 1)).unwrap()
}

fn graph_runs(model: &LoadedModel) -> Vec<u64> {
    model.text_encoders.iter().map(|e| e.graph_runs()).collect()
}

#[test]
fn repeated_texts_do_not_run_the_encoders_again() {
    // SD 1.x (one CLIP), SDXL (two CLIPs, pooled from the second), SD3 (two CLIPs and T5), Flux (CLIP and T5).
    for fixture in ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"] {
        let mut model = load(fixture);
        let encoders = model.text_encoders.len() as u64;
        assert!(encoders >= 1, "{fixture}");
        let first = encode_prompts(&mut model, "a red circle on a blue background", Some(""), true).unwrap();
        assert_eq!(graph_runs(&model), vec![2; encoders as usize], "{fixture}: the prompt and \"\" once each");

        let second = encode_prompts(&mut model, "a red circle on a blue background", Some(""), true).unwrap();
        assert_eq!(graph_runs(&model), vec![2; encoders as usize], "{fixture}: nothing ran the second time");
        assert_eq!(first, second, "{fixture}: identical embeddings");

        let other = encode_prompts(&mut model, "a green square", Some(""), true).unwrap();
        assert_eq!(graph_runs(&model), vec![3; encoders as usize], "{fixture}: only the new prompt ran");
        assert_eq!(other.negative, first.negative, "{fixture}: the empty negative prompt came from the cache");
        assert_ne!(other.positive, first.positive, "{fixture}: a new prompt has its own embedding");

        for encoder in &mut model.text_encoders {
            encoder.set_cache_limits(TextCacheLimits::OFF);
        }
        let uncached = encode_prompts(&mut model, "a red circle on a blue background", Some(""), true).unwrap();
        assert_eq!(graph_runs(&model), vec![5; encoders as usize], "{fixture}: with the cache off both ran");
        assert_eq!(uncached, first, "{fixture}: cached embeddings are what the encoders give");
    }
}
