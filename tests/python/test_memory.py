"""Memory in proportion to what a client sends (issue 13): a request of B bytes may raise the server's peak resident
memory by about 10 x B at most, 10 seconds later the server holds at most 3 x B more than before it, and a request of
about 1 KB, over any protocol, costs at most a few MB however large a shape it names. Measured on a fresh server's
/proc/PID/status (VmHWM reset through clear_refs before each request). Sizes are scaled down to a few MB so CI runs
them in seconds; the budget is a ratio, so the sizes do not change what is checked."""
import json
import os
import time

import grpc
import numpy as np
import pytest
import requests
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from conftest import identity_model, start_ferry, TensorProto
from onnx import helper

MB = 1 << 20


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_repo")
    for name, elem in [("id_bytes", TensorProto.STRING), ("id_fp32", TensorProto.FLOAT),
                       ("id_fp64", TensorProto.DOUBLE)]:
        os.makedirs(root / name / "1")
        (root / name / "1" / "model.onnx").write_bytes(identity_model(elem))
    # A wide identity, so a request can be several MB within the row limit.
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    os.makedirs(root / "wide_fp64" / "1")
    (root / "wide_fp64" / "1" / "model.onnx").write_bytes(model.SerializeToString())
    server = start_ferry(str(root), str(tmp_path_factory.mktemp("log") / "ferry.log"), "--max-request-bytes",
                         str(64 * MB))
    # Warm every path once, so lazily made state (sessions' first runs, channels, buffers) is not counted.
    for model, dtype, value in [("id_bytes", "BYTES", "a"), ("id_fp32", "FP32", 1), ("id_fp64", "FP64", 1)]:
        for _ in range(3):
            r = requests.post(f"{server.url}/v2/models/{model}/infer",
                              json={"inputs": [{"name": "x", "shape": [1000, 3], "datatype": dtype,
                                                "data": [value] * 3000}]})
            assert r.status_code == 200, r.text
    yield server
    server.stop()


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def measure(server, send, settle=10):
    """Sends one request; gives (its size, answer, peak growth, growth left `settle` s later) in bytes."""
    pid = server.process.pid
    time.sleep(0.5)
    before = status(pid)["VmRSS"]
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    size, answer = send()
    peak = status(pid)["VmHWM"] - before
    time.sleep(settle)
    kept = status(pid)["VmRSS"] - before
    print(f"\nMEM request {size / MB:.2f} MB: peak +{peak / MB:.1f} MB ({peak / size:.1f} x), "
          f"{settle} s later +{kept / MB:.1f} MB ({kept / size:.2f} x); answer {answer}")
    return size, answer, peak, kept


def post_json(server, path, body):
    data = json.dumps(body).encode()
    r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"})
    return len(data), (r.status_code, r.text[:200])


@pytest.mark.parametrize("case", ["kserve_strings", "kserve_empty_strings", "kserve_fp64", "tfserving_rows"])
def test_a_request_costs_memory_in_proportion_to_its_size(lean, case):
    rows = 60_000
    body = {
        # Text of realistic length: accepted.
        "kserve_strings": ("/v2/models/id_bytes/infer", {"inputs": [
            {"name": "x", "shape": [rows, 3], "datatype": "BYTES", "data": ["the quick brown fox jumps over"] * rows * 3}]}),
        # Empty strings would take 24 bytes each from 3 bytes of JSON: refused before they are stored.
        "kserve_empty_strings": ("/v2/models/id_bytes/infer", {"inputs": [
            {"name": "x", "shape": [rows, 3], "datatype": "BYTES", "data": [""] * rows * 3}]}),
        # The densest numbers JSON can carry, each becoming 8 bytes.
        "kserve_fp64": ("/v2/models/wide_fp64/infer", {"inputs": [
            {"name": "x", "shape": [rows, 64], "datatype": "FP64", "data": [0] * rows * 64}]}),
        "tfserving_rows": ("/v1/models/wide_fp64:predict", {"instances": [[0.5, 1, 2, 3] * 16] * rows}),
    }[case]
    size, answer, peak, kept = measure(lean, lambda: post_json(lean, *body))
    if case == "kserve_empty_strings":
        assert answer[0] == 400 and "bytes of memory" in answer[1], answer
    else:
        assert answer[0] == 200, answer
    assert peak <= 10 * size, f"peak +{peak} bytes for a request of {size}"
    # Byte strings kept 3.1-3.4 x until ONNX Runtime's freed std::strings (glibc blocks in the middle of a worker's
    # heap) were given back after large string runs: 0.4 x now. Numeric tensors keep 0.01-0.1 x.
    assert kept <= 3 * size, f"{kept} bytes kept 10 s after a request of {size}"


def tf_fill(dtype, value_field, value, shape):
    t = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    getattr(t, value_field).append(value)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "id_bytes" if dtype == types_pb2.DT_STRING else "id_fp32"
    request.inputs["x"].CopyFrom(t)
    return request


def test_a_1kb_request_costs_a_few_mb_at_most_over_every_protocol(lean):
    channel = grpc.insecure_channel(lean.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def grpc_fill(request):
        def send():
            try:
                stub.Predict(request, timeout=30)
                return request.ByteSize(), "OK"
            except grpc.RpcError as e:
                return request.ByteSize(), e.code().name
        return send

    cases = {
        # One 1 KB string filling 65,536 x 3 elements (200 MB if copied into each): refused.
        "tfserving_grpc_string_fill": grpc_fill(tf_fill(types_pb2.DT_STRING, "string_val", b"s" * 1000, [65536, 3])),
        "tfserving_grpc_float_fill": grpc_fill(tf_fill(types_pb2.DT_FLOAT, "float_val", 1.0, [65536, 3])),
        "kserve_rest_huge_shape": lambda: post_json(lean, "/v2/models/id_fp32/infer", {"inputs": [
            {"name": "x", "shape": [65536, 3], "datatype": "FP32", "data": [1.0] * 200}]}),
        "tfserving_rest_nested": lambda: post_json(lean, "/v1/models/id_bytes:predict",
                                                   {"instances": [["", "", ""]] * 70}),
    }
    for name, send in cases.items():
        size, answer, peak, _ = measure(lean, send, settle=0)
        print(name, size, answer)
        assert size <= 1100, (name, size)
        assert peak <= 4 * MB, f"{name}: peak +{peak / MB:.1f} MB for a request of {size} bytes"
    channel.close()
