//! Golden trajectories: every scheduler family against diffusers 0.36 (`tests/golden/schedulers/`).
//!
//! For each file in `index.json` the scheduler is built from the recorded class, config and step count; its
//! timesteps, sigmas and `init_noise_sigma` are compared, then the recorded run is replayed call by call with
//! the documented U-Net stand-in, feeding each stochastic step the noise diffusers drew for it. The chain
//! uses this crate's own outputs throughout (never the recorded sample), so errors would accumulate.
//!
//! Flow-matching files (`flow_euler_*`) record the extra `set_timesteps` arguments their pipeline passed
//! (`set_timesteps_kwargs`: Flux's `sigmas = linspace(1, 1/n, n)` and `mu`) and the `image_seq_len` behind
//! `mu`; they are replayed through `build_with`, after checking each recorded argument against what the
//! crate derives itself (within the same tolerance).
//! Their img2img `noised` is `scale_noise`, which `add_noise` computes for flow schedulers.
//!
//! Tolerance: `|a - b| <= RTOL * max(|a|, |b|) + ATOL` with RTOL = 1e-5 and ATOL = 1e-6 for every array and
//! every family.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use denoised::engine::rng::NoiseSource;
use denoised::engine::scheduler::flow_euler::calculate_shift;
use denoised::engine::scheduler::{
    build_with, parse_lenient_json, FlowSigmas, RunOptions, SchedulerConfig, SchedulerKind, StepInput,
};
use ndarray::{ArrayD, Axis, IxDyn};
use serde_json::Value;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-6;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/schedulers")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_lenient_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A nested JSON list of numbers as an array.
fn tensor(v: &Value) -> ArrayD<f32> {
    fn walk(v: &Value, depth: usize, shape: &mut Vec<usize>, out: &mut Vec<f32>) {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                for item in items {
                    walk(item, depth + 1, shape, out);
                }
            }
            Value::Number(n) => out.push(n.as_f64().expect("number") as f32),
            other => panic!("not a tensor element: {other}"),
        }
    }
    let mut shape = Vec::new();
    let mut data = Vec::new();
    walk(v, 0, &mut shape, &mut data);
    ArrayD::from_shape_vec(IxDyn(&shape), data).expect("rectangular tensor")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("list").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= RTOL * a.abs().max(b.abs()) + ATOL
}

/// Collects mismatches so that one run reports every failing file, step and array.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
}

impl Report {
    fn scalars(&mut self, what: &str, ours: &[f64], theirs: &[f64]) {
        if ours.len() != theirs.len() {
            self.failures.push(format!("{what}: length {} vs recorded {}", ours.len(), theirs.len()));
            return;
        }
        if let Some(i) = (0..ours.len()).find(|&i| !close(ours[i], theirs[i])) {
            self.failures.push(format!("{what}[{i}]: ours {} vs recorded {}", ours[i], theirs[i]));
        }
    }

    fn array(&mut self, what: &str, ours: &ArrayD<f32>, theirs: &ArrayD<f32>) {
        if ours.shape() != theirs.shape() {
            self.failures.push(format!("{what}: shape {:?} vs recorded {:?}", ours.shape(), theirs.shape()));
            return;
        }
        let worst =
            ours.iter().zip(theirs.iter()).enumerate().filter(|(_, (&a, &b))| !close(a as f64, b as f64)).max_by(
                |x, y| {
                    let dx = (x.1 .0 - x.1 .1).abs();
                    let dy = (y.1 .0 - y.1 .1).abs();
                    dx.total_cmp(&dy)
                },
            );
        if let Some((i, (a, b))) = worst {
            self.failures.push(format!("{what}: element {i}: ours {a} vs recorded {b} (|diff| {})", (a - b).abs()));
        }
    }
}

/// Replays the noise diffusers drew during one `step` call, in order.
struct Replay {
    draws: VecDeque<ArrayD<f32>>,
    error: Option<String>,
}

