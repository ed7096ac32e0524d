#!/usr/bin/env python3
"""Ferry's side-by-side serving benchmark (issue 4, item 6). One command:

    python3 bench/serving/run.py            # set up (idempotent), measure every server, write RESULTS.md
    python3 bench/serving/run.py --tune     # try dynamic-batching settings for mlp_batched, write TUNING.md

Setup: builds Ferry and the ceiling example (cargo), fetches ONNX Runtime, makes one venv per Python peer under
.ferry/bench/venvs/ from the pinned requirements/*.txt (PyTriton's from Debian's /usr/bin/python3.11), and builds the
models (make_models.py). Then, on this machine, one server at a time: start it, poll until the first successful
inference (cold start), drive it with `ferry bench` (KServe v2 REST or gRPC) for models iris and mlp at batch 1 and
32 and concurrency 1, 8, 64, read VmRSS/VmHWM of its process tree, stop it. Ferry also gets the batching comparison
(mlp vs mlp_batched) and the overload run (concurrency 1000 against max_queue_size = 64).

Standard library only; any python3 runs it.
"""

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / ".ferry" / "bench"
VENVS = WORK / "venvs"
FERRY = ROOT / "target/release/ferry"
CEILING = ROOT / "target/release/examples/ceiling"
LOGS = WORK / "logs"

# venv name -> interpreter that makes it. PyTriton's venv must come from Debian's python3.11 (its tritonserver and
# python backend stub are built against it).
PYTHONS = {"tools": "python3", "fastapi": "python3", "mlserver": "python3", "pytriton": "/usr/bin/python3.11"}

