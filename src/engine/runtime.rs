//! ONNX Runtime start-up and the one place sessions are created.
//!
//! The library is loaded dynamically from a path we check first (a missing file can otherwise hang the
//! process), and every session is built by [`SessionFactory`] so that threads, execution providers and
//! optimisation level are decided in one place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};

use super::error::EngineError;

/// Environment variable that overrides the configured library path, as ort itself honours it.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Where a worker runs its graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// CUDA execution provider on the given device ordinal.
    Cuda(u32),
}

impl Device {
    /// Parses `cpu` or `cuda:N` (`cuda` alone means `cuda:0`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "cpu" {
            return Ok(Device::Cpu);
        }
        if text == "cuda" {
            return Ok(Device::Cuda(0));
        }
        if let Some(n) = text.strip_prefix("cuda:") {
            return n.parse().map(Device::Cuda).map_err(|_| format!("`{text}`: expected cuda:N with N a number"));
        }
        Err(format!("`{text}`: expected `cpu` or `cuda:N`"))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The loaded ONNX Runtime environment. Created once per process.
#[derive(Clone)]
pub struct Runtime {
    env: ort::environment::Environment,
    library: PathBuf,
    cuda: CudaOptions,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").field("library", &self.library).finish()
    }
}

impl Runtime {
    /// Picks the library path: `ORT_DYLIB_PATH` when set and non-empty, else `configured`.
    pub fn library_path(configured: &Path) -> PathBuf {
        match std::env::var_os(ORT_DYLIB_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => configured.to_path_buf(),
        }
    }

    /// Loads the shared library at `library` and creates the environment. Fails with one clear message
    /// when the file is missing or is not a compatible ONNX Runtime. ONNX Runtime allows one environment per
    /// process: later calls return the first one (and fail if they name another library).
    pub fn load(library: &Path) -> Result<Self, EngineError> {
        static LOADED: std::sync::Mutex<Option<Runtime>> = std::sync::Mutex::new(None);
        let mut loaded = LOADED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(runtime) = loaded.as_ref() {
            if runtime.library != library {
                return Err(EngineError::Runtime {
                    path: library.to_path_buf(),
                    message: format!("this process already loaded ONNX Runtime from {}", runtime.library.display()),
                });
            }
            return Ok(runtime.clone());
        }
        let runtime = Self::load_first(library)?;
        *loaded = Some(runtime.clone());
        Ok(runtime)
    }

    fn load_first(library: &Path) -> Result<Self, EngineError> {
        let err = |message: String| EngineError::Runtime { path: library.to_path_buf(), message };
        let meta = std::fs::metadata(library)
            .map_err(|e| err(format!("{e}; run `python3 scripts/fetch-onnxruntime.py` or set {ORT_DYLIB_ENV}")))?;
        if !meta.is_file() {
            return Err(err("is not a file".into()));
        }
        return_freed_memory_promptly();
        let builder = ort::init_from(library).map_err(|e| err(e.to_string()))?;
        let env = builder.with_name("denoised").build().map_err(|e| err(e.to_string()))?;
        Ok(Self { env, library: library.to_path_buf(), cuda: CudaOptions::default() })
    }

    /// The library this runtime was loaded from.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// A factory for sessions on `device` with `threads` intra-op threads.
    pub fn session_factory(&self, device: Device, threads: usize) -> SessionFactory {
        SessionFactory {
            env: self.env.clone(),
            device,
            threads,
            runs: RunControl::default(),
            share_weights: false,
            cuda: self.cuda,
        }
    }

    /// With `options` for the CUDA provider of every `cuda:N` factory made from now on.
    pub fn with_cuda_options(mut self, options: CudaOptions) -> Self {
        self.cuda = options;
        self
    }
}

/// Large allocations (1 MiB and up) go straight to `mmap`, so that freeing them gives the memory back to the
/// system at once. Without this, glibc's heap kept the protobuf copy of a model's weights that ONNX Runtime
/// parses and then frees while it builds its own tensors: a 535 MB graph with embedded weights held 1.79x its
/// size after loading (measured; see the README, "Large models"). Runtime allocations of that size are
/// ONNX Runtime's arena and whole pictures, for which an `mmap` per allocation costs nothing that matters.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_freed_memory_promptly() {
    const THRESHOLD: libc::c_int = 1 << 20;
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_memory_promptly() {}

