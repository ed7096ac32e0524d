"""`ferry top --once` against a real server: one frame of per-version rates, latency, queue and drift, taken while
a client keeps sending (so the interval it measures always holds traffic)."""
import subprocess
import threading

import requests

from conftest import ferry_binary


def test_top_once_shows_each_version_with_its_traffic(server):
    row = [5.1, 3.5, 1.4, 0.2]
    body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": row}]}
    stop = threading.Event()
    sent = []

    def client():
        # Bounded: at most 20000 requests, and it stops when `ferry top` has printed its frame.
        with requests.Session() as s:
            for _ in range(20000):
                if stop.is_set():
                    break
                sent.append(s.post(server.url + "/v2/models/iris/infer", json=body).status_code)

    t = threading.Thread(target=client)
    t.start()
    try:
        out = subprocess.run([ferry_binary(), "top", "--once", "--interval", "1s", "--url", server.url],
                             capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        t.join(timeout=60)
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout, "--once prints no escape codes"
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ferry top") and "rates over" in lines[0], out.stdout
    assert lines[1].split() == ["MODEL", "VERSION", "STATE", "REQ/S", "ERR%", "P50", "MS", "P99", "MS", "BATCH",
                                "QUEUE", "DRIFT"], lines[1]
    rows = {tuple(l.split()[:2]): l.split() for l in lines[2:]}
    iris = rows[("iris", "1")]
    assert iris[2] == "READY"
    assert float(iris[3]) > 0, out.stdout
    assert iris[4] == "0.0", "no failed request"
    assert float(iris[5]) > 0 and float(iris[6]) >= float(iris[5]), out.stdout
    assert rows[("broken", "1")][2] == "UNAVAILABLE"
    assert set(sent) == {200}
    # A server that is not there is a clear error.
    out = subprocess.run([ferry_binary(), "top", "--once", "--url", "127.0.0.1:9"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "scraping http://127.0.0.1:9/metrics" in out.stderr, out.stderr