PORT = 18800  # every server listens on PORT (REST) and PORT+1.. (gRPC, metrics)
ITERATIONS = [("iris", 1), ("iris", 32), ("mlp", 1), ("mlp", 32)]
LEVELS = [1, 8, 64]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    log("+", " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---------------------------------------------------------------------------------------------------- setup


def setup():
    sh(["cargo", "build", "--release", "-p", "ferry"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-p", "ferry-server", "--example", "ceiling"], cwd=ROOT)
    lib = subprocess.run([ROOT / "scripts/fetch-onnxruntime"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    for name, python in PYTHONS.items():
        venv = VENVS / name
        req = HERE / "requirements" / f"{name}.txt"
        stamp = venv / ".installed"
        if stamp.exists() and stamp.read_text() == req.read_text():
            continue
        if name == "pytriton" and not Path(python).exists():
            sh(["apt-get", "update"])
            sh(["apt-get", "install", "-y", "python3.11", "python3.11-venv"])
        shutil.rmtree(venv, ignore_errors=True)
        sh([python, "-m", "venv", venv])
        sh([venv / "bin/pip", "install", "--quiet", "-r", req])
        stamp.write_text(req.read_text())
    sh([VENVS / "tools/bin/python", HERE / "make_models.py", WORK])
    # MLServer's repository: server settings and one model-settings.json per model (adaptive batching is off by
    # default in MLServer, so it stays off).
    ml = WORK / "mlserver"
    for model, spec in [("iris", ("features", [-1, 4])), ("mlp", ("input", [-1, 64]))]:
        (ml / model).mkdir(parents=True, exist_ok=True)
        (ml / model / "model-settings.json").write_text(json.dumps({
            "name": model, "implementation": "onnx_runtime.OnnxModel",
            "parameters": {"uri": str(WORK / "models" / f"{model}.onnx"), "version": "1"},
            "inputs": [{"name": spec[0], "datatype": "FP32", "shape": spec[1]}]}, indent=1))
    (ml / "settings.json").write_text(json.dumps({"host": "127.0.0.1", "http_port": PORT, "grpc_port": PORT + 1,
                                                 "metrics_port": PORT + 2}))
    LOGS.mkdir(parents=True, exist_ok=True)
    return lib


def versions():
    def pip_version(venv, pkg):
        for line in (HERE / "requirements" / f"{venv}.txt").read_text().splitlines():
            if line.lower().startswith(pkg.lower() + "=="):
                return line.split("==")[1]
        return "?"

    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    ferry = subprocess.run([FERRY, "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    tritonserver = VENVS / "pytriton/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver"
    tv = "?"
    if tritonserver.exists():
        out = subprocess.run([tritonserver, "--version"], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).splitlines():
            if "server_version" in line:
                tv = line.split("|")[2].strip()
    return {
        "ferry": f"{ferry} (HEAD {commit} + working tree), {rustc}, ONNX Runtime 1.32.0",
        "triton": f"nvidia-pytriton {pip_version('pytriton', 'nvidia-pytriton')} (bundled tritonserver {tv}), "
                  f"onnxruntime {pip_version('pytriton', 'onnxruntime')}, numpy {pip_version('pytriton', 'numpy')}, "
                  f"Debian python {platform_python('/usr/bin/python3.11')}",
        "mlserver": f"mlserver {pip_version('mlserver', 'mlserver')}, uvloop {pip_version('mlserver', 'uvloop')}, "
                    f"onnxruntime {pip_version('mlserver', 'onnxruntime')}, python {platform_python(VENVS / 'mlserver/bin/python')}",
        "fastapi": f"fastapi {pip_version('fastapi', 'fastapi')}, uvicorn[standard] {pip_version('fastapi', 'uvicorn')} "
                   f"(uvloop {pip_version('fastapi', 'uvloop')}, httptools {pip_version('fastapi', 'httptools')}), "
                   f"pydantic {pip_version('fastapi', 'pydantic')}, onnxruntime {pip_version('fastapi', 'onnxruntime')}",
        "ceiling": "crates/server/examples/ceiling.rs (axum on tokio, the same stack as Ferry), same build",
    }


def platform_python(exe):
    return subprocess.run([str(exe), "-c", "import platform; print(platform.python_version())"], capture_output=True,
                          text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------------- servers


def servers(lib):
    m = WORK / "models"
    py_models = [f"iris={m / 'iris.onnx'}", f"mlp={m / 'mlp.onnx'}"]
    return {
        "ferry": dict(cmd=[FERRY, "serve", "--model-repository", WORK / "ferry", "--host", "127.0.0.1",
                           "--rest-port", PORT, "--grpc-port", PORT + 1, "--admin-port", 0, "--onnxruntime-lib", lib],
                      models=["iris", "mlp"]),
        "triton": dict(cmd=[VENVS / "pytriton/bin/python", HERE / "pytriton_server.py", PORT, PORT + 1, PORT + 2,
                            *py_models], models=["iris", "mlp"]),
        "mlserver": dict(cmd=[VENVS / "mlserver/bin/mlserver", "start", WORK / "mlserver"],
                         env={"PYTHONPATH": str(HERE / "mlserver")}, models=["iris", "mlp"]),
        "fastapi": dict(cmd=[VENVS / "fastapi/bin/python", HERE / "fastapi_server.py", PORT, *py_models],
                        models=["iris", "mlp"]),
        "ceiling": dict(cmd=[CEILING, PORT, "--input", "features:FP32:-1,4"], models=["iris"]),
        "plainloop": dict(cmd=[CEILING, PORT, "--mlp", m / "mlp.weights", "--input", "input:FP32:-1,64"],
                          models=["mlp"]),
    }


def request_body(model, rows=1):
    if model == "iris":
        data = [5.1, 3.5, 1.4, 0.2] * rows
        return {"inputs": [{"name": "features", "shape": [rows, 4], "datatype": "FP32", "data": data}]}
    data = [((i % 7) - 3) / 3 for i in range(64)] * rows
    return {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": data}]}


def infer(model, timeout=5.0, port=PORT):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                 data=json.dumps(request_body(model)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def probe_run(model, seconds, port=PORT, delay=0.0):
    """A side client, one request at a time on one kept-alive connection, timing every answer whatever its status
    (`ferry bench` times only the 200s): [(status, ms)], status -1 for a transport error."""
    time.sleep(delay)
    body = json.dumps(request_body(model)).encode()
    conn, out = None, []
    end = time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            status = r.status
        except (OSError, http.client.HTTPException):
            status, conn = -1, None
        out.append((status, (time.perf_counter() - t) * 1000))
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))] if xs else None


def probe_stats(probes):
    """A probe's answers by status: {status: {"n", "p50", "p99", "max"}} (ms); what results.json keeps of them."""
    out = {}
    for status in sorted({st for st, _ in probes}):
        ms = [m for st, m in probes if st == status]
        out[status] = {"n": len(ms), "p50": pct(ms, .5), "p99": pct(ms, .99), "max": max(ms)}
    return out


def stat(stats, status, key):
    """One figure of `probe_stats` (None when the probe got no answer with that status; n is 0 then)."""
    return (stats or {}).get(status, {}).get(key, 0 if key == "n" else None)


def overload_run(s, model, args, port=PORT):
    """Concurrency 1000 with `ferry bench` for args.duration (after args.warmup), a side probe meanwhile and the
    server's resident memory sampled every 20 ms: (bench result, probes, peak RSS MiB)."""
    stop = threading.Event()
    peak = {"rss_mib": s.memory()["rss_mib"]}
    probes = []

    def sample():
        while not stop.is_set():
            peak["rss_mib"] = max(peak["rss_mib"], s.memory()["rss_mib"])
            time.sleep(0.02)

    def probe():
        probes.extend(probe_run(model, max(args.duration - 1, 1), port=port, delay=args.warmup + 0.5))

    threads = [threading.Thread(target=sample), threading.Thread(target=probe)]
    for t in threads:
        t.start()
    try:
        result = bench_once(model, 1, [1000], args.duration, args.warmup, server=s, port=port)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return result, probes, peak["rss_mib"]


class Server:
    def __init__(self, name, spec, port=PORT):
        self.name, self.spec, self.port = name, spec, port
        self.proc = None

    def start(self):
        self.log_path = LOGS / f"{self.name}.log"
        env = dict(os.environ, **self.spec.get("env", {}))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(c) for c in self.spec["cmd"]], env=env, start_new_session=True,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        # Cold start: process start to the first successful inference of every model it serves (some servers load
        # their models one after the other), polling every 5 ms.
        pending = list(self.spec["models"])
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = infer(pending[0], timeout=2, port=self.port)
                if status == 200:
                    pending.pop(0)
                    if not pending:
                        self.cold_start = time.perf_counter() - self.t0
                        return
                    continue
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} did not answer an inference within 180 s; see {self.log_path}")

    def pids(self):
        """The server process and all its descendants."""
        children = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [self.proc.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def memory(self):
        """VmRSS and VmHWM (MiB) summed over the process tree, and the process count."""
        rss = hwm = 0
        pids = self.pids()
        for p in pids:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
            except OSError:
                pass
        return {"rss_mib": rss / 1024, "hwm_mib": hwm / 1024, "processes": len(pids)}

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Leftover children (PyTriton's tritonserver and stubs, MLServer's workers) share the process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


CLK = os.sysconf("SC_CLK_TCK")


def cpu_busy():
    """Busy jiffies of the whole machine (all but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - f[4]


def tree_cpu(pids):
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_for_quiet(limit=0.3, max_wait=60):
    """Waits (at most max_wait s) until the machine's other work uses less than `limit` cores over 2 s."""
    start = time.time()
    while True:
        b0 = cpu_busy()
        time.sleep(2)
        load = (cpu_busy() - b0) / CLK / 2
        if load < limit or time.time() - start > max_wait:
            log(f"   other load {load:.2f} cores after waiting {time.time() - start:.0f} s")
            return load


RETRY = {"budget_s": 300.0, "limit": 0.25}  # re-measure a point taken under other load, within this time budget


def bench(model, batch, levels, duration, warmup, protocol="rest", binary=False, server=None, port=PORT):
    """`bench_once`, again (after waiting for a quiet machine) while other work took more than RETRY["limit"] cores,
    as long as the retry budget lasts; keeps the measurement taken under the least other load."""
    best = bench_once(model, batch, levels, duration, warmup, protocol, binary, server, port)
    attempts = 1
    while best["foreign_cores"] > RETRY["limit"] and RETRY["budget_s"] > 0 and attempts < 4:
        t = time.time()
        wait_for_quiet(RETRY["limit"], max_wait=60)
        again = bench_once(model, batch, levels, duration, warmup, protocol, binary, server, port)
        attempts += 1
        RETRY["budget_s"] -= time.time() - t
        if again["foreign_cores"] < best["foreign_cores"]:
            best = again
    best["attempts"] = attempts
    return best


def bench_once(model, batch, levels, duration, warmup, protocol="rest", binary=False, server=None, port=PORT):
    url = f"127.0.0.1:{port + 1}" if protocol == "grpc" else f"http://127.0.0.1:{port}"
    cmd = [FERRY, "bench", "--model", model, "--url", url, "--protocol", protocol, "--batch", batch,
           "--concurrency", ",".join(map(str, levels)), "--duration", f"{duration}s", "--warmup", f"{warmup}s",
           "--json"]
    if binary:
        cmd.append("--binary")
    log("+", " ".join(map(str, cmd)))
    # CPU used meanwhile by anything but this server, the load generator and this script: the other work on the
    # machine, reported beside the figures (in cores).
    pids = server.pids() if server else []
    t0, b0, s0, c0 = time.time(), cpu_busy(), tree_cpu(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
    m0 = resource.getrusage(resource.RUSAGE_SELF)
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    c1, m1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    ours = (tree_cpu(pids) - s0) / CLK + (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) + (
        m1.ru_utime + m1.ru_stime - m0.ru_utime - m0.ru_stime)
    foreign = max(0.0, ((cpu_busy() - b0) / CLK - ours) / (time.time() - t0))
    if out.returncode != 0:
        log(out.stderr.strip())
        return {"error": out.stderr.strip()[-300:], "foreign_cores": foreign}
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    result = {int(r["level"]): r for r in rows}
    result["foreign_cores"] = foreign
    log(f"   {[(c, round(r['requests_per_second']), round(r['p99_ms'], 2)) for c, r in result.items() if c != 'foreign_cores']}"
        f" other load {foreign:.2f} cores")
    return result


# ---------------------------------------------------------------------------------------------------- runs

# (table row name, server, protocol, binary)
MODES = {
    "ferry": [("Ferry REST JSON", "rest", False), ("Ferry REST binary", "rest", True), ("Ferry gRPC", "grpc", False)],
    "triton": [("Triton (PyTriton) REST", "rest", False)],
    "mlserver": [("MLServer REST", "rest", False)],
    "fastapi": [("FastAPI+onnxruntime REST", "rest", False)],
    "ceiling": [("bare axum ceiling REST", "rest", False)],
    "plainloop": [("plain-loop Rust MLP REST", "rest", False)],
}


def check_outputs(name, models):
    """The mlp's answer to the reference input, checked against numpy's (make_models.py)."""
    if "mlp" not in models:
        return None
    ref = [float(v) for v in (WORK / "models/mlp.reference.txt").read_text().split()]
    _, body = infer("mlp")
    got = next(o for o in body["outputs"] if o["name"] == "logits")["data"]
    got = [v for row in got for v in row] if got and isinstance(got[0], list) else got
    return max(abs(a - b) for a, b in zip(ref, got))


def run_server(name, spec, args, results):
    s = Server(name, spec)
    entry = results["servers"].setdefault(name, {})
    entry["other_load_before_start"] = wait_for_quiet()
    try:
        s.start()
    except Exception as e:  # noqa: BLE001 -- a peer that cannot run is reported, the rest goes on
        log(f"!! {name}: {e}")
        entry["failed"] = str(e)
        tail = s.log_path.read_text()[-2000:] if s.log_path.exists() else ""
        entry["log_tail"] = tail
        s.stop()
        return
    entry["cold_start_s"] = s.cold_start
    entry["memory_after_start"] = s.memory()
    try:  # KServe v2 server metadata (name, version) where the server has it
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v2", timeout=5) as r:
            entry["server_metadata"] = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        pass
    try:
        try:
            entry["mlp_max_abs_diff"] = check_outputs(name, spec["models"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, StopIteration) as e:
            entry["mlp_check_failed"] = repr(e)
        for label, protocol, binary in MODES[name]:
            for model, batch in ITERATIONS:
                if model not in spec["models"]:
                    continue
                r = bench(model, batch, LEVELS, args.duration, args.warmup, protocol, binary, server=s)
                results["grid"].setdefault(label, {})[f"{model}/{batch}"] = r
        if name == "ferry":
            ferry_batching(s, args, results)
        entry["memory_after_runs"] = s.memory()
        entry["alive_after_runs"] = s.proc.poll() is None
        if name == "ferry":
            ferry_overload(s, args, results)
            entry["memory_after_overload"] = s.memory()
    finally:
        s.stop()


def ceiling_rounds(lib, args, results, rounds=5):
    """Ferry and the bare-axum ceiling running at once, iris batch 1 at concurrency 64 measured in alternating rounds:
    a single point on a shared 2-core machine scatters by ±20%, so the median of the per-round ratios is the figure
    to quote."""
    specs = servers(lib)

    def moved(name, port):  # the server's spec on ports port, port + 1 instead of PORT, PORT + 1
        cmd = [{PORT: port, PORT + 1: port + 1}.get(c, c) for c in specs[name]["cmd"]]
        return Server(name, dict(specs[name], cmd=cmd), port)

    pair = [("ferry", moved("ferry", PORT + 10)), ("ceiling", moved("ceiling", PORT + 20))]
    out = {"ferry": [], "ceiling": [], "other_load": []}
    try:
        for _, srv in pair:
            srv.start()
        for _ in range(rounds):
            for name, srv in pair:
                r = bench_once("iris", 1, [64], args.duration, args.warmup, server=srv, port=srv.port)
                if 64 in r:
                    out[name].append({"requests_per_second": r[64]["requests_per_second"], "p99_ms": r[64]["p99_ms"]})
                out["other_load"].append(r["foreign_cores"])
    finally:
        for _, srv in pair:
            srv.stop()
    ratios = [f["requests_per_second"] / c["requests_per_second"] for f, c in zip(out["ferry"], out["ceiling"])]
    out["ratios"] = ratios
    out["median_ratio"] = statistics.median(ratios) if ratios else None
    results["ceiling_rounds"] = out


def ferry_batching(s, args, results):
    # Dynamic batching on vs off for the MLP at batch 1, concurrency 64: alternate, two rounds each.
    rounds = {"mlp": [], "mlp_batched": []}
    for _ in range(2):
        for model in rounds:
            r = bench(model, 1, [64], args.duration, args.warmup, server=s)
            if 64 in r:
                rounds[model].append(dict(r[64], foreign_cores=r["foreign_cores"]))
    results["batching"] = rounds


def histogram(name, model):
    """One histogram of the server's /metrics for one model: {upper bound: cumulative count}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and f'model="{model}"' in line:
            le = line.split('le="')[1].split('"')[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def quantile_bound(before, after, q):
    """The upper bound (seconds) of the bucket holding quantile q of what was recorded between two scrapes."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    for le, c in zip(les, counts):
        if c >= q * counts[-1]:
            return le
    return None


def server_side(model, run):
    """Runs `run()` and returns the p99 bucket bounds (ms) of queue and engine time of the requests it got answered:
    the server's own latency of accepted requests, without the time they waited to be read."""
    names = ["ferry_queue_duration_seconds", "ferry_compute_duration_seconds"]
    before = {n: histogram(n, model) for n in names}
    result = run()
    out = {}
    for n in names:
        b = quantile_bound(before[n], histogram(n, model), 0.99)
        out[n.split("_")[1]] = None if b is None else b * 1000
    return result, out


def ferry_overload(s, args, results):
    # Overload: concurrency 1000 against mlp_overload (dynamic batching, max_queue_size = 64).
    unloaded, unloaded_server = server_side(
        "mlp_overload", lambda: bench("mlp_overload", 1, [1], args.duration, args.warmup, server=s))
    unloaded.update({k: v for k, v in bench("mlp_overload", 1, [64], args.duration, args.warmup, server=s).items()
                     if k == 64})
    # The side probe alone, for the unloaded latency of the very client that probes during the overload.
    probes_unloaded = probe_run("mlp_overload", max(args.duration - 1, 1))
    steady = s.memory()
    (overload, probes, peak), overload_server = server_side(
        "mlp_overload", lambda: overload_run(s, "mlp_overload", args))
    time.sleep(1)
    after = s.memory()
    try:
        ready = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v2/health/ready", timeout=5).status == 200
    except (urllib.error.URLError, OSError):
        ready = False
    results["overload"] = {
        "unloaded": unloaded, "overload": overload, "rss_steady": steady, "rss_peak_during_mib": peak,
        "rss_after": after, "alive": s.proc.poll() is None, "ready_after": ready, "probes": probe_stats(probes),
        "probes_unloaded": probe_stats(probes_unloaded),
        "server_unloaded_p99_ms": unloaded_server, "server_overload_p99_ms": overload_server,
    }


def bounds(lib, args, results, rounds=3):
    """What any server could reach on this machine, measured against the bare-axum ceiling given the MLP's input
    (it parses the same JSON and answers a constant: an engine that costs nothing).

    Batching: Ferry's mlp (off) and mlp_batched (on) and the ceiling, alternated; ceiling ÷ off bounds what any
    batching could gain here. Overload: the same concurrency-1000 run and side probe against the ceiling, whose
    probe p99 ÷ its unloaded probe p99 is what a server with no queue and no engine keeps."""
    specs = servers(lib)
    cmd = [{PORT: PORT + 10, PORT + 1: PORT + 11}.get(c, c) for c in specs["ferry"]["cmd"]]
    ferry = Server("ferry-bounds", dict(specs["ferry"], cmd=cmd), PORT + 10)
    ceiling = Server("ceiling-mlp", dict(cmd=[CEILING, PORT + 30, "--input", "input:FP32:-1,64"], models=["mlp"]),
                     PORT + 30)
    out = {"mlp": [], "mlp_batched": [], "ceiling": [], "other_load": []}
    try:
        ferry.start()
        ceiling.start()
        for _ in range(rounds):
            for key, srv, model in [("mlp", ferry, "mlp"), ("mlp_batched", ferry, "mlp_batched"),
                                    ("ceiling", ceiling, "mlp")]:
                r = bench_once(model, 1, [64], args.duration, args.warmup, server=srv, port=srv.port)
                if 64 in r:
                    out[key].append({"requests_per_second": r[64]["requests_per_second"], "p99_ms": r[64]["p99_ms"]})
                out["other_load"].append(r["foreign_cores"])
        ferry.stop()
        time.sleep(1)
        out["ceiling_probes_unloaded"] = probe_stats(probe_run("mlp", max(args.duration - 1, 1), port=ceiling.port))
        overload, probes, _ = overload_run(ceiling, "mlp", args, port=ceiling.port)
        out["ceiling_overload"] = overload
        out["ceiling_probes"] = probe_stats(probes)
    finally:
        ferry.stop()
        ceiling.stop()
    results["bounds"] = out


def tune(args, lib):
    """Tries dynamic-batching settings for mlp_batched at batch 1, concurrency 64; writes TUNING.md."""
    candidates = [
        "max_batch_size = 32\nmax_queue_delay_us = 500\npreferred_batch_sizes = [16, 32]\ninstances = 2\nintra_op_threads = 1\n",
        "max_batch_size = 32\nmax_queue_delay_us = 500\ninstances = 1\nintra_op_threads = 1\n",
        "max_batch_size = 32\nmax_queue_delay_us = 200\ninstances = 2\nintra_op_threads = 1\n",
        "max_batch_size = 32\nmax_queue_delay_us = 1000\ninstances = 2\nintra_op_threads = 1\n",
        "max_batch_size = 64\nmax_queue_delay_us = 2000\ninstances = 1\nintra_op_threads = 1\n",
        "max_batch_size = 16\nmax_queue_delay_us = 100\ninstances = 2\nintra_op_threads = 1\n",
    ]
    rows = []
    for config in candidates:
        sh([VENVS / "tools/bin/python", HERE / "make_models.py", WORK, "--batched-config", config])
        s = Server("ferry", servers(lib)["ferry"])
        wait_for_quiet()
        s.start()
        try:
            off = bench("mlp", 1, [64], args.duration, args.warmup, server=s)
            on = bench("mlp_batched", 1, [64], args.duration, args.warmup, server=s)
            off = dict(off.get(64, {}), foreign_cores=off["foreign_cores"])
            on = dict(on.get(64, {}), foreign_cores=on["foreign_cores"])
        finally:
            s.stop()
        rows.append((config, off, on))
    sh([VENVS / "tools/bin/python", HERE / "make_models.py", WORK])
    md = ["# Dynamic batching settings tried for mlp_batched (batch 1, concurrency 64)", "",
          f"Each with a fresh `ferry serve`, {args.warmup}s warm-up + {args.duration}s; `mlp` (batching off, "
          "instances = 2) measured in the same process just before.", "",
          "| config.toml | off req/s | off p99 ms | on req/s | on p99 ms | on ÷ off | other load (cores) off / on |",
          "|---|---|---|---|---|---|---|"]
    for config, off, on in rows:
        ratio = on.get("requests_per_second", 0) / max(off.get("requests_per_second", 1), 1e-9)
        md.append(f"| `{config.strip().replace(chr(10), '; ')}` | {off.get('requests_per_second', 0):.0f} | "
                  f"{off.get('p99_ms', 0):.2f} | {on.get('requests_per_second', 0):.0f} | {on.get('p99_ms', 0):.2f} | "
                  f"{ratio:.2f} | {off['foreign_cores']:.2f} / {on['foreign_cores']:.2f} |")
    (HERE / "TUNING.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


# ---------------------------------------------------------------------------------------------------- report


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def report(results):
    g = results["grid"]
    ferry = g.get("Ferry REST JSON", {})
    lines = ["# Ferry serving benchmark, side by side", "",
             f"Generated by `python3 bench/serving/run.py` on {results['date']}.", "",
             "## Machine", "", f"- {results['machine']}", "- Everything on this one machine: one server at a time, "
             "the load generator (`ferry bench`, closed loop, one connection per concurrent client) on the same 2 "
             "cores.", f"- Each point: {results['warmup']} s warm-up, then {results['duration']} s measured.", "",
             "## Peers", ""]
    for k, v in results["versions"].items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Throughput and latency", "",
              "req/s = successful requests per second; p50/p99 in ms; ×F = Ferry REST JSON req/s ÷ this row's req/s "
              "at the same model, batch and concurrency (above 1: Ferry is faster). errors = non-200 or transport "
              "errors. other load = CPU (in cores, of 2) that the rest of the machine used meanwhile: anything but this "
              "server, the load generator and run.py (other people's builds and tests on a shared machine); figures "
              "taken while it is well above 0 understate the servers.", ""]
    for model, batch in ITERATIONS:
        key = f"{model}/{batch}"
        lines += [f"### {model}, batch {batch}", "",
                  "| server | " + " | ".join(f"c={c} req/s | p50 | p99 | ×F" for c in LEVELS) + " | errors | other load |",
                  "|---|" + "---|---|---|---|" * len(LEVELS) + "---|---|"]
        for label, per in g.items():
            r = per.get(key)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {label} | failed: {r['error'][:120]} |")
                continue
            cells, errors = [], 0
            for c in LEVELS:
                x = r.get(c)
                if not x:
                    cells.append("— | — | — | —")
                    continue
                errors += x["errors"]
                f = ferry.get(key, {}).get(c)
                ratio = f["requests_per_second"] / x["requests_per_second"] if f and x["requests_per_second"] else None
                cells.append(f"{fmt(x['requests_per_second'])} | {fmt(x['p50_ms'], 2)} | {fmt(x['p99_ms'], 2)} | "
                             f"{fmt(ratio, 2)}")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {errors} | {r.get('foreign_cores', 0):.2f} |")
        lines.append("")

    # Servers that failed to start.
    for name, e in results["servers"].items():
        if "failed" in e:
            lines += [f"**{name} did not run**: {e['failed']}", "", "```", e.get("log_tail", "")[-1500:], "```", ""]

    lines += ["## Cold start and memory", "",
              "Cold start: process start to the first successful inference (polled every 5 ms with a real request). "
              "Memory: VmRSS / VmHWM from /proc/PID/status summed over the server's process tree (Python peers run "
              "several processes), right after start and after all its runs.", "",
              "| server | cold start s | RSS after start MiB | RSS after runs MiB | HWM after runs MiB | processes | "
              "mlp max abs diff vs numpy | other load at start |", "|---|---|---|---|---|---|---|---|"]
    for name, e in results["servers"].items():
        if "failed" in e:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        a, b = e.get("memory_after_start", {}), e.get("memory_after_runs", {})
        diff = e.get("mlp_max_abs_diff")
        lines.append(f"| {name} | {fmt(e.get('cold_start_s'), 3)} | {fmt(a.get('rss_mib'), 1)} | "
                     f"{fmt(b.get('rss_mib'), 1)} | {fmt(b.get('hwm_mib'), 1)} | {b.get('processes', '—')} | "
                     f"{'—' if diff is None else f'{diff:.1e}'} | {e.get('other_load_before_start', 0):.2f} |")
    lines.append("")

    b = results.get("batching")
    if b:
        lines += ["## Dynamic batching, mlp, batch 1, concurrency 64 (REST JSON, alternated, 2 rounds each)", "",
                  "| model | req/s per round | p99 ms per round | mean req/s | mean p99 | other load per round |",
                  "|---|---|---|---|---|---|"]
        for model, rs in b.items():
            if rs:
                lines.append(f"| {model} | {' / '.join(fmt(r['requests_per_second']) for r in rs)} | "
                             f"{' / '.join(fmt(r['p99_ms'], 2) for r in rs)} | "
                             f"{fmt(statistics.mean(r['requests_per_second'] for r in rs))} | "
                             f"{fmt(statistics.mean(r['p99_ms'] for r in rs), 2)} | "
                             f"{' / '.join(fmt(r['foreign_cores'], 2) for r in rs)} |")
        lines.append("")
        lines.append("mlp_batched's config.toml: `" + (WORK / "ferry/mlp_batched/config.toml").read_text().strip()
                     .replace("\n", "; ") + "`; mlp: `" + (WORK / "ferry/mlp/config.toml").read_text().strip()
                     .replace("\n", "; ") + "`. Settings tried: TUNING.md.")
        lines.append("")

    cr = results.get("ceiling_rounds")
    if cr and cr.get("ratios"):
        lines += ["## Ferry against the ceiling, alternating rounds (iris, REST JSON, batch 1, concurrency 64)", "",
                  "Both servers running at once, measured one after the other in each round (1 s warm-up, "
                  f"{results['duration']:g} s each); the per-round ratio compares two points taken seconds apart.", "",
                  "| round | Ferry req/s | p99 ms | ceiling req/s | p99 ms | Ferry ÷ ceiling |", "|---|---|---|---|---|---|"]
        for i, (f, c, r) in enumerate(zip(cr["ferry"], cr["ceiling"], cr["ratios"]), 1):
            lines.append(f"| {i} | {fmt(f['requests_per_second'])} | {fmt(f['p99_ms'], 2)} | "
                         f"{fmt(c['requests_per_second'])} | {fmt(c['p99_ms'], 2)} | {r:.2f} |")
        lines += ["", f"Median ratio {cr['median_ratio']:.2f} (range {min(cr['ratios']):.2f}–{max(cr['ratios']):.2f}); "
                  f"other load at most {max(cr['other_load']):.2f} cores.", ""]

    o = results.get("overload")
    if o:
        ov = o["overload"].get(1000, {})
        un = o["unloaded"]
        probes, pu = o["probes"], o.get("probes_unloaded")
        other = sum(v["n"] for st, v in probes.items() if st not in (200, 429))
        answers_per_s = ov.get("requests_per_second", 0) + ov.get("errors", 0) / results["duration"]
        lines += ["## Overload: mlp_overload (max_queue_size = 64, dynamic batching), batch 1, concurrency 1000", "",
                  f"- Unloaded (same model): c=1 {fmt(un.get(1, {}).get('requests_per_second'))} req/s, p99 "
                  f"{fmt(un.get(1, {}).get('p99_ms'), 2)} ms; c=64 {fmt(un.get(64, {}).get('requests_per_second'))} "
                  f"req/s, p99 {fmt(un.get(64, {}).get('p99_ms'), 2)} ms.",
                  f"- Concurrency 1000 (`ferry bench`): {fmt(ov.get('ok'))} answered 200 "
                  f"({fmt(ov.get('requests_per_second'))} req/s), p50 {fmt(ov.get('p50_ms'), 2)} ms, p99 of the 200s "
                  f"{fmt(ov.get('p99_ms'), 2)} ms; {fmt(ov.get('errors'))} non-200 (429 from the full queue; "
                  "`ferry bench` counts them as errors and does not time them).",
                  f"- Side probe (one request at a time on one kept-alive connection, every answer timed): alone "
                  f"before the overload, {stat(pu, 200, 'n')} × 200 (p50 {fmt(stat(pu, 200, 'p50'), 2)} ms, p99 "
                  f"{fmt(stat(pu, 200, 'p99'), 2)} ms); "
                  f"during the overload, {stat(probes, 429, 'n')} × 429 (latency p50 "
                  f"{fmt(stat(probes, 429, 'p50'), 2)} ms, p99 {fmt(stat(probes, 429, 'p99'), 2)} ms, max "
                  f"{fmt(stat(probes, 429, 'max'), 2)} ms), {stat(probes, 200, 'n')} × 200 (p50 "
                  f"{fmt(stat(probes, 200, 'p50'), 2)} ms, p99 {fmt(stat(probes, 200, 'p99'), 2)} ms), {other} other.",
                  "- Server side, from the /metrics histograms (p99 as the bound of its bucket): time in the queue "
                  f"≤ {fmt(o['server_overload_p99_ms']['queue'], 2)} ms and in the engine ≤ "
                  f"{fmt(o['server_overload_p99_ms']['compute'], 2)} ms during the overload, against ≤ "
                  f"{fmt(o['server_unloaded_p99_ms']['queue'], 2)} ms and ≤ "
                  f"{fmt(o['server_unloaded_p99_ms']['compute'], 2)} ms unloaded (c=1; a lone request waits out "
                  "max_queue_delay_us in the queue).",
                  "- Client side, every request, accepted or not, waits its turn to be read: with 1,000 clients "
                  "always sending, the mean latency is 1,000 ÷ the answers per second (Little's law), whatever the "
                  f"server does; here 1,000 ÷ {fmt(answers_per_s)} answers/s = {fmt(1000 / answers_per_s * 1000 if answers_per_s else None, 1)} ms.",
                  f"- Resident memory: steady {fmt(o['rss_steady']['rss_mib'], 1)} MiB before, peak "
                  f"{fmt(o['rss_peak_during_mib'], 1)} MiB during (sampled every 20 ms), "
                  f"{fmt(o['rss_after']['rss_mib'], 1)} MiB after; VmHWM {fmt(o['rss_after']['hwm_mib'], 1)} MiB. "
                  f"Process alive: {o['alive']}; ready after: {o['ready_after']}.", ""]

    bd = results.get("bounds")
    if bd and bd.get("mlp") and bd.get("ceiling"):
        mean = lambda k: statistics.mean(r["requests_per_second"] for r in bd[k]) if bd.get(k) else None
        off, on, ceil = mean("mlp"), mean("mlp_batched"), mean("ceiling")
        lines += ["## What any server could reach here: the ceiling given the MLP's input", "",
                  "The bare-axum ceiling parses the MLP's request (64 floats) and answers a constant: an engine that "
                  "costs nothing, behind the same HTTP stack, on the same 2 cores as the load generator.", "",
                  f"Batching (batch 1, concurrency 64, {len(bd['mlp'])} alternating rounds, req/s):", "",
                  "| round | Ferry mlp, batching off | Ferry mlp_batched, on | ceiling, no engine | on ÷ off | "
                  "ceiling ÷ off |", "|---|---|---|---|---|---|"]
        for i, (a, b_, c) in enumerate(zip(bd["mlp"], bd["mlp_batched"], bd["ceiling"]), 1):
            lines.append(f"| {i} | {fmt(a['requests_per_second'])} | {fmt(b_['requests_per_second'])} | "
                         f"{fmt(c['requests_per_second'])} | {b_['requests_per_second'] / a['requests_per_second']:.2f} "
                         f"| {c['requests_per_second'] / a['requests_per_second']:.2f} |")
        lines += ["", f"Means: off {fmt(off)}, on {fmt(on)}, ceiling {fmt(ceil)} req/s. Batching removes engine work "
                  "and nothing else, so no batching can lift the unbatched server above the ceiling: "
                  f"{ceil / off:.2f}× is the most any batching could give on this machine, against the "
                  f"{on / off:.2f}× Ferry's gives. Other load at most {max(bd['other_load']):.2f} cores.", ""]
        cu = stat(bd.get("ceiling_probes_unloaded"), 200, "p99")
        co = stat(bd.get("ceiling_probes"), 200, "p99")
        cov = bd.get("ceiling_overload", {}).get(1000, {})
        if cu and co:
            lines += [f"Overload, the same run against the ceiling (concurrency 1000 with `ferry bench`, the same side "
                      f"probe): {fmt(cov.get('requests_per_second'))} req/s, `ferry bench` p99 "
                      f"{fmt(cov.get('p99_ms'), 2)} ms; side probe alone p99 {cu:.2f} ms, during the "
                      f"overload p99 {co:.2f} ms ({co / cu:.1f}×). "
                      + ("A server with no queue and no engine does not keep its p99 within 2× here either: the 1,000 "
                         "clients, the load generator and the server share 2 cores." if co > 2 * cu
                         else "A server with no queue and no engine keeps its p99 within 2× in this run."), ""]

    lines += done_when(results)
    return "\n".join(lines) + "\n"


def done_when(results):
    g = results["grid"]

    def point(label, key, c):
        r = g.get(label, {}).get(key, {})
        return r.get(c) if isinstance(r, dict) else None

    out = ["## Issue 4 \"Done when\" ratios", "", "| check | measured | target | met |", "|---|---|---|---|"]

    def row(check, measured, target, ok):
        out.append(f"| {check} | {measured} | {target} | {'—' if ok is None else ('yes' if ok else 'no')} |")

    for model in ["iris", "mlp"]:
        f = point("Ferry REST JSON", f"{model}/1", 64)
        for label, target in [("bare axum ceiling REST", 0.8), ("Triton (PyTriton) REST", 10),
                              ("MLServer REST", 50), ("FastAPI+onnxruntime REST", None)]:
            if model != "iris":  # the issue sets these targets on a small model; the MLP's are for reference
                target = None
            p = point(label, f"{model}/1", 64)
            if not f or not p:
                continue
            ratio = f["requests_per_second"] / p["requests_per_second"] if p["requests_per_second"] else None
            p99 = f"; p99 {f['p99_ms']:.2f} vs {p['p99_ms']:.2f} ms"
            ok = None if target is None or ratio is None else ratio >= target and (
                label.startswith("bare") or f["p99_ms"] < p["p99_ms"])
            row(f"{model} REST batch 1 c=64: Ferry ÷ {label}", f"{fmt(ratio, 2)}×{p99}",
                "—" if target is None else (f"≥ {target}×" + ("" if label.startswith("bare") else ", lower p99")), ok)
    cr = results.get("ceiling_rounds")
    if cr and cr.get("median_ratio"):
        m = cr["median_ratio"]
        row(f"iris REST batch 1 c=64: Ferry ÷ bare axum ceiling, median of {len(cr['ratios'])} alternating rounds",
            f"{m:.2f}× (range {min(cr['ratios']):.2f}–{max(cr['ratios']):.2f})", "≥ 0.8×", m >= 0.8)
    b = results.get("batching")
    if b and b["mlp"] and b["mlp_batched"]:
        off = statistics.mean(r["requests_per_second"] for r in b["mlp"])
        on = statistics.mean(r["requests_per_second"] for r in b["mlp_batched"])
        p_off = statistics.mean(r["p99_ms"] for r in b["mlp"])
        p_on = statistics.mean(r["p99_ms"] for r in b["mlp_batched"])
        row("mlp batch 1 c=64: batching on ÷ off", f"{on / off:.2f}× (p99 {p_on:.2f} vs {p_off:.2f} ms)",
            "≥ 2×, p99 no higher", on / off >= 2 and p_on <= p_off)
    bd = results.get("bounds")
    if bd and bd.get("mlp") and bd.get("mlp_batched") and bd.get("ceiling"):
        mean = lambda k: statistics.mean(r["requests_per_second"] for r in bd[k])
        row("mlp batch 1 c=64, alternating rounds: batching on ÷ off; the ceiling (no engine) ÷ off, the most any "
            "batching could give here", f"{mean('mlp_batched') / mean('mlp'):.2f}×; {mean('ceiling') / mean('mlp'):.2f}×",
            "≥ 2×", mean("mlp_batched") >= 2 * mean("mlp"))
    for c in LEVELS:
        f = point("Ferry REST JSON", "mlp/32", c)
        p = point("plain-loop Rust MLP REST", "mlp/32", c)
        if f and p:
            r = f["requests_per_second"] / p["requests_per_second"]
            row(f"mlp batch 32 c={c}: Ferry ÷ plain-loop Rust MLP", f"{r:.2f}×", "> 1×", r > 1)
    e = results["servers"].get("ferry", {})
    if "cold_start_s" in e:
        row("Ferry cold start", f"{e['cold_start_s']:.3f} s", "< 0.5 s", e["cold_start_s"] < 0.5)
        a, m = e.get("memory_after_start", {}), e.get("memory_after_runs", {})
        row("Ferry resident memory, 4 models loaded (after start; after the whole grid, before the overload run)",
            f"VmRSS {a.get('rss_mib', 0):.1f} MiB; VmRSS {m.get('rss_mib', 0):.1f} MiB, VmHWM "
            f"{m.get('hwm_mib', 0):.1f} MiB", "< 64 MB (61.0 MiB)", m.get("hwm_mib", 1e9) * 1.048576 < 64)
        o = e.get("memory_after_overload")
        if o:
            row("Ferry resident memory after the overload run", f"VmRSS {o['rss_mib']:.1f} MiB, VmHWM "
                f"{o['hwm_mib']:.1f} MiB", "< 64 MB (61.0 MiB)", o["hwm_mib"] * 1.048576 < 64)
    o = results.get("overload")
    if o:
        ov = o["overload"].get(1000, {})
        un = o["unloaded"].get(1, {})
        if ov and un:
            row("overload: p99 of accepted (ferry bench, c=1000, latency includes the client's own queueing) ÷ "
                "unloaded (c=1) p99", f"{ov['p99_ms'] / un['p99_ms']:.2f}× "
                f"({ov['p99_ms']:.2f} vs {un['p99_ms']:.2f} ms)", "≤ 2×", ov["p99_ms"] <= 2 * un["p99_ms"])
        p99, u99 = stat(o["probes"], 200, "p99"), stat(o.get("probes_unloaded"), 200, "p99")
        if p99 and u99:
            row("overload: p99 of the side probe's 200s ÷ the same probe's p99 alone",
                f"{p99 / u99:.2f}× ({p99:.2f} vs {u99:.2f} ms)", "≤ 2×", p99 <= 2 * u99)
        bd = results.get("bounds") or {}
        cu = stat(bd.get("ceiling_probes_unloaded"), 200, "p99")
        co = stat(bd.get("ceiling_probes"), 200, "p99")
        if cu and co:
            row("overload, for reference: the bare-axum ceiling's probe p99 during the same overload ÷ alone",
                f"{co / cu:.2f}× ({co:.2f} vs {cu:.2f} ms)", "—", None)
        su, so = o.get("server_unloaded_p99_ms", {}), o.get("server_overload_p99_ms", {})
        if su.get("queue") is not None and so.get("queue") is not None:
            u, v = su["queue"] + su["compute"], so["queue"] + so["compute"]
            row("overload: server-side p99 (queue + engine, bucket bounds) of accepted requests ÷ unloaded (c=1)",
                f"{v / u:.2f}× (≤ {v:.2f} vs ≤ {u:.2f} ms)", "≤ 2×", v <= 2 * u)
        if stat(o["probes"], 429, "n"):
            row("overload: 429 latency (side probe)",
                f"{stat(o['probes'], 429, 'n')} × 429, p50 {stat(o['probes'], 429, 'p50'):.2f} ms, max "
                f"{stat(o['probes'], 429, 'max'):.2f} ms",
                "within milliseconds", None)
        peak = max(o["rss_peak_during_mib"], o["rss_after"]["rss_mib"])
        row("overload: peak RSS ÷ steady RSS", f"{peak / o['rss_steady']['rss_mib']:.2f}×", "≤ 1.5×",
            peak <= 1.5 * o["rss_steady"]["rss_mib"])
        row("overload: no crash", f"alive {o['alive']}, ready after {o['ready_after']}", "alive", o["alive"])
    out.append("")
    return out


def machine():
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return (f"nproc {os.cpu_count()} ({cpu}), {int(mem) / 1024 / 1024:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--only", help="comma-separated servers to run (default: all)")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-setup", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS.md and results.json from the last full run's .ferry/bench/results.json")
    args = ap.parse_args()
    if args.report_only:
        results = load_results(WORK / "results.json")
        write_report(results, args)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 connections in the overload run
    lib = str(ROOT / ".ferry/lib/libonnxruntime.so.1.32.0") if args.skip_setup else setup()
    if args.tune:
        tune(args, lib)
        return
    started = time.time()
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
               "duration": args.duration, "warmup": args.warmup, "versions": versions(), "servers": {}, "grid": {}}
    specs = servers(lib)
    wanted = args.only.split(",") if args.only else list(specs)
    for name in wanted:
        log(f"== {name}")
        try:
            run_server(name, specs[name], args, results)
        except Exception as e:  # noqa: BLE001 -- report it and go on with the next server
            log(f"!! {name}: {e!r}")
            results["servers"].setdefault(name, {})["failed"] = f"benchmark error: {e!r}"
        (WORK / "results.partial.json").write_text(json.dumps(results, indent=1))
    if "ferry" in wanted and "ceiling" in wanted:
        log("== ferry and the ceiling, alternating")
        try:
            ceiling_rounds(lib, args, results)
        except Exception as e:  # noqa: BLE001 -- reported, the rest of the report stands
            log(f"!! ceiling rounds: {e!r}")
        log("== what any server could reach here: the ceiling with the MLP's input")
        try:
            bounds(lib, args, results)
        except Exception as e:  # noqa: BLE001 -- reported, the rest of the report stands
            log(f"!! bounds: {e!r}")
    results["elapsed_s"] = time.time() - started
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args)


def load_results(path):
    """A results.json as the run left it: JSON turned its integer keys (concurrency levels, statuses) into
    strings; earlier runs kept the probes' raw answers, which are summarized here."""
    def ints(v):
        if isinstance(v, dict):
            return {(int(k) if k.lstrip("-").isdigit() else k): ints(x) for k, x in v.items()}
        if isinstance(v, list):
            return [ints(x) for x in v]
        return v
    results = ints(json.loads(Path(path).read_text()))
    for where, keys in [(results.get("overload"), ["probes", "probes_unloaded"]),
                        (results.get("bounds"), ["ceiling_probes", "ceiling_probes_unloaded"])]:
        for k in keys:
            if where and isinstance(where.get(k), list):
                where[k] = probe_stats([tuple(p) for p in where[k]])
    return results


def write_report(results, args):
    tv = results["servers"].get("triton", {}).get("server_metadata", {}).get("version")
    if tv:
        results["versions"]["triton"] = results["versions"]["triton"].replace("tritonserver ?", f"tritonserver {tv}")
    md = report(results) + f"\nWhole run: {results['elapsed_s'] / 60:.1f} minutes (setup excluded).\n"
    # The monitoring-overhead table comes from its own script (bench/monitoring_overhead.py --write).
    if (HERE / "MONITORING.md").exists():
        md += "\n" + (HERE / "MONITORING.md").read_text()
    if not args.only:
        (HERE / "RESULTS.md").write_text(md)
        (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(md)


if __name__ == "__main__":
    main()
