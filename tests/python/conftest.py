"""Starts a real `ferry serve` (the binary named by $FERRY_BIN) on a free port over a repository that holds the
bundled examples, scikit-learn models exported with skl2onnx, identity models for every datatype, and a broken
model; tests talk to it with third-party clients."""
import os
import re
import shutil
import subprocess
import time

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

# numpy dtype -> (KServe datatype, ONNX element type)
DTYPES = {
    "bool": ("BOOL", TensorProto.BOOL),
    "uint8": ("UINT8", TensorProto.UINT8),
    "uint16": ("UINT16", TensorProto.UINT16),
    "uint32": ("UINT32", TensorProto.UINT32),
    "uint64": ("UINT64", TensorProto.UINT64),
    "int8": ("INT8", TensorProto.INT8),
    "int16": ("INT16", TensorProto.INT16),
    "int32": ("INT32", TensorProto.INT32),
    "int64": ("INT64", TensorProto.INT64),
    "float16": ("FP16", TensorProto.FLOAT16),
    "float32": ("FP32", TensorProto.FLOAT),
    "float64": ("FP64", TensorProto.DOUBLE),
    "object": ("BYTES", TensorProto.STRING),
}


def identity_model(elem_type):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem_type, ["N", 3])],
        [helper.make_tensor_value_info("y", elem_type, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def sklearn_models():
    """Real scikit-learn models as their users export them with skl2onnx, trained on the bundled data."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def load(name):
        data = np.genfromtxt(os.path.join(ROOT, "examples", "data", name), delimiter=",", skip_header=1, dtype=str)
        return data[:, :-1].astype(np.float32), data[:, -1]

    x_iris, y_iris = load("iris.csv")
    x_diab, y_diab = load("diabetes.csv")
    y_diab = y_diab.astype(np.float64)
    models = {
        # String class labels: a STRING label output and a ZipMap with string keys.
        "sk_logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x_iris, y_iris),
        # Integer labels: ZipMap with int64 keys, a tree ensemble.
        "sk_forest": RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0).fit(
            x_iris, np.unique(y_iris, return_inverse=True)[1]
        ),
        "sk_gbr": GradientBoostingRegressor(n_estimators=20, random_state=0).fit(x_diab, y_diab),
        "sk_linear": make_pipeline(StandardScaler(), LinearRegression()).fit(x_diab, y_diab),
    }
    samples = {"sk_logreg": x_iris, "sk_forest": x_iris, "sk_gbr": x_diab, "sk_linear": x_diab}
    return {name: to_onnx(m, samples[name][:1]).SerializeToString() for name, m in models.items()}


def torch_models():
    """Models exported from PyTorch with torch.onnx, as shipped in the silero-vad wheel (found without importing
    the package, whose code needs torch)."""
    import importlib.util

    data = os.path.join(importlib.util.find_spec("silero_vad").submodule_search_locations[0], "data")
    return {"torch_vad_op15": os.path.join(data, "silero_vad_16k_op15.onnx"),
            "torch_vad_op18": os.path.join(data, "silero_vad_op18_ifless.onnx")}


def build_repository(root):
    shutil.copytree(os.path.join(ROOT, "examples", "models"), root, dirs_exist_ok=True)
    # A copy of the iris example with its own small drift window, so other tests' traffic does not mix in.
    shutil.copytree(os.path.join(ROOT, "examples", "models", "iris"), os.path.join(root, "iris_drift"))
    with open(os.path.join(root, "iris_drift", "config.toml"), "w") as f:
        f.write("drift_window = 150\n")
    for name, path in torch_models().items():
        os.makedirs(os.path.join(root, name, "1"))
        shutil.copy(path, os.path.join(root, name, "1", "model.onnx"))
    for name, data in sklearn_models().items():
        os.makedirs(os.path.join(root, name, "1"))
        with open(os.path.join(root, name, "1", "model.onnx"), "wb") as f:
            f.write(data)
    # A model made elsewhere gets its drift baseline from `ferry baseline`.
    subprocess.run([ferry_binary(), "baseline", os.path.join(root, "sk_linear", "1"),
                    os.path.join(ROOT, "examples", "data", "diabetes.csv")], check=True, capture_output=True)
    for np_name, (kserve, elem) in DTYPES.items():
        path = os.path.join(root, f"id_{kserve.lower()}", "1")
        os.makedirs(path)
        with open(os.path.join(path, "model.onnx"), "wb") as f:
            f.write(identity_model(elem))
    os.makedirs(os.path.join(root, "broken", "1"))
    with open(os.path.join(root, "broken", "1", "model.onnx"), "wb") as f:
        f.write(b"\x08\x07garbage that is not a model")


def ferry_binary():
    return os.environ.get("FERRY_BIN") or os.path.join(ROOT, "target", "debug", "ferry")


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("repo"))
    build_repository(root)
    return root


def stop_process(process, log_file):
    """Terminates `process` (killed if it has not ended within 30 s) and closes the log file it writes."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_file.close()


class Ferry:
    """A running `ferry serve` on free ports: url, host, grpc, admin (management API url), process, log."""

    def __init__(self, proc, log_path, url, grpc, admin, log_file):
        self.process = proc
        self.log = log_path
        self.url = url
        self.host = url.split("://", 1)[1]
        self.grpc = grpc
        self.admin = admin
        self._log_file = log_file

    def stop(self):
        stop_process(self.process, self._log_file)


def start_ferry(repository, log_path, *extra, env=None, ready=True, timeout=60, verify=None):
    """Starts `ferry serve` on `repository` with free ports (REST, gRPC, management API) and waits until it is
    ready (or, with ready=False, until its ports are open). With `verify` (a CA file), the server speaks TLS."""
    scheme = "https" if verify else "http"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [ferry_binary(), "serve", "--model-repository", repository, "--host", "127.0.0.1", "--rest-port", "0",
         "--grpc-port", "0", "--admin-port", "0", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        text = open(log_path).read()
        m = re.search(r"REST .* listening address=127\.0\.0\.1:(\d+)", text)
        g = re.search(r"gRPC .* listening address=127\.0\.0\.1:(\d+)", text)
        a = re.search(r"management API listening address=([\d.]+:\d+)", text)
        if m and g:
            base = f"{scheme}://127.0.0.1:{m.group(1)}"
            admin = f"{scheme}://{a.group(1)}" if a else None
            try:
                if not ready or requests.get(base + "/v2/health/ready", timeout=1,
                                             verify=verify or True).status_code == 200:
                    return Ferry(proc, log_path, base, f"127.0.0.1:{g.group(1)}", admin, log)
            except requests.ConnectionError:
                pass
        time.sleep(0.05)
    proc.kill()
    log.close()
    raise RuntimeError("ferry did not become ready:\n" + open(log_path).read())


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("log") / "ferry.log")
    # `none`: the shared repository is not changed under the session server.
    Server = start_ferry(repository, log_path, "--model-control-mode", "none")
    yield Server
    Server.stop()
