"""TLS, tokens with scopes, rate limits and request limits, checked with curl, tritonclient (HTTP and gRPC) and raw
sockets against a real `ferry serve`."""
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import numpy as np
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ROOT, ferry_binary, start_ferry
from test_updates import IRIS_BODY, iris_files, publish, wait_for

TOKENS = "app:infer+read:tok-app,viewer:read:tok-viewer,ops:admin:tok-ops"


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(path_prefix, cn, issuer=None, ca=False, server=True):
    """Writes `<prefix>.pem` and `<prefix>.key`; returns (cert, key). Signed by `issuer` (cert, key) or self."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer[0].subject if issuer else _name(cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server and not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    with open(path_prefix + ".pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(path_prefix + ".key", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = make_cert(os.path.join(d, "ca"), "ferry test CA", ca=True)
    make_cert(os.path.join(d, "server"), "localhost", issuer=ca)
    make_cert(os.path.join(d, "client"), "a client", issuer=ca, server=False)
    return d


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("repo"))
    publish(root, "iris", 1, iris_files())
    env = dict(os.environ, FERRY_TOKENS=TOKENS)
    server = start_ferry(root, str(tmp_path_factory.mktemp("log") / "ferry.log"),
                         "--tls-cert", os.path.join(pki, "server.pem"), "--tls-key", os.path.join(pki, "server.key"),
                         env=env, verify=os.path.join(pki, "ca.pem"))
    yield server
    server.stop()


def curl(*args):
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                         timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_curl_over_https_needs_a_token_with_the_right_scope(tls_server, pki):
    ca = os.path.join(pki, "ca.pem")
    url = tls_server.url + "/v2/models/iris/infer"
    data = json.dumps(IRIS_BODY)
    code, body = curl("--cacert", ca, "-H", "Authorization: Bearer tok-app", "-d", data, url)
    assert code == 200 and json.loads(body)["model_name"] == "iris", body
    code, body = curl("--cacert", ca, "-d", data, url)
    assert code == 401 and "needs a token" in json.loads(body)["error"]
    code, body = curl("--cacert", ca, "-H", "Authorization: Bearer wrong", "-d", data, url)
    assert code == 401 and "not valid" in json.loads(body)["error"]
    code, body = curl("--cacert", ca, "-H", "Authorization: Bearer tok-viewer", "-d", data, url)
    assert code == 403 and "infer" in json.loads(body)["error"]
    # The viewer may read metadata; health and metrics stay open for probes and scrapers.
    code, _ = curl("--cacert", ca, "-H", "Authorization: Bearer tok-viewer", tls_server.url + "/v2/models/iris")
    assert code == 200
    assert curl("--cacert", ca, tls_server.url + "/v2/models/iris")[0] == 401
    assert curl("--cacert", ca, tls_server.url + "/v2/health/ready")[0] == 200
    assert curl("--cacert", ca, tls_server.url + "/metrics")[0] == 200
    # TF Serving's routes are guarded the same way.
    code, _ = curl("--cacert", ca, "-d", json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}),
                   tls_server.url + "/v1/models/iris:predict")
    assert code == 401
    # Plain HTTP gets no answer from a TLS port, and an untrusted certificate is refused by the client.
    with pytest.raises(requests.RequestException):
        requests.get(tls_server.url.replace("https", "http") + "/v2/health/ready", timeout=5)
    assert curl(tls_server.url + "/v2/health/ready")[0] == 0


def test_tritonclient_http_and_grpc_over_tls_with_tokens(tls_server, pki):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    ca = os.path.join(pki, "ca.pem")
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)

    client = httpclient.InferenceServerClient(tls_server.host, ssl=True, ssl_options={"ca_certs": ca})
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("iris", [inp], headers={"Authorization": "Bearer tok-app"})
    assert result.as_numpy("label").tolist() == [b"setosa"]
    with pytest.raises(InferenceServerException, match="token"):
        client.infer("iris", [inp])

    with open(ca, "rb") as f:
        root = f.read()
    g = grpcclient.InferenceServerClient(tls_server.grpc, ssl=True, root_certificates=ca)
    ginp = grpcclient.InferInput("features", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    result = g.infer("iris", [ginp], headers={"authorization": "Bearer tok-app"})
    assert result.as_numpy("label").tolist() == [b"setosa"]
    assert g.is_server_ready()  # health is open
    with pytest.raises(InferenceServerException) as e:
        g.infer("iris", [ginp])
    assert "UNAUTHENTICATED" in str(e.value.status())
    with pytest.raises(InferenceServerException) as e:
        g.infer("iris", [ginp], headers={"authorization": "Bearer tok-viewer"})
    assert "PERMISSION_DENIED" in str(e.value.status())
    assert root


def test_admin_scope_tokens_open_the_management_api(tls_server, pki):
    ca = os.path.join(pki, "ca.pem")
    url = tls_server.admin + "/v2/repository/index"
    assert requests.post(url, json={}, verify=ca, timeout=10).status_code == 401
    assert requests.post(url, json={}, verify=ca, timeout=10,
                         headers={"Authorization": "Bearer tok-app"}).status_code == 403
    r = requests.post(url, json={}, verify=ca, timeout=10, headers={"Authorization": "Bearer tok-ops"})
    assert r.status_code == 200 and r.json()[0]["name"] == "iris"


def test_a_rotated_certificate_is_served_without_a_restart(pki, tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "cert.key")
    shutil.copy(os.path.join(pki, "server.pem"), cert)
    shutil.copy(os.path.join(pki, "server.key"), key)
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--tls-cert", cert, "--tls-key", key,
                         verify=os.path.join(pki, "ca.pem"))
    try:
        port = int(server.url.rsplit(":", 1)[1])
        first = ssl.get_server_certificate(("127.0.0.1", port))
        ca_cert = x509.load_pem_x509_certificate(open(os.path.join(pki, "ca.pem"), "rb").read())
        ca_key = serialization.load_pem_private_key(open(os.path.join(pki, "ca.key"), "rb").read(), None)
        make_cert(str(tmp_path / "new"), "localhost", issuer=(ca_cert, ca_key))
        # Key first, then certificate (a half-written pair is retried, never served).
        shutil.copy(str(tmp_path / "new.key"), key)
        shutil.copy(str(tmp_path / "new.pem"), cert)
        new = open(str(tmp_path / "new.pem")).read()
        wait_for(lambda: ssl.get_server_certificate(("127.0.0.1", port)).strip() == new.strip(), 20,
                 what="the rotated certificate")
        assert first.strip() != new.strip()
        assert requests.post(server.url + "/v2/models/iris/infer", json=IRIS_BODY,
                             verify=os.path.join(pki, "ca.pem"), timeout=10).status_code == 200
    finally:
        server.stop()


def test_mutual_tls_refuses_clients_without_a_certificate(pki, tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    ca = os.path.join(pki, "ca.pem")
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--tls-cert", os.path.join(pki, "server.pem"),
                         "--tls-key", os.path.join(pki, "server.key"), "--tls-client-ca", ca,
                         ready=False, verify=ca)
    try:
        client = (os.path.join(pki, "client.pem"), os.path.join(pki, "client.key"))
        url = server.url + "/v2/models/iris/infer"
        wait_for(lambda: requests.get(server.url + "/v2/health/ready", verify=ca, cert=client,
                                      timeout=5).status_code == 200, 30, what="ready over mTLS")
        assert requests.post(url, json=IRIS_BODY, verify=ca, cert=client, timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(url, json=IRIS_BODY, verify=ca, timeout=10)
    finally:
        server.stop()


def test_per_token_rate_limit_answers_429(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "slow"\ntoken = "tok-slow"\nscopes = ["infer"]\nrate_limit = 2\n'
                      '[[token]]\nname = "fast"\nsha256 = "%s"\nscopes = ["infer"]\n'
                      % __import__("hashlib").sha256(b"tok-fast").hexdigest())
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--tokens-file", str(tokens))
    try:
        url = server.url + "/v2/models/iris/infer"
        codes = [requests.post(url, json=IRIS_BODY, timeout=10,
                               headers={"Authorization": "Bearer tok-slow"}).status_code for _ in range(6)]
        assert codes[:2] == [200, 200] and 429 in codes[2:], codes
        r = requests.post(url, json=IRIS_BODY, timeout=10, headers={"Authorization": "Bearer tok-slow"})
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and "rate limit" in r.json()["error"]
        # Another token has its own bucket (and is stored only as a digest in the file).
        assert all(requests.post(url, json=IRIS_BODY, timeout=10,
                                 headers={"Authorization": "Bearer tok-fast"}).status_code == 200
                   for _ in range(6))
    finally:
        server.stop()


def test_request_limits_and_slow_clients(tmp_path):
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--max-rows-per-request", "2",
                         "--max-tensor-elements", "8", "--max-json-depth", "8", "--client-timeout", "1s")
    try:
        url = server.url + "/v2/models/iris/infer"
        rows = {"inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", "data": [1.0] * 12}]}
        r = requests.post(url, json=rows, timeout=10)
        assert r.status_code == 400 and "rows" in r.json()["error"], r.text
        deep = '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ' \
               + "[" * 20 + "1" + "]" * 20 + "}]}"
        r = requests.post(url, data=deep, timeout=10)
        assert r.status_code == 400 and "nests deeper" in r.json()["error"], r.text
        r = requests.post(server.url + "/v1/models/iris:predict", data='{"instances": ' + "[" * 30 + "]" * 30 + "}",
                          timeout=10)
        assert r.status_code == 400 and "nests deeper" in r.json()["error"], r.text
        assert requests.post(url, json=IRIS_BODY, timeout=10).status_code == 200
        host, port = server.host.split(":")
        # Headers that never finish: the server hangs up after the client timeout.
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n")
            t0 = time.time()
            data = s.recv(4096)
            assert time.time() - t0 < 8 and (data == b"" or data.startswith(b"HTTP/1.1 408")), data
        # A body that stalls: the request fails after the client timeout instead of holding a slot.
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500\r\n\r\n{\"inputs\": [")
            t0 = time.time()
            data = s.recv(4096)
            assert time.time() - t0 < 8, data
            assert data == b"" or data.split(b" ")[1][:1] == b"4", data
    finally:
        server.stop()


def slow_model(layers=12, width=1024):
    """x float [N, 4] -> y [N, width]: a chain of dense layers, slow enough that concurrent requests overlap."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((4 if i == 0 else width, width)).astype(np.float32) * 0.01
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_per_model_concurrency_limit_answers_429(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    root = str(tmp_path / "repo")
    publish(root, "slow", 1, {"model.onnx": slow_model()})
    with open(os.path.join(root, "slow", "config.toml"), "w") as f:
        f.write("max_concurrent_requests = 1\n")
    server = start_ferry(root, str(tmp_path / "ferry.log"))
    try:
        url = server.url + "/v2/models/slow/infer"
        body = {"inputs": [{"name": "x", "shape": [64, 4], "datatype": "FP32", "data": [0.5] * 256}]}

        def call(_):
            r = requests.post(url, json=body, timeout=30)
            return r.status_code, (r.json().get("error", "") if r.status_code != 200 else "")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(16)))
        codes = [c for c, _ in results]
        assert 200 in codes and 429 in codes, codes
        assert all("concurrent" in e for c, e in results if c == 429)
    finally:
        server.stop()


