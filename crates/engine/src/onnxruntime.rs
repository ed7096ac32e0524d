//! The ONNX Runtime backend, through the `ort` crate with the library loaded at run time.
//!
//! `ort` sessions need `&mut` to run, so each loaded version keeps a small pool of sessions
//! ([`EngineOptions::instances`]); a call takes one out, runs it, and puts it back. No lock is held while a
//! session runs.

use std::path::Path;
use std::sync::OnceLock;

use parking_lot::{Condvar, Mutex};

use ferry_model::{DataType, NamedTensor, Signature, Tensor, TensorData, TensorSpec, ValueKind};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, DynValueTypeMarker, TensorElementType, ValueType};

use crate::{
    check_inputs, find_onnxruntime, Backend, EngineError, EngineOptions, OptimizationLevel,
};

/// The process-wide ONNX Runtime: the library can be loaded only once per process.
static RUNTIME: OnceLock<Result<Environment, EngineError>> = OnceLock::new();

/// A handle on the loaded ONNX Runtime library, from which models are loaded.
#[derive(Clone)]
pub struct OrtEngine {
    env: Environment,
}

impl std::fmt::Debug for OrtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OrtEngine")
    }
}

impl OrtEngine {
    /// Loads the ONNX Runtime library (see [`find_onnxruntime`]) the first time it is called; later calls
    /// return the same runtime whatever path they pass.
    pub fn init(library: Option<&Path>) -> Result<OrtEngine, EngineError> {
        let env = RUNTIME.get_or_init(|| {
            let path =
                find_onnxruntime(library).map_err(|e| EngineError::Library(e.to_string()))?;
            tracing::info!(library = %path.display(), "loading ONNX Runtime");
            ort::init_from(&path)
                .map_err(|e| {
                    EngineError::Library(format!(
                        "cannot load ONNX Runtime from {}: {e}",
                        path.display()
                    ))
                })?
                .with_name("ferry")
                .build()
                .map_err(|e| EngineError::Library(format!("cannot start ONNX Runtime: {e}")))
        });
        match env {
            Ok(env) => Ok(OrtEngine { env: env.clone() }),
            Err(e) => Err(e.clone()),
        }
    }

    /// Prepares a self-contained model from its serialized ONNX bytes.
    pub fn load(&self, model: &[u8], options: &EngineOptions) -> Result<OrtBackend, EngineError> {
        self.load_with_external_data(model, None, options)
    }

    /// Prepares a model from its serialized ONNX bytes, reading the external data its tensors name (`location`s
    /// relative to the model) from `folder` when given. The caller has checked that every location stays inside
    /// `folder`.
    ///
    /// ONNX Runtime maps external data files into memory (read-only, from the page cache) rather than copying them
    /// onto the heap, so the weights cost their files' pages once, shared by every session of the version, as long
    /// as they are not pre-packed ([`EngineOptions::prepack_weights`], off by default with external data).
    /// Pre-packing lays some weights out anew for their kernels (`MatMul`'s right operand, for one) on the heap and
    /// drops the mapping: each session then holds its own packed copy (a container of pre-packed weights shares
    /// them only for initializers the application adds itself, not for a model's own, as measured), and the load
    /// takes as long as the packing.
    pub fn load_with_external_data(
        &self,
        model: &[u8],
        folder: Option<&Path>,
        options: &EngineOptions,
    ) -> Result<OrtBackend, EngineError> {
        let instances = options.instances.max(1);
        let mut sessions = Vec::with_capacity(instances);
        for _ in 0..instances {
            sessions.push(self.session(model, folder, options)?);
        }
        let signature = signature(&sessions[0])?;
        Ok(OrtBackend {
            signature,
            pool: Mutex::new(sessions),
            returned: Condvar::new(),
        })
    }

