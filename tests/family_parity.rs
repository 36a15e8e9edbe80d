//! Parity of the SDXL and LCM families with optimum/diffusers 0.36 (`tests/fixtures/reference-family/`, made
//! by `tests/fixtures/make_family_fixtures.py`): with the same graphs, prompts and noise, the engine draws the
//! pictures optimum drew within 2/255 per pixel, and its intermediates (prompt embeddings, pooled embeddings,
//! `time_ids`, `timestep_cond`, image latents) match the recorded arrays.

mod common;

use std::path::PathBuf;

use denoised::engine::family::Family;
use denoised::engine::model::{Capability, LoadedModel, ModelInfo};
use denoised::engine::pipeline::conditioning::{assemble, guidance_embedding, Branch, SizeConditioning};
use denoised::engine::pipeline::edit::scaled_latents;
use denoised::engine::pipeline::mask::binarise;
use denoised::engine::pipeline::prompt::{encode_prompts, PromptEmbedding};
use denoised::engine::pipeline::{
    edit_with, text_to_image_with, EditMode, EditRequest, GenerateRequest, NoObserver, RunExtras,
};
use denoised::engine::rng::NoiseSource;
use denoised::engine::runtime::Device;
use denoised::engine::scheduler::SchedulerKind;
use image::RgbImage;
use ndarray::{ArrayD, Axis};
use serde_json::Value;

const TOLERANCE: f32 = 2.0 / 255.0;
const CLOSE: f32 = 1e-4;

fn dir() -> PathBuf {
    common::fixture("reference-family")
}

fn npy(name: &str) -> ArrayD<f32> {
    common::read_npy(&dir().join(name))
}

fn case(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap()
}

fn fixture_of(case: &Value) -> String {
    case["model"].as_str().unwrap().trim_start_matches("tests/fixtures/").to_string()
}

fn load(fixture: &str) -> LoadedModel {
    let info = ModelInfo::read(&common::fixture(fixture)).unwrap();
    LoadedModel::load(info, &common::runtime().session_factory(common::device(), 1)).unwrap()
}

