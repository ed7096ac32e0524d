#!/usr/bin/env python3
"""Issue 17's side-by-side benchmark: explanations per second, Ferry's `/explain` against the Python `shap` package
in-process, on the same models, rows and background, on this machine.

    .venv/bin/python bench/explain.py            # needs target/release/ferry (cargo build --release -p ferry)

Models (scikit-learn on the bundled diabetes data, exported with skl2onnx; the background is 50 training rows):
  tree    GradientBoostingRegressor (100 trees, depth 3): Ferry's exact interventional TreeSHAP against
          shap.TreeExplainer(feature_perturbation="interventional") on the scikit-learn model
  kernel  MLPRegressor (32 hidden units): Ferry's KernelSHAP over every coalition of the 10 features (1024) through
          ONNX Runtime, against shap.KernelExplainer with nsamples=1024 (so shap enumerates every coalition too)
          calling the same ONNX graph through onnxruntime (the same engine, 1 thread)
Each cell: explanations of 1 row per request (wrk, one connection, back to back for --duration seconds; its CPU
share reported) and of 100 rows in one request (a Python client; the request's own time dominates). shap runs
in-process on one thread. Attributions are checked to agree (1e-4 relative to their scale) before anything is timed.

Predict latency under explain load: wrk (1 thread, 16 connections) on iris predictions alone, then while 4 Python
threads send kernel explanations back to back; p50/p99 of each, wrk's CPU share reported.

Prints a Markdown table and writes bench/explain.json.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FERRY = ROOT / "target/release/ferry"
BACKGROUND = 50


def load(name):
    data = np.genfromtxt(ROOT / "examples" / "data" / name, delimiter=",", skip_header=1, dtype=str)
    return data[:, :-1].astype(np.float32), data[:, -1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_version(root, name, onnx_model, bg):
    d = root / name / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(onnx_model.SerializeToString())
    with open(d / "background.csv", "w") as f:
        f.write(",".join(f"f{i}" for i in range(bg.shape[1])) + "\n")
        for r in bg:
            f.write(",".join(repr(float(v)) for v in r) + "\n")


SESSION = requests.Session()


def explain(url, model, rows, **parameters):
    body = {"inputs": [{"name": "X", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    r = SESSION.post(f"{url}/v2/models/{model}/explain", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def per_second(fn, duration, minimum=3):
    n, start = 0, time.perf_counter()
    while n < minimum or time.perf_counter() - start < duration:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def wrk(url, path, body, seconds, connections=16):
    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lua.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)!r}\n')
    lua.close()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua.name,
                          url + path], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(lua.name)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def ms(label):
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == label:
                v = parts[1]
                for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
                    if v.endswith(unit):
                        return float(v[: -len(unit)]) * scale
        return None

    rate = next(float(l.split()[1]) for l in out.splitlines() if l.startswith("Requests/sec"))
    return {"rate": rate, "p50_ms": ms("50%"), "p99_ms": ms("99%"), "wrk_cpu_share": cpu / wall}


def brute_force(onnx_bytes, row, bg):
    """Exact interventional Shapley values of one row by enumeration of every coalition, the ONNX graph run by
    onnxruntime: v(S) = mean over the background of the model on (row's S, background's rest)."""
    import itertools
    import math

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    m = len(row)
    values = {}
    for k in range(m + 1):
        for s in itertools.combinations(range(m), k):
            z = bg.copy()
            z[:, list(s)] = row[list(s)]
            values[s] = float(session.run(None, {"X": z.astype(np.float32)})[0].mean())
    phi = np.zeros(m)
    for i in range(m):
        for s, v in values.items():
            if i not in s:
                w = math.factorial(len(s)) * math.factorial(m - len(s) - 1) / math.factorial(m)
                phi[i] += w * (values[tuple(sorted(s + (i,)))] - v)
    return phi


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--out", default=str(HERE / "explain.json"))
    args = ap.parse_args()
    import shap
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.neural_network import MLPRegressor

    x, y = load("diabetes.csv")
    y = y.astype(np.float32)
    rng = np.random.default_rng(17)
    bg = x[rng.choice(len(x), BACKGROUND, replace=False)]
    rows1 = x[:1]
    rows100 = x[rng.choice(len(x), 100, replace=False)]
    gbr = GradientBoostingRegressor(n_estimators=100, max_depth=3, random_state=0).fit(x, y)
    mlp = MLPRegressor(hidden_layer_sizes=(32,), max_iter=2000, random_state=0).fit(x, y)
    gbr_onnx, mlp_onnx = to_onnx(gbr, x[:1]), to_onnx(mlp, x[:1])

    root = Path(tempfile.mkdtemp(prefix="ferry-explain-bench-"))
    write_version(root, "tree", gbr_onnx, bg)
    write_version(root, "kernel", mlp_onnx, bg)
    shutil.copytree(ROOT / "examples/models/iris", root / "iris")
    port = free_port()
    log = open(root / "ferry.log", "w")
    server = subprocess.Popen([str(FERRY), "serve", "--model-repository", str(root), "--host", "127.0.0.1",
                               "--rest-port", str(port), "--grpc-port", "0", "--no-admin", "--log-level", "warn",
                               "--request-timeout", "600"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if requests.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(mlp_onnx.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        f = lambda a: session.run(None, {"X": np.asarray(a, dtype=np.float32)})[0].reshape(len(a))
        tree_shap = shap.TreeExplainer(gbr, data=bg.astype(np.float64), feature_perturbation="interventional")
        kernel_shap = shap.KernelExplainer(f, bg)

        def agree(got, want):
            got, want = np.asarray(got), np.asarray(want)
            scale = max(1.0, float(np.abs(want).max()))
            return float(np.abs(got - want).max() / scale)

        results = {"machine": os.cpu_count(), "background_rows": BACKGROUND, "cells": []}
        for kind, rows in [("tree", rows1), ("tree", rows100), ("kernel", rows1), ("kernel", rows100)]:
            params = {"max_model_rows": 1 << 24} if kind == "kernel" else {}
            ferry_values = np.array([r["attributions"][0]
                                     for r in explain(url, kind, rows, **params)["explanations"]["rows"]])
            if kind == "tree":
                theirs = lambda: tree_shap.shap_values(rows.astype(np.float64))
            else:
                theirs = lambda: kernel_shap.shap_values(rows, nsamples=1024, silent=True)
            shap_values = np.asarray(theirs())
            err = agree(ferry_values, shap_values)
            exact_check = None
            if err >= 1e-4:
                # Where they disagree, the exact interventional Shapley values (every coalition, the ONNX graph as
                # the model) decide.
                worst = int(np.abs(ferry_values - shap_values).max(axis=1).argmax())
                model = {"tree": gbr_onnx, "kernel": mlp_onnx}[kind].SerializeToString()
                exact = brute_force(model, rows[worst], bg)
                exact_check = {"row": worst, "ferry_vs_exact": agree(ferry_values[worst], exact),
                               "shap_vs_exact": agree(shap_values[worst], exact)}
                print("disagreement", kind, exact_check, flush=True)
                assert exact_check["ferry_vs_exact"] < 1e-4, exact_check
            duration = args.duration if len(rows) == 1 else 0
            if len(rows) == 1:
                # One row per request: wrk, one connection, requests back to back (a Python client would cost more
                # per request than the explanation itself).
                body = {"inputs": [{"name": "X", "shape": [1, rows.shape[1]], "datatype": "FP32",
                                    "data": rows.ravel().tolist()}], "parameters": params}
                w = wrk(url, f"/v2/models/{kind}/explain", body, duration, connections=1)
                ours_rate, generator = w["rate"], w["wrk_cpu_share"]
            else:
                ours_rate = per_second(lambda: explain(url, kind, rows, **params), duration, minimum=1)
                generator = None
            shap_rate = per_second(theirs, duration, minimum=3 if len(rows) == 1 else 1)
            cell = {"model": kind, "rows": len(rows), "ferry_rows_per_s": ours_rate * len(rows),
                    "shap_rows_per_s": shap_rate * len(rows), "ratio": ours_rate / shap_rate, "max_difference": err,
                    "exact_check": exact_check, "wrk_cpu_share": generator}
            results["cells"].append(cell)
            print(cell, flush=True)

        body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.7, 3.0, 5.2, 2.3]}]}
        alone = wrk(url, "/v2/models/iris/infer", body, 10)
        stop = threading.Event()
        done = [0]

        def flood():
            while not stop.is_set():
                explain(url, "kernel", rows1)
                done[0] += 1

        threads = [threading.Thread(target=flood) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        loaded = wrk(url, "/v2/models/iris/infer", body, 10)
        stop.set()
        for t in threads:
            t.join()
        results["predict_alone"] = alone
        results["predict_under_explain"] = dict(loaded, explanations=done[0])
        print("predict alone", alone, flush=True)
        print("predict under explain load", results["predict_under_explain"], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print("\n| model | rows per request | Ferry rows/s | shap rows/s | Ferry / shap |\n|---|---|---|---|---|")
        for c in results["cells"]:
            print(f"| {c['model']} | {c['rows']} | {c['ferry_rows_per_s']:.1f} | {c['shap_rows_per_s']:.1f} | "
                  f"{c['ratio']:.1f}x |")
    finally:
        server.terminate()
        server.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