    fn session(
        &self,
        model: &[u8],
        folder: Option<&Path>,
        options: &EngineOptions,
    ) -> Result<Session, EngineError> {
        let level = match options.optimization {
            OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
            OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
            OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
            OptimizationLevel::All => GraphOptimizationLevel::All,
        };
        // The builder's error type is neither Send nor Sync: turn it into text at once.
        let load = |e: ort::Error<_>| EngineError::Load(e.to_string());
        let mut builder = Session::builder(&self.env)
            .map_err(|e| EngineError::Load(e.to_string()))?
            .with_prepacking(options.prepack_weights.unwrap_or(folder.is_none()))
            .map_err(load)?;
        if let Some(folder) = folder {
            // Loaded from memory, ONNX Runtime would resolve external data against the working directory.
            let folder = folder.to_str().ok_or_else(|| {
                EngineError::Load(format!("{} is not a UTF-8 path", folder.display()))
            })?;
            builder = builder
                .with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    folder,
                )
                .map_err(load)?;
        }
        builder
            .with_intra_threads(options.intra_op_threads.max(1))
            .map_err(load)?
            .with_inter_threads(1)
            .map_err(load)?
            .with_optimization_level(level)
            .map_err(load)?
            // No CPU memory arena unless asked: ONNX Runtime's arena keeps the largest run's tensors for the
            // session's life (one large request left every session of a version holding its size); without it,
            // tensors go back to the C allocator when freed. Measured in tests/python/test_memory.py and
            // bench/serving. Text models, whose batches are bounded in tokens, keep it (bench/text_embeddings.py).
            .with_execution_providers([ort::ep::CPU::default()
                .with_arena_allocator(options.memory_arena.unwrap_or(false))
                .build()])
            .map_err(load)?
            .commit_from_memory(model)
            .map_err(|e| EngineError::Load(e.to_string()))
    }
}

/// A model version loaded into ONNX Runtime.
pub struct OrtBackend {
    signature: Signature,
    pool: Mutex<Vec<Session>>,
    returned: Condvar,
}

/// Puts a session back into the pool when dropped, even if inference panicked.
struct Lease<'a> {
    backend: &'a OrtBackend,
    session: Option<Session>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let mut pool = self.backend.pool.lock();
            pool.push(session);
            self.backend.returned.notify_one();
        }
    }
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

impl OrtBackend {
    fn lease(&self) -> Lease<'_> {
        let mut pool = self.pool.lock();
        loop {
            if let Some(session) = pool.pop() {
                return Lease {
                    backend: self,
                    session: Some(session),
                };
            }
            self.returned.wait(&mut pool);
        }
    }
}

impl Backend for OrtBackend {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn predict(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, EngineError> {
        let inputs = check_inputs(&self.signature, inputs)?;
        let mut string_bytes: usize = inputs.iter().map(|i| string_cost(&i.tensor.data)).sum();
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for input in inputs {
            let value = to_value(&input.name, input.tensor)?;
            values.push((input.name, value));
        }
        let mut lease = self.lease();
        let session = lease
            .session
            .as_mut()
            .expect("a lease holds a session until dropped");
        let outputs = session
            .run(values)
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let mut result = Vec::with_capacity(self.signature.outputs.len());
        for spec in &self.signature.outputs {
            let value = outputs.get(&spec.name).ok_or_else(|| {
                EngineError::Run(format!("output `{}` missing from the result", spec.name))
            })?;
            result.push(from_value(spec, value)?);
        }
        string_bytes += result
            .iter()
            .map(|o| string_cost(&o.tensor.data))
            .sum::<usize>();
        drop(outputs);
        if string_bytes >= TRIM_AFTER_STRING_BYTES {
            give_back_freed_heap();
        }
        Ok(result)
    }

    fn engine_name(&self) -> &'static str {
        "onnxruntime"
    }
}

/// After a run that moved this many bytes of strings through ONNX Runtime, the freed heap is given back.
const TRIM_AFTER_STRING_BYTES: usize = 1 << 20;