fn max_abs(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn close(what: &str, got: &ArrayD<f32>, expected: &ArrayD<f32>) {
    let d = max_abs(got, expected);
    eprintln!("{what}: max abs difference {d:e}");
    assert!(d <= CLOSE, "{what} differs by {d}");
}

fn request(case: &Value, latents_key: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap_or_default().into(),
        width: case["width"].as_u64().unwrap() as u32,
        height: case["height"].as_u64().unwrap() as u32,
        steps: case["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
        guidance_rescale: 0.0,
        scheduler: SchedulerKind::from_class_name(case["scheduler"].as_str().unwrap()).unwrap(),
        seed: 0,
        images: 1,
        latents: Some(npy(case[latents_key].as_str().unwrap())),
        watermark: None,
    }
}

/// Checks `images` against the case's output and returns the max difference.
fn check_images(name: &str, images: &[RgbImage], case: &Value) -> f32 {
    let reference = npy(case["output_npy"].as_str().unwrap());
    assert_eq!(images.len(), reference.shape()[0], "{name}: image count");
    let worst = common::max_difference(images, &reference);
    eprintln!("{name}: max pixel difference {worst} ({:.2}/255)", worst * 255.0);
    assert!(worst <= TOLERANCE, "{name}: max pixel difference {worst} > {TOLERANCE}");
    worst
}

fn run_text_to_image(name: &str) {
    let case = case(name);
    let mut model = load(&fixture_of(&case));
    // `negative_prompt: ""` in a case is diffusers' explicit empty text; null is an absent one.
    let extras = RunExtras { encode_empty_negative: case["negative_prompt"] == "", ..Default::default() };
    let images = text_to_image_with(&mut model, &request(&case, "latents_npy"), extras, &mut NoObserver).unwrap();
    check_images(name, &images, &case);
}

fn edit_request(case: &Value, mode: EditMode, mask_blur: u32) -> EditRequest {
    EditRequest {
        base: request(case, "noise_npy"),
        mode,
        image: image::open(dir().join("input.png")).unwrap().to_rgb8(),
        mask: case.get("mask_png").and_then(Value::as_str).map(|m| image::open(dir().join(m)).unwrap().to_luma8()),
        strength: case["strength"].as_f64().unwrap() as f32,
        image_guidance_scale: 1.5,
        mask_blur,
        diffedit: None,
    }
}

fn run_edit(name: &str, mode: EditMode) {
    let case = case(name);
    let mut model = load(&fixture_of(&case));
    let images = edit_with(&mut model, &edit_request(&case, mode, 0), RunExtras::default(), &mut NoObserver).unwrap();
    check_images(name, &images, &case);
}

/// 4-channel inpainting: the engine pastes the input's pixels back outside the mask (diffusers does not), so
/// the reference is compared inside the mask, and outside it the picture must be the input exactly.
fn run_blended_inpaint(name: &str) {
    let case = case(name);
    let mut model = load(&fixture_of(&case));
    let request = edit_request(&case, EditMode::Inpaint, 0);
    let images = edit_with(&mut model, &request, RunExtras::default(), &mut NoObserver).unwrap();
    let reference = npy(case["output_npy"].as_str().unwrap());
    let binary = binarise(request.mask.as_ref().unwrap());
    let (mut inside, mut outside) = (0f32, 0u8);
    for (x, y, px) in images[0].enumerate_pixels() {
        let original = request.image.get_pixel(x, y);
        for c in 0..3 {
            if binary[[y as usize, x as usize]] > 0.5 {
                let expected = reference[[0, y as usize, x as usize, c]];
                inside = inside.max((px[c] as f32 / 255.0 - expected).abs());
            } else {
                outside = outside.max(px[c].abs_diff(original[c]));
            }
        }
    }
    eprintln!("{name}: max pixel difference inside the mask {inside} ({:.2}/255)", inside * 255.0);
    assert!(inside <= TOLERANCE, "{name}: inside the mask {inside} > {TOLERANCE}");
    assert_eq!(outside, 0, "{name}: pixels outside the mask changed");
}

#[test]
fn families_and_capabilities_are_read_from_the_exports() {
    use Capability::*;
    let info = |f: &str| ModelInfo::read(&common::fixture(f)).unwrap();
    let sdxl = info("tiny-sdxl");
    assert_eq!(sdxl.family(), Family::StableDiffusionXl);
    assert_eq!(sdxl.capabilities, [TextToImage, Img2img, Inpaint, Outpaint]);
    assert_eq!(sdxl.native_size, 64);
    assert_eq!(info("tiny-sdxl-refiner").capabilities, [Img2img, Inpaint, Outpaint]);
    assert_eq!(info("tiny-sdxl-inpaint").capabilities, [Inpaint, Outpaint]);
    let lcm = info("tiny-lcm");
    assert_eq!((lcm.family(), lcm.capabilities.clone()), (Family::LatentConsistency, vec![TextToImage]));
    assert_eq!(info("tiny-sd").family(), Family::StableDiffusion);
    let sd3 = info("tiny-sd3");
    assert_eq!(
        (sd3.family(), sd3.capabilities.clone()),
        (Family::StableDiffusion3, vec![TextToImage, Img2img, Inpaint, Outpaint])
    );
    assert_eq!((sd3.latent_channels, sd3.size_multiple, sd3.native_size), (16, 16, 64));
    assert_eq!((sd3.vae_scaling_factor, sd3.vae_shift_factor), (1.5305, 0.0609));
    assert_eq!(sd3.text_encoders.len(), 3);
    assert_eq!(sd3.default_scheduler, SchedulerKind::FlowEuler);
    for flux in ["tiny-flux", "tiny-flux-schnell"] {
        let flux = info(flux);
        assert_eq!((flux.family(), flux.capabilities.clone()), (Family::Flux, vec![TextToImage, Img2img]));
        assert_eq!((flux.latent_channels, flux.unet_in_channels, flux.size_multiple), (16, 16, 16));
        assert_eq!(flux.run_options(64, 64).image_seq_len, Some(16));
    }
}

#[test]
fn a_missing_graph_is_named_at_read_time() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixture("tiny-sdxl");
    for entry in ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"] {
        let to = tmp.path().join(entry);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src.join(entry), to).unwrap();
    }
    let err = ModelInfo::read(tmp.path()).unwrap_err().to_string();
    assert!(err.contains(&tmp.path().display().to_string()) && err.contains("missing unet/model.onnx"), "{err}");
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn sdxl_prompt_embeddings_and_unet_inputs_match() {
    let case = case("sdxl_t2i");
    let mut model = load("tiny-sdxl");
    let prompts = encode_prompts(&mut model, "a red circle on a blue background", Some("blurry"), true).unwrap();
    let check = |what: &str, got: &PromptEmbedding, prefix: &str| {
        close(&format!("{what} embeds"), &got.hidden, &npy(&format!("sdxl_t2i_{prefix}prompt_embeds.npy")));
        let pooled = got.pooled.as_ref().unwrap();
        close(&format!("{what} pooled"), pooled, &npy(&format!("sdxl_t2i_{prefix}pooled_prompt_embeds.npy")));
    };
    check("positive", &prompts.positive, "");
    check("negative", prompts.negative.as_ref().unwrap(), "negative_");
    let size = SizeConditioning::for_picture(64, 64);
    let unet = assemble(&model, &prompts, &[Branch::Negative, Branch::Positive], 1, &size, 5.0).unwrap();
    close("encoder_hidden_states", &unet.encoder_hidden_states, &npy("sdxl_t2i_unet_encoder_hidden_states.npy"));
    close("text_embeds", unet.text_embeds.as_ref().unwrap(), &npy("sdxl_t2i_unet_text_embeds.npy"));
    close("time_ids", unet.time_ids.as_ref().unwrap(), &npy(case["unet_time_ids_npy"].as_str().unwrap()));
    assert!(unet.timestep_cond.is_none());

    // An absent negative prompt is zeros (force_zeros_for_empty_prompt); an empty one is encoded.
    let none = encode_prompts(&mut model, "a red circle on a blue background", None, true).unwrap();
    let zeros = none.negative.unwrap();
    assert!(zeros.hidden.iter().chain(zeros.pooled.as_ref().unwrap().iter()).all(|v| *v == 0.0));
    let empty = encode_prompts(&mut model, "a red circle on a blue background", Some(""), true).unwrap();
    let empty = empty.negative.unwrap();
    close("empty negative embeds", &empty.hidden, &npy("sdxl_t2i_neg_empty_negative_prompt_embeds.npy"));
    let pooled = npy("sdxl_t2i_neg_empty_negative_pooled_prompt_embeds.npy");
    close("empty negative pooled", empty.pooled.as_ref().unwrap(), &pooled);
}

