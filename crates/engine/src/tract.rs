//! The pure-Rust tract backend, behind the `tract` cargo feature (slow to compile, so not in the default build).
//!
//! tract prepares a plan once at load; a plan is shared by every call (each run spawns its own state), so no pool
//! is needed. It supports fewer operators than ONNX Runtime (no ZipMap, no TreeEnsembleRegressor).

use ferry_model::{DataType, NamedTensor, Signature, Tensor, TensorData, TensorSpec};
use tract_onnx::prelude::{
    tract_ndarray, tvec, Datum, DatumType, Framework, InferenceModelExt, IntoTValue, TValue,
    TypedFact, TypedModel, TypedRunnableModel,
};

use crate::{check_inputs, Backend, EngineError, EngineOptions, OptimizationLevel};

/// A model version prepared by tract.
pub struct TractBackend {
    signature: Signature,
    plan: std::sync::Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend")
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

fn data_type(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::String => DataType::Bytes,
        _ => return None,
    })
}

fn spec(name: String, fact: &TypedFact) -> Result<TensorSpec, EngineError> {
    let dtype = data_type(fact.datum_type).ok_or_else(|| {
        EngineError::Unsupported(format!(
            "`{name}` has type {:?}, which Ferry cannot serve",
            fact.datum_type
        ))
    })?;
    let shape = fact
        .shape
        .iter()
        .map(|d| d.to_i64().unwrap_or(-1))
        .collect();
    Ok(TensorSpec::tensor(name, dtype, shape))
}

impl TractBackend {
    /// Prepares a model from its serialized ONNX bytes. `options.optimization` of `disable` keeps the graph as
    /// written (decluttered only); anything else lets tract optimize it.
    pub fn load(model: &[u8], options: &EngineOptions) -> Result<TractBackend, EngineError> {
        let load = |e: tract_onnx::prelude::TractError| EngineError::Load(format!("{e:#}"));
        let inference = tract_onnx::onnx()
            .model_for_read(&mut &model[..])
            .map_err(load)?;
        let typed: TypedModel = if options.optimization == OptimizationLevel::Disable {
            inference
                .into_typed()
                .and_then(|m| m.into_decluttered())
                .map_err(load)?
        } else {
            inference.into_optimized().map_err(load)?
        };
        let mut inputs = Vec::new();
        for (i, outlet) in typed.input_outlets().map_err(load)?.iter().enumerate() {
            let name = typed.node(outlet.node).name.clone();
            inputs.push(spec(name, typed.input_fact(i).map_err(load)?)?);
        }
        let mut outputs = Vec::new();
        for (i, outlet) in typed.output_outlets().map_err(load)?.iter().enumerate() {
            let name = typed
                .outlet_label(*outlet)
                .map(str::to_string)
                .unwrap_or_else(|| typed.node(outlet.node).name.clone());
            outputs.push(spec(name, typed.output_fact(i).map_err(load)?)?);
        }
        let plan = tract_onnx::prelude::IntoRunnable::into_runnable(typed).map_err(load)?;
        Ok(TractBackend {
            signature: Signature { inputs, outputs },
            plan,
        })
    }
}

fn to_value(name: &str, tensor: Tensor) -> Result<TValue, EngineError> {
    let shape = tensor.shape;
    let invalid =
        |e: &dyn std::fmt::Display| EngineError::InvalidInput(format!("input `{name}`: {e}"));
    fn array<T: Datum>(shape: &[usize], v: Vec<T>) -> Result<TValue, tract_ndarray::ShapeError> {
        tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map(|a| tract_onnx::prelude::Tensor::from(a).into_tvalue())
    }
    match tensor.data {
        TensorData::Bool(v) => array(&shape, v),
        TensorData::U8(v) => array(&shape, v),
        TensorData::U16(v) => array(&shape, v),
        TensorData::U32(v) => array(&shape, v),
        TensorData::U64(v) => array(&shape, v),
        TensorData::I8(v) => array(&shape, v),
        TensorData::I16(v) => array(&shape, v),
        TensorData::I32(v) => array(&shape, v),
        TensorData::I64(v) => array(&shape, v),
        TensorData::F16(v) => array(&shape, v),
        TensorData::F32(v) => array(&shape, v),
        TensorData::F64(v) => array(&shape, v),
        TensorData::Bytes(v) => {
            let mut strings = Vec::with_capacity(v.len());
            for (i, b) in v.iter().enumerate() {
                let Ok(s) = std::str::from_utf8(b) else {
                    return Err(invalid(&format_args!("element {i} is not valid UTF-8")));
                };
                strings.push(s.to_string());
            }
            array(&shape, strings)
        }
    }
    .map_err(|e| invalid(&e))
}

fn from_value(spec: &TensorSpec, value: &TValue) -> Result<NamedTensor, EngineError> {
    let err = |e: tract_onnx::prelude::TractError| {
        EngineError::Run(format!("reading output `{}`: {e}", spec.name))
    };
    fn collect<T: Datum + Clone>(
        t: &tract_onnx::prelude::Tensor,
    ) -> tract_onnx::prelude::TractResult<Vec<T>> {
        Ok(t.to_plain_array_view::<T>()?.iter().cloned().collect())
    }
    let t: &tract_onnx::prelude::Tensor = value;
    let data = match data_type(t.datum_type()) {
        Some(DataType::Bool) => TensorData::Bool(collect(t).map_err(err)?),
        Some(DataType::U8) => TensorData::U8(collect(t).map_err(err)?),
        Some(DataType::U16) => TensorData::U16(collect(t).map_err(err)?),
        Some(DataType::U32) => TensorData::U32(collect(t).map_err(err)?),
        Some(DataType::U64) => TensorData::U64(collect(t).map_err(err)?),
        Some(DataType::I8) => TensorData::I8(collect(t).map_err(err)?),
        Some(DataType::I16) => TensorData::I16(collect(t).map_err(err)?),
        Some(DataType::I32) => TensorData::I32(collect(t).map_err(err)?),
        Some(DataType::I64) => TensorData::I64(collect(t).map_err(err)?),
        Some(DataType::F16) => TensorData::F16(collect(t).map_err(err)?),
        Some(DataType::F32) => TensorData::F32(collect(t).map_err(err)?),
        Some(DataType::F64) => TensorData::F64(collect(t).map_err(err)?),
        Some(DataType::Bytes) => {
            TensorData::Bytes(collect::<String>(t).map_err(err)?.iter().collect())
        }
        None => {
            return Err(EngineError::Run(format!(
                "output `{}` has an unsupported type",
                spec.name
            )))
        }
    };
    let tensor =
        Tensor::new(t.shape().to_vec(), data).map_err(|e| EngineError::Run(e.to_string()))?;
    Ok(NamedTensor::new(spec.name.clone(), tensor))
}

impl Backend for TractBackend {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn predict(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, EngineError> {
        // tract feeds inputs by position: put them in signature order.
        let inputs = check_inputs(&self.signature, inputs)?;
        let mut values = tvec![];
        for input in inputs {
            values.push(to_value(&input.name, input.tensor)?);
        }
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        self.signature
            .outputs
            .iter()
            .zip(outputs.iter())
            .map(|(spec, value)| from_value(spec, value))
            .collect()
    }

    fn engine_name(&self) -> &'static str {
        "tract"
    }
}
