//! TF Serving over gRPC: `tensorflow.serving.PredictionService` (Predict, GetModelMetadata) and
//! `tensorflow.serving.ModelService` (GetModelStatus), with `TensorProto` tensors.
//!
//! Inputs are read from `tensor_content` (raw little-endian) or the typed `*_val` fields (a single value fills the
//! whole shape, as in TensorFlow); outputs are written to the typed fields, which is what TF Serving clients read
//! (`outputs["y"].float_val`, or `tf.make_ndarray`).

use std::collections::HashMap;

use ferry_model::{element_count, DataType, NamedTensor, Tensor, TensorData, TensorSpec};
use half::f16;
use prost::Message;
use tonic::{Request, Response, Status};

use super::grpc::grpc_deadline;
use super::grpc::tensorflow::serving::{
    model_service_server::ModelService, model_spec::VersionChoice, model_version_status::State,
    prediction_service_server::PredictionService, GetModelMetadataRequest,
    GetModelMetadataResponse, GetModelStatusRequest, GetModelStatusResponse, ModelSpec,
    ModelVersionStatus, PredictRequest, PredictResponse, SignatureDefMap, StatusProto,
};
use super::grpc::tensorflow::{
    tensor_info, tensor_shape_proto::Dim, DataType as TfType, SignatureDef, TensorInfo,
    TensorProto, TensorShapeProto,
};
use crate::core::infer::{Call, Infer, Protocol, VersionSelector};
use crate::core::repository::VersionState;
use crate::error::InferError;

/// The TF Serving gRPC services over the shared [`Infer`] path.
#[derive(Debug, Clone)]
pub struct TfServingGrpc {
    /// The shared inference path.
    pub infer: Infer,
    /// The largest tensor a request may make, in bytes (`--max-request-bytes`).
    pub max_request_bytes: usize,
}

fn tf_type(t: DataType) -> TfType {
    match t {
        DataType::Bool => TfType::DtBool,
        DataType::U8 => TfType::DtUint8,
        DataType::U16 => TfType::DtUint16,
        DataType::U32 => TfType::DtUint32,
        DataType::U64 => TfType::DtUint64,
        DataType::I8 => TfType::DtInt8,
        DataType::I16 => TfType::DtInt16,
        DataType::I32 => TfType::DtInt32,
        DataType::I64 => TfType::DtInt64,
        DataType::F16 => TfType::DtHalf,
        DataType::F32 => TfType::DtFloat,
        DataType::F64 => TfType::DtDouble,
        DataType::Bytes => TfType::DtString,
    }
}

fn from_tf_type(t: i32) -> Option<DataType> {
    DataType::ALL.into_iter().find(|d| tf_type(*d) as i32 == t)
}

fn spec_of(request: Option<ModelSpec>) -> Result<(String, VersionSelector, ModelSpec), InferError> {
    let spec = request.ok_or_else(|| InferError::invalid("Missing ModelSpec"))?;
    let selector = match &spec.version_choice {
        None => VersionSelector::Latest,
        Some(VersionChoice::Version(v)) => {
            let v = u64::try_from(*v).ok().filter(|v| *v > 0);
            VersionSelector::Specific(
                v.ok_or_else(|| InferError::invalid("model_spec.version must be positive"))?,
            )
        }
        Some(VersionChoice::VersionLabel(l)) => VersionSelector::Label(l.clone()),
    };
    match spec.signature_name.as_str() {
        "" | "serving_default" => {}
        other => {
            return Err(InferError::invalid(format!(
                "Serving signature name: \"{other}\" not found in signature def (Ferry models have `serving_default`)"
            )))
        }
    }
    Ok((spec.name.clone(), selector, spec))
}

