//! One ONNX graph with the I/O metadata read from its session.
//!
//! Exports drift: `input_ids` may be int32 or int64, `timestep` float or int64, scalar or batched, and fp16
//! exports take f16 tensors. Callers hand over f32 / i64 arrays by name; [`Graph::run`] converts each to what
//! the graph declares and converts every float output back to f32.
//!
//! A graph called many times with some inputs unchanged (the denoiser's text conditioning over a run's
//! steps) binds those once ([`Graph::bind`], ONNX Runtime's IO binding): they are converted once and, on
//! CUDA, copied to the device once, and each call binds only what changes ([`Graph::run_bound`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use half::f16;
use ndarray::ArrayD;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor, TensorElementType};

use super::error::EngineError;
use super::runtime::SessionFactory;

/// Element types the engine knows how to feed and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// 32-bit float.
    F32,
    /// 16-bit float (fp16 exports).
    F16,
    /// 64-bit integer.
    I64,
    /// 32-bit integer (older exports' `input_ids`).
    I32,
    /// Anything else: reported, never fed.
    Unsupported,
}

impl Element {
    fn from_ort(ty: TensorElementType) -> Self {
        match ty {
            TensorElementType::Float32 => Element::F32,
            TensorElementType::Float16 => Element::F16,
            TensorElementType::Int64 => Element::I64,
            TensorElementType::Int32 => Element::I32,
            _ => Element::Unsupported,
        }
    }

    /// Whether values of this type are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, Element::F32 | Element::F16)
    }
}

/// Name, element type and declared shape (-1 for dynamic dimensions) of one graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    /// The tensor's name in the graph.
    pub name: String,
    /// Its element type.
    pub element: Element,
    /// Declared dimensions; -1 where dynamic.
    pub shape: Vec<i64>,
}

impl IoSpec {
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

/// A tensor handed to [`Graph::run`], converted to the declared element type on the way in.
#[derive(Debug, Clone)]
pub enum Feed {
    /// Float data (fed as f32 or f16, or rounded to integers when the graph wants integers).
    Float(ArrayD<f32>),
    /// Integer data (fed as i64 or i32, or as floats when the graph wants floats).
    Int(ArrayD<i64>),
}

/// An ONNX session plus its I/O description.
pub struct Graph {
    name: &'static str,
    session: Session,
    /// The worker's run options that shrink the arena after the run (see [`super::runtime::RunControl`]).
    run_options: std::sync::Arc<ort::session::RunOptions>,
    /// The worker's run options that keep the arena for the next call.
    steady_options: std::sync::Arc<ort::session::RunOptions>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    /// Completed runs, so tests and benchmarks can see calls shared between jobs.
    runs: u64,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn specs(outlets: &[ort::value::Outlet]) -> Vec<IoSpec> {
    outlets
        .iter()
        .map(|o| IoSpec {
            name: o.name().to_string(),
            element: o.dtype().tensor_type().map_or(Element::Unsupported, Element::from_ort),
            shape: o.dtype().tensor_shape().map(|s| s.iter().copied().collect()).unwrap_or_default(),
        })
        .collect()
}

impl Graph {
    /// Opens `path` with `factory` and records its I/O; `name` labels errors (`unet`, `text_encoder`, …).
    pub fn open(factory: &SessionFactory, path: &Path, name: &'static str) -> Result<Self, EngineError> {
        if !path.is_file() {
            return Err(EngineError::Model { path: path.to_path_buf(), message: "file not found".into() });
        }
        let session = factory.open(path)?;
        let run_options = factory.run_control().options()?;
        let steady_options = factory.run_control().steady_options()?;
        let inputs = specs(session.inputs());
        let outputs = specs(session.outputs());
        Ok(Self { name, session, run_options, steady_options, inputs, outputs, runs: 0 })
    }

    /// The graph's label.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How many runs of this graph have completed.
    pub fn runs(&self) -> u64 {
        self.runs
    }

    /// Declared inputs.
    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    /// Declared outputs.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    /// The input called `name`, if the graph has one.
    pub fn input(&self, name: &str) -> Option<&IoSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    /// The output called `name`, if the graph has one.
    pub fn output(&self, name: &str) -> Option<&IoSpec> {
        self.outputs.iter().find(|s| s.name == name)
    }

    /// Runs the graph. Every input is converted to its declared type; every float output comes back as f32.
    /// Integer outputs are skipped. The CPU arena gives back what the run used (see
    /// [`super::runtime::RunControl`]).
    pub fn run(&mut self, feeds: Vec<(&str, Feed)>) -> Result<HashMap<String, ArrayD<f32>>, EngineError> {
        let options = self.run_options.clone();
        self.run_with(feeds, &options)
    }

    /// Like [`Graph::run`], keeping the CPU arena's memory for the next call: for a graph that runs again at
    /// once (every denoising step but the last).
    pub fn run_again_soon(&mut self, feeds: Vec<(&str, Feed)>) -> Result<HashMap<String, ArrayD<f32>>, EngineError> {
        let options = self.steady_options.clone();
        self.run_with(feeds, &options)
    }

    fn run_with(
        &mut self,
        feeds: Vec<(&str, Feed)>,
        options: &ort::session::RunOptions,
    ) -> Result<HashMap<String, ArrayD<f32>>, EngineError> {
        let graph = self.name;
        let fail = |message: String| EngineError::Inference { graph, message };
        let mut values: Vec<(Cow<'static, str>, SessionInputValue<'static>)> = Vec::with_capacity(feeds.len());
        for (name, feed) in feeds {
            let value = self.value_for(name, feed)?;
            values.push((Cow::Owned(name.to_string()), SessionInputValue::Owned(value)));
        }
        let outputs = self.session.run_with_options(values, options).map_err(|e| fail(e.to_string()))?;
        self.runs += 1;
        float_outputs(graph, &outputs)
    }

