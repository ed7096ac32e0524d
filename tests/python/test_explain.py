"""Feature attributions served by Ferry, checked against the Python `shap` package on the same models and the same
background rows: the bundled iris model (`ferry train`'s softmax regression) against shap's LinearExplainer; tree
ensembles exported with skl2onnx against TreeExplainer (interventional, raw output); an MLP against shap's Exact
explainer, Ferry running KernelSHAP over every coalition through the model's own engine. Plus the request shapes
(KServe v2 `/explain`, KServe v1 `:explain`) and their refusals."""
import os
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import requests
from onnx import numpy_helper

from conftest import ROOT, start_ferry

BACKGROUND_ROWS = 40


def load(name):
    data = np.genfromtxt(os.path.join(ROOT, "examples", "data", name), delimiter=",", skip_header=1, dtype=str)
    return data[:, :-1].astype(np.float32), data[:, -1]


def write_background(version_dir, names, rows):
    with open(os.path.join(version_dir, "background.csv"), "w") as f:
        f.write(",".join(names) + "\n")
        for r in rows:
            f.write(",".join(repr(float(v)) for v in r) + "\n")


def save_onnx(model, version_dir):
    os.makedirs(version_dir, exist_ok=True)
    with open(os.path.join(version_dir, "model.onnx"), "wb") as f:
        f.write(model.SerializeToString())


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("explain_repo")
    x_iris, y_iris = load("iris.csv")
    x_diab, y_diab = load("diabetes.csv")
    y_diab = y_diab.astype(np.float32)
    models = {}

    # The bundled iris model, as `ferry train` made it, with a background of iris rows.
    shutil.copytree(os.path.join(ROOT, "examples", "models", "iris", "1"), root / "iris" / "1")
    bg_iris = x_iris[rng.choice(len(x_iris), BACKGROUND_ROWS, replace=False)]
    write_background(root / "iris" / "1", [f"f{i}" for i in range(4)], bg_iris)
    models["iris"] = bg_iris
    # The same model without a background: explanations are refused, predictions are not.
    shutil.copytree(os.path.join(ROOT, "examples", "models", "iris", "1"), root / "nobg" / "1")
    os.remove(root / "nobg" / "1" / "background.csv")
    # A background named in config.toml.
    shutil.copytree(os.path.join(ROOT, "examples", "models", "iris", "1"), root / "named_bg" / "1")
    os.remove(root / "named_bg" / "1" / "background.csv")
    write_background(root / "named_bg" / "1", [f"f{i}" for i in range(4)], bg_iris[:7])
    os.rename(root / "named_bg" / "1" / "background.csv", root / "named_bg" / "1" / "reference.csv")
    (root / "named_bg" / "config.toml").write_text('[explain]\nbackground = "reference.csv"\n')

    bg_diab = x_diab[rng.choice(len(x_diab), BACKGROUND_ROWS, replace=False)]
    gbr = GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0).fit(x_diab, y_diab)
    save_onnx(to_onnx(gbr, x_diab[:1]), root / "gbr" / "1")
    write_background(root / "gbr" / "1", [f"f{i}" for i in range(x_diab.shape[1])], bg_diab)
    models["gbr"] = (gbr, bg_diab)

    rfc = RandomForestClassifier(n_estimators=15, max_depth=4, random_state=0).fit(x_iris, y_iris)
    rfc_onnx = to_onnx(rfc, x_iris[:1], options={"zipmap": False})
    save_onnx(rfc_onnx, root / "rfc" / "1")
    models["rfc_onnx"] = rfc_onnx.SerializeToString()
    write_background(root / "rfc" / "1", [f"f{i}" for i in range(4)], bg_iris)
    models["rfc"] = (rfc, bg_iris)

    mlp = MLPRegressor(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(x_diab, y_diab)
    mlp_onnx = to_onnx(mlp, x_diab[:1])
    save_onnx(mlp_onnx, root / "mlp" / "1")
    bg_small = bg_diab[:12]
    write_background(root / "mlp" / "1", [f"f{i}" for i in range(x_diab.shape[1])], bg_small)
    models["mlp"] = (mlp_onnx.SerializeToString(), bg_small)

    server = start_ferry(str(root), str(tmp_path_factory.mktemp("explain_log") / "ferry.log"))
    yield server, models, x_iris, x_diab
    server.stop()


def explain(server, model, rows, **parameters):
    body = {"inputs": [{"name": "features" if model in ("iris", "nobg", "named_bg") else "X", "shape": list(rows.shape),
                        "datatype": "FP32", "data": rows.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return requests.post(f"{server.url}/v2/models/{model}/explain", json=body, timeout=120)


def attributions(answer):
    """[row][output][feature] and [row][output] from Ferry's answer."""
    rows = answer["explanations"]["rows"]
    return np.array([r["attributions"] for r in rows]), np.array([r["base_values"] for r in rows])


def close(got, want, tol=1e-4):
    """Agreement to `tol` relative to the attributions' scale (at least 1)."""
    scale = max(1.0, float(np.max(np.abs(want))))
    assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= tol * scale, (got, want)


def test_linear_model_matches_shap_linear_explainer(explained):
    import shap

    server, models, x_iris, _ = explained
    bg = models["iris"]
    rows = x_iris[::15]
    r = explain(server, "iris", rows)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = answer["explanations"]
    assert info["method"] == "linear" and info["background_rows"] == BACKGROUND_ROWS
    assert info["outputs"] == ["setosa", "versicolor", "virginica"] and "logit" in info["space"]
    assert sorted(o["name"] for o in answer["outputs"]) == ["label", "probabilities"]
    got, base = attributions(answer)
    # The graph's own weights (one Gemm on the raw features: standardization is folded in), explained by shap.
    graph = onnx.load(os.path.join(ROOT, "examples", "models", "iris", "1", "model.onnx")).graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    w, b = init[gemm.input[1]].astype(np.float64), init[gemm.input[2]].astype(np.float64)
    if any(a.name == "transB" and a.i == 1 for a in gemm.attribute):
        w = w.T
    masker = shap.maskers.Independent(bg.astype(np.float64), max_samples=len(bg))
    for k in range(3):
        e = shap.LinearExplainer((w[:, k], b[k]), masker)
        close(got[:, k, :], e.shap_values(rows.astype(np.float64)))
        close(base[:, k], np.full(len(rows), e.expected_value))
        # Additivity: base value + attributions = the logit.
        close(base[:, k] + got[:, k, :].sum(axis=1), rows.astype(np.float64) @ w[:, k] + b[k])


def test_gradient_boosting_matches_shap_tree_explainer(explained):
    import shap

    server, models, _, x_diab = explained
    model, bg = models["gbr"]
    rows = x_diab[::37][:6]
    r = explain(server, "gbr", rows)
    assert r.status_code == 200, r.text
    assert r.json()["explanations"]["method"] == "tree_interventional"
    got, base = attributions(r.json())
    e = shap.TreeExplainer(model, data=bg.astype(np.float64), feature_perturbation="interventional",
                           model_output="raw")
    close(got[:, 0, :], e.shap_values(rows.astype(np.float64)))
    close(base[:, 0], np.full(len(rows), np.atleast_1d(e.expected_value)[0]))


def test_random_forest_classifier_matches_shap_exact_interventional_values(explained):
    """shap 0.51's TreeExplainer on this scikit-learn 1.9 forest is not additive against the forest's own
    predict_proba (off by up to 0.008, and its values differ from brute-force Shapley values by 0.003), so the
    reference here is shap's Exact explainer (every coalition, the same interventional masker) on the ONNX graph
    Ferry serves."""
    import shap

    server, models, x_iris, _ = explained
    model, bg = models["rfc"]
    rows = x_iris[::37]
    r = explain(server, "rfc", rows)
    assert r.status_code == 200, r.text
    info = r.json()["explanations"]
    assert info["method"] == "tree_interventional" and info["outputs"] == [str(c) for c in model.classes_]
    got, base = attributions(r.json())
    session = onnxruntime.InferenceSession(models["rfc_onnx"], providers=["CPUExecutionProvider"])
    f = lambda x: session.run(None, {"X": np.asarray(x, dtype=np.float32)})[1]
    want = shap.explainers.Exact(f, shap.maskers.Independent(bg, max_samples=len(bg)))(rows)
    close(got, want.values.transpose(0, 2, 1))
    close(base, want.base_values)
    # Additivity against the probabilities the server answered.
    probs = np.array(next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]).reshape(-1, 3)
    close(base + got.sum(axis=2), probs, tol=1e-5)


def test_mlp_kernel_shap_over_every_coalition_matches_shap_exact(explained):
    import shap

    server, models, _, x_diab = explained
    onnx_bytes, bg = models["mlp"]
    rows = x_diab[[3, 50, 200]]
    r = explain(server, "mlp", rows)
    assert r.status_code == 200, r.text
    info = r.json()["explanations"]
    assert info["method"] == "kernel_exact" and info["model_rows"] > 0, info
    got, base = attributions(r.json())
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    f = lambda x: session.run(None, {"X": np.asarray(x, dtype=np.float32)})[0].reshape(len(x))
    e = shap.explainers.Exact(f, shap.maskers.Independent(bg, max_samples=len(bg)))
    want = e(rows)
    close(got[:, 0, :], want.values, tol=1e-4)
    close(base[:, 0], want.base_values, tol=1e-4)
    # Sampled coalitions (features beyond the exact limit): additive, and near the exact values.
    r = explain(server, "mlp", rows, exact_max_features=4, coalitions=400, seed=3)
    assert r.status_code == 200 and r.json()["explanations"]["method"] == "kernel_sampled"
    sampled, sbase = attributions(r.json())
    close(sbase[:, 0] + sampled[:, 0, :].sum(axis=1), f(rows), tol=1e-4)
    close(sampled[:, 0, :], want.values, tol=0.1)


def test_kserve_v1_explain_answers_predictions_and_explanations(explained):
    server, models, x_iris, _ = explained
    rows = x_iris[:2]
    r = requests.post(f"{server.url}/v1/models/iris:explain", json={"instances": rows.tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    a = r.json()
    assert len(a["predictions"]) == 2 and len(a["explanations"]) == 2
    assert a["explanation_info"]["method"] == "linear"
    v2 = explain(server, "iris", rows).json()["explanations"]["rows"]
    assert a["explanations"] == v2


def test_config_toml_names_the_background(explained):
    server, _, x_iris, _ = explained
    r = explain(server, "named_bg", x_iris[:1])
    assert r.status_code == 200, r.text
    assert r.json()["explanations"]["background_rows"] == 7


def test_explain_refusals_are_clear_and_leave_predictions_alone(explained):
    server, _, x_iris, _ = explained
    rows = x_iris[:2]
    r = explain(server, "nobg", rows)
    assert r.status_code == 400 and "background" in r.json()["error"], r.text
    r = explain(server, "iris", rows, max_model_rows=0)
    assert r.status_code == 400 and "max_model_rows" in r.json()["error"]
    r = explain(server, "iris", rows, method="tree")
    assert r.status_code == 400 and "does not apply" in r.json()["error"]
    r = explain(server, "iris", rows, mehtod="kernel")
    assert r.status_code == 400 and "unknown explain parameter `mehtod`" in r.json()["error"]
    r = explain(server, "iris", np.repeat(rows, 501, axis=0))
    assert r.status_code == 400 and "at most 1000" in r.json()["error"]
    r = explain(server, "gbr", np.zeros((1, 10), np.float32), max_model_rows=10, method="kernel")
    assert r.status_code == 400 and "limit" in r.json()["error"], r.text
    # Predictions of the same models are unaffected.
    r = requests.post(f"{server.url}/v2/models/nobg/infer",
                      json={"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                                        "data": rows.ravel().tolist()}]}, timeout=30)
    assert r.status_code == 200
    # The model's own method on request, and kernel on any model.
    r = explain(server, "iris", rows, method="kernel", output="probabilities")
    assert r.status_code == 200 and r.json()["explanations"]["method"] == "kernel_exact"
    got, base = attributions(r.json())
    probs = np.array(next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]).reshape(2, 3)
    close(base + got.sum(axis=2), probs, tol=1e-5)


@pytest.fixture(scope="module")
def importance_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance_repo")
    for name in ["steady", "shifted"]:
        shutil.copytree(os.path.join(ROOT, "examples", "models", "iris", "1"), root / name / "1")
    server = start_ferry(str(root), str(tmp_path_factory.mktemp("importance_log") / "ferry.log"))
    yield server
    server.stop()


def test_importance_attributes_a_shifted_features_drift_and_not_steady_traffic(importance_server):
    server = importance_server
    x, _ = load("iris.csv")
    rng = np.random.default_rng(11)
    rows = x[rng.choice(len(x), 300)]
    shifted = rows.copy()
    shifted[:, 2] += 2.5  # petal length, 2.5 cm longer
    for name, data in [("steady", rows), ("shifted", shifted)]:
        for chunk in np.array_split(data, 30):
            r = requests.post(f"{server.url}/v2/models/{name}/infer", timeout=30, json={"inputs": [
                {"name": "features", "shape": list(chunk.shape), "datatype": "FP32", "data": chunk.ravel().tolist()}]})
            assert r.status_code == 200, r.text
    answers = {}
    for name in ["steady", "shifted"]:
        r = requests.get(f"{server.url}/v2/models/{name}/importance", timeout=60)
        assert r.status_code == 200, r.text
        answers[name] = r.json()
    a = answers["shifted"]
    assert a["method"] == "linear" and a["live"]["rows"] == 256 and a["background"]["rows"] == 100
    assert a["features"] == ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
    drift = {d["feature"]: d for d in a["drift"]}
    top = max(drift.values(), key=lambda d: d["abs_attribution"])
    assert top["feature"] == "petal_length_cm" and top["drifted"], a["drift"]
    others = [d["abs_attribution"] for d in a["drift"] if d["feature"] != "petal_length_cm"]
    assert top["abs_attribution"] > 3 * max(others), a["drift"]
    # The signed attributions add up to the shift of the mean logit (additivity, averaged).
    for k in range(3):
        assert abs(sum(d["attribution"][k] for d in a["drift"]) - a["live"]["prediction_shift"][k]) < 1e-6
    # Steady traffic: no feature drifts, and no drift attribution stands out against the features' importance.
    s = answers["steady"]
    assert not any(d["drifted"] for d in s["drift"]), s["drift"]
    background_importance = np.array(s["background"]["importance"]).sum(axis=0)
    steady_attr = np.array([d["abs_attribution"] for d in s["drift"]])
    assert np.all(steady_attr < 0.35 * background_importance), (steady_attr, background_importance)
    assert drift["petal_length_cm"]["abs_attribution"] > 5 * steady_attr.max()
    # The same figures as gauges.
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    line = next(l for l in text.splitlines() if l.startswith("ferry_feature_drift_attribution{")
                and 'model="shifted"' in l and 'feature="petal_length_cm"' in l)
    assert abs(float(line.split()[-1]) - top["abs_attribution"]) < 1e-9 * max(1.0, top["abs_attribution"])
    assert 'ferry_feature_importance{model="steady",version="1",feature="sepal_length_cm",source="live"}' in text
