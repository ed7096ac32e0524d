#!/usr/bin/env python3
"""Side-by-side benchmark: `ferry train` (release build, default settings) against scikit-learn, same folds.

For every bundled dataset and model family it runs the 5-fold cross-validation of shared/datasets/REFERENCE.md
(StratifiedKFold for classification, KFold for regression, shuffle, random_state=0). Each fold's training rows go
to `ferry train --quiet --json`, its test rows to `ferry evaluate --json` (the exported ONNX through ONNX Runtime);
scikit-learn fits a StandardScaler pipeline with default hyper-parameters on the same rows.
Times are medians over folds of the fastest of `--repeat` fits (default 3): ferry's fit time as it reports it (`training_seconds`: split, standardize, epochs,
final scoring), ferry's whole command (process start, CSV parsing, ONNX export, writing files), and scikit-learn's
`fit` alone.

Run from the repository root, after `cargo build --release -p ferry` and with the test venv (scripts/test makes it):
    ORT_DYLIB_PATH=.ferry/lib/libonnxruntime.so.1.32.0 .venv/bin/python bench/train_vs_sklearn.py [--only mlp]
Prints a Markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))

# (file, ferry family, scikit-learn estimator, label for the table, REFERENCE.md mean)
CASES = [
    ("iris.csv", "softmax", lambda: LogisticRegression(), "LogisticRegression", 0.9600),
    ("iris.csv", "mlp", lambda: MLPClassifier(random_state=0), "MLPClassifier", 0.9533),
    ("breast_cancer.csv", "logistic", lambda: LogisticRegression(), "LogisticRegression", 0.9789),
    ("breast_cancer.csv", "softmax", lambda: LogisticRegression(), "LogisticRegression", 0.9789),
    ("breast_cancer.csv", "mlp", lambda: MLPClassifier(random_state=0), "MLPClassifier", 0.9771),
    ("digits.csv", "softmax", lambda: LogisticRegression(), "LogisticRegression", 0.9694),
    ("digits.csv", "mlp", lambda: MLPClassifier(random_state=0), "MLPClassifier", 0.9772),
    ("diabetes.csv", "linear", lambda: LinearRegression(), "LinearRegression", 0.4892),
    ("diabetes.csv", "mlp", lambda: MLPRegressor(random_state=0), "MLPRegressor", 0.4717),
]


def load(path):
    with open(path) as f:
        header = f.readline().rstrip("\n")
        lines = [l.rstrip("\n") for l in f if l.strip()]
    rows = [l.split(",") for l in lines]
    x = np.array([[float(v) for v in r[:-1]] for r in rows])
    y = [r[-1] for r in rows]
    return header, lines, x, y


def numeric_many(y):
    """A target ferry's mlp treats as a regression target: numbers with more than 20 distinct values."""
    try:
        return len({float(v) for v in y}) > 20
    except ValueError:
        return False


def ferry(args):
    out = subprocess.run([FERRY, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run_case(data_dir, tmp, file, family, estimator, skip_sklearn, extra, repeat):
    header, lines, x, y = load(os.path.join(data_dir, file))
    regression = family == "linear" or (family == "mlp" and numeric_many(y))
    if regression:
        y_fit = np.array([float(v) for v in y])
        folds = KFold(5, shuffle=True, random_state=0).split(x)
        key = "r2"
    else:
        y_fit = np.array(y)
        folds = StratifiedKFold(5, shuffle=True, random_state=0).split(x, y_fit)
        key = "accuracy"
    scores, sk_scores, fit_s, wall_s, sk_s, epochs = [], [], [], [], [], []
    for k, (train, test) in enumerate(folds):
        train_csv = os.path.join(tmp, f"{file}-{k}-train.csv")
        test_csv = os.path.join(tmp, f"{file}-{k}-test.csv")
        for name, idx in ((train_csv, train), (test_csv, test)):
            with open(name, "w") as f:
                f.write(header + "\n" + "\n".join(lines[i] for i in idx) + "\n")
        model_dir = os.path.join(tmp, f"{file}-{family}-{k}")
        # Each fit runs `repeat` times and keeps its fastest time, which is the least disturbed by other work
        # on the machine; the models of every repeat are identical (fixed seeds).
        walls, fits = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            trained = ferry(["train", train_csv, "--model", family, "--out", model_dir, "--json", *extra])
            walls.append(time.perf_counter() - start)
            fits.append(trained["training_seconds"])
        epochs.append(trained["epochs_run"])
        wall_s.append(min(walls))
        fit_s.append(min(fits))
        scores.append(ferry(["evaluate", model_dir, test_csv, "--json"])[key])
        if not skip_sklearn:
            times = []
            for _ in range(repeat):
                model = make_pipeline(StandardScaler(), estimator())
                start = time.perf_counter()
                model.fit(x[train], y_fit[train])
                times.append(time.perf_counter() - start)
            sk_s.append(min(times))
            sk_scores.append(model.score(x[test], y_fit[test]))
    return key, scores, sk_scores, fit_s, wall_s, sk_s, epochs


def main():
    # scikit-learn's MLP warns that 200 epochs did not converge; its defaults are what we compare against.
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "examples", "data"))
    parser.add_argument("--only", help="run only this ferry family (linear, logistic, softmax, mlp)")
    parser.add_argument("--ferry-args", default="", help="extra `ferry train` flags (default settings otherwise)")
    parser.add_argument("--blas-threads", type=int,
                        help="limit scikit-learn's BLAS/OpenMP threads (default: its own choice, every core)")
    parser.add_argument("--repeat", type=int, default=3, help="fits per fold; the fastest counts")
    parser.add_argument("--skip-sklearn", action="store_true", help="score ferry only (no scikit-learn fits)")
    args = parser.parse_args()
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.blas_threads)
    if not os.path.exists(FERRY):
        sys.exit(f"{FERRY} not found: cargo build --release -p ferry")
    print("| data | ferry model | metric | ferry 5-fold | scikit-learn 5-fold (here) | REFERENCE.md | "
          "ferry epochs | ferry fit s | ferry command s | scikit-learn fit s | fit speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for file, family, estimator, sk_name, reference in CASES:
            if args.only and family != args.only:
                continue
            key, scores, sk_scores, fit_s, wall_s, sk_s, epochs = run_case(
                args.data, tmp, file, family, estimator, args.skip_sklearn, args.ferry_args.split(), args.repeat)
            sk = f"{np.mean(sk_scores):.4f} ({sk_name})" if sk_scores else "-"
            sk_time = f"{statistics.median(sk_s):.3f}" if sk_s else "-"
            ratio = f"{statistics.median(sk_s) / statistics.median(fit_s):.1f}x" if sk_s else "-"
            print(f"| {file} | {family} | {key} | {np.mean(scores):.4f} ± {np.std(scores):.4f} | {sk} | "
                  f"{reference:.4f} | {statistics.median(epochs):.0f} | {statistics.median(fit_s):.3f} | {statistics.median(wall_s):.3f} | "
                  f"{sk_time} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