    /// Binds `constant` inputs for a run of calls (see [`BoundInputs`]) and every output to host memory.
    pub fn bind(&self, constant: Vec<(&str, Feed)>) -> Result<BoundInputs, EngineError> {
        let graph = self.name;
        let fail = |e: ort::Error| EngineError::Inference { graph, message: format!("binding: {e}") };
        let mut binding = self.session.create_binding().map_err(fail)?;
        for (name, feed) in constant {
            let value = self.value_for(name, feed)?;
            binding.bind_input(name, &value).map_err(fail)?;
        }
        let host =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(fail)?;
        for output in &self.outputs {
            binding.bind_output_to_device(output.name.as_str(), &host).map_err(fail)?;
        }
        Ok(BoundInputs { binding, graph })
    }

    /// Runs the graph on `bound`'s inputs plus `feeds` (bound for this call, replacing any earlier value of
    /// the same name), converted like [`Graph::run`]'s. `again_soon` keeps the CPU arena's memory for the
    /// next call, like [`Graph::run_again_soon`].
    pub fn run_bound(
        &mut self,
        bound: &mut BoundInputs,
        feeds: Vec<(&str, Feed)>,
        again_soon: bool,
    ) -> Result<HashMap<String, ArrayD<f32>>, EngineError> {
        let graph = self.name;
        if bound.graph != graph {
            return Err(EngineError::Inference { graph, message: format!("inputs bound for `{}`", bound.graph) });
        }
        let fail = |e: ort::Error| EngineError::Inference { graph, message: e.to_string() };
        for (name, feed) in feeds {
            let value = self.value_for(name, feed)?;
            bound.binding.bind_input(name, &value).map_err(fail)?;
        }
        let options = if again_soon { self.steady_options.clone() } else { self.run_options.clone() };
        let outputs = self.session.run_binding_with_options(&bound.binding, &options).map_err(fail)?;
        self.runs += 1;
        float_outputs(graph, &outputs)
    }

    /// `feed` as the value the input `name` declares.
    fn value_for(&self, name: &str, feed: Feed) -> Result<DynValue, EngineError> {
        let graph = self.name;
        let fail = |message: String| EngineError::Inference { graph, message };
        let spec = self.input(name).ok_or_else(|| fail(format!("the graph has no input `{name}`")))?;
        to_value(spec, feed).map_err(|e| fail(format!("input `{name}`: {e}")))
    }
}

/// Inputs bound to one graph's session for a run of calls, with its outputs bound to host memory: made by
/// [`Graph::bind`], used by [`Graph::run_bound`]. On CUDA the bound inputs are copied to the device when
/// bound, once, instead of at every call.
pub struct BoundInputs {
    binding: IoBinding,
    graph: &'static str,
}

impl std::fmt::Debug for BoundInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundInputs").field("graph", &self.graph).finish_non_exhaustive()
    }
}

/// Every float output of a run as f32, by name (integer outputs are skipped).
fn float_outputs(
    graph: &'static str,
    outputs: &SessionOutputs<'_>,
) -> Result<HashMap<String, ArrayD<f32>>, EngineError> {
    let mut result = HashMap::new();
    for (name, value) in outputs.iter() {
        let array =
            to_f32(&value).map_err(|e| EngineError::Inference { graph, message: format!("output `{name}`: {e}") })?;
        if let Some(array) = array {
            result.insert(name.to_string(), array);
        }
    }
    Ok(result)
}

fn to_value(spec: &IoSpec, feed: Feed) -> Result<DynValue, String> {
    let value: DynValue = match (spec.element, feed) {
        (Element::F32, Feed::Float(a)) => Tensor::from_array(a).map_err(|e| e.to_string())?.into_dyn(),
        (Element::F16, Feed::Float(a)) => {
            Tensor::from_array(a.mapv(f16::from_f32)).map_err(|e| e.to_string())?.into_dyn()
        }
        (Element::I64, Feed::Float(a)) => {
            Tensor::from_array(a.mapv(|v| v.round() as i64)).map_err(|e| e.to_string())?.into_dyn()
        }
        (Element::I32, Feed::Float(a)) => {
            Tensor::from_array(a.mapv(|v| v.round() as i32)).map_err(|e| e.to_string())?.into_dyn()
        }
        (Element::I64, Feed::Int(a)) => Tensor::from_array(a).map_err(|e| e.to_string())?.into_dyn(),
        (Element::I32, Feed::Int(a)) => {
            let narrowed = a.mapv(|v| i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX }));
            Tensor::from_array(narrowed).map_err(|e| e.to_string())?.into_dyn()
        }
        (Element::F32, Feed::Int(a)) => Tensor::from_array(a.mapv(|v| v as f32)).map_err(|e| e.to_string())?.into_dyn(),
        (Element::F16, Feed::Int(a)) => {
            Tensor::from_array(a.mapv(|v| f16::from_f32(v as f32))).map_err(|e| e.to_string())?.into_dyn()
        }
        (Element::Unsupported, _) => return Err("unsupported element type".into()),
    };
    Ok(value)
}

fn to_f32(value: &ort::value::DynValueRef<'_>) -> Result<Option<ArrayD<f32>>, String> {
    let ty = value.dtype().tensor_type();
    match ty {
        Some(TensorElementType::Float32) => {
            Ok(Some(value.try_extract_array::<f32>().map_err(|e| e.to_string())?.to_owned()))
        }
        Some(TensorElementType::Float16) => {
            Ok(Some(value.try_extract_array::<f16>().map_err(|e| e.to_string())?.mapv(f16::to_f32)))
        }
        _ => Ok(None),
    }
}