#[test]
fn refiner_embeddings_and_aesthetic_time_ids_match() {
    let mut model = load("tiny-sdxl-refiner");
    let prompts = encode_prompts(&mut model, "a red circle on a blue background", None, true).unwrap();
    close("refiner embeds", &prompts.positive.hidden, &npy("sdxl_refiner_img2img_prompt_embeds.npy"));
    let pooled = npy("sdxl_refiner_img2img_pooled_prompt_embeds.npy");
    close("refiner pooled", prompts.positive.pooled.as_ref().unwrap(), &pooled);
    // force_zeros_for_empty_prompt is false for the refiner: an absent negative prompt is "" encoded.
    assert!(prompts.negative.as_ref().unwrap().hidden.iter().any(|v| *v != 0.0));
    let prompts = encode_prompts(&mut model, "a red circle on a blue background", Some("blurry"), true).unwrap();
    let negative = prompts.negative.as_ref().unwrap();
    close("refiner negative embeds", &negative.hidden, &npy("sdxl_refiner_img2img_negative_prompt_embeds.npy"));
    let size = SizeConditioning::for_picture(64, 64);
    let unet = assemble(&model, &prompts, &[Branch::Negative, Branch::Positive], 1, &size, 5.0).unwrap();
    close("refiner time_ids", unet.time_ids.as_ref().unwrap(), &npy("sdxl_refiner_img2img_unet_time_ids.npy"));
}

#[test]
fn sdxl_image_latents_match() {
    let pixels = denoised::engine::image::image_to_tensor(&image::open(dir().join("input.png")).unwrap().to_rgb8());
    let mut model = load("tiny-sdxl");
    close("init latents", &scaled_latents(&mut model, pixels.view()).unwrap(), &npy("sdxl_img2img_init_latents.npy"));
}