/// What a string tensor costs ONNX Runtime: a `std::string` (32 bytes) per element plus the contents.
fn string_cost(data: &TensorData) -> usize {
    match data {
        TensorData::Bytes(s) => s.len() * 32 + s.content_len(),
        _ => 0,
    }
}

/// Returns glibc's free pages to the system. ONNX Runtime keeps each string of a string tensor in its own
/// `std::string`, allocated by glibc's `malloc`: freed, these small blocks lie in the middle of the thread's heap,
/// which trimming its top never returns, so a large string request kept several times its size until the next one
/// reused it (measured: 3.4 x a 5.8 MB request 10 s later; 0.4-0.6 x with this). `malloc_trim` walks the heaps and
/// releases every free page; it takes about a millisecond per hundred MB of heap, small beside a run that moved
/// megabytes of strings.
#[allow(unsafe_code)]
fn give_back_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe (it locks each arena it walks).
    unsafe {
        libc::malloc_trim(0);
    }
}

fn data_type(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn spec(name: &str, ty: &ValueType) -> Result<TensorSpec, EngineError> {
    let unsupported =
        || EngineError::Unsupported(format!("`{name}` has type {ty}, which Ferry cannot serve"));
    match ty {
        ValueType::Tensor {
            ty: elem, shape, ..
        } => Ok(TensorSpec::tensor(
            name,
            data_type(*elem).ok_or_else(unsupported)?,
            shape.iter().map(|d| if *d < 0 { -1 } else { *d }).collect(),
        )),
        ValueType::Sequence(inner) => match inner.as_ref() {
            ValueType::Map { key, value } => Ok(TensorSpec {
                name: name.to_string(),
                dtype: data_type(*value)
                    .filter(|t| t.is_float())
                    .ok_or_else(unsupported)?,
                shape: Some(vec![-1, -1]),
                kind: ValueKind::MapSequence {
                    key: data_type(*key)
                        .filter(|k| matches!(k, DataType::I64 | DataType::Bytes))
                        .ok_or_else(unsupported)?,
                },
            }),
            _ => Err(unsupported()),
        },
        _ => Err(unsupported()),
    }
}

fn signature(session: &Session) -> Result<Signature, EngineError> {
    Ok(Signature {
        inputs: session
            .inputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<_, _>>()?,
        outputs: session
            .outputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<_, _>>()?,
    })
}

fn to_value(name: &str, tensor: Tensor) -> Result<DynValue, EngineError> {
    let shape: Vec<i64> = tensor.shape.iter().map(|d| *d as i64).collect();
    let err = |e: ort::Error| EngineError::InvalidInput(format!("input `{name}`: {e}"));
    macro_rules! prim {
        ($v:expr) => {
            ort::value::Tensor::from_array((shape, $v))
                .map_err(err)?
                .into_dyn()
        };
    }
    Ok(match tensor.data {
        TensorData::Bool(v) => prim!(v),
        TensorData::U8(v) => prim!(v),
        TensorData::U16(v) => prim!(v),
        TensorData::U32(v) => prim!(v),
        TensorData::U64(v) => prim!(v),
        TensorData::I8(v) => prim!(v),
        TensorData::I16(v) => prim!(v),
        TensorData::I32(v) => prim!(v),
        TensorData::I64(v) => prim!(v),
        TensorData::F16(v) => prim!(v),
        TensorData::F32(v) => prim!(v),
        TensorData::F64(v) => prim!(v),
        TensorData::Bytes(v) => {
            let strings = v
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    std::str::from_utf8(b).map(str::to_string).map_err(|_| {
                        EngineError::InvalidInput(format!(
                            "input `{name}`: element {i} is not valid UTF-8, and ONNX string tensors hold text"
                        ))
                    })
                })
                .collect::<Result<Vec<String>, _>>()?;
            // ONNX Runtime copies the strings into its own tensor; these copies live only for this call, on the
            // thread that runs it.
            ort::value::Tensor::from_string_array((shape, strings.as_slice()))
                .map_err(err)?
                .into_dyn()
        }
    })
}

