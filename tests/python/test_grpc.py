"""The gRPC front door with third-party clients: Triton's `tritonclient.grpc` and TF Serving's own client
(`tensorflow-serving-api` with TensorFlow's `make_tensor_proto`/`make_ndarray`). Answers are checked against
onnxruntime run directly on the same model files."""
import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.utils import InferenceServerException

from test_clients import SERVED, reference


@pytest.fixture(scope="module")
def triton(server):
    c = grpcclient.InferenceServerClient(url=server.grpc)
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.grpc)
    yield ch
    ch.close()


def test_triton_grpc_health_and_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("iris")
    assert not triton.is_model_ready("broken")
    meta = triton.get_model_metadata("iris", as_json=True)
    assert meta["inputs"][0]["name"] == "features"
    assert meta["inputs"][0]["shape"] == ["-1", "4"]
    assert "binary_tensor_data" in triton.get_server_metadata(as_json=True)["extensions"]


@pytest.mark.parametrize("model", SERVED)
def test_triton_grpc_outputs_equal_onnxruntime(triton, repository, model):
    meta = triton.get_model_metadata(model, as_json=True)
    spec = meta["inputs"][0]
    width = int(spec["shape"][1])
    x = np.random.default_rng(3).normal(3.0, 2.0, size=(4, width)).astype(np.float32)
    inp = grpcclient.InferInput(spec["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = triton.infer(model, [inp], request_id="grpc-1")
    assert result.get_response().id == "grpc-1"
    want = reference(repository, model, {spec["name"]: x})
    for o in meta["outputs"]:
        got = result.as_numpy(o["name"])
        expected = want[o["name"]]
        if expected.dtype == object or expected.dtype.kind in "US":
            np.testing.assert_array_equal([g.decode() for g in got.ravel()], expected.astype(str).ravel())
        else:
            np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=1e-6, atol=1e-6, err_msg=o["name"])


@pytest.mark.parametrize("dtype", ["int8", "uint16", "int64", "float16", "float64", "bool", "object"])
def test_triton_grpc_datatypes(triton, dtype):
    names = {"int8": "INT8", "uint16": "UINT16", "int64": "INT64", "float16": "FP16", "float64": "FP64", "bool": "BOOL", "object": "BYTES"}
    if dtype == "object":
        x = np.array([[b"a", b"bc", b""], [b"\xc3\xa9", b"x", b"yz"]], dtype=object)
    elif dtype == "bool":
        x = np.array([[True, False, True], [False, False, True]])
    else:
        x = (np.arange(6).reshape(2, 3) - 2).astype(dtype) if dtype.startswith("int") or dtype.startswith("float") else np.arange(6, dtype=dtype).reshape(2, 3)
    inp = grpcclient.InferInput("x", [2, 3], names[dtype])
    inp.set_data_from_numpy(x)
    got = triton.infer(f"id_{names[dtype].lower()}", [inp]).as_numpy("y")
    np.testing.assert_array_equal(got, x)


def test_triton_grpc_errors(triton):
    inp = grpcclient.InferInput("features", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("iris", [inp])
    assert "StatusCode.INVALID_ARGUMENT" in str(e.value) and "expected shape [-1, 4]" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        triton.infer("nope", [inp])
    assert "StatusCode.NOT_FOUND" in str(e.value)


def test_tfserving_grpc_predict(channel, repository):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "iris"
    request.model_spec.signature_name = "serving_default"
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(x))
    response = stub.Predict(request, timeout=10.0)
    assert response.model_spec.version.value == 1
    labels = tf.make_ndarray(response.outputs["label"])
    assert [v.decode() for v in labels] == ["setosa", "virginica"]
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    np.testing.assert_allclose(probabilities, reference(repository, "iris", {"features": x})["probabilities"], rtol=1e-6)
    # The familiar shortcut: read the typed field directly.
    assert len(response.outputs["probabilities"].float_val) == 6
    # Version pinned through Int64Value, and a regressor.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "diabetes"
    request.model_spec.version.value = 1
    d = np.array([[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]], dtype=np.float32)
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(d))
    got = tf.make_ndarray(stub.Predict(request, timeout=10.0).outputs["prediction"])
    np.testing.assert_allclose(got, reference(repository, "diabetes", {"features": d})["prediction"], rtol=1e-6)


def test_tfserving_grpc_metadata_status_and_errors(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "iris"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=10.0)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    sig = signatures.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["features"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in sig.inputs["features"].tensor_shape.dim] == [-1, 4]

    models = model_service_pb2_grpc.ModelServiceStub(channel)
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "iris"
    (version,) = models.GetModelStatus(status, timeout=10.0).model_version_status
    assert version.version == 1 and version.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    status.model_spec.name = "broken"
    (version,) = models.GetModelStatus(status, timeout=10.0).model_version_status
    assert version.state == get_model_status_pb2.ModelVersionStatus.END and version.status.error_message

    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(bad, timeout=10.0)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    bad.model_spec.name = "iris"
    bad.inputs["features"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 3), dtype=np.float32)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(bad, timeout=10.0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected shape [-1, 4], got [1, 3]" in e.value.details()