#[test]
fn lcm_embeddings_and_timestep_cond_match() {
    let mut model = load("tiny-lcm");
    let prompts = encode_prompts(&mut model, "a red circle on a blue background", None, false).unwrap();
    close("lcm prompt embeds", &prompts.positive.hidden, &npy("lcm_prompt_embeds.npy"));
    let size = SizeConditioning::for_picture(64, 64);
    let unet = assemble(&model, &prompts, &[Branch::Positive], 1, &size, 8.5).unwrap();
    // PyTorch's vectorised float32 `exp` is one ulp off for one frequency (k = 4, f ≈ 0.748) where the
    // engine rounds correctly; at the angle 7500·f one ulp moves sin/cos by up to 4.5e-4.
    let expected = npy("lcm_timestep_cond.npy");
    let got = unet.timestep_cond.as_ref().unwrap();
    let d = max_abs(got, &expected);
    eprintln!("timestep_cond: max abs difference {d:e}");
    assert!(d <= 5e-4, "timestep_cond differs by {d}");
    let direct = ArrayD::from_shape_vec(expected.raw_dim(), guidance_embedding(7.5, 256)).unwrap();
    assert_eq!(&direct, got);
}

#[test]
fn sdxl_text_to_image_matches_optimum() {
    run_text_to_image("sdxl_t2i");
}

#[test]
fn sdxl_absent_negative_prompt_is_zeros_like_optimum() {
    run_text_to_image("sdxl_t2i_neg_none");
}

#[test]
fn sdxl_explicit_empty_negative_prompt_is_encoded_like_optimum() {
    run_text_to_image("sdxl_t2i_neg_empty");
}

#[test]
fn sdxl_img2img_matches_optimum() {
    run_edit("sdxl_img2img", EditMode::Img2img);
}

#[test]
fn sdxl_refiner_img2img_matches_optimum() {
    run_edit("sdxl_refiner_img2img", EditMode::Img2img);
}

#[test]
fn sdxl_inpaint_unet_matches_optimum() {
    run_edit("sdxl_inpaint9", EditMode::Inpaint);
    run_edit("sdxl_inpaint9_s060", EditMode::Inpaint);
}

#[test]
fn sdxl_base_inpainting_by_blending_matches_optimum_inside_the_mask() {
    run_blended_inpaint("sdxl_inpaint4");
    run_blended_inpaint("sdxl_inpaint4_s060");
}

/// Replays the noise LCMScheduler drew between steps.
struct Replay {
    draws: Vec<ArrayD<f32>>,
}

impl NoiseSource for Replay {
    fn fill_normal(&mut self, out: &mut [f32]) {
        assert!(!self.draws.is_empty(), "more draws than recorded");
        let draw = self.draws.remove(0);
        assert_eq!(draw.len(), out.len());
        out.iter_mut().zip(draw.iter()).for_each(|(o, v)| *o = *v);
    }
}

#[test]
fn lcm_text_to_image_matches_optimum() {
    let case = case("lcm_t2i");
    let mut model = load("tiny-lcm");
    let recorded = npy(case["step_noise_npy"].as_str().unwrap());
    let mut replay = Replay { draws: recorded.axis_iter(Axis(0)).map(|d| d.to_owned()).collect() };
    let extras = RunExtras { step_noise: Some(&mut replay), ..Default::default() };
    let images = text_to_image_with(&mut model, &request(&case, "latents_npy"), extras, &mut NoObserver).unwrap();
    check_images("lcm_t2i", &images, &case);
    assert!(replay.draws.is_empty(), "{} recorded draws not consumed", replay.draws.len());
}