/// Hands the heap memory freed while a session was built (smaller weights parsed from the model file)
/// back to the system instead of keeping it for later allocations.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory at the allocator's discretion.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// The run options every graph of one worker runs with: they let another thread stop the graph that is
/// running now (ONNX Runtime checks the terminate flag between kernels), and they hand the CPU arena's
/// memory back after a job's last run of each graph, so one large job does not keep its peak memory for the
/// life of the process.
///
/// Shrinking the arena after every run would free and re-map the activations of every denoising step (10 %
/// of a step at 256² on the default model, measured), so there are two sets: [`RunControl::options`] shrinks
/// the arena after the run, [`RunControl::steady_options`] keeps it for the next call of the same graph; the
/// denoising loop uses the second for every call but its last.
#[derive(Clone, Default)]
pub struct RunControl {
    options: Arc<Mutex<Option<RunOptionsPair>>>,
}

/// The shrinking and the steady run options.
#[derive(Clone)]
struct RunOptionsPair {
    shrink: Arc<RunOptions>,
    steady: Arc<RunOptions>,
}

impl fmt::Debug for RunControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunControl").finish_non_exhaustive()
    }
}

impl RunControl {
    fn pair(&self) -> Result<RunOptionsPair, EngineError> {
        let mut slot = self.options.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pair) = slot.as_ref() {
            return Ok(pair.clone());
        }
        let fail = |e: ort::Error| EngineError::Inference { graph: "run options", message: e.to_string() };
        let mut shrink = RunOptions::new().map_err(fail)?;
        shrink.set("memory.enable_memory_arena_shrinkage", "cpu:0").map_err(fail)?;
        let steady = RunOptions::new().map_err(fail)?;
        let pair = RunOptionsPair { shrink: Arc::new(shrink), steady: Arc::new(steady) };
        *slot = Some(pair.clone());
        Ok(pair)
    }

    /// The shared run options that shrink the CPU arena after the run, made on first use.
    pub fn options(&self) -> Result<Arc<RunOptions>, EngineError> {
        Ok(self.pair()?.shrink)
    }

    /// The shared run options that keep the CPU arena for the next run (calls of a graph that will run again
    /// at once), made on first use.
    pub fn steady_options(&self) -> Result<Arc<RunOptions>, EngineError> {
        Ok(self.pair()?.steady)
    }

    /// Stops the run in progress (and any started before [`RunControl::reset`]) as soon as it can.
    pub fn interrupt(&self) {
        if let Some(pair) = self.options.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            let _ = pair.shrink.terminate();
            let _ = pair.steady.terminate();
        }
    }

    /// Lets runs proceed again after an [`RunControl::interrupt`].
    pub fn reset(&self) {
        if let Some(pair) = self.options.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            let _ = pair.shrink.unterminate();
            let _ = pair.steady.unterminate();
        }
    }
}

/// How the CUDA provider manages device memory and picks convolution kernels (ignored on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaOptions {
    /// Most bytes the provider's memory arena may hold on the device (`None`: no limit).
    pub memory_limit: Option<usize>,
    /// How the arena grows when it needs more.
    pub arena_extend: ArenaExtend,
    /// How cuDNN picks a convolution algorithm for a new input shape.
    pub conv_search: ConvSearch,
}

/// Growth of the CUDA memory arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtend {
    /// Each extension doubles: fewer allocations, more memory held (ONNX Runtime's default).
    #[default]
    NextPowerOfTwo,
    /// Each extension is what was asked for: the least memory held, for GPUs shared with other work.
    SameAsRequested,
}

/// cuDNN's convolution algorithm search for each new input shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvSearch {
    /// cuDNN's heuristics pick at once: new picture sizes cost nothing extra (the default here).
    #[default]
    Heuristic,
    /// Every algorithm is timed on the first call of each shape (hundreds of ms per new size, then the
    /// fastest kernels): for servers that see few sizes and warm them up.
    Exhaustive,
    /// cuDNN's default algorithm, no search.
    Default,
}

