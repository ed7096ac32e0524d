"""The monitoring assets in deploy/monitoring agree with what Ferry exports: promtool accepts and unit-tests the
alert rules, and every metric the Grafana dashboard and the alerts query exists on a live /metrics page."""
import json
import os
import re
import shutil
import subprocess

import pytest
import requests

from conftest import ROOT

MONITORING = os.path.join(ROOT, "deploy", "monitoring")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"), reason="promtool not installed")


@needs_promtool
def test_promtool_checks_and_unit_tests_the_alert_rules():
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"], ["check", "config", "prometheus.yml"]):
        r = subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"


def referenced_metrics(expr):
    return set(re.findall(r"\b((?:ferry|process)_[a-z_]+)\b", expr))


def test_every_queried_metric_exists(server):
    # Make sure batches and requests have happened, so every family has a series.
    requests.post(server.url + "/v2/models/iris/infer",
                  json={"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})
    page = requests.get(server.url + "/metrics", timeout=5).text
    exported = {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line and not line.startswith("#")}
    with open(os.path.join(MONITORING, "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    with open(os.path.join(MONITORING, "alerts.yml")) as f:
        exprs += re.findall(r"expr: \|?\n?((?:.*\n)*?)\s*for:", f.read())
    queried = set().union(*(referenced_metrics(e) for e in exprs))
    assert queried, "the dashboard queries something"
    missing = sorted(m for m in queried if m not in exported)
    assert not missing, f"queried but not exported: {missing}"