/// Through HTTP: `GET /v1/models` reports each family with its defaults, and `POST /v1/images` on the SDXL
/// model with the reference's latents draws optimum's `sdxl_t2i` picture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_generates_through_http_like_optimum() {
    use base64::Engine as _;
    let server = common::TestServer::start(&common::extra_models(&["tiny-sdxl", "tiny-lcm"])).await;
    let client = reqwest::Client::new();
    let models: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let card = |id: &str| models["data"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap().clone();
    let (sdxl, lcm, sd) = (card("tiny-sdxl"), card("tiny-lcm"), card("tiny-sd"));
    assert_eq!((sdxl["family"].as_str(), sdxl["width"].as_u64()), (Some("sdxl"), Some(64)));
    assert_eq!(sdxl["default_guidance_scale"], 5.0);
    assert_eq!((lcm["family"].as_str(), lcm["default_steps"].as_u64()), (Some("lcm"), Some(4)));
    assert_eq!((lcm["default_guidance_scale"].as_f64(), lcm["default_scheduler"].as_str()), (Some(8.5), Some("lcm")));
    assert_eq!(sd["family"], "sd");

    let case = case("sdxl_t2i");
    let latents = std::fs::read(dir().join(case["latents_npy"].as_str().unwrap())).unwrap();
    let body = serde_json::json!({
        "model": "tiny-sdxl",
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"],
        "steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "scheduler": "euler",
        "latents": base64::engine::general_purpose::STANDARD.encode(latents),
    });
    let picture = run_http_job(&client, &server, body).await;
    check_images("sdxl_t2i over HTTP", &[picture], &case);

    // LCM runs with its defaults (4 steps, guidance embedded) from a seed.
    let lcm_picture = run_http_job(&client, &server, serde_json::json!({"model": "tiny-lcm", "prompt": "a cat"})).await;
    assert_eq!(lcm_picture.dimensions(), (64, 64));
    server.shutdown().await;
}

