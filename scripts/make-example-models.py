#!/usr/bin/env python3
"""Builds examples/models/ from the bundled data until `ferry train` exists.

Honest route: numpy fits each model by batch gradient descent on standardized features (softmax regression on
iris, linear regression on the MSE cost J = 1/2m sum (h(x) - y)^2 on diabetes), the standardization is folded into
the first layer, and the result is written as a standard ONNX graph with the `onnx` package, in the layout
`ferry train` will use: input `features` [N, F]; classifiers give `label` [N] and `probabilities` [N, C];
regressors give `prediction` [N, 1]. Beside each model.onnx, ferry.json records features, classes and metrics.

Run it from the repository root with the test environment: .venv/bin/python scripts/make-example-models.py
"""
import csv
import hashlib
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(name):
    with open(os.path.join(ROOT, "examples", "data", name)) as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    x = np.array([[float(v) for v in r[:-1]] for r in rows])
    y = [r[-1] for r in rows]
    return header[:-1], header[-1], x, y


def split(n, seed=0, fraction=0.2):
    idx = np.random.default_rng(seed).permutation(n)
    cut = int(n * fraction)
    return idx[cut:], idx[:cut]


def fold(w, b, mean, std):
    """Folds (x - mean) / std into the affine layer so the model takes raw features."""
    w_raw = w / std[:, None]
    b_raw = b - (mean / std) @ w
    return w_raw.astype(np.float32), b_raw.astype(np.float32)


def write(model_dir, graph, meta):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ferry-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    os.makedirs(model_dir, exist_ok=True)
    data = model.SerializeToString()
    with open(os.path.join(model_dir, "model.onnx"), "wb") as f:
        f.write(data)
    meta["model_sha256"] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(model_dir, "ferry.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def iris():
    features, target, x, labels = load("iris.csv")
    classes = sorted(set(labels), key=labels.index)
    y = np.array([classes.index(l) for l in labels])
    train, valid = split(len(y))
    mean, std = x[train].mean(0), x[train].std(0)
    z = (x - mean) / std
    w, b = np.zeros((x.shape[1], len(classes))), np.zeros(len(classes))
    onehot = np.eye(len(classes))[y[train]]
    for _ in range(2000):
        logits = z[train] @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = p - onehot
        w -= 0.5 * (z[train].T @ grad / len(train) + 1e-3 * w)
        b -= 0.5 * grad.mean(0)
    accuracy = float(((z[valid] @ w + b).argmax(1) == y[valid]).mean())
    w32, b32 = fold(w, b, mean, std)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["features", "W", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["index"], axis=1, keepdims=0),
            helper.make_node("Gather", ["classes", "index"], ["label"], axis=0),
        ],
        "iris",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(features)])],
        [
            helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)]),
        ],
        [
            numpy_helper.from_array(w32, "W"),
            numpy_helper.from_array(b32, "B"),
            helper.make_tensor("classes", TensorProto.STRING, [len(classes)], [c.encode() for c in classes]),
        ],
    )
    write(
        os.path.join(ROOT, "examples", "models", "iris", "1"),
        graph,
        {"task": "classification", "model": "softmax", "target": target, "features": features, "classes": classes,
         "trained_by": "scripts/make-example-models.py (numpy batch gradient descent)",
         "metrics": {"validation_accuracy": accuracy}},
    )
    print(f"iris: validation accuracy {accuracy:.3f}")


def diabetes():
    features, target, x, y = load("diabetes.csv")
    y = np.array([float(v) for v in y])
    train, valid = split(len(y))
    mean, std = x[train].mean(0), x[train].std(0)
    z = (x - mean) / std
    theta, bias, m = np.zeros(x.shape[1]), 0.0, len(train)
    for _ in range(5000):
        error = z[train] @ theta + bias - y[train]  # h(x) - y
        theta -= 0.1 * (z[train].T @ error) / m  # gradient of J = 1/2m sum error^2
        bias -= 0.1 * error.mean()
    pred = z[valid] @ theta + bias
    r2 = float(1 - ((pred - y[valid]) ** 2).sum() / ((y[valid] - y[valid].mean()) ** 2).sum())
    w32, b32 = fold(theta[:, None], np.array([bias]), mean, std)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W", "B"], ["prediction"])],
        "diabetes",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(features)])],
        [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w32, "W"), numpy_helper.from_array(b32, "B")],
    )
    write(
        os.path.join(ROOT, "examples", "models", "diabetes", "1"),
        graph,
        {"task": "regression", "model": "linear", "target": target, "features": features,
         "trained_by": "scripts/make-example-models.py (numpy batch gradient descent on the MSE cost)",
         "metrics": {"validation_r2": r2}},
    )
    print(f"diabetes: validation R2 {r2:.3f}")


if __name__ == "__main__":
    iris()
    diabetes()