fn shape_proto(dims: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dim {
                size: *d,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

/// Decodes one input `TensorProto`; the model's declared type must match.
fn decode(
    name: &str,
    spec: &TensorSpec,
    mut t: TensorProto,
    limits: &crate::codec::limits::Limits,
    budget: &crate::codec::limits::Budget,
) -> Result<NamedTensor, InferError> {
    let err = |m: String| InferError::invalid(format!("input `{name}`: {m}"));
    let dtype =
        from_tf_type(t.dtype).ok_or_else(|| err(format!("unsupported dtype {}", t.dtype)))?;
    if dtype != spec.dtype {
        return Err(err(format!(
            "expected {}, got {}",
            spec.dtype.tf_name(),
            dtype.tf_name()
        )));
    }
    let shape = t
        .tensor_shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| usize::try_from(d.size))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(|_| err("tensor_shape has a negative dimension".into()))?
        .unwrap_or_default();
    let count =
        element_count(&shape).ok_or_else(|| err(format!("shape {shape:?} is too large")))?;
    if !spec.accepts_shape(&shape) {
        return Err(err(format!(
            "expected shape {:?}, got {shape:?}",
            spec.display_shape()
        )));
    }
    limits.check_shape(name, &shape)?;
    let data = if !t.tensor_content.is_empty() && dtype != DataType::Bytes {
        TensorData::from_le_bytes(dtype, &t.tensor_content).ok_or_else(|| {
            err(format!(
                "tensor_content holds {} bytes, not whole {dtype} elements",
                t.tensor_content.len()
            ))
        })?
    } else {
        fn narrow<T: TryFrom<i32>>(
            name: &str,
            what: &str,
            values: &[i32],
        ) -> Result<Vec<T>, InferError> {
            values
                .iter()
                .map(|v| {
                    T::try_from(*v).map_err(|_| {
                        InferError::invalid(format!("input `{name}`: {v} does not fit {what}"))
                    })
                })
                .collect()
        }
        match dtype {
            DataType::F32 => TensorData::F32(std::mem::take(&mut t.float_val)),
            DataType::F64 => TensorData::F64(std::mem::take(&mut t.double_val)),
            DataType::I32 => TensorData::I32(std::mem::take(&mut t.int_val)),
            DataType::I16 => TensorData::I16(narrow(name, "DT_INT16", &t.int_val)?),
            DataType::I8 => TensorData::I8(narrow(name, "DT_INT8", &t.int_val)?),
            DataType::U8 => TensorData::U8(narrow(name, "DT_UINT8", &t.int_val)?),
            DataType::U16 => TensorData::U16(narrow(name, "DT_UINT16", &t.int_val)?),
            DataType::I64 => TensorData::I64(std::mem::take(&mut t.int64_val)),
            DataType::U32 => TensorData::U32(std::mem::take(&mut t.uint32_val)),
            DataType::U64 => TensorData::U64(std::mem::take(&mut t.uint64_val)),
            DataType::Bool => TensorData::Bool(std::mem::take(&mut t.bool_val)),
            DataType::F16 => TensorData::F16(
                t.half_val
                    .iter()
                    .map(|b| f16::from_bits(*b as u16))
                    .collect(),
            ),
            DataType::Bytes => {
                let strings = std::mem::take(&mut t.string_val);
                budget
                    .take(crate::codec::limits::decoded_strings_cost(&strings))
                    .map_err(|e| err(e.to_string()))?;
                TensorData::Bytes(strings.into())
            }
        }
    };
    // prost has already decoded the typed fields (packed varints and empty strings take up to 8-12 x their bytes on
    // the wire): what they hold is charged too, and refused when it does not fit.
    budget
        .take(crate::codec::limits::memory_cost(&data))
        .map_err(|e| err(e.to_string()))?;
    // TensorFlow fills a whole tensor from a single value: a few bytes may ask for a large tensor, so the filled
    // size is charged to the request's budget before anything is allocated.
    let data = if count > 1 && data.len() == 1 {
        let each = crate::codec::limits::element_cost(dtype)
            + match &data {
                TensorData::Bytes(v) => v[0].len(),
                _ => 0,
            };
        budget
            .take(count.saturating_mul(each))
            .map_err(|e| err(format!("a single value filling shape {shape:?}: {e}")))?;
        data.repeat_single(count).unwrap_or(data)
    } else {
        data
    };
    if data.len() != count {
        return Err(err(format!(
            "shape {shape:?} needs {count} values but {} were given",
            data.len()
        )));
    }
    Ok(NamedTensor::new(
        name,
        Tensor::new(shape, data).map_err(|e| err(e.to_string()))?,
    ))
}

/// Encodes an output in the typed fields.
fn encode(t: &Tensor) -> TensorProto {
    let mut p = TensorProto {
        dtype: tf_type(t.dtype()) as i32,
        tensor_shape: Some(shape_proto(
            &t.shape.iter().map(|d| *d as i64).collect::<Vec<_>>(),
        )),
        ..Default::default()
    };
    match &t.data {
        TensorData::F32(v) => p.float_val = v.clone(),
        TensorData::F64(v) => p.double_val = v.clone(),
        TensorData::I32(v) => p.int_val = v.clone(),
        TensorData::I16(v) => p.int_val = v.iter().map(|x| i32::from(*x)).collect(),
        TensorData::I8(v) => p.int_val = v.iter().map(|x| i32::from(*x)).collect(),
        TensorData::U8(v) => p.int_val = v.iter().map(|x| i32::from(*x)).collect(),
        TensorData::U16(v) => p.int_val = v.iter().map(|x| i32::from(*x)).collect(),
        TensorData::I64(v) => p.int64_val = v.clone(),
        TensorData::U32(v) => p.uint32_val = v.clone(),
        TensorData::U64(v) => p.uint64_val = v.clone(),
        TensorData::Bool(v) => p.bool_val = v.clone(),
        TensorData::F16(v) => p.half_val = v.iter().map(|x| i32::from(x.to_bits())).collect(),
        TensorData::Bytes(v) => p.string_val = v.iter().map(<[u8]>::to_vec).collect(),
    }
    p
}

fn resolved_spec(model: &str, version: u64) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: Some(VersionChoice::Version(version as i64)),
        signature_name: "serving_default".into(),
    }
}