impl NoiseSource for Replay {
    fn fill_normal(&mut self, out: &mut [f32]) {
        match self.draws.pop_front() {
            Some(d) if d.len() == out.len() => {
                for (o, v) in out.iter_mut().zip(d.iter()) {
                    *o = *v;
                }
            }
            Some(d) => {
                self.error = Some(format!("draw of {} values, recorded {}", out.len(), d.len()));
                out.fill(0.0);
            }
            None => {
                self.error = Some("draw beyond the recorded ones".into());
                out.fill(0.0);
            }
        }
    }
}

/// The documented U-Net stand-in:
/// `0.7 * tanh(0.5 * x) + 0.05 * sin(t / 97) + 0.02 * roll(x, shift=1, axis=-1)`.
fn unet_stand_in(x: &ArrayD<f32>, t: f64) -> ArrayD<f32> {
    let last = x.ndim() - 1;
    let w = x.shape()[last];
    let bias = (0.05 * (t / 97.0).sin()) as f32;
    let mut out = x.mapv(|v| 0.7 * (0.5 * v).tanh() + bias);
    for (mut o, xi) in out.lanes_mut(Axis(last)).into_iter().zip(x.lanes(Axis(last))) {
        for j in 0..w {
            o[j] += 0.02 * xi[(j + w - 1) % w];
        }
    }
    out
}

/// The run options that reproduce a file's `set_timesteps_kwargs`, after checking that each recorded argument
/// is what `build_with` derives from them (Flux's linear sigmas, `mu` from `image_seq_len`).
fn run_options(file: &str, g: &Value, cfg: &SchedulerConfig, n: usize, report: &mut Report) -> RunOptions {
    let image_seq_len = g.get("image_seq_len").and_then(Value::as_u64).map(|v| v as usize);
    let mut options = RunOptions { image_seq_len, flow_sigmas: FlowSigmas::Scheduler };
    let Some(kwargs) = g.get("set_timesteps_kwargs").and_then(Value::as_object) else {
        return options;
    };
    for (key, value) in kwargs {
        match key.as_str() {
            "sigmas" => {
                // np.linspace(1, 1/n, n), as the Flux pipelines compute it.
                let step = (1.0 / n as f64 - 1.0) / (n as f64 - 1.0).max(1.0);
                let linear: Vec<f64> =
                    (0..n).map(|i| if i + 1 == n { 1.0 / n as f64 } else { 1.0 + i as f64 * step }).collect();
                report.scalars(&format!("{file}: set_timesteps sigmas"), &linear, &floats(value));
                options.flow_sigmas = FlowSigmas::Linear;
            }
            "mu" => match image_seq_len.map(|len| calculate_shift(len, cfg)) {
                Some(Ok(mu)) => report.scalars(&format!("{file}: mu"), &[mu], &[value.as_f64().expect("mu")]),
                Some(Err(e)) => report.failures.push(format!("{file}: mu: {e}")),
                None => report.failures.push(format!("{file}: mu recorded without image_seq_len")),
            },
            other => report.failures.push(format!("{file}: set_timesteps argument `{other}` not replayed")),
        }
    }
    options
}

