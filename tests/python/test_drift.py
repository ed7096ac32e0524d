"""Drift on a model trained by `ferry train` on the bundled iris data: the training rows themselves keep every
feature's PSI under the threshold; shifting one feature raises that feature's PSI over it, and only that one."""
import csv
import os

import requests

from conftest import ROOT


def iris_rows():
    with open(os.path.join(ROOT, "examples", "data", "iris.csv")) as f:
        rows = list(csv.reader(f))[1:]
    return [[float(v) for v in r[:4]] for r in rows]


def send(server, rows):
    r = requests.post(server.url + "/v2/models/iris_drift/infer",
                      json={"inputs": [{"name": "features", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]})
    assert r.status_code == 200, r.text


def report(server):
    r = requests.get(server.url + "/v2/models/iris_drift/drift")
    assert r.status_code == 200, r.text
    return {f["name"]: f for f in r.json()["features"]}, r.json()


def test_shifted_feature_drifts_and_unshifted_do_not(server):
    rows = iris_rows()
    send(server, rows)
    features, body = report(server)
    assert body["window_rows"] == 150 and body["psi_threshold"] == 0.2
    assert all(f["psi"] < 0.2 and not f["drifted"] for f in features.values()), features
    shifted = [[a, b, c + 3.0, d] for a, b, c, d in rows]
    send(server, shifted)
    features, _ = report(server)
    assert features["petal_length_cm"]["drifted"] and features["petal_length_cm"]["psi"] > 0.2, features
    for name in ("sepal_length_cm", "sepal_width_cm", "petal_width_cm"):
        assert features[name]["psi"] < 0.2 and not features[name]["drifted"], features
    page = requests.get(server.url + "/metrics").text
    assert 'ferry_feature_drift_psi{model="iris_drift",version="1",feature="petal_length_cm"}' in page


def test_ferry_baseline_gives_a_model_made_elsewhere_a_drift_baseline(server):
    """sk_linear is a scikit-learn pipeline exported with skl2onnx; `ferry baseline` wrote its ferry.json."""
    with open(os.path.join(ROOT, "examples", "data", "diabetes.csv")) as f:
        rows = [[float(v) for v in r[:10]] for r in list(csv.reader(f))[1:]]
    r = requests.post(server.url + "/v2/models/sk_linear/infer",
                      json={"inputs": [{"name": "X", "shape": [len(rows), 10], "datatype": "FP32", "data": rows}]})
    assert r.status_code == 200, r.text
    r = requests.get(server.url + "/v2/models/sk_linear/drift")
    assert r.status_code == 200, r.text
    features = r.json()["features"]
    assert [f["name"] for f in features][:3] == ["age", "sex", "bmi"]
    assert all(f["psi"] < 0.2 for f in features), features