/// Builds sessions for one worker: same device and thread count for every graph it loads, and one
/// [`RunControl`] for all of them.
#[derive(Clone)]
pub struct SessionFactory {
    env: ort::environment::Environment,
    device: Device,
    threads: usize,
    runs: RunControl,
    share_weights: bool,
    cuda: CudaOptions,
}

impl fmt::Debug for SessionFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFactory")
            .field("device", &self.device)
            .field("threads", &self.threads)
            .field("share_weights", &self.share_weights)
            .finish()
    }
}

impl SessionFactory {
    /// The device sessions run on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The run options of every graph this factory opens.
    pub fn run_control(&self) -> &RunControl {
        &self.runs
    }

    /// With `true`, CPU sessions leave weights where ONNX Runtime put them instead of re-packing them into
    /// private copies, so that several workers (or processes) opening the same model share one copy of every
    /// weight that ONNX Runtime memory-maps from external data (`model.onnx_data`). Costs one packing pass over
    /// each MatMul/Gemm weight per run instead of once at load. Ignored on CUDA, where weights live in device
    /// memory per session anyway. The worker pool turns it on when it runs more than one CPU worker.
    pub fn with_shared_weights(mut self, share: bool) -> Self {
        self.share_weights = share;
        self
    }

    /// Whether CPU sessions share memory-mapped weights (see [`SessionFactory::with_shared_weights`]).
    pub fn shares_weights(&self) -> bool {
        self.share_weights
    }

    /// Loads `model_path` into a session. With `cuda:N` the CUDA provider must register, or this fails:
    /// a config that asks for a GPU never silently runs on the CPU.
    pub fn open(&self, model_path: &Path) -> Result<Session, EngineError> {
        let share = self.share_weights && self.device == Device::Cpu;
        let session = build_session(&self.env, self.device, self.threads, share, self.cuda, model_path);
        trim_heap();
        session.map_err(|e| match self.device {
            Device::Cuda(_) if e.to_string().to_ascii_lowercase().contains("cuda") => {
                EngineError::Device { device: self.device.to_string(), message: e.to_string() }
            }
            _ => EngineError::Model { path: model_path.to_path_buf(), message: e.to_string() },
        })
    }
}

fn build_session(
    env: &ort::environment::Environment,
    device: Device,
    threads: usize,
    share_weights: bool,
    cuda: CudaOptions,
    model_path: &Path,
) -> ort::Result<Session> {
    let builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        // Prepacked weights are private to a session (ONNX Runtime's shared prepacked-weights container only
        // serves initializers added through the API); unpacked ones stay in the shared memory map.
        .with_prepacking(!share_weights)?;
    let mut builder = match device {
        Device::Cpu => builder,
        Device::Cuda(ordinal) => with_cuda(builder, ordinal, cuda)?,
    };
    builder.commit_from_file(model_path)
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    ordinal: u32,
    options: CudaOptions,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    use ort::ep;
    let search = match options.conv_search {
        ConvSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
        ConvSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
        ConvSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
    };
    let extend = match options.arena_extend {
        ArenaExtend::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
        ArenaExtend::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
    };
    let mut cuda = ep::CUDA::default()
        .with_device_id(ordinal as i32)
        .with_conv_algorithm_search(search)
        .with_arena_extend_strategy(extend);
    if let Some(limit) = options.memory_limit {
        cuda = cuda.with_memory_limit(limit);
    }
    Ok(builder.with_execution_providers([cuda.build().error_on_failure()])?)
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _builder: ort::session::builder::SessionBuilder,
    ordinal: u32,
    _options: CudaOptions,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    Err(ort::Error::new(format!(
        "cuda:{ordinal} requested but this build has no CUDA support: rebuild with `--features cuda`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("CUDA:1"), Ok(Device::Cuda(1)));
        assert_eq!(Device::parse("cuda"), Ok(Device::Cuda(0)));
        assert!(Device::parse("cuda:x").is_err());
        assert!(Device::parse("metal").is_err());
    }

    #[test]
    fn missing_library_is_one_clear_error() {
        let err = Runtime::load(Path::new("/nonexistent/libonnxruntime.so")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
        assert!(err.contains("fetch-onnxruntime"), "{err}");
    }
}