/// Submits a generation, waits for it and returns its first picture.
async fn run_http_job(client: &reqwest::Client, server: &common::TestServer, body: Value) -> RgbImage {
    let response = client.post(server.url("/v1/images")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let job = common::wait_for_job(client, &server.url(&location), std::time::Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let url = job["images"][0]["url"].as_str().unwrap();
    let bytes = client.get(server.url(url)).send().await.unwrap().bytes().await.unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

#[test]
fn graphs_that_contradict_the_pipeline_class_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&common::fixture("tiny-sdxl"), tmp.path());
    let index = tmp.path().join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replace("StableDiffusionXLPipeline", "StableDiffusionPipeline")).unwrap();
    let info = ModelInfo::read(tmp.path()).unwrap();
    let err = LoadedModel::load(info, &common::runtime().session_factory(Device::Cpu, 1)).unwrap_err().to_string();
    assert!(err.contains("unet") && err.contains("`text_embeds` is not supported for family sd"), "{err}");
    assert_eq!(err.lines().count(), 1);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

// ---- SD3 and Flux (flow matching) ----

fn run_text_to_image_sd3_flux(name: &str) -> f32 {
    let case = case(name);
    let mut model = load(&fixture_of(&case));
    // SD3 encodes an absent negative prompt as ""; Flux has no negative branch.
    let images =
        text_to_image_with(&mut model, &request(&case, "latents_npy"), RunExtras::default(), &mut NoObserver).unwrap();
    check_images(name, &images, &case)
}

fn ids_of(case: &Value, which: &str, encoder: &str) -> Vec<u32> {
    case["input_ids"][which][encoder].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn t5_tokenizer_pads_and_truncates_like_the_fast_tokenizer() {
    use denoised::engine::t5_tokenizer::T5Tokenizer;
    let sd3 = case("sd3_t2i");
    let t5 = T5Tokenizer::from_dir(&common::fixture("tiny-sd3/tokenizer_3")).unwrap();
    assert_eq!(
        t5.encode_padded(sd3["prompt"].as_str().unwrap(), 256).unwrap(),
        ids_of(&sd3, "prompt_input_ids", "text_encoder_3")
    );
    assert_eq!(t5.encode_padded("blurry", 256).unwrap(), ids_of(&sd3, "negative_input_ids", "text_encoder_3"));
    let flux = case("flux_t2i");
    let t5 = T5Tokenizer::from_dir(&common::fixture("tiny-flux/tokenizer_2")).unwrap();
    let flux_ids: Vec<u32> =
        flux["input_ids"]["text_encoder_2"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(t5.encode_padded(flux["prompt"].as_str().unwrap(), 512).unwrap(), flux_ids);
    // Truncation keeps `</s>` last; an empty text is `</s>` then padding.
    let long = "a red circle ".repeat(100);
    let ids = t5.encode_padded(&long, 16).unwrap();
    assert_eq!((ids.len(), ids[15]), (16, 1));
    assert_eq!(&t5.encode_padded("", 4).unwrap(), &[1, 0, 0, 0]);
}

#[test]
fn sd3_prompt_embeddings_and_transformer_inputs_match() {
    let mut model = load("tiny-sd3");
    let prompts = encode_prompts(&mut model, "a red circle on a blue background", Some("blurry"), true).unwrap();
    close("sd3 embeds", &prompts.positive.hidden, &npy("sd3_prompt_embeds.npy"));
    close("sd3 pooled", prompts.positive.pooled.as_ref().unwrap(), &npy("sd3_pooled_prompt_embeds.npy"));
    let negative = prompts.negative.as_ref().unwrap();
    close("sd3 negative embeds", &negative.hidden, &npy("sd3_negative_prompt_embeds.npy"));
    close("sd3 negative pooled", negative.pooled.as_ref().unwrap(), &npy("sd3_negative_pooled_prompt_embeds.npy"));
    let size = SizeConditioning::for_picture(64, 64);
    let inputs = assemble(&model, &prompts, &[Branch::Negative, Branch::Positive], 1, &size, 5.0).unwrap();
    assert_eq!(inputs.encoder_hidden_states.shape(), &[2, 333, 32]);
    assert_eq!(inputs.pooled_projections.as_ref().unwrap().shape(), &[2, 20]);
    assert!(inputs.img_ids.is_none() && inputs.guidance.is_none() && inputs.time_ids.is_none());
}

#[test]
fn sd3_without_t5_feeds_zeros_in_its_place() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&common::fixture("tiny-sd3"), tmp.path());
    std::fs::remove_dir_all(tmp.path().join("text_encoder_3")).unwrap();
    let info = ModelInfo::read(tmp.path()).unwrap();
    assert_eq!(info.text_encoders.len(), 2);
    let mut model = LoadedModel::load(info, &common::runtime().session_factory(common::device(), 1)).unwrap();
    let prompt = encode_prompts(&mut model, "a red circle on a blue background", None, false).unwrap().positive;
    let full = npy("sd3_prompt_embeds.npy");
    assert_eq!(prompt.hidden.shape(), full.shape());
    let clip = |a: &ArrayD<f32>| a.slice_axis(Axis(1), (0..77).into()).to_owned();
    close("sd3 clip part without T5", &clip(&prompt.hidden), &clip(&full));
    assert!(prompt.hidden.slice_axis(Axis(1), (77..333).into()).iter().all(|v| *v == 0.0));
}

#[test]
fn sd3_text_to_image_matches_optimum() {
    run_text_to_image_sd3_flux("sd3_t2i");
}

#[test]
fn sd3_image_latents_match() {
    let pixels = denoised::engine::image::image_to_tensor(&image::open(dir().join("input.png")).unwrap().to_rgb8());
    let mut model = load("tiny-sd3");
    close("sd3 init latents", &scaled_latents(&mut model, pixels.view()).unwrap(), &npy("sd3_init_latents.npy"));
    let mut model = load("tiny-flux");
    close("flux init latents", &scaled_latents(&mut model, pixels.view()).unwrap(), &npy("flux_init_latents.npy"));
}

#[test]
fn sd3_img2img_matches_optimum() {
    run_edit("sd3_img2img", EditMode::Img2img);
}

#[test]
fn sd3_inpainting_by_blending_matches_optimum_inside_the_mask() {
    run_blended_inpaint("sd3_inpaint");
    run_blended_inpaint("sd3_inpaint_s060");
}

#[test]
fn flux_prompt_embeddings_ids_and_packing_match() {
    use denoised::engine::pipeline::packing::{pack, unpack};
    for (fixture, prefix, guidance) in [("tiny-flux", "flux", Some(3.5)), ("tiny-flux-schnell", "flux_schnell", None)] {
        let mut model = load(fixture);
        let prompts = encode_prompts(&mut model, "a red circle on a blue background", None, false).unwrap();
        assert!(prompts.negative.is_none());
        close(&format!("{prefix} embeds"), &prompts.positive.hidden, &npy(&format!("{prefix}_prompt_embeds.npy")));
        let pooled = npy(&format!("{prefix}_pooled_prompt_embeds.npy"));
        close(&format!("{prefix} pooled"), prompts.positive.pooled.as_ref().unwrap(), &pooled);
        let size = SizeConditioning::for_picture(64, 64);
        let inputs = assemble(&model, &prompts, &[Branch::Positive], 1, &size, 3.5).unwrap();
        let img_ids = inputs.img_ids.as_ref().unwrap().mapv(|v| v as f32);
        assert_eq!(img_ids, npy(&format!("{prefix}_img_ids.npy")));
        assert_eq!(inputs.txt_ids.as_ref().unwrap().shape(), &[512, 3]);
        assert_eq!(inputs.guidance.as_ref().map(|g| g.iter().copied().collect::<Vec<_>>()), guidance.map(|g| vec![g]));
        let latents = npy(&format!("latents_{prefix}_1x16x8x8.npy"));
        assert_eq!(pack(&latents).unwrap(), npy(&format!("latents_{prefix}_packed_1x16x64.npy")));
        let final_packed = npy(&format!("{prefix}_t2i_final_packed_latents.npy"));
        assert_eq!(unpack(&final_packed, 8, 8).unwrap(), npy(&format!("{prefix}_t2i_final_latents.npy")));
    }
}

#[test]
fn flux_dev_text_to_image_matches_optimum() {
    run_text_to_image_sd3_flux("flux_t2i");
}

#[test]
fn flux_schnell_text_to_image_matches_optimum() {
    run_text_to_image_sd3_flux("flux_schnell_t2i");
}

#[test]
fn flux_img2img_matches_optimum() {
    run_edit("flux_img2img", EditMode::Img2img);
}

#[test]
fn flux_refuses_inpainting_and_diffusion_schedulers_in_one_line() {
    let case = case("flux_img2img");
    let mut model = load("tiny-flux");
    let mut request = edit_request(&case, EditMode::Img2img, 0);
    request.mode = EditMode::Inpaint;
    request.mask = Some(image::open(dir().join("mask.png")).unwrap().to_luma8());
    let err = edit_with(&mut model, &request, RunExtras::default(), &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains("tiny-flux") && err.contains("cannot do inpaint"), "{err}");
    let mut t2i = request.base.clone();
    t2i.scheduler = SchedulerKind::Euler;
    let err = text_to_image_with(&mut model, &t2i, RunExtras::default(), &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains("flow-matching"), "{err}");
    t2i.scheduler = SchedulerKind::FlowEuler;
    t2i.width = 72;
    let err = text_to_image_with(&mut model, &t2i, RunExtras::default(), &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains("multiples of 16") && err.lines().count() == 1, "{err}");
}

/// `POST /v1/images` on `fixture` with the case's latents and settings (the model's default scheduler,
/// `flow_euler`) draws optimum's picture; `GET /v1/models` reports the family.
async fn flow_model_generates_through_http(fixture: &str, name: &str, family: &str) {
    use base64::Engine as _;
    let server = common::TestServer::start(&common::extra_models(&[fixture])).await;
    let client = reqwest::Client::new();
    let models: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let card = models["data"].as_array().unwrap().iter().find(|m| m["id"] == fixture).unwrap().clone();
    assert_eq!((card["family"].as_str(), card["default_scheduler"].as_str()), (Some(family), Some("flow_euler")));
    assert_eq!(card["size_multiple"], 16);

    let case = case(name);
    let latents = std::fs::read(dir().join(case["latents_npy"].as_str().unwrap())).unwrap();
    let body = serde_json::json!({
        "model": fixture,
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"].as_str().unwrap_or_default(),
        "width": case["width"],
        "height": case["height"],
        "steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "latents": base64::engine::general_purpose::STANDARD.encode(latents),
    });
    let picture = run_http_job(&client, &server, body).await;
    check_images(&format!("{name} over HTTP"), &[picture], &case);

    // A diffusion scheduler is refused for a flow-matching model.
    let body =
        serde_json::json!({"model": fixture, "prompt": "a cat", "width": 64, "height": 64, "scheduler": "euler"});
    let response = client.post(server.url("/v1/images")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 422);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd3_generates_through_http_like_optimum() {
    flow_model_generates_through_http("tiny-sd3", "sd3_t2i", "sd3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_generates_through_http_like_optimum() {
    flow_model_generates_through_http("tiny-flux", "flux_t2i", "flux").await;
}

/// Asks for an approximate preview after every call and counts the pictures.
struct Previews {
    pictures: Vec<(u32, u32)>,
}

impl denoised::engine::pipeline::StepObserver for Previews {
    fn on_step(&mut self, _step: usize, _total: usize, preview: Option<RgbImage>) {
        self.pictures.extend(preview.map(|p| p.dimensions()));
    }

    fn preview_wanted(&self, _step: usize, _total: usize) -> Option<denoised::engine::preview::PreviewMode> {
        Some(denoised::engine::preview::PreviewMode::Approx)
    }
}

#[test]
fn sixteen_channel_previews_fall_back_to_the_vae() {
    for name in ["sd3_t2i", "flux_schnell_t2i"] {
        let case = case(name);
        let mut model = load(&fixture_of(&case));
        assert!(!model.preview.is_available(), "{name}: no 16-channel linear map is shipped");
        let mut observer = Previews { pictures: Vec::new() };
        let request = request(&case, "latents_npy");
        text_to_image_with(&mut model, &request, RunExtras::default(), &mut observer).unwrap();
        assert_eq!(observer.pictures, vec![(64, 64); request.steps as usize], "{name}");
    }
}

// ---- SD-Turbo (an SD 2.x export run with guidance off and trailing ancestral steps) ----

/// Engine parity for `case` (guidance 0, `EulerAncestralDiscreteScheduler` on trailing timesteps), replaying
/// the noise the scheduler drew at every step.
fn run_turbo(name: &str) -> f32 {
    let case = case(name);
    let mut model = load(&fixture_of(&case));
    let recorded = npy(case["step_noise_npy"].as_str().unwrap());
    let mut replay = Replay { draws: recorded.axis_iter(Axis(0)).map(|d| d.to_owned()).collect() };
    let extras = RunExtras { step_noise: Some(&mut replay), ..Default::default() };
    let images = text_to_image_with(&mut model, &request(&case, "latents_npy"), extras, &mut NoObserver).unwrap();
    assert!(replay.draws.is_empty(), "{name}: {} recorded draws not consumed", replay.draws.len());
    check_images(name, &images, &case)
}

#[test]
fn sd_turbo_is_an_sd_export_with_an_ancestral_trailing_scheduler() {
    let info = ModelInfo::read(&common::fixture("tiny-sd-turbo")).unwrap();
    assert_eq!(info.family(), Family::StableDiffusion);
    assert_eq!(info.default_scheduler, SchedulerKind::EulerA);
    let mut model = load("tiny-sd-turbo");
    let prompts = encode_prompts(&mut model, "a red circle on a blue background", None, false).unwrap();
    close("turbo prompt embeds", &prompts.positive.hidden, &npy("turbo_prompt_embeds.npy"));
}

#[test]
fn sd_turbo_one_step_matches_optimum() {
    run_turbo("turbo_t2i_1step");
}

#[test]
fn sd_turbo_four_steps_match_optimum() {
    run_turbo("turbo_t2i_4step");
}

/// Through HTTP, with the defaults a turbo model is configured with (`guidance_scale = 0`, `steps = 1`):
/// `GET /v1/models` reports them, and a request with only a prompt and the reference's latents draws optimum's
/// one-step picture (the one step's ancestral noise is multiplied by zero, so no recorded draw is needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_turbo_configured_defaults_draw_optimums_one_step_picture_through_http() {
    use base64::Engine as _;
    let path = common::fixture("tiny-sd-turbo");
    let models =
        format!("[[models]]\nname = \"tiny-sd-turbo\"\npath = \"{}\"\nguidance_scale = 0\nsteps = 1\n", path.display());
    let server = common::TestServer::start(&models).await;
    let client = reqwest::Client::new();
    let listed: Value = client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let card = listed["data"].as_array().unwrap().iter().find(|m| m["id"] == "tiny-sd-turbo").unwrap().clone();
    assert_eq!((card["family"].as_str(), card["default_scheduler"].as_str()), (Some("sd"), Some("euler_a")));
    assert_eq!((card["default_steps"].as_u64(), card["default_guidance_scale"].as_f64()), (Some(1), Some(0.0)));

    let case = case("turbo_t2i_1step");
    let latents = std::fs::read(dir().join(case["latents_npy"].as_str().unwrap())).unwrap();
    let body = serde_json::json!({
        "model": "tiny-sd-turbo",
        "prompt": case["prompt"],
        "latents": base64::engine::general_purpose::STANDARD.encode(latents),
    });
    let picture = run_http_job(&client, &server, body).await;
    check_images("turbo_t2i_1step over HTTP", &[picture], &case);
    server.shutdown().await;
}
