"""`ferry bench` against a real server: each mode (REST JSON, REST binary tensors, gRPC, a fixed request rate, rows
per request) reports figures that agree with themselves and with the server's own request counters."""
import json
import os
import re
import shutil
import subprocess

import requests

from conftest import ROOT, ferry_binary, start_ferry


def successes(url):
    """Successful iris requests the server counted, over every protocol."""
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^ferry_requests_total\{model="iris",version="1",protocol="[a-z_]+",outcome="success"\} (\S+)$', text, re.M))


def bench(*args):
    out = subprocess.run([ferry_binary(), "bench", "--model", "iris", "--duration", "1s", "--warmup", "200ms",
                          "--json", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_reports_what_the_server_answered(tmp_path):
    repo = str(tmp_path / "repo")
    shutil.copytree(os.path.join(ROOT, "examples", "models"), repo)
    server = start_ferry(repo, str(tmp_path / "ferry.log"))
    try:
        before = successes(server.url)
        reports = []
        levels = bench("--url", server.url, "--concurrency", "1,4")
        assert [r["level"] for r in levels] == [1, 4] and all(r["mode"] == "concurrency" for r in levels), levels
        reports += levels
        reports += bench("--url", server.url, "--binary", "--concurrency", "2")
        reports += bench("--url", server.grpc, "--protocol", "grpc", "--concurrency", "2")
        rows = bench("--url", server.url, "--batch", "8", "--concurrency", "2")[0]
        reports.append(rows)
        assert abs(rows["rows_per_second"] - 8 * rows["requests_per_second"]) < 1e-6 * rows["rows_per_second"], rows
        for r in reports:
            assert r["errors"] == 0 and r["ok"] > 0, r
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
            # Requests per second are the measured answers over the measured second.
            assert abs(r["requests_per_second"] - r["ok"]) <= 0.05 * r["ok"] + 1, r
        # A fixed rate sends that many requests per second whatever the answers do.
        rate = bench("--url", server.url, "--rate", "200")[0]
        assert rate["mode"] == "rate" and rate["errors"] == 0 and 150 <= rate["ok"] <= 250, rate
        reports.append(rate)
        # The server answered at least every request the reports count (warm-up requests come on top).
        answered = successes(server.url) - before
        counted = sum(r["ok"] for r in reports)
        assert answered >= counted, (answered, counted)
        # A model the server does not have is an error, not an empty report, with the server's own message.
        for url, protocol in [(server.url, "rest"), (server.grpc, "grpc")]:
            out = subprocess.run([ferry_binary(), "bench", "--model", "nope", "--url", url, "--protocol", protocol,
                                  "--duration", "1s"], capture_output=True, text=True, timeout=60)
            assert out.returncode != 0 and "model `nope` not found" in out.stderr, out.stderr
            assert ("404 Not Found" if protocol == "rest" else "NotFound") in out.stderr, out.stderr
    finally:
        server.stop()


def test_bench_says_why_the_first_request_failed(tmp_path):
    # A server whose body limit the request exceeds: the cause (413 and the server's message) is printed, and a URL
    # without a scheme means http://. `--warmup 0` turns the warm-up off.
    repo = str(tmp_path / "repo")
    shutil.copytree(os.path.join(ROOT, "examples", "models"), repo)
    server = start_ferry(repo, str(tmp_path / "ferry.log"), "--max-request-bytes", "50")
    try:
        bare = server.url.removeprefix("http://")
        out = subprocess.run([ferry_binary(), "bench", "--model", "iris", "--url", bare, "--duration", "1s",
                              "--warmup", "0"], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, out.stdout
        assert "413" in out.stderr and "max-request-bytes" in out.stderr, out.stderr
        assert "first request to model `iris` failed" in out.stderr, out.stderr
    finally:
        server.stop()