def test_ports_refuse_connections_until_every_model_was_tried(tmp_path):
    # Ports are bound at start (a port in use fails it at once) but listen only after loading, as TF Serving and
    # Triton open theirs: a client connecting meanwhile is refused at once instead of left waiting.
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "examples", "models", "iris"), repo / "iris")
    warmup = repo / "iris" / "1" / "warmup"
    warmup.mkdir()
    rows = 60000  # a slow warm-up: thirty requests of 60,000 rows each
    (warmup / "00.json").write_text(json.dumps(
        {"inputs": [{"name": "features", "shape": [rows, 4], "datatype": "FP32", "data": [1.5] * (4 * rows)}]}))
    for i in range(1, 30):
        os.link(warmup / "00.json", warmup / f"{i:02}.json")
    log_path = tmp_path / "ferry.log"
    proc = subprocess.Popen(
        [ferry_binary(), "serve",
         "--model-repository", str(repo), "--host", "127.0.0.1", "--rest-port", "0", "--grpc-port", "0",
         "--admin-port", "0"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        port = None
        while port is None and time.time() < deadline:
            for line in open(log_path).read().splitlines():
                if "REST port bound" in line:
                    port = int(line.rsplit(":", 1)[1])
            time.sleep(0.01)
        assert port, open(log_path).read()
        log = open(log_path).read()
        assert "state=\"READY\"" not in log and "REST (KServe v2 and TF Serving) listening" not in log, log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # Once loaded, the same port answers, ready.
        wait_for(lambda: "REST (KServe v2 and TF Serving) listening" in open(log_path).read(), timeout=60)
        assert requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200
    finally:
        proc.kill()
        proc.wait()


def test_grpc_errors_naming_a_huge_model_still_arrive(tmp_path):
    # An error message echoing an 8 KB model name travels percent-encoded in the grpc-message header: spaces or
    # non-ASCII letters triple it, past the client's 16 KB metadata limit, and the client lost the status
    # (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"). Messages are cut at 1 KB. Such a name cannot
    # be a model name (at most 255 characters), so the answer is INVALID_ARGUMENT, as for any invalid name.
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    server = start_ferry(root, str(tmp_path / "ferry.log"))
    try:
        with grpc.insecure_channel(server.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for name in ["é" * 4096, "m " * 4096]:
                infer = service_pb2.ModelInferRequest(model_name=name)
                infer.inputs.add(name="features", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0] * 4)
                for call, request in [(stub.ModelMetadata, service_pb2.ModelMetadataRequest(name=name)),
                                      (stub.ModelInfer, infer)]:
                    with pytest.raises(grpc.RpcError) as e:
                        call(request, timeout=10)
                    details = e.value.details()
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), details[:200])
                    assert details.startswith("invalid model name `" + name[:20]), details[:200]
                    assert details.endswith("…") and len(details.encode()) <= 1024, details
            # A valid name that is not there: NOT_FOUND, the whole message.
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="n" * 255), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "n" * 255 in e.value.details(), e.value
    finally:
        server.stop()


