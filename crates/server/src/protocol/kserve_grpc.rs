//! KServe v2 (Open Inference Protocol) over gRPC: `inference.GRPCInferenceService`.
//!
//! Inputs come as typed `contents` or as `raw_input_contents` (little-endian, BYTES elements length-prefixed);
//! outputs are always answered as `raw_output_contents`, as Triton does, which its clients read directly.

use ferry_model::{DataType, NamedTensor, Tensor, TensorData};
use prost::Message;
use tonic::{Request, Response, Status};

use super::grpc::grpc_deadline;
use super::grpc::inference::{
    grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata, InferParameter, InferTensorContents,
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use crate::core::infer::{Call, Infer, Protocol, VersionSelector};
use crate::core::repository::parse_version;
use crate::error::{ErrorKind, InferError};

/// The KServe v2 gRPC service over the shared [`Infer`] path.
#[derive(Debug, Clone)]
pub struct KserveGrpc {
    /// The shared inference path.
    pub infer: Infer,
}

fn selector(version: &str) -> Result<VersionSelector, InferError> {
    if version.is_empty() {
        return Ok(VersionSelector::Latest);
    }
    parse_version(version)
        .map(VersionSelector::Specific)
        .ok_or_else(|| {
            InferError::invalid(format!(
                "version must be a positive integer, got `{version}`"
            ))
        })
}

/// Converts typed contents to a narrower element type, refusing values that do not fit.
fn narrow<T: TryFrom<i64>, V: Into<i64>>(
    name: &str,
    what: &str,
    values: Vec<V>,
) -> Result<Vec<T>, InferError> {
    values
        .into_iter()
        .map(|v| {
            let v: i64 = v.into();
            T::try_from(v).map_err(|_| {
                InferError::invalid(format!("input `{name}`: {v} does not fit {what}"))
            })
        })
        .collect()
}

fn decode_contents(
    name: &str,
    dtype: DataType,
    c: InferTensorContents,
) -> Result<TensorData, InferError> {
    Ok(match dtype {
        DataType::Bool => TensorData::Bool(c.bool_contents),
        DataType::I8 => TensorData::I8(narrow(name, "INT8", c.int_contents)?),
        DataType::I16 => TensorData::I16(narrow(name, "INT16", c.int_contents)?),
        DataType::I32 => TensorData::I32(c.int_contents),
        DataType::I64 => TensorData::I64(c.int64_contents),
        DataType::U8 => TensorData::U8(narrow(name, "UINT8", c.uint_contents)?),
        DataType::U16 => TensorData::U16(narrow(name, "UINT16", c.uint_contents)?),
        DataType::U32 => TensorData::U32(c.uint_contents),
        DataType::U64 => TensorData::U64(c.uint64_contents),
        DataType::F32 => TensorData::F32(c.fp32_contents),
        DataType::F64 => TensorData::F64(c.fp64_contents),
        DataType::Bytes => TensorData::Bytes(c.bytes_contents.into()),
        DataType::F16 => {
            return Err(InferError::invalid(format!(
                "input `{name}`: FP16 has no typed contents field; send it in raw_input_contents"
            )))
        }
    })
}

fn decode_input(
    input: InferInputTensor,
    raw: Option<Vec<u8>>,
    limits: &crate::codec::limits::Limits,
    budget: &crate::codec::limits::Budget,
) -> Result<NamedTensor, InferError> {
    let name = input.name;
    let (dtype, shape, expected) =
        crate::codec::kserve::kserve_input_header(&name, &input.datatype, &input.shape)?;
    limits.check_shape(&name, &shape)?;
    let data = match (raw, input.contents) {
        (Some(_), Some(_)) => {
            return Err(InferError::invalid(format!(
                "input `{name}`: give either contents or raw_input_contents, not both"
            )))
        }
        (Some(raw), None) => {
            crate::codec::kserve::charge_binary(&name, dtype, &raw, budget)?;
            TensorData::from_le_bytes_at_most(dtype, &raw, expected).ok_or_else(|| {
                InferError::invalid(format!(
                    "input `{name}`: {} raw bytes are not a whole number of {dtype} elements",
                    raw.len()
                ))
            })?
        }
        (None, Some(contents)) => {
            // prost has already decoded them (packed varints and empty strings take up to 8-12 x their bytes on
            // the wire); what does not fit the budget is refused here, before anything else is made of it.
            let strings = crate::codec::limits::decoded_strings_cost(&contents.bytes_contents);
            let data = decode_contents(&name, dtype, contents)?;
            budget
                .take(crate::codec::limits::memory_cost(&data) + strings)
                .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))?;
            data
        }
        (None, None) => {
            return Err(InferError::invalid(format!(
                "input `{name}`: no contents and no raw_input_contents"
            )))
        }
    };
    if data.len() != expected {
        return Err(InferError::invalid(format!(
            "input `{name}`: shape {shape:?} needs {expected} elements but {} were given",
            data.len()
        )));
    }
    let tensor = Tensor::new(shape, data)
        .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))?;
    Ok(NamedTensor::new(name, tensor))
}

