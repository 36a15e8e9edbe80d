//! Resident memory while loading weights (issue 13, part 6).
//!
//! Every measurement runs in a fresh copy of this test binary (it re-executes itself with
//! `DENOISED_MEMORY_PROBE` set), so that one measurement's peak and allocator state never leak into the next.
//! The probe loads the graphs of a model once per simulated CPU worker, each through its own
//! [`SessionFactory`] as the worker pool does, runs every graph once on zeros, and reports `/proc/self`
//! numbers against the process right after ONNX Runtime was loaded.
//!
//! The small version always runs, on `tests/fixtures/tiny-sd-external/`. The big version runs when
//! `DENOISED_LARGE_MODEL` names a `model.onnx` made by `scripts/make-large-model.py` (hundreds of MB; never
//! committed); it prints the numbers the README reports.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use denoised::engine::graph::{Element, Feed, Graph};
use denoised::engine::runtime::Device;
use ndarray::ArrayD;

const PROBE_ENV: &str = "DENOISED_MEMORY_PROBE";
const LARGE_ENV: &str = "DENOISED_LARGE_MODEL";
const GRAPHS: [&str; 4] = ["text_encoder", "unet", "vae_decoder", "vae_encoder"];

/// Memory numbers of one probe, in bytes, relative to the process after ONNX Runtime was loaded.
#[derive(Debug, Clone, Copy)]
struct Probe {
    weights: u64,
    rss_loaded: i64,
    hwm_loaded: i64,
    pss_loaded: i64,
    rss_ran: i64,
    pss_ran: i64,
}

fn status_kb(text: &str, key: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|rest| rest.trim().trim_end_matches("kB").trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {key}"))
}

/// (VmRSS, VmHWM, Pss) in bytes. Pss divides a page mapped twice (two sessions mapping one external-data
/// file) between its mappings, where VmRSS counts it once per mapping.
fn memory() -> (i64, i64, i64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    (status_kb(&status, "VmRSS:") * 1024, status_kb(&status, "VmHWM:") * 1024, status_kb(&rollup, "Pss:") * 1024)
}

/// The `.onnx` files of a model: the file itself, or the four graphs of an optimum folder.
fn graph_files(model: &Path) -> Vec<PathBuf> {
    if model.is_file() {
        return vec![model.to_path_buf()];
    }
    GRAPHS.iter().map(|g| model.join(g).join("model.onnx")).filter(|p| p.is_file()).collect()
}

/// Bytes of weights on disk: each graph file plus its external data.
fn weight_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .flat_map(|f| [f.clone(), f.with_file_name("model.onnx_data")])
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn zeros(graph: &Graph) -> Vec<(String, Feed)> {
    graph
        .inputs()
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| if d > 0 { d as usize } else { 8 }).collect();
            let feed = match spec.element {
                Element::I64 | Element::I32 => Feed::Int(ArrayD::zeros(shape)),
                _ => Feed::Float(ArrayD::zeros(shape)),
            };
            (spec.name.clone(), feed)
        })
        .collect()
}

/// Runs inside the re-executed binary: loads `model` `workers` times and prints one `PROBE` line.
fn probe(model: &Path, workers: usize, share: bool) {
    let runtime = common::runtime();
    let files = graph_files(model);
    let (rss0, _, pss0) = memory();
    let mut graphs = Vec::new();
    for _ in 0..workers {
        let factory = runtime.session_factory(Device::Cpu, 1).with_shared_weights(share);
        for file in &files {
            graphs.push(Graph::open(&factory, file, "probe").unwrap());
        }
    }
    let (rss1, hwm1, pss1) = memory();
    for graph in &mut graphs {
        let feeds = zeros(graph);
        graph.run(feeds.iter().map(|(n, f)| (n.as_str(), f.clone())).collect()).unwrap();
    }
    let (rss2, _, pss2) = memory();
    println!(
        "\nPROBE {} {} {} {} {} {} END",
        weight_bytes(&files),
        rss1 - rss0,
        hwm1 - rss0,
        pss1 - pss0,
        rss2 - rss0,
        pss2 - pss0
    );
}

#[test]
fn memory_probe_entry() {
    // Does nothing unless this binary was re-executed by `measure`.
    if let Ok(spec) = std::env::var(PROBE_ENV) {
        let mut parts = spec.splitn(3, ':');
        let workers = parts.next().unwrap().parse().unwrap();
        let share = parts.next().unwrap() == "shared";
        probe(Path::new(parts.next().unwrap()), workers, share);
    }
}

/// Loads `model` with `workers` workers in a fresh process and returns what it measured.
fn measure(model: &Path, workers: usize, share: bool) -> Probe {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["memory_probe_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, format!("{workers}:{}:{}", if share { "shared" } else { "private" }, model.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "probe failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| l.strip_prefix("PROBE ")).expect("no PROBE line");
    let n: Vec<i64> = line.split_whitespace().take(6).map(|v| v.parse().unwrap()).collect();
    Probe { weights: n[0] as u64, rss_loaded: n[1], hwm_loaded: n[2], pss_loaded: n[3], rss_ran: n[4], pss_ran: n[5] }
}

