//! Pipeline benchmark: times text-to-image on the tiny optimum fixture with real ONNX Runtime and prints
//! each configuration against a baseline measured in the same process.
//!
//! `cargo bench --bench pipeline` (release). Under `cargo test` it runs each case once as a smoke test.
//! `BENCH_MODEL=models/tiny-shapes` benchmarks another export.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use denoised::engine::model::{LoadedModel, ModelInfo};
use denoised::engine::pipeline::{text_to_image, GenerateRequest, NoObserver};
use denoised::engine::runtime::{Device, Runtime};
use denoised::engine::scheduler::SchedulerKind;

fn request(steps: u32, images: u32, guidance: f32, scheduler: SchedulerKind, size: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a large red circle top left on a blue background".into(),
        negative_prompt: String::new(),
        width: size,
        height: size,
        steps,
        guidance_scale: guidance,
        guidance_rescale: 0.0,
        scheduler,
        seed: 1,
        images,
        latents: None,
        watermark: None,
    }
}

fn median(model: &mut LoadedModel, request: &GenerateRequest, runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            text_to_image(model, request, &mut NoObserver).expect("generation");
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_dir =
        std::env::var_os("BENCH_MODEL").map(|p| root.join(p)).unwrap_or_else(|| root.join("tests/fixtures/tiny-sd"));
    let library = Runtime::library_path(&root.join(".ort/libonnxruntime.so"));
    let runtime = Runtime::load(&library).expect("ONNX Runtime (run scripts/fetch-onnxruntime.py)");
    let info = ModelInfo::read(&model_dir).expect("model");
    let size = info.native_size;
    let scheduler = info.default_scheduler;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut model = LoadedModel::load(info, &runtime.session_factory(Device::Cpu, threads)).expect("load");
    let runs = if benchmarking { 15 } else { 1 };

    // Warm-up, then the baseline: one image, 20 steps, guided, the model's own scheduler.
    median(&mut model, &request(2, 1, 7.5, scheduler, size), 1);
    let baseline = median(&mut model, &request(20, 1, 7.5, scheduler, size), runs);
    println!("model {} ({size}x{size}), {threads} threads, median of {runs}", model_dir.display());
    println!("{:<44} {:>9.1} ms   1.00x", "baseline: 1 image, 20 steps, guidance 7.5", baseline.as_secs_f64() * 1e3);
    let cases = [
        ("1 image, 20 steps, no guidance", request(20, 1, 1.0, scheduler, size), 1),
        ("1 image, 4 steps, guidance 7.5", request(4, 1, 7.5, scheduler, size), 1),
        ("1 image, 20 steps, dpmpp_2m_karras", request(20, 1, 7.5, SchedulerKind::Dpmpp2mKarras, size), 1),
        ("4 images in one batch, 20 steps (per image)", request(20, 4, 7.5, scheduler, size), 4),
    ];
    for (name, req, per) in cases {
        let t = median(&mut model, &req, runs) / per;
        println!("{name:<44} {:>9.1} ms   {:.2}x", t.as_secs_f64() * 1e3, t.as_secs_f64() / baseline.as_secs_f64());
    }
}