/// Decodes a `Predict` request's inputs against a model's inputs, within the memory budget of a request of
/// `request_bytes`. The entry point of the fuzz targets and property tests.
pub fn decode_predict_inputs(
    specs: &[TensorSpec],
    inputs: std::collections::HashMap<String, TensorProto>,
    request_bytes: usize,
    limits: &crate::codec::limits::Limits,
) -> Result<Vec<NamedTensor>, InferError> {
    let budget = crate::codec::limits::Budget::for_request(request_bytes);
    let mut decoded = Vec::with_capacity(inputs.len());
    for (name, tensor) in inputs {
        let spec = specs.iter().find(|s| s.name == name).ok_or_else(|| {
            InferError::invalid(format!(
                "input tensor alias not found in signature: {name}. Inputs expected to be in the set {{{}}}.",
                specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(",")
            ))
        })?;
        decoded.push(decode(&name, spec, tensor, limits, &budget)?);
    }
    Ok(decoded)
}

impl TfServingGrpc {
    async fn predict_inner(
        &self,
        call: &mut Call<'_>,
        request: Request<PredictRequest>,
    ) -> Result<PredictResponse, InferError> {
        let deadline = grpc_deadline(request.metadata())?;
        let key = super::grpc_route_key(request.metadata());
        let r = request.into_inner();
        let (model, selector, _) = spec_of(r.model_spec.clone())?;
        let request_bytes = r.encoded_len();
        let loaded = call.resolve(&model, Ok(selector), key.as_deref(), request_bytes)?;
        let inputs = decode_predict_inputs(
            &loaded.signature.inputs,
            r.inputs,
            request_bytes,
            call.limits(),
        )?;
        let filter = (!r.output_filter.is_empty()).then_some(r.output_filter);
        let outputs = call.predict(inputs, filter, None, deadline).await?;
        Ok(PredictResponse {
            model_spec: Some(resolved_spec(&loaded.model, loaded.version)),
            outputs: outputs
                .iter()
                .map(|o| (o.name.clone(), encode(&o.tensor)))
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl PredictionService for TfServingGrpc {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let mut call = self.infer.call(Protocol::TfservingGrpc);
        let result = self.predict_inner(&mut call, request).await;
        super::grpc::finish(call, result)
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let (model, selector, _) = spec_of(r.model_spec)?;
        if r.metadata_field.iter().any(|f| f != "signature_def") || r.metadata_field.is_empty() {
            return Err(InferError::invalid(
                "Metadata field signature_def must be requested (the only one served)",
            )
            .into());
        }
        let loaded = self.infer.resolve(&model, &selector)?;
        let info = |specs: &[TensorSpec]| -> HashMap<String, TensorInfo> {
            specs
                .iter()
                .map(|s| {
                    let shape = match &s.shape {
                        Some(d) => shape_proto(d),
                        None => TensorShapeProto {
                            dim: vec![],
                            unknown_rank: true,
                        },
                    };
                    let info = TensorInfo {
                        encoding: Some(tensor_info::Encoding::Name(s.name.clone())),
                        dtype: tf_type(s.dtype) as i32,
                        tensor_shape: Some(shape),
                    };
                    (s.name.clone(), info)
                })
                .collect()
        };
        let signature = SignatureDef {
            inputs: info(&loaded.signature.inputs),
            outputs: info(&loaded.signature.outputs),
            method_name: "tensorflow/serving/predict".into(),
        };
        let map = SignatureDefMap {
            signature_def: HashMap::from([("serving_default".to_string(), signature)]),
        };
        let any = prost_types::Any {
            type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
            value: map.encode_to_vec(),
        };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: Some(resolved_spec(&loaded.model, loaded.version)),
            metadata: HashMap::from([("signature_def".to_string(), any)]),
        }))
    }
}

#[tonic::async_trait]
impl ModelService for TfServingGrpc {
    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let r = request.into_inner();
        let (model, selector, _) = spec_of(r.model_spec)?;
        let statuses: Vec<ModelVersionStatus> = self
            .infer
            .version_states(&model, &selector)?
            .into_iter()
            .map(|(v, state)| {
                let (state, code, message) = match state {
                    VersionState::Loading => (State::Loading, 0, String::new()),
                    VersionState::Ready => (State::Available, 0, String::new()),
                    VersionState::Unloading => (State::Unloading, 0, String::new()),
                    VersionState::Unavailable(reason) => (State::End, 2, reason),
                };
                ModelVersionStatus {
                    version: v as i64,
                    state: state as i32,
                    status: Some(StatusProto {
                        error_code: code,
                        error_message: message,
                    }),
                }
            })
            .collect();
        Ok(Response::new(GetModelStatusResponse {
            model_version_status: statuses,
        }))
    }
}
