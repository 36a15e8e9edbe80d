//! Times one denoiser graph: `cargo run --release [--features cuda] --example unet_speed -- MODEL.onnx DEVICE
//! SIZE [BATCH] [RUNS]` runs the U-Net of an optimum export (`unet/model.onnx`) on `DEVICE` (`cpu`, `cuda:0`)
//! at a `SIZE`×`SIZE` picture (latents SIZE/8) with a guidance batch of `BATCH` (default 2: one image with
//! classifier-free guidance), and prints iterations per second after warm-up runs, twice: handing every input
//! over at each call, and as the server runs it, with the text conditioning bound once (IO binding) and only
//! the latents and timestep handed over per call. `scripts/gpu-check` uses it on an SD 1.5-sized U-Net; on the
//! CPU it runs on any fixture.

use std::path::PathBuf;
use std::time::Instant;

use denoised::engine::graph::{Feed, Graph};
use denoised::engine::runtime::{Device, Runtime};
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, device, size, rest @ ..] = args.as_slice() else {
        return Err("usage: unet_speed MODEL.onnx DEVICE SIZE [BATCH] [RUNS]".into());
    };
    let device = Device::parse(device)?;
    let size: usize = size.parse()?;
    let batch: usize = rest.first().map_or(Ok(2), |b| b.parse())?;
    let runs: usize = rest.get(1).map_or(Ok(20), |r| r.parse())?;
    let library = Runtime::library_path(&PathBuf::from(".ort/libonnxruntime.so"));
    let runtime = Runtime::load(&library)?;
    let threads = if device == Device::Cpu { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { 1 };
    let mut graph = Graph::open(&runtime.session_factory(device, threads), model.as_ref(), "unet")?;
    let channels = dimension(&graph, "sample", 1).unwrap_or(4);
    let (sequence, width) = (
        dimension(&graph, "encoder_hidden_states", 1).unwrap_or(77),
        dimension(&graph, "encoder_hidden_states", 2).ok_or("no encoder_hidden_states width")?,
    );
    let timestep_rank = graph.input("timestep").map_or(1, |s| s.rank());
    let latent = size / 8;
    let step_feeds = || {
        let sample = ArrayD::from_elem(IxDyn(&[batch, channels, latent, latent]), 0.5f32);
        let timestep = if timestep_rank == 0 {
            ArrayD::from_elem(IxDyn(&[]), 500.0f32)
        } else {
            ArrayD::from_elem(IxDyn(&[batch]), 500.0f32)
        };
        vec![("sample", Feed::Float(sample)), ("timestep", Feed::Float(timestep))]
    };
    let conditioning = || {
        let hidden = ArrayD::from_elem(IxDyn(&[batch, sequence, width]), 0.1f32);
        vec![("encoder_hidden_states", Feed::Float(hidden))]
    };
    let report = |how: &str, seconds: f64| {
        println!(
            "{model} on {device}: {size}x{size}, batch {batch}, {how}: {runs} runs in {seconds:.2} s: {:.2} it/s",
            runs as f64 / seconds
        );
    };
    let every_input = || step_feeds().into_iter().chain(conditioning()).collect::<Vec<_>>();
    for _ in 0..3 {
        graph.run_again_soon(every_input())?;
    }
    let started = Instant::now();
    for _ in 0..runs {
        graph.run_again_soon(every_input())?;
    }
    report("every input per call", started.elapsed().as_secs_f64());

    let mut bound = graph.bind(conditioning())?;
    for _ in 0..3 {
        graph.run_bound(&mut bound, step_feeds(), true)?;
    }
    let started = Instant::now();
    for _ in 0..runs {
        graph.run_bound(&mut bound, step_feeds(), true)?;
    }
    report("conditioning bound once", started.elapsed().as_secs_f64());
    Ok(())
}

/// The fixed size of axis `axis` of input `name`, if the graph declares one.
fn dimension(graph: &Graph, name: &str, axis: usize) -> Option<usize> {
    graph.input(name).and_then(|spec| spec.shape.get(axis).copied()).and_then(|d| usize::try_from(d).ok())
}
