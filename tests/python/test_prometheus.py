"""A real Prometheus (Debian's package, installed by scripts/setup-test-env) scrapes Ferry's /metrics while known
traffic is sent; its HTTP API must report exactly what was sent. `promtool check metrics` must accept the page."""
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"), reason="prometheus not installed (scripts/setup-test-env installs it)"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    assert PROMETHEUS, "prometheus must be installed (scripts/setup-test-env)"
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: ['%s']\n" % server.host
    )
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if requests.get(url + "/-/ready", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("prometheus did not start:\n" + (work / "prometheus.log").read_text())
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def query(prom, expr):
    r = requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=5).json()
    assert r["status"] == "success", r
    result = r["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def wait_for(prom, expr, want, timeout=30):
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        value = query(prom, expr)
        if value == want:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {value}, expected {want}")


def test_promtool_accepts_the_metrics_page(server):
    assert PROMTOOL, "promtool comes with Debian's prometheus package"
    page = requests.get(server.url + "/metrics", timeout=5).text
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_sees_exactly_the_traffic_sent(server, prometheus):
    ok = 'sum(ferry_requests_total{model="diabetes",outcome="success"})'
    bad = 'sum(ferry_requests_total{model="diabetes",outcome="invalid_argument"})'
    count = 'sum(ferry_request_duration_seconds_count{model="diabetes"})'
    # Wait for a first scrape so the baseline is what the server has counted so far.
    wait_for(prometheus, 'up{job="ferry"}', 1.0)
    base_ok, base_bad, base_count = (query(prometheus, e) for e in (ok, bad, count))
    row = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]
    for _ in range(7):
        r = requests.post(server.url + "/v2/models/diabetes/infer",
                          json={"inputs": [{"name": "features", "shape": [1, 10], "datatype": "FP32", "data": row}]})
        assert r.status_code == 200
    for _ in range(3):
        r = requests.post(server.url + "/v1/models/diabetes:predict", json={"instances": [row[:9]]})
        assert r.status_code == 400
    wait_for(prometheus, ok, base_ok + 7)
    wait_for(prometheus, bad, base_bad + 3)
    wait_for(prometheus, count, base_count + 10)
    # The histogram's buckets are scraped too: its +Inf bucket holds every request.
    inf = 'sum(ferry_request_duration_seconds_bucket{model="diabetes",le="+Inf"})'
    assert query(prometheus, inf) == base_count + 10