fn check_file(file: &str, report: &mut Report) {
    let g = read_json(&golden_dir().join(file));
    let class = g["scheduler_class"].as_str().expect("scheduler_class");
    let n = g["num_inference_steps"].as_u64().expect("num_inference_steps") as usize;
    let cfg = SchedulerConfig::from_value(g["config"].clone()).expect("config parses");
    let kind = SchedulerKind::from_class_name(class).unwrap_or_else(|| panic!("{file}: unknown class {class}"));
    let options = run_options(file, &g, &cfg, n, report);
    let build = |kind, cfg: &SchedulerConfig, n| build_with(kind, cfg, n, &options);
    let mut s = match build(kind, &cfg, n) {
        Ok(s) => s,
        Err(e) => {
            report.failures.push(format!("{file}: build failed: {e}"));
            return;
        }
    };
    report.scalars(&format!("{file}: timesteps"), s.timesteps(), &floats(&g["timesteps"]));
    if !g["sigmas"].is_null() {
        match s.sigmas() {
            Some(ours) => report.scalars(&format!("{file}: sigmas"), ours, &floats(&g["sigmas"])),
            None => report.failures.push(format!("{file}: no sigmas but recorded ones")),
        }
    }
    let init = g["init_noise_sigma"].as_f64().expect("init_noise_sigma");
    report.scalars(&format!("{file}: init_noise_sigma"), &[s.init_noise_sigma()], &[init]);
    report.scalars(&format!("{file}: order"), &[s.order() as f64], &[g["order"].as_f64().expect("order")]);

    let mut sample = tensor(&g["initial_noise"]).mapv(|v| v * s.init_noise_sigma() as f32);
    let steps = g["steps"].as_array().expect("steps");
    if steps.len() != s.timesteps().len() {
        report.failures.push(format!("{file}: {} recorded calls vs {} timesteps", steps.len(), s.timesteps().len()));
        return;
    }
    for (call, rec) in steps.iter().enumerate() {
        let at = |name: &str| format!("{file}: call {call}: {name}");
        let t = s.timesteps()[call];
        report.scalars(&at("timestep"), &[t], &[rec["timestep"].as_f64().expect("timestep")]);
        let input = s.scale_model_input(sample.view(), call);
        report.array(&at("model_input"), &input, &tensor(&rec["model_input"]));
        let output = unet_stand_in(&input, t);
        report.array(&at("model_output"), &output, &tensor(&rec["model_output"]));
        let draws = rec.get("noise").and_then(Value::as_array).map(|d| d.iter().map(tensor).collect());
        let mut replay = Replay { draws: draws.unwrap_or_default(), error: None };
        let out = s.step(StepInput::new(call, output.view(), sample.view()), &mut replay);
        if let Some(e) = replay.error {
            report.failures.push(at(&format!("noise: {e}")));
        }
        if !replay.draws.is_empty() {
            report.failures.push(at(&format!("noise: {} recorded draws not consumed", replay.draws.len())));
        }
        report.array(&at("prev_sample"), &out.prev_sample, &tensor(&rec["prev_sample"]));
        for key in ["pred_original_sample", "denoised"] {
            if let Some(x0) = rec.get(key) {
                match &out.pred_original_sample {
                    Some(ours) => report.array(&at(key), ours, &tensor(x0)),
                    None => report.failures.push(at(&format!("{key}: none but recorded"))),
                }
            }
        }
        sample = out.prev_sample;
    }

    for entry in g["img2img"].as_array().expect("img2img") {
        let strength = entry["strength"].as_f64().expect("strength");
        let at = |name: &str| format!("{file}: img2img strength {strength}: {name}");
        let fresh = build(kind, &cfg, n).expect("builds again");
        let start = match fresh.start_call_for_strength(strength) {
            Ok(start) => start,
            Err(e) => {
                report.failures.push(at(&format!("no start call: {e}")));
                continue;
            }
        };
        report.scalars(&at("timesteps"), &fresh.timesteps()[start..], &floats(&entry["timesteps"]));
        let noised = fresh.add_noise(tensor(&entry["original"]).view(), tensor(&entry["noise"]).view(), start);
        report.array(&at("noised"), &noised, &tensor(&entry["noised"]));
    }
}

#[test]
fn every_golden_file_matches_diffusers() {
    let index = read_json(&golden_dir().join("index.json"));
    let cases = index["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 45, "index.json lists every golden file");
    let mut report = Report::default();
    let mut failed_files = Vec::new();
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let before = report.failures.len();
        check_file(file, &mut report);
        if report.failures.len() > before {
            failed_files.push(file.to_string());
        }
    }
    assert!(
        report.failures.is_empty(),
        "{} of {} golden files differ from diffusers: {:?}\n{}",
        failed_files.len(),
        cases.len(),
        failed_files,
        report.failures.join("\n")
    );
}
