"""A real Prometheus (Debian's package, installed by scripts/setup-test-env) scrapes Ferry's /metrics while known
traffic is sent; its HTTP API must report exactly what was sent. Prometheus asks for OpenMetrics when it scrapes, so
this also checks that it takes Ferry's OpenMetrics page; `promtool check metrics` must accept the text page, and the
`prometheus_client` OpenMetrics parser the OpenMetrics page. With `--metrics-compat triton` Triton's families count
the same traffic under Triton's names."""
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from conftest import start_ferry

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
    r = requests.get(server.url + "/metrics", timeout=5)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=r.text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def infer_diabetes(server, n_ok, n_bad):
    row = [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87]
    for _ in range(n_ok):
        r = requests.post(server.url + "/v2/models/diabetes/infer",
                          json={"inputs": [{"name": "features", "shape": [1, 10], "datatype": "FP32", "data": row}]})
        assert r.status_code == 200
    for _ in range(n_bad):
        r = requests.post(server.url + "/v1/models/diabetes:predict", json={"instances": [row[:9]]})
        assert r.status_code == 400


def test_openmetrics_when_asked_parses_with_the_reference_parser(server):
    infer_diabetes(server, 2, 1)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    r = requests.get(server.url + "/metrics", headers={"Accept": accept}, timeout=5)
    assert r.headers["content-type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert r.text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests_family = families["ferry_requests"]
    assert requests_family.type == "counter"
    ok = [s for s in requests_family.samples if s.labels.get("model") == "diabetes" and s.labels.get("outcome") == "success"]
    assert ok and ok[0].name == "ferry_requests_total" and ok[0].value >= 2
    assert families["ferry_request_duration_seconds"].type == "histogram"
    assert families["ferry_request_duration_seconds"].unit == "seconds"
    assert families["ferry_response_bytes"].unit == "bytes"
    sent = [s for s in families["ferry_response_bytes"].samples if s.labels == {"model": "diabetes", "protocol": "rest_kserve"}]
    assert sent and sent[0].value > 0
    assert families["ferry_build"].type == "info"
    # The same page in the text format names the same series.
    text = requests.get(server.url + "/metrics", timeout=5).text
    assert 'ferry_response_bytes_total{model="diabetes",protocol="rest_kserve"}' in text


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
    # Prometheus negotiated OpenMetrics: only that format carries units, and it keys metadata by family name.
    meta = requests.get(prometheus + "/api/v1/targets/metadata",
                        params={"metric": "ferry_request_duration_seconds"}, timeout=5).json()
    assert meta["status"] == "success" and meta["data"], meta
    assert meta["data"][0]["unit"] == "seconds", meta
    meta = requests.get(prometheus + "/api/v1/metadata", params={"metric": "ferry_requests"}, timeout=5).json()
    assert meta["data"].get("ferry_requests", [{}])[0].get("type") == "counter", meta


@pytest.fixture(scope="module")
def triton_server(repository, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("triton") / "ferry.log")
    s = start_ferry(repository, log, "--model-control-mode", "none", "--metrics-compat", "triton")
    yield s
    s.stop()


def triton_values(page, name):
    """{(model, version): value} of one Triton family on a text page."""
    out = {}
    for family in text_families(page):
        if family.name == name:
            for s in family.samples:
                out[(s.labels["model"], s.labels["version"])] = s.value
    return out


def test_triton_families_count_the_traffic_sent(triton_server):
    row = [5.1, 3.5, 1.4, 0.2]
    body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [row, row]}]}
    for _ in range(5):
        assert requests.post(triton_server.url + "/v2/models/iris/infer", json=body).status_code == 200
    bad = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    for _ in range(2):
        assert requests.post(triton_server.url + "/v2/models/iris/infer", json=bad).status_code == 400
    page = requests.get(triton_server.url + "/metrics", timeout=5).text
    key = ("iris", "1")
    assert triton_values(page, "nv_inference_request_success")[key] == 5
    assert triton_values(page, "nv_inference_request_failure")[key] == 2
    assert triton_values(page, "nv_inference_count")[key] == 10, "two rows per request"
    assert triton_values(page, "nv_inference_exec_count")[key] == 5
    assert triton_values(page, "nv_inference_pending_request_count")[key] == 0
    request_us = triton_values(page, "nv_inference_request_duration_us")[key]
    queue_us = triton_values(page, "nv_inference_queue_duration_us")[key]
    compute_us = triton_values(page, "nv_inference_compute_infer_duration_us")[key]
    assert request_us >= compute_us > 0 and queue_us >= 0, (request_us, queue_us, compute_us)
    # Triton's types and label sets, exactly.
    for name, kind in [("nv_inference_request_success", "counter"), ("nv_inference_request_failure", "counter"),
                       ("nv_inference_count", "counter"), ("nv_inference_exec_count", "counter"),
                       ("nv_inference_request_duration_us", "counter"), ("nv_inference_queue_duration_us", "counter"),
                       ("nv_inference_compute_infer_duration_us", "counter"),
                       ("nv_inference_pending_request_count", "gauge")]:
        assert f"# TYPE {name} {kind}\n" in page, name
        assert f'{name}{{model="iris",version="1"}} ' in page, name
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True, text=True)
    # promtool lints Triton's own names (counters without _total, `_us`) as style problems, never as errors of
    # format; Ferry's own families pass clean.
    problems = [l for l in (check.stdout + check.stderr).splitlines() if l.strip() and "nv_inference" not in l]
    assert not problems, check.stdout + check.stderr
    # OpenMetrics keeps Triton's sample names: its counters without `_total` are `unknown` families there.
    om = requests.get(triton_server.url + "/metrics", headers={"Accept": "application/openmetrics-text"}).text
    families = {f.name: f for f in text_string_to_metric_families(om)}
    assert families["nv_inference_request_success"].type == "unknown"
    assert families["nv_inference_request_success"].samples[0].name == "nv_inference_request_success"
