"""The Docker image and the Kubernetes manifests agree with the binary they run.

Defaults come from the real binary's `ferry serve --help`, so a change on either side fails here: the Dockerfile's
ports, paths, variables, user, entrypoint and health check; every overlay's container ports, probes, drain timing,
variables and writable paths; and the overlays' config.toml, on which a real server is started and probed.
scripts/check-deploy (run here) renders every overlay and validates it against the Kubernetes schemas offline."""
import http.server
import importlib.machinery
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import ROOT, ferry_binary

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
CHECK_DEPLOY = os.path.join(ROOT, "scripts", "check-deploy")
OVERLAYS = sorted(os.listdir(os.path.join(ROOT, "deploy", "kubernetes", "overlays")))
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None and not os.environ.get("CI"), reason="kubectl not installed")


# --- what the binary says -------------------------------------------------------------------------------------------

def clean_env(**extra):
    """The environment without FERRY_* settings (clap shows set variables' values in --help and obeys them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(extra)
    return env


def serve_help():
    """`ferry serve --help` as {flag: {"env": NAME, "default": VALUE or None}}."""
    text = subprocess.run([ferry_binary(), "serve", "--help"], capture_output=True, text=True, check=True,
                          env=clean_env()).stdout
    options = {}
    for block in re.split(r"\n(?=\s{2,}(?:-\w, )?--[a-z])", text):
        m = re.match(r"\s*(?:-\w, )?--([a-z0-9-]+)", block)
        if not m:
            continue
        env = re.search(r"\[env: (\w+)", block)
        default = re.search(r"\[default: ([^\]]*)\]", block)
        options[m.group(1)] = {"env": env and env.group(1), "default": default and default.group(1)}
    return options


@pytest.fixture(scope="module")
def flags():
    options = serve_help()
    assert {"model-repository", "host", "rest-port", "grpc-port", "shutdown-grace-period"} <= set(options)
    return options


def env_names(flags):
    return {o["env"]: name for name, o in flags.items() if o["env"]}


def seconds(duration):
    m = re.fullmatch(r"([\d.]+)(ms|s|m)?", str(duration).strip())
    assert m, f"not a duration: {duration}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[m.group(2)]


# --- the Dockerfile -------------------------------------------------------------------------------------------------

def dockerfile_stages(path=DOCKERFILE):
    """[(stage name, [(INSTRUCTION, arguments)])], continuation lines joined and comments dropped."""
    instructions, current = [], ""
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#") or (not current and not stripped):
                continue
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            current += stripped
            word, _, rest = current.partition(" ")
            instructions.append((word.upper(), rest.strip()))
            current = ""
    stages = []
    for word, rest in instructions:
        if word == "FROM":
            m = re.search(r"\s+AS\s+(\S+)$", rest, re.I)
            stages.append((m.group(1) if m else None, []))
        elif stages:
            stages[-1][1].append((word, rest))
    return stages


def final_stage():
    return dockerfile_stages()[-1][1]


def image_env(stage):
    env = {}
    for word, rest in stage:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def copies(stage):
    """[(from stage or None, [sources], destination)]."""
    out = []
    for word, rest in stage:
        if word == "COPY":
            parts = rest.split()
            source_stage = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
            paths = [p for p in parts if not p.startswith("--")]
            out.append((source_stage, paths[:-1], paths[-1]))
    return out


def healthcheck_command(stage):
    (rest,) = [r for w, r in stage if w == "HEALTHCHECK"]
    m = re.search(r"\bCMD\s+(\[.*\])$", rest)
    assert m, "HEALTHCHECK uses the exec form"
    argv = json.loads(m.group(1))
    assert argv[:2] == ["/bin/bash", "-c"], argv
    return argv[2]


def onnxruntime_version():
    with open(os.path.join(ROOT, "scripts", "fetch-onnxruntime")) as f:
        return re.search(r"^version=(\S+)$", f.read(), re.M).group(1)


def test_dockerfile_agrees_with_the_binary(flags):
    stages = dockerfile_stages()
    stage = stages[-1][1]
    env = image_env(stage)
    known = env_names(flags)

    # Ports: the binary's defaults, and nothing else.
    exposed = {int(p.split("/")[0]) for w, r in stage if w == "EXPOSE" for p in r.split()}
    assert exposed == {int(flags["rest-port"]["default"]), int(flags["grpc-port"]["default"])}

    # Variables: real ones, and only paths inside the image (anything else would shadow the --config file).
    for name, value in env.items():
        assert name in known, f"the Dockerfile sets {name}, which `ferry serve` does not read"
        assert value.startswith("/"), f"{name}={value}: the image should set only paths"
    assert env["FERRY_MODEL_REPOSITORY"] == "/models"
    run = " ".join(r for w, r in stage if w == "RUN")
    assert "/models" in run and env["FERRY_CACHE_DIR"] in run, "the image creates /models and the cache folder"
    volumes = {v for w, r in stage if w == "VOLUME" for v in json.loads(r)}
    assert env["FERRY_CACHE_DIR"] in volumes, "the cache is a volume, so a read-only root filesystem works"

    # ONNX Runtime: the version scripts/fetch-onnxruntime pins, copied to where FERRY_ONNXRUNTIME_LIB points.
    version = onnxruntime_version()
    destinations = {dst: (src_stage, srcs) for src_stage, srcs, dst in copies(stage)}
    lib = env["FERRY_ONNXRUNTIME_LIB"]
    assert lib.endswith(f"/libonnxruntime.so.{version}")
    src_stage, srcs = destinations[lib]
    fetch = dict(stages)[src_stage]
    assert ("RUN", "scripts/fetch-onnxruntime") in fetch
    workdir = [r for w, r in fetch if w == "WORKDIR"][-1]
    assert srcs == [f"{workdir}/.ferry/lib/libonnxruntime.so.{version}"]

    # The user: numeric (Kubernetes' runAsNonRoot can only check a number) and not root.
    (user,) = [r for w, r in stage if w == "USER"]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), f"USER {user}"

    # The entrypoint is the binary built by `cargo build --release --locked -p ferry`; the command is `serve`.
    (entrypoint,) = [json.loads(r) for w, r in stage if w == "ENTRYPOINT"]
    (cmd,) = [json.loads(r) for w, r in stage if w == "CMD"]
    assert cmd == ["serve"]
    binary_stage, _ = destinations[entrypoint[0]]
    build = dict(stages)[binary_stage]
    assert any(w == "RUN" and "cargo build --release --locked -p ferry" in r for w, r in build)
    parsed = subprocess.run([ferry_binary(), *entrypoint[1:], *cmd, "--help"], capture_output=True, text=True,
                            env=clean_env())
    assert parsed.returncode == 0, parsed.stderr

    # The health check asks for readiness on the REST port the binary defaults to.
    check = healthcheck_command(stage)
    assert "/v2/health/ready" in check
    assert f"${{FERRY_REST_PORT:-{flags['rest-port']['default']}}}" in check


def dockerignored(path, patterns):
    import fnmatch

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_local_state():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for _, stage in dockerfile_stages():
        for src_stage, srcs, _ in copies(stage):
            if src_stage is None:
                for src in srcs:
                    assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: no such file"
                    assert not dockerignored(src, patterns), f"COPY {src}, but .dockerignore drops it"
    for local in ("target", ".venv", ".ferry", ".git", "crates/server/__pycache__"):
        assert dockerignored(local, patterns), f".dockerignore should drop {local}"


# --- a real server with an overlay's configuration ------------------------------------------------------------------

def start_ferry(tmp_path, config_text, env_values):
    """`ferry serve` with the overlay's config.toml and its literal FERRY_* variables, on free loopback ports."""
    repo = tmp_path / "models"
    shutil.copytree(os.path.join(ROOT, "examples", "models", "iris"), repo / "iris")
    config = tmp_path / "config.toml"
    config.write_text(config_text)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = clean_env(**env_values)
    env.update(FERRY_CONFIG=str(config), FERRY_MODEL_REPOSITORY=str(repo), FERRY_CACHE_DIR=str(cache))
    log_path = tmp_path / "ferry.log"
    log = open(log_path, "w")
    # Flags outrank the file and the environment: loopback and free ports, so tests never need a fixed port.
    proc = subprocess.Popen([ferry_binary(), "serve", "--host", "127.0.0.1", "--rest-port", "0", "--grpc-port", "0",
                             "--metrics-port", "0", "--admin-port", "0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    addresses = {}
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(addresses) < 3:
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
                record = record.get("fields", record)
                message, address = record.get("message", ""), record.get("address")
            except ValueError:
                m = re.search(r"(REST|gRPC|metrics) .*listening address=(\S+)", line)
                message, address = (m.group(1), m.group(2)) if m else ("", None)
            for kind in ("REST", "gRPC", "metrics"):
                if address and message.startswith(kind):
                    addresses[kind] = address
        time.sleep(0.05)
    if len(addresses) < 3:
        proc.kill()
        raise AssertionError("ferry did not start with this configuration:\n" + log_path.read_text())
    return proc, addresses, log_path


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


class Status503(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_health_check_passes_on_a_ready_server_only(tmp_path):
    check = healthcheck_command(final_stage())
    with open(os.path.join(ROOT, "deploy", "kubernetes", "base", "config.toml")) as f:
        proc, addresses, _ = start_ferry(tmp_path, f.read(), {})
    try:
        wait_ready("http://" + addresses["REST"])
        port = addresses["REST"].rsplit(":", 1)[1]
        ok = subprocess.run(["/bin/bash", "-c", check], env=clean_env(FERRY_REST_PORT=port), capture_output=True)
        assert ok.returncode == 0, ok.stderr
    finally:
        stop(proc)
    closed = subprocess.run(["/bin/bash", "-c", check], env=clean_env(FERRY_REST_PORT=port), capture_output=True)
    assert closed.returncode != 0, "a stopped server fails the health check"
    unready = http.server.HTTPServer(("127.0.0.1", 0), Status503)
    threading.Thread(target=unready.serve_forever, daemon=True).start()
    try:
        r = subprocess.run(["/bin/bash", "-c", check], capture_output=True,
                           env=clean_env(FERRY_REST_PORT=str(unready.server_address[1])))
        assert r.returncode != 0, "a server that answers 503 fails the health check"
    finally:
        unready.shutdown()


def wait_ready(url):
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if requests.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


# --- the Kubernetes manifests ---------------------------------------------------------------------------------------

def check_deploy_module():
    loader = importlib.machinery.SourceFileLoader("check_deploy", CHECK_DEPLOY)
    module = type(sys)(loader.name)
    module.__file__ = CHECK_DEPLOY
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """{overlay: [objects]} as `kubectl kustomize` renders them (through check-deploy, which handles old kubectl)."""
    cd = check_deploy_module()
    binary = cd.kubectl()
    root = cd.KUSTOMIZE_ROOT
    if cd.kubectl_minor(binary) < 21:
        root = cd.legacy_tree(str(tmp_path_factory.mktemp("kustomize")))
    return {name: cd.render(binary, os.path.join(root, "overlays", name)) for name in OVERLAYS}


@needs_kubectl
def test_every_overlay_renders_and_validates_offline():
    r = subprocess.run([sys.executable, CHECK_DEPLOY], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in OVERLAYS:
        assert re.search(rf"^{name}: .*: ok$", r.stdout, re.M), r.stdout


def one(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"one {kind}, got {len(found)}"
    return found[0]


def config_toml(objects, deployment):
    """The config.toml the pods read: FERRY_CONFIG's file, from the ConfigMap mounted at its folder."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    path = {e["name"]: e.get("value") for e in container["env"]}["FERRY_CONFIG"]
    folder, key = os.path.split(path)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    volume = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}[mount["name"]]
    configmap = [o for o in objects if o["kind"] == "ConfigMap"
                 and o["metadata"]["name"] == volume["configMap"]["name"]]
    assert configmap, f"FERRY_CONFIG={path}, but no ConfigMap is mounted at {folder}"
    return configmap[0]["data"][key]


def effective_settings(flags, config_text, image, container_env):
    """flag -> value, as `ferry serve` resolves them: defaults < config file < environment (image, then pod)."""
    import tomllib

    settings = {name: o["default"] for name, o in flags.items()}
    for key, value in tomllib.loads(config_text).get("serve", {}).items():
        flag = key.replace("_", "-")
        assert flag in flags, f"config.toml key `{key}` is not a `ferry serve` flag"
        settings[flag] = str(value)
    by_env = env_names(flags)
    for name, value in {**image, **container_env}.items():
        if name.startswith("FERRY_"):
            assert name in by_env, f"{name} is set, but `ferry serve` does not read it"
            settings[by_env[name]] = value
    return settings


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_agrees_with_the_binary_and_the_image(overlay, rendered, flags, tmp_path):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container and "args" not in container, "the image's `ferry serve` runs as it is"
    literal_env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    secret_env = {e["name"] for e in container.get("env", []) if "valueFrom" in e}
    for name in secret_env:
        if name.startswith("FERRY_"):
            assert name in env_names(flags), f"{name} comes from a Secret, but `ferry serve` does not read it"
    config_text = config_toml(objects, deployment)
    stage = final_stage()
    settings = effective_settings(flags, config_text, image_env(stage), literal_env)

    # Ports: what the server listens on is what the container and the Service declare.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(settings["grpc-port"])
    assert ports["http"] == int(settings["rest-port"])
    assert ports["metrics"] == int(settings["metrics-port"])
    service = one(objects, "Service")
    for p in service["spec"]["ports"]:
        assert p["port"] == ports[p["targetPort"]], f"Service port {p['name']} keeps the container's number"
    exposed = {int(p) for w, r in stage if w == "EXPOSE" for p in r.split()}
    assert {ports["grpc"], ports["http"]} <= exposed

    # Probes: the v2 health endpoints, on the REST port.
    expected = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                "readinessProbe": "/v2/health/ready"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}"
        assert ports.get(get["port"], get["port"]) == ports["http"], f"{probe} asks port {get['port']}"

    # Draining: the pod is killed only after the preStop pause and Ferry's own grace period.
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = seconds(settings["shutdown-grace-period"])
    assert pod["terminationGracePeriodSeconds"] > pause + grace, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= preStop {pause}s + {grace}s")

    # The user is the image's, and everything Ferry writes is on a writable volume (the root is read-only).
    uid, gid = (int(x) for x in [r for w, r in stage if w == "USER"][0].split(":"))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for path in ("/tmp", settings["cache-dir"]):
        assert "emptyDir" in mounts.get(path, {}), f"{path} must be a writable emptyDir"
    repository = settings["model-repository"]
    assert repository.startswith("s3://") or repository in mounts, f"the model repository {repository} is mounted"

    # The configuration works on the real binary: it starts with it, answers the probes, and exports the gauge the
    # HorizontalPodAutoscaler scales on.
    server_env = {k: v for k, v in literal_env.items()
                  if k.startswith("FERRY_") and k not in ("FERRY_MODEL_REPOSITORY", "FERRY_CACHE_DIR", "FERRY_CONFIG")}
    server_env.update({name: "test-token-0123456789abcdef" for name in secret_env if name.startswith("FERRY_")})
    proc, addresses, log = start_ferry(tmp_path, config_text, server_env)
    try:
        url = "http://" + addresses["REST"]
        wait_ready(url)
        for path in expected.values():
            assert requests.get(url + path, timeout=5).status_code == 200, path
        metrics = requests.get("http://" + addresses["metrics"] + "/metrics", timeout=5).text
        hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
        for hpa in hpas:
            for m in hpa["spec"]["metrics"]:
                if m["type"] == "Pods":
                    name = m["pods"]["metric"]["name"]
                    assert f"# TYPE {name} gauge" in metrics, f"the HPA scales on {name}, which /metrics lacks"
    finally:
        stop(proc)


@pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"), reason="promtool not installed")
def test_the_prometheus_adapter_rule_is_valid_promql(tmp_path):
    import yaml

    with open(os.path.join(ROOT, "deploy", "kubernetes", "prometheus-adapter", "values.yaml")) as f:
        rules = yaml.safe_load(f)["rules"]["custom"]
    recorded = []
    for i, rule in enumerate(rules):
        # The adapter's templates, filled as it fills them for one namespace's pods.
        query = (rule["metricsQuery"].replace("<<.Series>>", rule["name"]["as"])
                 .replace("<<.LabelMatchers>>", 'namespace="ferry",pod=~"ferry-a|ferry-b"')
                 .replace("<<.GroupBy>>", "pod"))
        recorded += [{"record": f"adapter:metrics_query:{i}", "expr": query},
                     {"record": f"adapter:series_query:{i}", "expr": rule["seriesQuery"]}]
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": recorded}]}))
    r = subprocess.run([shutil.which("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