def test_a_grpc_call_whose_request_never_finishes_gets_deadline_exceeded(tmp_path):
    # The call's headers arrive, its message never does: past --request-timeout + --client-timeout the server ends
    # it with DEADLINE_EXCEEDED (tonic's own timeout answered CANCELLED). The client sets no deadline of its own, so
    # the status it reports is the server's.
    import threading
    import grpc
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--request-timeout", "1s", "--client-timeout", "1s")
    stop = threading.Event()

    def never_sends():
        stop.wait(30)
        return
        yield

    try:
        with grpc.insecure_channel(server.grpc) as channel:
            call = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=lambda m: m, response_deserializer=lambda m: m)
            t0 = time.time()
            with pytest.raises(grpc.RpcError) as e:
                call(never_sends())
            elapsed = time.time() - t0
            stop.set()
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.value.code(), e.value.details())
            assert 1.5 < elapsed < 6, elapsed
    finally:
        stop.set()
        server.stop()


def test_requests_cut_by_the_shutdown_grace_period_get_503_and_a_failed_exit(tmp_path):
    # Requests wait in the batch queue far longer than the grace period (a 20 s batch delay). When it runs out, the
    # queued requests are answered 503 "server shutting down" (they got no answer at all before) and the process
    # exits with status 1, saying how many it answered and cut (it exited 0 before).
    import signal
    from concurrent.futures import ThreadPoolExecutor
    root = str(tmp_path / "repo")
    publish(root, "iris", 1, iris_files())
    with open(os.path.join(root, "iris", "config.toml"), "w") as f:
        f.write("max_batch_size = 8\nmax_queue_delay_us = 20000000\n")
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--shutdown-grace-period", "1s")
    try:
        url = server.url + "/v2/models/iris/infer"

        def call(_):
            try:
                r = requests.post(url, json=IRIS_BODY, timeout=30)
                return r.status_code, r.json()
            except requests.RequestException as e:
                return None, str(e)

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(call, i) for i in range(3)]
            wait_for(lambda: 'ferry_queue_depth{model="iris",version="1"} 3' in
                     requests.get(server.url + "/metrics", timeout=5).text, timeout=10)
            t0 = time.time()
            server.process.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        code = server.process.wait(timeout=30)
        assert time.time() - t0 < 10
        assert answers == [(503, {"error": "server shutting down"})] * 3, answers
        assert code == 1, code
        log = open(server.log).read()
        assert "answered_503=3" in log and "ran out with requests in flight" in log, log[-2000:]
    finally:
        server.stop()
