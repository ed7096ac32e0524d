#!/usr/bin/env python3
"""LLM serving side by side on this machine: Ferry (llama.cpp, continuous batching) against llama.cpp's own
OpenAI-compatible server (llama-cpp-python[server], one request at a time), same GGUF, 2 llama.cpp threads each, one
server running at a time, both on 127.0.0.1 and free ports, both stopped at the end.

Run with the project's venv (it has llama-cpp-python[server]; scripts/setup-test-env makes it):

    .venv/bin/python bench/llm.py             # 5 reps, 5 s warm-up + 30 s per cell, 60 s overload: about 9 min
    .venv/bin/python bench/llm.py --quick     # 1 rep, 1 s + 5 s cells, 10 s overload: about 2.5 min
    .venv/bin/python bench/llm.py --servers peer --phases single,concurrency   # the peer alone

Phases (for each server in turn, then the overload phase on a second Ferry):
  single       One stream at a time, fixed chat prompts asking for long answers, temperature 0, max_tokens 128,
               the prompts taken in turn (llama-cpp-python keeps the last request's KV cache and prefills only
               what follows the longest common prefix: the chat template's system part is shared by all, a repeated
               prompt would cost nothing). Time to first token (first chunk with text, from just before connecting) and
               decode tokens/s ((tokens - 1) / (last token's arrival - first token's)); medians over --reps.
               One non-streamed request per prompt gives the token count to check the streamed count against.
  concurrency  1, 4 and 16 clients, each looping streamed requests (the prompts in turn), --warmup s unmeasured then
               --duration s measured: generated tokens/s (text chunks that arrived in the window; one chunk is one
               token on both servers, checked against Ferry's streamed usage and the non-streamed counts), TTFT p50 and
               p99 of the requests whose first token came in the window, median per-stream decode rate. When the
               window closes the clients drop their connections and the next cell waits until the server is idle.
  overload     Ferry only: --overload-clients clients (200) looping against a Ferry with a small budget
               (max_total_tokens 8192, max_sequences 32, max_waiting 64); a 429 is retried after its Retry-After.
               Peak RSS (VmRSS every 100 ms, and the kernel's VmHWM), RSS idle after load, the KV budget in bytes
               (from the GGUF: layers x 2 x KV heads x head dim x 2 bytes of F16), 429 counts, peak running/waiting
               sequences from /metrics, and afterwards: still running, /v2/health/ready 200, 0 running and waiting.

The load generator is this process: asyncio over plain sockets (HTTP/1.1, one connection per request, chunked SSE
decoded by hand, one json.loads per event, one clock read per socket read). Its CPU share (getrusage of this process,
the RSS sampler thread included) is reported for each phase beside the server's and whatever else used the machine:
on 2 cores every bit the generator uses is taken from the servers' 2 llama.cpp threads.

Also, before the servers, the engine alone: llama-cpp-python in this process (llama_cpp.Llama, same GGUF, threads,
flash attention and n_ctx as the peer, logits_all off), the same prompts streamed with its KV cache reset before each
(a full prefill, as Ferry does), and 128 one-token evals: what llama.cpp does here without HTTP or a server loop.

Settings that differ from the servers' defaults, and why:
  peer   --n_threads 2 --n_threads_batch 2 (the same threads as Ferry); --flash_attn (--peer-flash-attn, default off
         as in llama-cpp-python and in Ferry's engine, which turns it off: the attention kernels change the last bits
         enough that greedy answers part within a few dozen tokens, so the single-stream table checks that both
         servers give the same text); --interrupt_requests false: by default a new request makes llama-cpp-python
         end the stream being generated (it sends [DONE] after the current token), so with several clients most
         streams would be cut short; each request carries repeat_penalty 1.0 (its default 1.1 would make greedy
         answers differ from Ferry's, which has no repetition penalty; Ferry ignores the field). n_ctx 8192
         (llm_peer's default). logits_all stays at its default (true).
  ferry  threads = 2 in config.toml; --request-timeout 10m (the peer has none; Ferry's 30 s would cut requests
         that wait long in the overload phase); --model-control-mode none.

Prints Markdown tables and writes the results as JSON (--out, default bench/llm.json).
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests/python"))

from text_embeddings import TICK, Server, machine_busy, tree_cpu, wait_idle  # noqa: E402

MODEL = "smollm"
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a dragon who is afraid of heights.",
    "Explain in detail how a steam engine works, step by step.",
    "Write a long essay about the history of the city of Rome.",
]
WARMUP_PROMPT = "Say hello."
FERRY_CONFIG = {"threads": 2}
OVERLOAD_CONFIG = {"threads": 2, "max_total_tokens": 8192, "max_sequences": 32, "max_waiting": 64}


# ---------------------------------------------------------------- setup

def ensure_python():
    """Re-executes under the project's .venv when this Python has no llama-cpp-python (the peer needs it)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        python = ROOT / ".venv/bin/python"
        if python.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
            os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit("llama-cpp-python is missing: run scripts/setup-test-env (or scripts/setup-llama-cpp-python)")


