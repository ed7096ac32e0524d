"""Updates without a failed request: hot reload under load, broken versions kept out of service, canary rollouts
that roll back or promote by themselves, shadow traffic, and the management API (checked with tritonclient)."""
import json
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper

from conftest import ROOT, ferry_binary, start_ferry

IRIS = os.path.join(ROOT, "examples", "models", "iris", "1")


def sum_model(offset=0.0):
    """y = sum(x, axis 1) + offset, for x float [N, 4]."""
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["s", "offset"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("offset", TensorProto.FLOAT, [], [offset])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def erroring_model():
    """Same signature as sum_model; looks x[:, 0] up in a 3-entry table, so it runs on zeros (synthetic warm-up)
    and fails for any row whose first feature is 3 or more."""
    nodes = [
        helper.make_node("Gather", ["x", "zero"], ["c"], axis=1),
        helper.make_node("Cast", ["c"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "i"], ["y"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "erroring",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
         helper.make_tensor("table", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def publish(root, model, version, files):
    """Writes a version aside and renames it into place, as a deployment tool would."""
    aside = os.path.join(root, model, f".incoming-{version}")
    os.makedirs(aside, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(aside, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    os.rename(aside, os.path.join(root, model, str(version)))


def iris_files():
    return {name: open(os.path.join(IRIS, name), "rb").read() for name in ("model.onnx", "ferry.json")}


def wait_for(check, timeout=30, every=0.05, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def index(server, headers=None):
    r = requests.post(server.admin + "/v2/repository/index", json={}, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def state_of(server, model, version):
    for row in index(server):
        if row["name"] == model and row.get("version") == str(version):
            return row
    return None


IRIS_BODY = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
X_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.0, 1.0, 1.0, 1.0]}]}


class Load:
    """Clients that send requests without pause, recording status, served version and latency."""

    def __init__(self, url, body, threads=2, headers=None):
        self.url, self.body, self.headers = url, json.dumps(body), headers or {}
        self.stop_flag = threading.Event()
        self.records = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self):
        session = requests.Session()
        while not self.stop_flag.is_set():
            t0 = time.perf_counter()
            try:
                r = session.post(self.url, data=self.body, headers={"content-type": "application/json", **self.headers},
                                 timeout=30)
                status, version = r.status_code, (r.json().get("model_version") if r.status_code == 200 else r.text)
            except requests.RequestException as e:
                status, version = -1, str(e)
            with self.lock:
                self.records.append((time.time(), status, version, time.perf_counter() - t0))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=60)

    def since(self, t):
        with self.lock:
            return [r for r in self.records if r[0] >= t]


def p99(latencies):
    return float(np.percentile(latencies, 99))


def test_versions_published_and_removed_under_load_fail_no_request(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.1")
    try:
        url = server.url + "/v2/models/iris/infer"
        with Load(url, IRIS_BODY) as load:
            time.sleep(1.5)
            steady_end = time.time()
            for version in range(2, 12):
                publish(root, "iris", version, iris_files())
                wait_for(lambda: any(r[2] == str(version) for r in load.since(time.time() - 0.3)), 30,
                         what=f"version {version} serving")
                shutil.rmtree(os.path.join(root, "iris", str(version - 1)))
                wait_for(lambda: state_of(server, "iris", version - 1) is None, 30,
                         what=f"version {version - 1} unloaded")
            swaps_end = time.time()
            time.sleep(0.5)
        records = load.records
        failed = [r for r in records if r[1] != 200]
        assert not failed, failed[:5]
        steady = [r[3] for r in records if r[0] < steady_end]
        swaps = [r[3] for r in records if steady_end <= r[0] <= swaps_end]
        ratio = p99(swaps) / p99(steady)
        print(f"\nhot reload: {len(records)} requests, 0 failed; p99 steady {p99(steady) * 1e3:.2f} ms, "
              f"during 10 swaps {p99(swaps) * 1e3:.2f} ms ({ratio:.2f}x)")
        # p99 during the swaps against steady state is a benchmark figure (printed; README and the issue note carry
        # it), not an assertion: on a shared 2-core machine another process's build moves it far more than Ferry.
        assert {r[2] for r in load.since(swaps_end)} == {"11"}
        assert [row["version"] for row in index(server) if row["name"] == "iris"] == ["11"]
    finally:
        server.stop()


def test_broken_versions_never_take_traffic(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.1")
    try:
        good = iris_files()
        meta = json.loads(good["ferry.json"])
        bad_sum = dict(meta, model_sha256="0" * 64)
        failing_warmup = {
            "model.onnx": erroring_model(),
            "warmup/request.json": json.dumps(X_BODY),
        }
        cases = [
            (2, {"model.onnx": b"\x08\x07 not a model at all"}, "model"),
            (3, {"model.onnx": good["model.onnx"], "ferry.json": json.dumps(bad_sum)}, "checksum"),
            (4, failing_warmup, "warm-up request warmup/request.json failed"),
        ]
        url = server.url + "/v2/models/iris/infer"
        with Load(url, IRIS_BODY) as load:
            for version, files, reason in cases:
                publish(root, "iris", version, files)
                row = wait_for(lambda: (state_of(server, "iris", version) or {}).get("state") == "UNAVAILABLE"
                               and state_of(server, "iris", version), 30, what=f"version {version} refused")
                assert reason in row["reason"], row
                assert state_of(server, "iris", 1)["state"] == "READY"
            time.sleep(0.3)
        assert load.records and all(r[1] == 200 and r[2] == "1" for r in load.records), \
            [r for r in load.records if r[1] != 200 or r[2] != "1"][:5]
        # Fixing the files of a refused version lets it load and take over.
        shutil.rmtree(os.path.join(root, "iris", "4"))
        publish(root, "iris", 4, good)
        wait_for(lambda: (state_of(server, "iris", 4) or {}).get("state") == "READY", 30, what="fixed version 4")
        r = requests.post(url, json=IRIS_BODY, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == "4"
    finally:
        server.stop()


def metric(server, name, **labels):
    text = requests.get(server.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def write_plan(root, model, stable, candidate, steps, created_at):
    plan = {
        "candidate": candidate, "stable": stable, "steps": steps, "step_interval_secs": 0.5,
        "max_error_rate": 0.05, "max_p99_ratio": 50.0, "min_requests": 10, "state": "running",
        "created_at": created_at, "history": [],
    }
    with open(os.path.join(root, model, "rollout.json"), "w") as f:
        json.dump(plan, f)


def read_plan(root, model):
    with open(os.path.join(root, model, "rollout.json")) as f:
        return json.load(f)


def test_canary_rolls_back_an_erroring_candidate_and_promotes_an_equal_one(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "m", 1, {"model.onnx": sum_model()})
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.1")
    try:
        url = server.url + "/v2/models/m/infer"
        # The plan goes in first, so the new version never takes all the traffic when it appears.
        write_plan(root, "m", 1, 2, [20.0, 50.0, 100.0], 1000)
        publish(root, "m", 2, {"model.onnx": erroring_model()})
        with Load(url, X_BODY) as load:
            plan = wait_for(lambda: read_plan(root, "m")["state"] != "running" and read_plan(root, "m"), 60,
                            what="the erroring canary decided")
            assert plan["state"] == "rolled_back", plan
            assert any(e["event"] == "gate_failed" and "error rate" in e["reason"] for e in plan["history"]), plan
            after = time.time() + 0.3
            time.sleep(1.0)
            settled = load.since(after)
        assert settled and all(r[1] == 200 and r[2] == "1" for r in settled), settled[:5]
        # Some requests did reach the candidate (and failed): that is the canary's job.
        assert any(r[1] == 500 for r in load.records)
        assert metric(server, "ferry_rollout_state", model="m", version="2", state="rolled_back") == 1
        assert metric(server, "ferry_rollout_decisions_total", model="m", decision="rolled_back") == 1
        # The rolled-back candidate is unloaded.
        wait_for(lambda: state_of(server, "m", 2) is None, 30, what="the candidate unloaded")

        status = json.loads(subprocess.run(
            [ferry_binary(), "rollout", "status", "m", "--model-repository", root, "--json"],
            capture_output=True, text=True, check=True).stdout)
        assert status["state"] == "rolled_back" and status["candidate"] == 2, status

        # An equal candidate, rolled out with `ferry rollout start`, passes every step and is promoted.
        subprocess.run(
            [ferry_binary(), "rollout", "start", "m", "--model-repository", root, "--version", "3", "--stable", "1",
             "--steps", "20,50,100", "--step-interval", "500ms", "--max-error-rate", "5%", "--max-p99-ratio", "50",
             "--min-requests", "10"],
            capture_output=True, text=True, check=True)
        publish(root, "m", 3, {"model.onnx": sum_model()})
        with Load(url, X_BODY) as load:
            plan = wait_for(lambda: read_plan(root, "m")["state"] != "running" and read_plan(root, "m"), 60,
                            what="the equal canary decided")
            assert plan["state"] == "promoted", plan
            passed = [e for e in plan["history"] if e["event"] == "step_passed"]
            assert [e["weight"] for e in passed] == [20.0, 50.0, 100.0], plan["history"]
            after = time.time() + 0.3
            time.sleep(1.0)
            settled = load.since(after)
        assert all(r[1] == 200 for r in load.records), [r for r in load.records if r[1] != 200][:5]
        assert settled and all(r[2] == "3" for r in settled)
        assert metric(server, "ferry_rollout_state", model="m", version="3", state="promoted") == 1
        status = subprocess.run([ferry_binary(), "rollout", "status", "m", "--model-repository", root],
                                capture_output=True, text=True, check=True).stdout
        assert "promoted" in status, status
        assert metric(server, "ferry_rollout_candidate_weight_percent", model="m", version="3") == 100
    finally:
        server.stop()


def test_shadow_traffic_is_compared_and_never_returned(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "s", 1, {"model.onnx": sum_model(offset=1.0)})
    publish(root, "s", 2, {"model.onnx": sum_model()})
    with open(os.path.join(root, "s", "config.toml"), "w") as f:
        f.write("[shadow]\nversion = 1\n")
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.1")
    try:
        for _ in range(20):
            r = requests.post(server.url + "/v2/models/s/infer", json=X_BODY, timeout=10)
            assert r.status_code == 200
            out = r.json()
            assert out["model_version"] == "2" and out["outputs"][0]["data"] == [8.0]
        wait_for(lambda: (metric(server, "ferry_shadow_requests_total", model="s", version="1",
                                 outcome="compared") or 0) >= 20, 10, what="shadow comparisons")
        assert metric(server, "ferry_shadow_mean_absolute_difference", model="s", version="1", output="y") == 1.0
    finally:
        server.stop()


def test_management_api_with_tritonclient_in_explicit_mode(tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    publish(root, "m", 1, {"model.onnx": sum_model()})
    env = dict(os.environ, FERRY_ADMIN_TOKEN="s3cret")
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--model-control-mode", "explicit",
                         "--load-model", "iris", env=env)
    try:
        admin = httpclient.InferenceServerClient(server.admin[len("http://"):])
        auth = {"Authorization": "Bearer s3cret"}
        # Without the token, or with a wrong one, nothing is answered.
        assert requests.post(server.admin + "/v2/repository/index", timeout=10).status_code == 401
        assert requests.post(server.admin + "/v2/repository/index", timeout=10,
                             headers={"Authorization": "Bearer nope"}).status_code == 403
        with pytest.raises(InferenceServerException):
            admin.get_model_repository_index()
        rows = admin.get_model_repository_index(headers=auth)
        assert {r["name"]: r.get("state") for r in rows} == {"iris": "READY", "m": "UNAVAILABLE"}
        main = httpclient.InferenceServerClient(server.host)
        assert main.is_model_ready("iris") and not main.is_model_ready("m")
        admin.load_model("m", headers=auth)
        assert main.is_model_ready("m")
        admin.unload_model("iris", headers=auth)
        wait_for(lambda: not main.is_model_ready("iris"), 10, what="iris unloaded")
        with pytest.raises(InferenceServerException, match="no such model"):
            admin.load_model("nope", headers=auth)
        # A label set through the API serves TF Serving's /labels/ routes.
        r = requests.put(server.admin + "/v2/repository/models/m/labels/stable", json={"version": 1},
                         headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        r = requests.post(server.url + "/v1/models/m/labels/stable:predict",
                          json={"instances": [[1.0, 2.0, 3.0, 4.0]]}, timeout=10)
        assert r.status_code == 200 and r.json()["predictions"] == [10.0], r.text
        r = requests.put(server.admin + "/v2/repository/models/m/labels/next", json={"version": 9},
                         headers=auth, timeout=10)
        assert r.status_code == 400 and "not ready" in r.json()["error"]
    finally:
        server.stop()


def test_management_api_refuses_loads_in_poll_mode_and_needs_a_token_beyond_loopback(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "m", 1, {"model.onnx": sum_model()})
    server = start_ferry(root, str(tmp_path / "ferry.log"))
    try:
        assert server.admin.startswith("http://127.0.0.1:")
        r = requests.post(server.admin + "/v2/repository/models/m/load", timeout=10)
        assert r.status_code == 400 and "not allowed" in r.json()["error"]
        # Its other errors come from the same table as the inference ports': JSON bodies, 405 with `Allow`.
        r = requests.get(server.admin + "/v2/repository/models/m/load", timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"], r.text
        r = requests.get(server.admin + "/v2/nowhere", timeout=10)
        assert r.status_code == 404 and r.json() == {"error": "no such endpoint"}
        r = requests.get(server.admin + "/v2/repository/models/nope/rollout", timeout=10)
        assert r.status_code == 404 and r.json() == {"error": "model `nope` not found"}
    finally:
        server.stop()
    out = subprocess.run(
        [ferry_binary(), "serve", "--model-repository", root, "--host", "127.0.0.1", "--rest-port", "0",
         "--grpc-port", "0", "--admin-host", "0.0.0.0", "--admin-port", "0"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                         if k != "FERRY_ADMIN_TOKEN"},
    )
    assert out.returncode != 0 and "without a token" in out.stderr + out.stdout


@pytest.fixture
def s3():
    """A real S3-compatible server (moto in server mode) on a free loopback port, and a boto3 client for it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="models")
    yield client, env
    server.stop()


def test_s3_repository_serves_polls_and_checks_checksums(tmp_path, s3):
    client, aws = s3
    files = iris_files()
    for name, data in files.items():
        client.put_object(Bucket="models", Key=f"team/iris/1/{name}", Body=data)
    env = dict(os.environ, **aws)
    server = start_ferry("s3://models/team", str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.2",
                         "--cache-dir", str(tmp_path / "cache"), env=env)
    try:
        url = server.url + "/v2/models/iris/infer"
        r = requests.post(url, json=IRIS_BODY, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
        # A version whose bytes do not match its ferry.json never loads; the current one keeps serving.
        meta = dict(json.loads(files["ferry.json"]), model_sha256="f" * 64)
        client.put_object(Bucket="models", Key="team/iris/2/ferry.json", Body=json.dumps(meta).encode())
        client.put_object(Bucket="models", Key="team/iris/2/model.onnx", Body=files["model.onnx"])
        row = wait_for(lambda: (state_of(server, "iris", 2) or {}).get("state") == "UNAVAILABLE"
                       and state_of(server, "iris", 2), 30, what="the tampered version refused")
        assert "checksum" in row["reason"]
        assert requests.post(url, json=IRIS_BODY, timeout=10).json()["model_version"] == "1"
        # A good new version is fetched, loaded and swapped in by the same polling.
        for name, data in files.items():
            client.put_object(Bucket="models", Key=f"team/iris/3/{name}", Body=data)
        wait_for(lambda: requests.post(url, json=IRIS_BODY, timeout=10).json().get("model_version") == "3", 30,
                 what="version 3 from S3 serving")
        assert os.path.exists(tmp_path / "cache")
    finally:
        server.stop()


def test_a_config_change_that_cannot_load_keeps_the_versions_serving(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.1")
    try:
        url = server.url + "/v2/models/iris/infer"
        with Load(url, IRIS_BODY) as load:
            # Parses, but names an input the model does not have: reloading under it fails.
            with open(os.path.join(root, "iris", "config.toml"), "w") as f:
                f.write("[inputs.featurs]\nshape = [-1, 4]\n")
            wait_for(lambda: "under the new configuration" in open(server.log).read(), 30,
                     what="the failed reload logged")
            time.sleep(0.5)
        assert load.records and all(r[1] == 200 and r[2] == "1" for r in load.records), \
            [r for r in load.records if r[1] != 200][:5]
        assert state_of(server, "iris", 1)["state"] == "READY"
        # A good change then applies.
        with open(os.path.join(root, "iris", "config.toml"), "w") as f:
            f.write("[inputs.features]\nshape = [-1, 4]\n")
        wait_for(lambda: "reloading them" in open(server.log).read().split("under the new configuration", 1)[1], 30,
                 what="the good configuration applied")
        assert requests.post(url, json=IRIS_BODY, timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_newer_shadow_version_never_takes_unversioned_traffic(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "s", 1, {"model.onnx": sum_model()})
    publish(root, "s", 2, {"model.onnx": sum_model(offset=1.0)})
    with open(os.path.join(root, "s", "config.toml"), "w") as f:
        f.write("version_policy = { specific = [1] }\n[shadow]\nversion = 2\n")
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.1")
    try:
        for _ in range(10):
            out = requests.post(server.url + "/v2/models/s/infer", json=X_BODY, timeout=10).json()
            assert out["model_version"] == "1" and out["outputs"][0]["data"] == [8.0], out
        wait_for(lambda: (metric(server, "ferry_shadow_requests_total", model="s", version="2",
                                 outcome="compared") or 0) >= 10, 10, what="shadow comparisons")
        assert metric(server, "ferry_shadow_mean_absolute_difference", model="s", version="2", output="y") == 1.0
        # The shadow version still answers when named.
        out = requests.post(server.url + "/v2/models/s/versions/2/infer", json=X_BODY, timeout=10).json()
        assert out["outputs"][0]["data"] == [9.0]
    finally:
        server.stop()
