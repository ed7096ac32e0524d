"""Drift on a model trained by `ferry train` on the bundled iris data: the training rows themselves keep every
feature's PSI under the threshold; shifting one feature raises that feature's PSI over it, and only that one. The
predicted classes drift too: the training rows keep their frequencies near the model's predictions on its training
data, the shifted rows move them. A model made elsewhere gets both baselines from `ferry baseline`."""
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
    [label] = body["predictions"]
    assert label["output"] == "label" and label["kind"] == "categorical" and label["window_rows"] == 150, label
    assert label["psi"] < 0.2 and not label["drifted"], label
    assert [c["class"] for c in label["classes"]] == ["setosa", "versicolor", "virginica", "(other)"]
    shifted = [[a, b, c + 3.0, d] for a, b, c, d in rows]
    send(server, shifted)
    features, body = report(server)
    assert features["petal_length_cm"]["drifted"] and features["petal_length_cm"]["psi"] > 0.2, features
    for name in ("sepal_length_cm", "sepal_width_cm", "petal_width_cm"):
        assert features[name]["psi"] < 0.2 and not features[name]["drifted"], features
    # Longer petals read as virginica: the predicted class frequencies leave the training ones.
    [label] = body["predictions"]
    assert label["drifted"] and label["psi"] > 0.2, label
    virginica = next(c for c in label["classes"] if c["class"] == "virginica")
    assert virginica["actual"] > 0.5 and virginica["expected"] < 0.4, label
    page = requests.get(server.url + "/metrics").text
    assert 'ferry_feature_drift_psi{model="iris_drift",version="1",feature="petal_length_cm"}' in page
    assert 'ferry_prediction_drift_psi{model="iris_drift",version="1",output="label"}' in page
    # The versioned route answers the same.
    r = requests.get(server.url + "/v2/models/iris_drift/versions/1/drift")
    assert r.status_code == 200 and r.json()["predictions"][0]["psi"] == label["psi"], r.text


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
    # skl2onnx names the regressor's output `variable`; `ferry baseline` ran the model on the data for its histogram.
    [prediction] = r.json()["predictions"]
    assert prediction["output"] == "variable" and prediction["kind"] == "numeric", prediction
    assert prediction["psi"] < 0.2 and prediction["ks"] < 0.1, prediction
    # Rows whose predictions all land far above the training range drift.
    high = [[v * 3 if i in (2, 3, 8) else v for i, v in enumerate(row)] for row in rows]
    r = requests.post(server.url + "/v2/models/sk_linear/infer",
                      json={"inputs": [{"name": "X", "shape": [len(high), 10], "datatype": "FP32", "data": high}]})
    assert r.status_code == 200, r.text
    [prediction] = requests.get(server.url + "/v2/models/sk_linear/drift").json()["predictions"]
    assert prediction["drifted"] and prediction["ks"] > 0.3, prediction
