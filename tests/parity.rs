//! Parity with diffusers/optimum: with the same graphs, prompt and starting latents, the Rust pipeline draws
//! the picture that optimum's `ORTStableDiffusionPipeline` drew (`tests/fixtures/reference/`, made by
//! `tests/fixtures/make_fixtures.py`), within 2/255 per pixel.

mod common;

use denoised::engine::model::{LoadedModel, ModelInfo};
use denoised::engine::pipeline::{text_to_image, GenerateRequest, NoObserver};
use denoised::engine::scheduler::SchedulerKind;
use serde_json::Value;

const TOLERANCE: f32 = 2.0 / 255.0;

fn load(fixture: &str) -> LoadedModel {
    let info = ModelInfo::read(&common::fixture(fixture)).unwrap();
    LoadedModel::load(info, &common::runtime().session_factory(common::device(), 1)).unwrap()
}

fn check_fixture(fixture: &str) {
    let mut model = load(fixture);
    let reference_dir = common::fixture("reference");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(reference_dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let latents = common::read_npy(&reference_dir.join(case["latents_npy"].as_str().unwrap()));
        let request = common::case_request(case, Some(latents));
        let images = text_to_image(&mut model, &request, &mut NoObserver).unwrap();
        let reference = common::read_npy(&reference_dir.join(case["output_npy"].as_str().unwrap()));
        assert_eq!(images.len(), reference.shape()[0], "{fixture}/{name}: image count");
        let worst = common::max_difference(&images, &reference);
        assert!(worst <= TOLERANCE, "{fixture}/{name}: max pixel difference {worst} > {TOLERANCE}");
    }
}

#[test]
fn tiny_sd_matches_optimum_for_every_reference_case() {
    check_fixture("tiny-sd");
}

#[test]
fn legacy_export_conventions_give_the_same_pictures() {
    // int32 input_ids, int64 batched timestep, `latent_sample` encoder output.
    check_fixture("tiny-sd-legacy");
}

#[test]
fn fp16_export_runs_and_tracks_fp32() {
    // The random tiny model amplifies rounding under strong guidance, so compare fp16 with fp32 without
    // guidance, where the two must stay close.
    let latents = common::read_npy(&common::fixture("reference/latents_1x4x8x8.npy"));
    let request = GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 10,
        guidance_scale: 1.0,
        guidance_rescale: 0.0,
        scheduler: SchedulerKind::Ddim,
        seed: 0,
        images: 1,
        latents: Some(latents),
        watermark: None,
    };
    let full = text_to_image(&mut load("tiny-sd"), &request, &mut NoObserver).unwrap();
    let half = text_to_image(&mut load("tiny-sd-fp16"), &request, &mut NoObserver).unwrap();
    assert_eq!(half[0].dimensions(), (64, 64));
    let diffs: Vec<f32> =
        full[0].as_raw().iter().zip(half[0].as_raw()).map(|(a, b)| (*a as f32 - *b as f32).abs() / 255.0).collect();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let max = diffs.iter().cloned().fold(0.0, f32::max);
    eprintln!("fp16 vs fp32: mean {mean}, max {max}");
    assert!(mean < 0.01, "fp16 drifts from fp32: mean difference {mean}");
    assert!(max < 0.1, "fp16 drifts from fp32: max difference {max}");
}

/// The denoiser runs with its text conditioning bound once (IO binding, `Graph::bind`) and only the latents
/// and timestep handed over per call: each call must give what a call handing over every input gives, the
/// per-call inputs must replace the previous call's, and inputs bound for one graph are refused by another.
#[test]
fn bound_conditioning_gives_the_same_predictions_as_every_input_per_call() {
    use denoised::engine::graph::{Feed, Graph};
    use ndarray::{ArrayD, IxDyn};

    let factory = common::runtime().session_factory(common::device(), 1);
    // Bit-identical on the CPU; on CUDA the same kernels may still differ in the last bits.
    let tolerance = if common::device() == denoised::engine::runtime::Device::Cpu { 0.0 } else { 1e-4 };
    for fixture in ["tiny-sd", "tiny-sd-fp16"] {
        let folder = common::fixture(fixture);
        let mut unet = Graph::open(&factory, &folder.join("unet/model.onnx"), "unet").unwrap();
        let text = Graph::open(&factory, &folder.join("text_encoder/model.onnx"), "text_encoder").unwrap();
        let width = unet.input("encoder_hidden_states").unwrap().shape[2] as usize;
        let pattern = |shape: &[usize], offset: f32| {
            let count: usize = shape.iter().product();
            let values = (0..count).map(|i| ((i as f32 * 0.37 + offset).sin() * 0.8).clamp(-1.0, 1.0)).collect();
            ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
        };
        let hidden = pattern(&[2, 77, width], 0.5);
        let timestep = match unet.input("timestep").unwrap().rank() {
            0 => ArrayD::from_elem(IxDyn(&[]), 500.0f32),
            _ => ArrayD::from_elem(IxDyn(&[2]), 500.0f32),
        };
        let mut bound = unet.bind(vec![("encoder_hidden_states", Feed::Float(hidden.clone()))]).unwrap();
        for (call, offset) in [0.0f32, 1.3, 2.9].into_iter().enumerate() {
            let sample = pattern(&[2, 4, 8, 8], offset);
            let every = unet
                .run(vec![
                    ("sample", Feed::Float(sample.clone())),
                    ("timestep", Feed::Float(timestep.clone())),
                    ("encoder_hidden_states", Feed::Float(hidden.clone())),
                ])
                .unwrap();
            let with_binding = unet
                .run_bound(
                    &mut bound,
                    vec![("sample", Feed::Float(sample)), ("timestep", Feed::Float(timestep.clone()))],
                    call < 2,
                )
                .unwrap();
            assert_eq!(every.keys().collect::<Vec<_>>(), with_binding.keys().collect::<Vec<_>>());
            for (name, expected) in &every {
                let got = &with_binding[name];
                assert_eq!(got.shape(), expected.shape());
                let largest = got.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(largest <= tolerance, "{fixture} call {call} `{name}`: differs by {largest}");
            }
        }
        let mut foreign = text.bind(Vec::new()).unwrap();
        let refused = unet.run_bound(&mut foreign, Vec::new(), false).unwrap_err();
        assert!(refused.to_string().contains("text_encoder"), "{refused}");
    }
}