fn from_value(spec: &TensorSpec, value: &DynValue) -> Result<NamedTensor, EngineError> {
    let err = |e: ort::Error| EngineError::Run(format!("reading output `{}`: {e}", spec.name));
    if let ValueKind::MapSequence { key } = spec.kind {
        return map_sequence(spec, key, value);
    }
    macro_rules! prim {
        ($t:ty, $variant:ident) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(err)?;
            (
                shape.iter().map(|d| *d as usize).collect::<Vec<_>>(),
                TensorData::$variant(data.to_vec()),
            )
        }};
    }
    let (shape, data) = match spec.dtype {
        DataType::Bool => prim!(bool, Bool),
        DataType::U8 => prim!(u8, U8),
        DataType::U16 => prim!(u16, U16),
        DataType::U32 => prim!(u32, U32),
        DataType::U64 => prim!(u64, U64),
        DataType::I8 => prim!(i8, I8),
        DataType::I16 => prim!(i16, I16),
        DataType::I32 => prim!(i32, I32),
        DataType::I64 => prim!(i64, I64),
        DataType::F16 => prim!(half::f16, F16),
        DataType::F32 => prim!(f32, F32),
        DataType::F64 => prim!(f64, F64),
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(err)?;
            let shape = shape.iter().map(|d| *d as usize).collect::<Vec<_>>();
            (shape, TensorData::Bytes(strings.iter().collect()))
        }
    };
    let tensor = Tensor::new(shape, data).map_err(|e| EngineError::Run(e.to_string()))?;
    Ok(NamedTensor::new(spec.name.clone(), tensor))
}

/// Turns a sequence of maps (one per row) into a dense `[rows, keys]` tensor, keys in the first row's order.
fn map_sequence(
    spec: &TensorSpec,
    key: DataType,
    value: &DynValue,
) -> Result<NamedTensor, EngineError> {
    let err = |e: ort::Error| EngineError::Run(format!("reading output `{}`: {e}", spec.name));
    let maps = value
        .try_extract_sequence::<DynValueTypeMarker>()
        .map_err(err)?;
    let mut rows: Vec<Vec<(String, f64)>> = Vec::with_capacity(maps.len());
    for map in &maps {
        let row: Vec<(String, f64)> = match (key, spec.dtype) {
            (DataType::I64, DataType::F32) => map
                .try_extract_key_values::<i64, f32>()
                .map_err(err)?
                .into_iter()
                .map(|(k, v)| (k.to_string(), f64::from(v)))
                .collect(),
            (DataType::I64, _) => map
                .try_extract_key_values::<i64, f64>()
                .map_err(err)?
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            (_, DataType::F32) => map
                .try_extract_key_values::<String, f32>()
                .map_err(err)?
                .into_iter()
                .map(|(k, v)| (k, f64::from(v)))
                .collect(),
            (_, _) => map.try_extract_key_values::<String, f64>().map_err(err)?,
        };
        rows.push(row);
    }
    let keys: Vec<String> = rows
        .first()
        .map(|r| r.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let mut flat = Vec::with_capacity(rows.len() * keys.len());
    for row in &rows {
        for k in &keys {
            let v = row
                .iter()
                .find(|(rk, _)| rk == k)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    EngineError::Run(format!("output `{}`: rows have different keys", spec.name))
                })?;
            flat.push(v);
        }
    }
    let data = if spec.dtype == DataType::F32 {
        TensorData::F32(flat.into_iter().map(|v| v as f32).collect())
    } else {
        TensorData::F64(flat)
    };
    let tensor = Tensor::new(vec![rows.len(), keys.len()], data)
        .map_err(|e| EngineError::Run(e.to_string()))?;
    Ok(NamedTensor {
        name: spec.name.clone(),
        tensor,
        keys: Some(keys),
    })
}