def find_gguf(arg):
    if arg:
        return Path(arg)
    local = ROOT / ".ferry/examples/smollm2/1/model.gguf"
    if not local.exists():
        subprocess.run([str(ROOT / "scripts/fetch-smollm2")], check=True, stdout=subprocess.DEVNULL)
    return local


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints context warnings on file descriptor 2 even when not verbose."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def kv_bytes_per_token(gguf):
    """Bytes of F16 keys and values one token takes in llama.cpp's cache, from the GGUF's metadata."""
    import llama_cpp

    with quiet_stderr():
        meta = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False).metadata
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"]))
    head_dim = int(meta.get(f"{arch}.attention.key_length",
                            int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"])))
    return dict(layers=layers, kv_heads=kv_heads, head_dim=head_dim, bytes=layers * 2 * kv_heads * head_dim * 2)


def write_repository(work, gguf, name, settings):
    """A model repository with `gguf` as <name>/1/model.gguf (a hard link where it can) and an [llm] table."""
    version = work / name / MODEL / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / "model.gguf"
    if not target.exists():
        try:
            os.link(gguf, target)
        except OSError:
            shutil.copy(gguf, target)
    (work / name / MODEL / "config.toml").write_text(
        "[llm]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return work / name


# ---------------------------------------------------------------- servers

class Peer:
    """llm_peer.start_peer with the attributes text_embeddings' helpers use (name, proc, url)."""

    def __init__(self, gguf, log, threads, flash_attn):
        from llm_peer import start_peer

        self.name, self.log_path = "peer", log
        self.peer = start_peer(gguf, log, "--n_threads_batch", str(threads), "--interrupt_requests", "false",
                               "--flash_attn", str(flash_attn).lower(), n_threads=threads)
        self.proc, self.url = self.peer.process, self.peer.url

    def stop(self):
        self.peer.stop()


def start_ferry(ferry, repo, log, ort_lib):
    cmd = [ferry, "serve", "--model-repository", repo, "--host", "127.0.0.1", "--rest-port", "0", "--grpc-port", "0",
           "--admin-port", "0", "--model-control-mode", "none", "--request-timeout", "10m"]
    if ort_lib:
        cmd += ["--onnxruntime-lib", ort_lib]

    def ready(s):
        import requests

        m = re.search(r"REST .* listening address=127\.0\.0\.1:(\d+)", Path(s.log_path).read_text())
        if not m:
            return False
        s.url = f"http://127.0.0.1:{m.group(1)}"
        return requests.get(s.url + "/v2/health/ready", timeout=1).status_code == 200

    server = Server("ferry", cmd, {}, None, None, None, None, log, ready)
    server.wait_ready(timeout=180)
    return server


def vm_status(pid):
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def llm_metrics(url):
    """Ferry's LLM gauges summed over models: seq_running, seq_waiting, kv_used, kv_reserved, kv_budget."""
    import requests

    text = requests.get(url + "/metrics", timeout=5).text
    out = {}
    for m in re.finditer(r"^ferry_llm_(sequences|kv_cache_tokens)\{([^}]*)\} (\S+)$", text, re.M):
        kind = re.search(r'(?:state|kind)="([^"]+)"', m.group(2)).group(1)
        key = ("seq_" if m.group(1) == "sequences" else "kv_") + kind
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


class Sampler(threading.Thread):
    """Samples the server's VmRSS every `every` s, and with a metrics URL Ferry's LLM gauges every 5th time; keeps
    the peaks."""

    def __init__(self, pid, metrics_url=None, every=0.1):
        super().__init__(daemon=True)
        self.pid, self.metrics_url, self.every = pid, metrics_url, every
        self.peak_rss, self.samples, self.peaks, self.metric_errors = 0, 0, {}, 0
        self._halt = threading.Event()

    def run(self):
        n = 0
        while not self._halt.is_set():
            t = time.monotonic()
            rss = vm_status(self.pid).get("VmRSS", 0)
            self.peak_rss = max(self.peak_rss, rss)
            self.samples += 1
            if self.metrics_url and n % 5 == 0:
                try:
                    for k, v in llm_metrics(self.metrics_url).items():
                        self.peaks[k] = max(self.peaks.get(k, 0.0), v)
                except Exception:
                    self.metric_errors += 1
            n += 1
            self._halt.wait(max(0.0, self.every - (time.monotonic() - t)))

    def stop(self):
        self._halt.set()
        self.join()


def busy_others(exclude=(), seconds=0.5, threshold=0.05):
    """Other processes (not this one, nor those in `exclude`) that used more than `threshold` cores over the next
    `seconds`, as "name (cores)": a build or a test suite running beside the benchmark makes its figures noisy."""
    def snapshot():
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in skip:
                try:
                    raw = Path(f"/proc/{d}/stat").read_text()
                except OSError:
                    continue
                f = raw[raw.rindex(")") + 2:].split()
                out[d] = (raw[raw.index("(") + 1:raw.rindex(")")], (int(f[11]) + int(f[12])) / TICK)
        return out

    skip = {os.getpid(), *exclude}
    a = snapshot()
    time.sleep(seconds)
    b = snapshot()
    busy = [(name, (cpu - a[pid][1]) / seconds) for pid, (name, cpu) in b.items() if pid in a]
    return [f"{name} ({cores:.2f})" for name, cores in sorted(busy, key=lambda x: -x[1]) if cores > threshold]


# ---------------------------------------------------------------- load generator

def chat_body(prompt, max_tokens, stream=True):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "repeat_penalty": 1.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


class Stream:
    """One streamed request as it went: filled in place, so a cancelled one keeps what had arrived."""
    __slots__ = ("sent", "status", "times", "usage", "finish", "done", "error", "retry_after", "pieces")

    def __init__(self, keep_text=False):
        self.sent, self.status, self.times, self.usage, self.finish = 0.0, None, [], None, None
        self.done, self.error, self.retry_after = False, None, None
        self.pieces = [] if keep_text else None


async def stream_chat(host, port, body, s):
    """POSTs `body` to /v1/chat/completions over a new connection and reads the SSE answer into `s`: the arrival
    time of each event with text, the usage and finish reason when given, [DONE]."""
    s.sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Accept: text/event-stream\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (host.encode(), port, len(body), body))
        status = await reader.readline()
        s.status = int(status.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if s.status != 200:
            s.retry_after = headers.get("retry-after")
            s.error = (await reader.read(4096)).decode("utf-8", "replace")[:300]
            return
        chunked = "chunked" in headers.get("transfer-encoding", "")
        buf = b""
        while not s.done:
            if chunked:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            lines = (buf + data).split(b"\n")
            buf = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    s.done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    s.error = str(event["error"])[:300]
                    continue
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        s.times.append(now)
                        if s.pieces is not None:
                            s.pieces.append(text)
                    if choice.get("finish_reason"):
                        s.finish = choice["finish_reason"]
                if event.get("usage"):
                    s.usage = event["usage"]
        if not s.done and s.error is None:
            s.error = "the stream ended without [DONE]"
    finally:
        writer.close()


def tokens_of(s):
    """Completion tokens of a finished stream: the streamed usage where the server sends it, else the text chunks."""
    return s.usage["completion_tokens"] if s.usage else len(s.times)


def decode_rate(s):
    n = tokens_of(s)
    span = s.times[-1] - s.times[0] if len(s.times) > 1 else 0.0
    return (n - 1) / span if span > 0 else None


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else None


class Usage:
    """CPU this process, the server and the whole machine used over a span of wall time."""

    def __init__(self, pid):
        self.pid = pid
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.own, self.srv, self.busy, self.t = r.ru_utime + r.ru_stime, tree_cpu(pid), machine_busy(), time.monotonic()

    def since(self):
        r = resource.getrusage(resource.RUSAGE_SELF)
        own, srv, busy = r.ru_utime + r.ru_stime - self.own, tree_cpu(self.pid) - self.srv, machine_busy() - self.busy
        wall = time.monotonic() - self.t
        return dict(wall_s=round(wall, 2), generator_cpu_share=round(own / wall, 4), server_cores=round(srv / wall, 3),
                    other_cores=round(max(0.0, busy - srv - own) / wall, 3))


# ---------------------------------------------------------------- phases

def engine_reference(gguf, reps, max_tokens, threads, flash_attn, n_ctx=8192):
    """llama-cpp-python in this process: the prompts streamed with the KV cache reset before each (a full prefill),
    TTFT and decode rate as for the servers, medians over reps; and max_tokens one-token evals (llama.cpp's decode
    step alone, no sampling)."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              flash_attn=flash_attn, verbose=False)
    try:
        ttft, rates = [], []
        for rep in range(reps + 1):  # the first round warms up
            for p in PROMPTS[:1] if rep == 0 else PROMPTS:
                llm.reset()
                times, t0 = [], time.perf_counter()
                for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0,
                                                        max_tokens=max_tokens, repeat_penalty=1.0, stream=True):
                    if chunk["choices"][0]["delta"].get("content"):
                        times.append(time.perf_counter())
                if rep:
                    ttft.append((times[0] - t0) * 1000)
                    rates.append((len(times) - 1) / (times[-1] - times[0]))
        tokens = llm.tokenize(b"Once upon a time")
        llm.reset()
        llm.eval(tokens)
        t0 = time.perf_counter()
        for _ in range(max_tokens):
            llm.eval(tokens[-1:])
        eval_rate = max_tokens / (time.perf_counter() - t0)
    finally:
        llm.close()
    return dict(ttft_ms=round(statistics.median(ttft), 2), decode_tok_s=round(statistics.median(rates), 1),
                one_token_eval_tok_s=round(eval_rate, 1), reps=reps, threads=threads, flash_attn=flash_attn,
                n_ctx=n_ctx, logits_all=False)


def single_stream(server, reps, max_tokens):
    """One request at a time: TTFT and decode rate per prompt (medians over reps), the prompts taken in turn."""
    import requests

    host, port = server.url.split("//")[1].split(":")
    port = int(port)
    reference = []
    for p in PROMPTS:  # non-streamed: the token counts (and the text) to check the streams against
        r = requests.post(server.url + "/v1/chat/completions", data=chat_body(p, max_tokens, stream=False),
                          headers={"Content-Type": "application/json"}, timeout=300).json()
        reference.append(dict(completion_tokens=r["usage"]["completion_tokens"],
                              prompt_tokens=r["usage"]["prompt_tokens"], finish=r["choices"][0]["finish_reason"],
                              text=r["choices"][0]["message"]["content"]))
    bodies = [chat_body(p, max_tokens) for p in PROMPTS]
    busy = busy_others([server.proc.pid])

    async def run():
        out = [[] for _ in PROMPTS]
        for _ in range(2):  # warm-up, on a prompt of its own (the peer would reuse its KV cache for a repeat)
            await stream_chat(host, port, chat_body(WARMUP_PROMPT, max_tokens), Stream())
        usage = Usage(server.proc.pid)
        for rep in range(reps):
            for i, body in enumerate(bodies):
                s = Stream(keep_text=rep == 0)
                await stream_chat(host, port, body, s)
                out[i].append(s)
        return out, usage.since()

    evals_before = len(llama_eval_rates(server))
    streams, cpu = asyncio.run(run())
    # llama.cpp's own decode rate inside the peer (llama-cpp-python logs its perf counters after each request).
    evals = llama_eval_rates(server)[evals_before + 2:]
    prompts = []
    for i, runs in enumerate(streams):
        bad = [s.error for s in runs if s.error or s.status != 200]
        if bad:
            raise RuntimeError(f"{server.name}: streamed request failed: {bad[0]}")
        first = runs[0]
        prompts.append(dict(
            prompt=PROMPTS[i], prompt_tokens=reference[i]["prompt_tokens"],
            tokens=tokens_of(first), text_chunks=len(first.times), streamed_usage=first.usage is not None,
            nonstreamed_tokens=reference[i]["completion_tokens"], finish=first.finish,
            ttft_ms=round(statistics.median((s.times[0] - s.sent) * 1000 for s in runs), 2),
            decode_tok_s=round(statistics.median(decode_rate(s) for s in runs), 1),
            ttft_ms_all=[round((s.times[0] - s.sent) * 1000, 2) for s in runs],
            decode_tok_s_all=[round(decode_rate(s), 1) for s in runs],
            text="".join(first.pieces), streamed_equals_nonstreamed="".join(first.pieces) == reference[i]["text"]))
    every = [s for runs in streams for s in runs]
    return dict(prompts=prompts, reps=reps, max_tokens=max_tokens,
                ttft_ms=round(statistics.median((s.times[0] - s.sent) * 1000 for s in every), 2),
                decode_tok_s=round(statistics.median(decode_rate(s) for s in every), 1), busy_others=busy,
                llama_eval_tok_s=round(statistics.median(evals), 1) if evals else None,
                llama_eval_tok_s_all=evals, **cpu)


def llama_eval_rates(server):
    """Decode rates llama.cpp reported in the peer's log so far ("eval time = ... tokens per second"); none for
    Ferry."""
    if server.name != "peer":
        return []
    text = Path(server.log_path).read_text(errors="replace")
    return [float(m) for m in re.findall(r"^llama_perf_context_print:\s+eval time.*?([\d.]+) tokens per second",
                                          text, re.M)]


async def client_loop(host, port, bodies, start_index, until, streams, retry_cap=10.0):
    """Sends streamed requests one after another until `until` (perf_counter); a 429 is retried after its
    Retry-After (at most retry_cap s), another failure after 0.1 s."""
    k = start_index
    while time.perf_counter() < until:
        s = Stream()
        streams.append(s)
        k += 1
        try:
            await stream_chat(host, port, bodies[k % len(bodies)], s)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            s.error = f"{type(e).__name__}: {e}"
        if s.status == 429:
            try:
                wait = float(s.retry_after)
            except (TypeError, ValueError):
                wait = 1.0
            await asyncio.sleep(min(max(wait, 0.0), retry_cap, max(0.0, until - time.perf_counter())))
        elif s.error:
            await asyncio.sleep(0.1)


def run_load(server, clients, warmup, duration, max_tokens):
    """`clients` closed-loop streaming clients for warmup + duration s; figures over the last `duration` s."""
    host, port = server.url.split("//")[1].split(":")
    port = int(port)
    bodies = [chat_body(p, max_tokens) for p in PROMPTS]
    busy = busy_others([server.proc.pid])

    async def run():
        per_client = [[] for _ in range(clients)]
        t0 = time.perf_counter()
        start, end = t0 + warmup, t0 + warmup + duration
        tasks = [asyncio.create_task(client_loop(host, port, bodies, i, end, per_client[i])) for i in range(clients)]
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        usage = Usage(server.proc.pid)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu = usage.since()
        for t in tasks:  # requests still going are dropped: their connections close
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return per_client, start, end, cpu

    per_client, start, end, cpu = asyncio.run(run())
    streams = [s for c in per_client for s in c]
    window = [s for s in streams if start <= s.sent < end]
    # TTFT of the requests whose first token came in the window (sent then or during the warm-up): with 16 clients
    # on a server that answers one at a time, a request waits longer than a window, and those sent in it would
    # leave out the long waits.
    answered = [s for s in streams if s.times and start <= s.times[0] < end]
    waiting = [end - s.sent for s in streams
               if s.status in (None, 200) and s.error is None and not (s.times and s.times[0] < end)]
    tokens = sum(bisect_left(s.times, end) - bisect_left(s.times, start) for s in streams)
    ttft = [(s.times[0] - s.sent) * 1000 for s in answered]
    finished = [s for s in streams if s.done and s.times and start <= s.times[0] and s.times[-1] < end]
    # Each stream's own rate over the tokens it got in the window (at 16+ clients few streams both start and end in
    # it), for the streams with at least 10 there.
    rates = []
    for s in streams:
        a, b = bisect_left(s.times, start), bisect_left(s.times, end)
        if b - a >= 10:
            rates.append((b - a - 1) / (s.times[b - 1] - s.times[a]))
    statuses = {}
    for s in window:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    with_usage = [s for s in finished if s.usage]
    finishes = {}
    for s in finished:
        finishes[str(s.finish)] = finishes.get(str(s.finish), 0) + 1
    return dict(
        clients=clients, warmup_s=warmup, duration_s=duration,
        tokens=tokens, tokens_per_s=round(tokens / duration, 1),
        ttft_p50_ms=round(percentile(ttft, 50), 1) if ttft else None,
        ttft_p99_ms=round(percentile(ttft, 99), 1) if ttft else None,
        requests_sent=len(window), requests_answered=len(answered), requests_finished=len(finished),
        unanswered_at_end=len(waiting), longest_unanswered_wait_ms=round(max(waiting) * 1000, 1) if waiting else None,
        finish_reasons=finishes, statuses=statuses,
        errors=sum(1 for s in window if s.error and s.status != 429),
        error_sample=next((s.error for s in window if s.error and s.status != 429), None),
        stream_decode_tok_s_p50=round(statistics.median(rates), 1) if rates else None,
        tokens_per_chunk=(round(sum(s.usage["completion_tokens"] for s in with_usage)
                                / sum(len(s.times) for s in with_usage), 4) if with_usage else None),
        busy_others=busy, _per_client=per_client, **cpu)


def concurrency(server, levels, warmup, duration, max_tokens):
    cells = []
    for c in levels:
        wait_idle(server)
        cell = run_load(server, c, warmup, duration, max_tokens)
        cell.pop("_per_client")
        cells.append(cell)
        print(f"  {server.name:5s} c={c:<3d} {cell['tokens_per_s']:7.1f} tok/s  TTFT p50 {cell['ttft_p50_ms']} ms "
              f"p99 {cell['ttft_p99_ms']} ms  stream {cell['stream_decode_tok_s_p50']} tok/s  "
              f"errors {cell['errors']}  generator {cell['generator_cpu_share']:.1%} of a core  "
              f"server {cell['server_cores']:.2f} cores  other {cell['other_cores']:.2f}", file=sys.stderr, flush=True)
    return cells


def overload(args, gguf, work, kv):
    """Ferry with a small budget under --overload-clients streaming clients: memory, 429s, and its state after."""
    import requests

    repo = write_repository(work, gguf, "repo-overload", OVERLOAD_CONFIG)
    server = start_ferry(args.ferry, repo, work / "ferry-overload.log", args.onnxruntime_lib)
    try:
        pid = server.proc.pid
        time.sleep(1.0)
        rss_loaded = vm_status(pid)["VmRSS"]
        metrics_idle = llm_metrics(server.url)
        run_load(server, 1, 0, 2, args.max_tokens)  # one warm request or so
        wait_idle(server)
        rss_warm = vm_status(pid)["VmRSS"]
        sampler = Sampler(pid, server.url)
        sampler.start()
        try:
            cell = run_load(server, args.overload_clients, 0, args.overload_duration, args.max_tokens)
        finally:
            sampler.stop()
        per_client = cell.pop("_per_client")
        t = time.monotonic()
        drained, after = None, {}
        while time.monotonic() - t < 120:
            after = llm_metrics(server.url)
            if after.get("seq_running", 1) == 0 and after.get("seq_waiting", 1) == 0:
                drained = round(time.monotonic() - t, 2)
                break
            time.sleep(0.2)
        alive = server.proc.poll() is None
        ready = requests.get(server.url + "/v2/health/ready", timeout=5).status_code if alive else None
        got_429 = [c for c in per_client if any(s.status == 429 for s in c)]
        budget_tokens = OVERLOAD_CONFIG["max_total_tokens"]
        result = dict(
            config=OVERLOAD_CONFIG, clients=args.overload_clients, duration_s=args.overload_duration,
            kv_bytes_per_token=kv["bytes"], kv_geometry=kv, kv_budget_tokens=budget_tokens,
            kv_budget_bytes=budget_tokens * kv["bytes"], kv_budget_tokens_from_metrics=metrics_idle.get("kv_budget"),
            rss_after_load_bytes=rss_loaded, rss_idle_after_a_request_bytes=rss_warm,
            rss_peak_bytes=sampler.peak_rss, rss_samples=sampler.samples, vm_hwm_bytes=vm_status(pid).get("VmHWM"),
            rss_after_bytes=vm_status(pid).get("VmRSS"),
            peak_metrics=sampler.peaks, metric_errors=sampler.metric_errors,
            clients_with_429=len(got_429),
            clients_429_on_first_request=sum(1 for c in per_client if c and c[0].status == 429),
            responses_429=sum(1 for c in per_client for s in c if s.status == 429),
            retry_after_values=sorted({s.retry_after for c in per_client for s in c if s.status == 429}, key=str),
            completed_streams=sum(1 for c in per_client for s in c if s.done),
            load=cell, drained_s=drained, metrics_after=after, alive_after=alive, ready_status_after=ready)
        print(f"  overload: {result['clients_with_429']} clients got 429 ({result['responses_429']} responses), "
              f"peak RSS {result['rss_peak_bytes'] / 2**20:.0f} MiB (idle {rss_warm / 2**20:.0f} MiB, KV budget "
              f"{result['kv_budget_bytes'] / 2**20:.0f} MiB), {cell['tokens_per_s']} tok/s, generator "
              f"{cell['generator_cpu_share']:.1%} of a core, after: alive {alive}, ready {ready}, {after}",
              file=sys.stderr, flush=True)
        return result
    finally:
        server.stop()


# ---------------------------------------------------------------- report

def versions(args):
    from importlib.metadata import version

    ferry = None
    if Path(args.ferry).exists():
        ferry = subprocess.run([args.ferry, "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"ferry": ferry, "ferry_binary": str(args.ferry), "commit": commit, "python": platform.python_version(),
            "llama-cpp-python": version("llama-cpp-python"), "cores": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(), "busy_others_at_start": busy_others()}


def mib(b):
    return f"{b / 2**20:.0f} MiB" if b else "-"


def report(results):
    lines = [f"## LLM serving, SmolLM2-135M-Instruct Q4_1, 2 llama.cpp threads, {results['meta']['cores']} cores, "
             f"max_tokens {results['args']['max_tokens']}, temperature 0\n"]
    servers = results["servers"]
    single = {k: v["single"] for k, v in servers.items() if isinstance(v, dict) and "single" in v}
    if single:
        lines.append("**One stream at a time** (medians over reps; TTFT from before connecting to the first text):\n")
        lines.append("| server | prompt | prompt tok | tokens | TTFT ms | decode tok/s | same text as peer |")
        lines.append("|---|---|---|---|---|---|---|")
        peer = single.get("peer")
        for name, s in single.items():
            for i, p in enumerate(s["prompts"]):
                other = peer["prompts"][i]["text"] if peer and name != "peer" else None
                same = "-" if other is None else (
                    "yes" if p["text"] == other else f"no (first {common_prefix(p['text'], other)} chars)")
                lines.append(f"| {name} | {p['prompt'][:40]}... | {p['prompt_tokens']} | {p['tokens']} | "
                             f"{p['ttft_ms']:.1f} | {p['decode_tok_s']:.1f} | {same} |")
            lines.append(f"| {name} | **all** | | | **{s['ttft_ms']:.1f}** | **{s['decode_tok_s']:.1f}** | |")
        slow = single.get("peer", {}).get("llama_eval_tok_s")
        if slow:
            lines.append(f"| peer, llama.cpp's own decode rate in its log (eval time) | all | | | | {slow:.1f} | |")
        e = results.get("engine")
        if e:
            lines.append(f"| engine alone (llama-cpp-python in-process, full prefill) | all | | | {e['ttft_ms']:.1f} | "
                         f"{e['decode_tok_s']:.1f} (one-token evals: {e['one_token_eval_tok_s']:.1f}) | |")
        lines.append("")
    conc = [c | {"server": k} for k, v in servers.items() if isinstance(v, dict) for c in v.get("concurrency", [])]
    if conc:
        lines.append("**Concurrent streaming clients** (closed loop; tokens that arrived in the measured window; "
                     "per-stream: median of each stream's rate over its tokens in the window):\n")
        lines.append("| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | per-stream tok/s | sent | finished | "
                     "errors | generator CPU (% core) | server CPU (cores) | other (cores) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in sorted(conc, key=lambda c: (c["clients"], c["server"])):
            lines.append(f"| {c['server']} | {c['clients']} | {c['tokens_per_s']:.1f} | {fmt(c['ttft_p50_ms'])} | "
                         f"{fmt(c['ttft_p99_ms'])} | {fmt(c['stream_decode_tok_s_p50'])} | {c['requests_sent']} | "
                         f"{c['requests_finished']} | {c['errors']} | {c['generator_cpu_share'] * 100:.1f} | "
                         f"{c['server_cores']:.2f} | {c['other_cores']:.2f} |")
        lines.append("")
    o = results.get("overload")
    if isinstance(o, dict):
        cfg = o["config"]
        lines.append(f"**Ferry overloaded**: {o['clients']} streaming clients for {o['duration_s']} s, "
                     f"max_total_tokens {cfg['max_total_tokens']}, max_sequences {cfg['max_sequences']}, "
                     f"max_waiting {cfg['max_waiting']}:\n")
        pm = o["peak_metrics"]
        load = o["load"]
        rows = [
            ("KV budget", f"{o['kv_budget_tokens']} tokens x {o['kv_bytes_per_token']} B = "
                          f"{mib(o['kv_budget_bytes'])}"),
            ("RSS after load (idle)", mib(o["rss_after_load_bytes"])),
            ("RSS idle after a request", mib(o["rss_idle_after_a_request_bytes"])),
            ("peak RSS (100 ms samples / VmHWM)", f"{mib(o['rss_peak_bytes'])} / {mib(o['vm_hwm_bytes'])}"),
            ("peak RSS over idle", mib(o["rss_peak_bytes"] - o["rss_idle_after_a_request_bytes"])),
            ("RSS once the clients had left and it was idle", mib(o["rss_after_bytes"])),
            ("peak running / waiting sequences", f"{fmt(pm.get('seq_running'))} / {fmt(pm.get('seq_waiting'))}"),
            ("peak KV used / reserved tokens", f"{fmt(pm.get('kv_used'))} / {fmt(pm.get('kv_reserved'))}"),
            ("clients that got 429 (on their first request)",
             f"{o['clients_with_429']} ({o['clients_429_on_first_request']})"),
            ("429 responses (Retry-After) / completed streams",
             f"{o['responses_429']} ({', '.join(map(str, o['retry_after_values']))} s) / {o['completed_streams']}"),
            ("tokens/s, TTFT p50 / p99 ms", f"{load['tokens_per_s']:.1f}, {fmt(load['ttft_p50_ms'])} / "
                                            f"{fmt(load['ttft_p99_ms'])}"),
            ("other errors", f"{load['errors']} {load['error_sample'] or ''}".strip()),
            ("generator CPU / server CPU / other",
             f"{load['generator_cpu_share'] * 100:.1f}% of a core / {load['server_cores']:.2f} cores / "
             f"{load['other_cores']:.2f} cores"),
            ("afterwards", f"alive {o['alive_after']}, /v2/health/ready {o['ready_status_after']}, running "
                           f"{fmt(o['metrics_after'].get('seq_running'))}, waiting "
                           f"{fmt(o['metrics_after'].get('seq_waiting'))} (idle {o['drained_s']} s after the clients "
                           f"left)"),
        ]
        lines.append("| | |")
        lines.append("|---|---|")
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines.append("")
    elif o:
        lines.append(f"**Ferry overloaded: not run.** {o}\n")
    gen = [(f"{k} single", v["single"]["generator_cpu_share"]) for k, v in servers.items()
           if isinstance(v, dict) and "single" in v]
    gen += [(f"{c['server']} c={c['clients']}", c["generator_cpu_share"]) for c in conc]
    if isinstance(o, dict):
        gen.append((f"ferry overload c={o['clients']}", o["load"]["generator_cpu_share"]))
    if gen:
        lines.append("Load generator CPU (share of one core, this process): " +
                     ", ".join(f"{k} {v * 100:.1f}%" for k, v in gen))
    for name, s in servers.items():
        if isinstance(s, str):
            lines.append(f"\n**{name}: not run.** {s}")
    lines.append(f"\nOther processes busy as a phase began: {'; '.join(results['busy_others']) or 'none'}; "
                 f"load average at start {results['meta']['loadavg_at_start'][0]:.2f}. "
                 f"Total run time {results['total_s']:.0f} s.")
    return "\n".join(lines)


def busy_summary(results):
    """"phase: processes" for each phase that began with other processes busy."""
    start = results["meta"]["busy_others_at_start"]
    out = [f"start: {', '.join(start)}"] if start else []
    for name, s in results["servers"].items():
        if isinstance(s, dict):
            for phase in [s.get("single")] + s.get("concurrency", []):
                if phase and phase.get("busy_others"):
                    label = "single" if "prompts" in phase else f"c={phase['clients']}"
                    out.append(f"{name} {label}: {', '.join(phase['busy_others'])}")
    o = results.get("overload")
    if isinstance(o, dict) and o["load"].get("busy_others"):
        out.append(f"overload: {', '.join(o['load']['busy_others'])}")
    return out


def fmt(v):
    return "-" if v is None else (f"{v:.0f}" if isinstance(v, float) and v >= 100 else f"{v}")


def common_prefix(a, b):
    return len(os.path.commonprefix([a, b]))


# ---------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="peer,ferry", help="peer, ferry or both, in this order")
    p.add_argument("--phases", default="engine,single,concurrency,overload")
    p.add_argument("--reps", type=int, help="repetitions of each prompt, one stream at a time (5; quick 1)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--warmup", type=float, help="seconds of load before each concurrency cell (5; quick 1)")
    p.add_argument("--duration", type=float, help="seconds measured per concurrency cell (30; quick 5)")
    p.add_argument("--overload-clients", type=int, default=200)
    p.add_argument("--overload-duration", type=float, help="seconds (60, so that streams finish; quick 10)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--peer-flash-attn", choices=["on", "off"], default="off",
                   help="flash attention in the peer (and the engine reference); Ferry's engine has it off, and only "
                   "with the same attention kernels do the greedy answers match")
    p.add_argument("--quick", action="store_true", help="defaults of 1 rep, 1 s + 5 s cells, 10 s overload: "
                   "about 2.5 min on 2 idle cores")
    p.add_argument("--gguf", help="default: .ferry/examples/smollm2/1/model.gguf (scripts/fetch-smollm2)")
    p.add_argument("--ferry", default=os.environ.get("FERRY_BIN", str(ROOT / "target/release/ferry")))
    p.add_argument("--onnxruntime-lib", default=None, help="passed to `ferry serve` (default: "
                   ".ferry/lib/libonnxruntime.so.* when there is one)")
    p.add_argument("--work", default="/tmp/ferry-llm-bench", help="model repositories and logs")
    p.add_argument("--out", default=str(HERE / "llm.json"))
    args = p.parse_args()
    for key, full, quick in [("reps", 5, 1), ("warmup", 5, 1), ("duration", 30, 5), ("overload_duration", 60, 10)]:
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    ensure_python()
    if args.onnxruntime_lib is None:
        libs = sorted((ROOT / ".ferry/lib").glob("libonnxruntime.so.*"))
        args.onnxruntime_lib = str(libs[-1]) if libs else None
    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = find_gguf(args.gguf)
    phases = args.phases.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    kv = kv_bytes_per_token(gguf)
    results = {"args": vars(args), "meta": versions(args), "gguf": str(gguf), "prompts": PROMPTS,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "servers": {}}
    if "engine" in phases:
        results["engine"] = engine_reference(gguf, args.reps, args.max_tokens, FERRY_CONFIG["threads"],
                                             args.peer_flash_attn == "on")
        e = results["engine"]
        print(f"engine (llama-cpp-python in-process): TTFT {e['ttft_ms']} ms, decode {e['decode_tok_s']} tok/s, "
              f"one-token evals {e['one_token_eval_tok_s']} tok/s", file=sys.stderr, flush=True)
    for name in args.servers.split(","):
        print(f"{name}:", file=sys.stderr, flush=True)
        try:
            if name == "peer":
                server = Peer(gguf, str(work / "peer.log"), FERRY_CONFIG["threads"], args.peer_flash_attn == "on")
            else:
                repo = write_repository(work, gguf, "repo", FERRY_CONFIG)
                server = start_ferry(args.ferry, repo, work / "ferry.log", args.onnxruntime_lib)
        except Exception as e:  # one server failing does not lose the other's figures
            results["servers"][name] = f"failed to start: {e}"
            print(f"  {name} failed to start: {e}", file=sys.stderr)
            continue
        out = results["servers"][name] = {"config": FERRY_CONFIG if name == "ferry" else
                                          {"n_threads": 2, "n_threads_batch": 2, "interrupt_requests": False,
                                           "flash_attn": args.peer_flash_attn == "on", "n_ctx": 8192}}
        try:
            if "single" in phases:
                wait_idle(server)
                out["single"] = single_stream(server, args.reps, args.max_tokens)
                s = out["single"]
                print(f"  {name:5s} single: TTFT {s['ttft_ms']} ms, decode {s['decode_tok_s']} tok/s, generator "
                      f"{s['generator_cpu_share']:.1%} of a core, server {s['server_cores']:.2f} cores",
                      file=sys.stderr, flush=True)
            if "concurrency" in phases:
                out["concurrency"] = concurrency(server, levels, args.warmup, args.duration, args.max_tokens)
            out["rss_end_bytes"] = vm_status(server.proc.pid).get("VmRSS")
        except Exception as e:
            out["failed"] = f"{type(e).__name__}: {e}"
            print(f"  {name} failed: {e}", file=sys.stderr)
        finally:
            server.stop()
    if "overload" in phases and "ferry" in args.servers.split(","):
        print("ferry overload:", file=sys.stderr, flush=True)
        try:
            results["overload"] = overload(args, gguf, work, kv)
        except Exception as e:
            results["overload"] = f"failed: {type(e).__name__}: {e}"
            print(f"  overload failed: {e}", file=sys.stderr)
    results["busy_others"] = busy_summary(results)
    results["total_s"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    print(f"\n(results in {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
