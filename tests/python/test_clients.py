"""Third-party clients against a real `ferry serve`: Triton's `tritonclient.http` (JSON and binary tensors) and
the request bodies of TF Serving's REST API documentation. Answers are checked against onnxruntime run directly
on the same model files."""
import base64
import os

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import DTYPES

SKLEARN = ["sk_logreg", "sk_forest", "sk_gbr", "sk_linear"]
SERVED = ["iris", "diabetes"] + SKLEARN


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(url=server.host)
    yield c
    c.close()


def reference(repository, model, feeds):
    """onnxruntime's own answer, outputs by name; sequences of maps made dense in key order."""
    session = ort.InferenceSession(os.path.join(repository, model, "1", "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = {}
    for name, value in zip(names, session.run(names, feeds)):
        if isinstance(value, list) and value and isinstance(value[0], dict):
            keys = list(value[0].keys())
            value = np.array([[row[k] for k in keys] for row in value], dtype=np.float32)
            out[name + ".keys"] = [str(k) for k in keys]
        out[name] = np.asarray(value)
    return out


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    for model in SERVED:
        assert client.is_model_ready(model), model
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("no_such_model")
    iris = client.get_model_metadata("iris")
    assert iris["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in iris["outputs"]] == ["label", "probabilities"]


@pytest.mark.parametrize("model", SERVED)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_outputs_equal_onnxruntime(client, repository, model, binary):
    meta = client.get_model_metadata(model)
    (spec,) = meta["inputs"]
    width = spec["shape"][1]
    x = np.random.default_rng(len(model)).normal(3.0, 2.0, size=(5, width)).astype(np.float32)
    inp = httpclient.InferInput(spec["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
    result = client.infer(model, [inp], outputs=outputs, request_id="check-1")
    assert result.get_response()["id"] == "check-1"
    want = reference(repository, model, {spec["name"]: x})
    for o in meta["outputs"]:
        got = result.as_numpy(o["name"])
        expected = want[o["name"]]
        if expected.dtype == object or expected.dtype.kind in "US":
            got = np.array([g.decode() if isinstance(g, bytes) else g for g in got.ravel()]).reshape(got.shape)
            np.testing.assert_array_equal(got, expected.astype(str), err_msg=o["name"])
        else:
            np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=1e-6, atol=1e-6, err_msg=o["name"])
        if o["name"] + ".keys" in want:
            params = result.get_output(o["name"])["parameters"]
            assert params["map_keys"] == want[o["name"] + ".keys"]


def test_default_request_gets_binary_outputs(client):
    # With no outputs named, tritonclient asks for every output in binary (binary_data_output).
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    inp = httpclient.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("iris", [inp])
    assert [v.decode() for v in result.as_numpy("label")] == ["setosa", "virginica"]
    assert result.as_numpy("probabilities").shape == (2, 3)
    assert "binary_data_size" in result.get_output("probabilities")["parameters"]


@pytest.mark.parametrize("np_name", list(DTYPES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client, np_name, binary):
    kserve, _ = DTYPES[np_name]
    rng = np.random.default_rng(7)
    if np_name == "object":
        x = np.array([[b"a", b"", "\u00e9".encode()], [b"long string " * 4, b"x", b"yz"]], dtype=object)
    elif np_name == "bool":
        x = rng.integers(0, 2, size=(2, 3)).astype(bool)
    elif np_name.startswith(("int", "uint")):
        info = np.iinfo(np_name)
        x = np.array([[info.min, info.max, 0], [1, 2, 3]], dtype=np_name)
    else:
        x = rng.normal(size=(2, 3)).astype(np_name)
    inp = httpclient.InferInput("x", [2, 3], kserve)
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer(f"id_{kserve.lower()}", [inp], outputs=[out])
    got = result.as_numpy("y")
    if np_name == "object":
        got = np.array([g if isinstance(g, bytes) else g.encode() for g in got.ravel()], dtype=object).reshape(got.shape)
    np.testing.assert_array_equal(got, x)


def test_client_errors_are_reported(client):
    inp = httpclient.InferInput("features", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("iris", [inp])
    assert "expected shape [-1, 4], got [1, 3]" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [inp])
    assert "[404]" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.infer("broken", [inp])
    assert "[503]" in str(e.value)


# The request bodies below are the ones TF Serving's REST API documentation shows, aimed at our models.

def test_tfserving_status_and_metadata(server):
    r = requests.get(server.url + "/v1/models/iris")
    assert r.status_code == 200
    assert r.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    broken = requests.get(server.url + "/v1/models/broken").json()["model_version_status"][0]
    assert broken["state"] == "END" and broken["status"]["error_message"]
    meta = requests.get(server.url + "/v1/models/iris/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["features"]["dtype"] == "DT_FLOAT"
    assert sig["inputs"]["features"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}, {"size": "4", "name": ""}]
    assert sig["outputs"]["label"]["dtype"] == "DT_STRING"


def test_tfserving_predict_formats(server, repository):
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    want = reference(repository, "iris", {"features": np.array(rows, dtype=np.float32)})
    row = requests.post(server.url + "/v1/models/iris:predict", json={"signature_name": "serving_default", "instances": rows})
    assert row.status_code == 200, row.text
    predictions = row.json()["predictions"]
    assert [p["label"] for p in predictions] == ["setosa", "virginica"]
    np.testing.assert_allclose([p["probabilities"] for p in predictions], want["probabilities"], rtol=1e-6)
    col = requests.post(server.url + "/v1/models/iris/versions/1:predict", json={"inputs": {"features": rows}}).json()
    assert col["outputs"]["label"] == ["setosa", "virginica"]
    np.testing.assert_allclose(col["outputs"]["probabilities"], want["probabilities"], rtol=1e-6)
    # A single output collapses: predictions are the rows themselves.
    d = requests.post(server.url + "/v1/models/diabetes:predict", json={"instances": [[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]]}).json()
    assert len(d["predictions"]) == 1 and len(d["predictions"][0]) == 1


def test_tfserving_classify_and_regress(server, repository):
    example = {"sepal_length_cm": 6.7, "sepal_width_cm": 3.0, "petal_length_cm": 5.2, "petal_width_cm": 2.3}
    r = requests.post(server.url + "/v1/models/iris:classify", json={"signature_name": "", "examples": [example]})
    assert r.status_code == 200, r.text
    (scores,) = r.json()["results"]
    assert [label for label, _ in scores] == ["setosa", "versicolor", "virginica"]
    assert max(scores, key=lambda p: p[1])[0] == "virginica"
    features = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]
    names = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    r = requests.post(server.url + "/v1/models/diabetes:regress", json={"examples": [dict(zip(names, features))]})
    assert r.status_code == 200, r.text
    want = reference(repository, "diabetes", {"features": np.array([features], dtype=np.float32)})["prediction"]
    np.testing.assert_allclose(r.json()["results"], want.ravel(), rtol=1e-6)
    # scikit-learn's ZipMap classifier: labels from the map keys.
    r = requests.post(server.url + "/v1/models/sk_logreg:classify", json={"examples": [{"X": [6.7, 3.0, 5.2, 2.3]}]})
    assert r.status_code == 200, r.text
    assert max(r.json()["results"][0], key=lambda p: p[1])[0] == "virginica"


def test_tfserving_b64_strings(server):
    body = {"instances": [[{"b64": base64.b64encode(b"hello").decode()}, "plain", ""]]}
    r = requests.post(server.url + "/v1/models/id_bytes:predict", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [["hello", "plain", ""]]}


def test_broken_model_does_not_stop_the_others(server):
    assert requests.get(server.url + "/v2/models/broken/ready").status_code == 400
    r = requests.post(server.url + "/v2/models/broken/infer", json={"inputs": []})
    assert r.status_code == 503 and "error" in r.json()
    r = requests.post(server.url + "/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert r.status_code == 200


@pytest.mark.parametrize("model", ["torch_vad_op15", "torch_vad_op18"])
def test_torch_onnx_exports_serve_out_of_the_box(client, repository, model):
    """Voice-activity models exported by torch.onnx (3-D state, a scalar INT64 input), through tritonclient."""
    rng = np.random.default_rng(11)
    feeds = {
        "input": rng.normal(0, 0.1, size=(2, 512)).astype(np.float32),
        "state": np.zeros((2, 2, 128), dtype=np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }
    meta = client.get_model_metadata(model)
    assert {i["name"] for i in meta["inputs"]} == set(feeds)
    inputs = []
    for name, value in feeds.items():
        inp = httpclient.InferInput(name, list(value.shape), {"float32": "FP32", "int64": "INT64"}[value.dtype.name])
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    result = client.infer(model, inputs)
    want = reference(repository, model, feeds)
    for name in ("output", "stateN"):
        np.testing.assert_allclose(result.as_numpy(name), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