/// Decodes a `ModelInfer` request's inputs (typed contents or raw little-endian bytes), within the memory budget of
/// a request of `request_bytes`. The entry point of the fuzz targets and property tests.
pub fn decode_infer_inputs(
    inputs: Vec<InferInputTensor>,
    raw: Vec<Vec<u8>>,
    request_bytes: usize,
    limits: &crate::codec::limits::Limits,
) -> Result<Vec<NamedTensor>, InferError> {
    let budget = crate::codec::limits::Budget::for_request(request_bytes);
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(InferError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input or none",
            raw.len(),
            inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut decoded = Vec::with_capacity(inputs.len());
    for input in inputs {
        decoded.push(decode_input(input, raw.next(), limits, &budget)?);
    }
    Ok(decoded)
}

#[tonic::async_trait]
impl GrpcInferenceService for KserveGrpc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.infer.health.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let selector = selector(&r.version)?;
        let ready = self.infer.resolve(&r.name, &selector).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "ferry".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["binary_tensor_data".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let selector = selector(&r.version)?;
        let loaded = self.infer.resolve(&r.name, &selector)?;
        let versions = self.infer.metadata_versions(&selector, &loaded);
        let describe = |specs: &[ferry_model::TensorSpec]| {
            specs
                .iter()
                .map(|s| TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.dtype.kserve_name().into(),
                    shape: s.display_shape(),
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: loaded.model.clone(),
            versions,
            platform: format!("{}_onnx", loaded.backend.engine_name()),
            inputs: describe(&loaded.signature.inputs),
            outputs: describe(&loaded.signature.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let mut call = self.infer.call(Protocol::KserveGrpc);
        let result = self.model_infer_inner(&mut call, request).await;
        super::grpc::finish(call, result)
    }
}

impl KserveGrpc {
    async fn model_infer_inner(
        &self,
        call: &mut Call<'_>,
        request: Request<ModelInferRequest>,
    ) -> Result<ModelInferResponse, InferError> {
        let deadline = grpc_deadline(request.metadata())?;
        let key = super::grpc_route_key(request.metadata());
        let r = request.into_inner();
        let request_bytes = r.encoded_len();
        let loaded = call.resolve(
            &r.model_name,
            selector(&r.model_version),
            key.as_deref().or(Some(r.id.as_str())),
            request_bytes,
        )?;
        let inputs =
            decode_infer_inputs(r.inputs, r.raw_input_contents, request_bytes, call.limits())?;
        let requested: Option<Vec<String>> =
            (!r.outputs.is_empty()).then(|| r.outputs.iter().map(|o| o.name.clone()).collect());
        let outputs = call
            .predict(inputs, requested, Some(r.id.clone()), deadline)
            .await?;
        let mut raw_output_contents = Vec::with_capacity(outputs.len());
        let mut tensors = Vec::with_capacity(outputs.len());
        for out in outputs {
            let mut bytes = Vec::new();
            out.tensor.data.write_le_bytes(&mut bytes);
            raw_output_contents.push(bytes);
            let mut parameters = std::collections::HashMap::new();
            if let Some(keys) = &out.keys {
                let text = serde_json::to_string(keys)
                    .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
                parameters.insert(
                    "map_keys".to_string(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam(text)),
                    },
                );
            }
            tensors.push(InferOutputTensor {
                name: out.name,
                datatype: out.tensor.dtype().kserve_name().into(),
                shape: out.tensor.shape.iter().map(|d| *d as i64).collect(),
                parameters,
                contents: None,
            });
        }
        Ok(ModelInferResponse {
            model_name: loaded.model.clone(),
            model_version: loaded.version.to_string(),
            id: r.id,
            parameters: Default::default(),
            outputs: tensors,
            raw_output_contents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_contents_are_range_checked() {
        let c = InferTensorContents {
            int_contents: vec![1, 300],
            ..Default::default()
        };
        let e = decode_contents("x", DataType::I8, c).unwrap_err();
        assert!(e.message.contains("300 does not fit INT8"), "{e}");
        let c = InferTensorContents {
            fp32_contents: vec![1.5],
            ..Default::default()
        };
        assert_eq!(
            decode_contents("x", DataType::F32, c).unwrap(),
            TensorData::F32(vec![1.5])
        );
        assert!(decode_contents("x", DataType::F16, InferTensorContents::default()).is_err());
    }
}