fn mb(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn report(label: &str, p: &Probe) {
    let w = p.weights as f64;
    eprintln!(
        "{label}: weights {} | loaded: RSS +{} ({:.2}x), peak +{} ({:.2}x), PSS +{} ({:.2}x) | after a run: RSS +{}, PSS +{} ({:.2}x)",
        mb(p.weights as i64),
        mb(p.rss_loaded),
        p.rss_loaded as f64 / w,
        mb(p.hwm_loaded),
        p.hwm_loaded as f64 / w,
        mb(p.pss_loaded),
        p.pss_loaded as f64 / w,
        mb(p.rss_ran),
        mb(p.pss_ran),
        p.pss_ran as f64 / w,
    );
}

#[test]
fn large_model_memory_when_asked() {
    let Some(model) = std::env::var_os(LARGE_ENV) else {
        return;
    };
    let model = PathBuf::from(model);
    for (workers, share) in [(1, false), (2, false), (1, true), (2, true)] {
        let label = format!("{} ({workers} worker(s), shared weights {share})", model.display());
        report(&label, &measure(&model, workers, share));
    }
}

#[test]
fn loading_holds_no_second_copy_of_embedded_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = onnx::write_matmul_chain(dir.path(), 8, 1024, false);
    let p = measure(&model, 1, false);
    report("32 MB embedded, 1 worker", &p);
    let limit = p.weights as f64 * 1.3 + 8e6;
    assert!((p.hwm_loaded as f64) < limit, "peak while loading {} over {}", mb(p.hwm_loaded), mb(limit as i64));
    assert!((p.pss_ran as f64) < limit, "after a run {} over {}", mb(p.pss_ran), mb(limit as i64));
}

#[test]
fn two_cpu_workers_share_memory_mapped_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = onnx::write_matmul_chain(dir.path(), 8, 1024, true);
    let one = measure(&model, 1, true);
    let two = measure(&model, 2, true);
    report("32 MB external data, 1 worker, shared weights", &one);
    report("32 MB external data, 2 workers, shared weights", &two);
    report("32 MB external data, 2 workers, private weights", &measure(&model, 2, false));
    let second = two.pss_ran - one.pss_ran;
    assert!(one.pss_ran as f64 > one.weights as f64 * 0.9, "the run did not touch the weights: {one:?}");
    assert!(
        (second as f64) < one.weights as f64 * 0.5,
        "the second worker added {} for {}",
        mb(second),
        mb(one.weights as i64)
    );
}

/// Just enough of ONNX's protobuf encoding to write a MatMul chain: the test needs a model tens of MB large
/// without a Python toolchain or a committed file.
mod onnx {
    use std::path::{Path, PathBuf};

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn int(out: &mut Vec<u8>, field: u64, v: u64) {
        varint(out, field << 3);
        varint(out, v);
    }

    fn bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
        varint(out, (field << 3) | 2);
        varint(out, data.len() as u64);
        out.extend_from_slice(data);
    }

    fn value_info(name: &str, dims: &[Option<u64>]) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in dims {
            let mut dim = Vec::new();
            match d {
                Some(v) => int(&mut dim, 1, *v),
                None => bytes(&mut dim, 2, b"n"),
            }
            bytes(&mut shape, 1, &dim);
        }
        let mut tensor = Vec::new();
        int(&mut tensor, 1, 1); // FLOAT
        bytes(&mut tensor, 2, &shape);
        let mut ty = Vec::new();
        bytes(&mut ty, 1, &tensor);
        let mut info = Vec::new();
        bytes(&mut info, 1, name.as_bytes());
        bytes(&mut info, 2, &ty);
        info
    }

    fn entry(key: &str, value: &str) -> Vec<u8> {
        let mut e = Vec::new();
        bytes(&mut e, 1, key.as_bytes());
        bytes(&mut e, 2, value.as_bytes());
        e
    }

    /// Writes `dir/model.onnx`: `x` [n, dim] through `layers` MatMuls with random [dim, dim] weights, in
    /// `model.onnx_data` when `external` (64 KiB-aligned, as ONNX Runtime needs to map it) or inside.
    pub fn write_matmul_chain(dir: &Path, layers: usize, dim: u64, external: bool) -> PathBuf {
        let mut graph = Vec::new();
        let mut data = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..layers {
            let mut node = Vec::new();
            bytes(&mut node, 1, if i == 0 { "x".to_string() } else { format!("h{i}") }.as_bytes());
            bytes(&mut node, 1, format!("w{i}").as_bytes());
            bytes(&mut node, 2, if i + 1 == layers { "y".to_string() } else { format!("h{}", i + 1) }.as_bytes());
            bytes(&mut node, 4, b"MatMul");
            bytes(&mut graph, 1, &node);
            let weights: Vec<u8> = (0..dim * dim)
                .flat_map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_le_bytes()
                })
                .collect();
            let mut tensor = Vec::new();
            int(&mut tensor, 1, dim);
            int(&mut tensor, 1, dim);
            int(&mut tensor, 2, 1);
            bytes(&mut tensor, 8, format!("w{i}").as_bytes());
            if external {
                bytes(&mut tensor, 13, &entry("location", "model.onnx_data"));
                bytes(&mut tensor, 13, &entry("offset", &data.len().to_string()));
                bytes(&mut tensor, 13, &entry("length", &weights.len().to_string()));
                int(&mut tensor, 14, 1); // EXTERNAL
                data.extend_from_slice(&weights);
            } else {
                bytes(&mut tensor, 9, &weights);
            }
            bytes(&mut graph, 5, &tensor);
        }
        bytes(&mut graph, 2, b"chain");
        bytes(&mut graph, 11, &value_info("x", &[None, Some(dim)]));
        bytes(&mut graph, 12, &value_info("y", &[None, Some(dim)]));
        let mut opset = Vec::new();
        int(&mut opset, 2, 18);
        let mut model = Vec::new();
        int(&mut model, 1, 8);
        bytes(&mut model, 7, &graph);
        bytes(&mut model, 8, &opset);
        if external {
            std::fs::write(dir.join("model.onnx_data"), &data).unwrap();
        }
        let path = dir.join("model.onnx");
        std::fs::write(&path, model).unwrap();
        path
    }
}
