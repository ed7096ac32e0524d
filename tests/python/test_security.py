"""Model integrity against the real binary: `ferry sign` keys and signatures, `--trusted-key` refusing unsigned and
tampered versions (local and S3), external data outside its version and oversized models refused before they load,
external data inside its version served (from S3 too) and covered by the signature."""
import json
import os
import shutil
import stat
import subprocess

import numpy as np
import onnx
import requests
from onnx import TensorProto, helper

from conftest import ROOT, ferry_binary, start_ferry
from test_updates import IRIS_BODY, s3, wait_for  # noqa: F401  (s3 is a fixture)

IRIS = os.path.join(ROOT, "examples", "models", "iris", "1")


def ferry(*args, check=True):
    return subprocess.run([ferry_binary(), *args], capture_output=True, text=True, timeout=60, check=check)


def make_key(path):
    out = ferry("sign", "--generate-key", str(path))
    assert "key id" in out.stdout, out.stdout
    return str(path) + ".pub"


def copy_iris(root, model, version=1):
    dest = os.path.join(root, model, str(version))
    shutil.copytree(IRIS, dest)
    return dest


def status(server, model):
    """The state and reason of a model's versions, from TF Serving's status API: {version: (state, reason)}."""
    rows = requests.get(f"{server.url}/v1/models/{model}", timeout=10).json()["model_version_status"]
    return {int(r["version"]): (r["state"], r["status"]["error_message"]) for r in rows}


def infer(server, model):
    return requests.post(f"{server.url}/v2/models/{model}/infer", json=IRIS_BODY, timeout=10)


def flip_byte(path, at=-1):
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_generated_keys_are_private_and_never_overwritten(tmp_path):
    key = tmp_path / "signing.key"
    pub = make_key(key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(open(key).read().strip()) == 64 and len(open(pub).read().strip()) == 64
    again = ferry("sign", "--generate-key", str(key), check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    # A secret key others can read is refused, as ssh does.
    os.chmod(key, 0o644)
    root = tmp_path / "repo"
    version = copy_iris(str(root), "iris")
    out = ferry("sign", version, "--key", str(key), check=False)
    assert out.returncode != 0 and "chmod 600" in out.stderr


def test_only_versions_signed_by_a_trusted_key_load(tmp_path):
    root = str(tmp_path / "repo")
    pub = make_key(tmp_path / "trusted.key")
    make_key(tmp_path / "other.key")
    for model in ("signed", "flipped", "edited", "unsigned", "other_key", "extra_file"):
        copy_iris(root, model)
    for model in ("signed", "flipped", "edited", "extra_file"):
        out = ferry("sign", os.path.join(root, model, "1"), "--key", str(tmp_path / "trusted.key"))
        assert f"signed {model} version 1 (3 files)" in out.stdout, out.stdout
    ferry("sign", os.path.join(root, "other_key", "1"), "--key", str(tmp_path / "other.key"))
    flip_byte(os.path.join(root, "flipped", "1", "model.onnx"))
    meta_path = os.path.join(root, "edited", "1", "ferry.json")
    meta = json.load(open(meta_path))
    meta["classes"] = list(reversed(meta["classes"]))
    json.dump(meta, open(meta_path, "w"))
    os.makedirs(os.path.join(root, "extra_file", "1", "warmup"))
    with open(os.path.join(root, "extra_file", "1", "warmup", "1.json"), "w") as f:
        json.dump(IRIS_BODY, f)

    server = start_ferry(root, str(tmp_path / "ferry.log"), "--trusted-key", pub, "--repository-poll-secs", "0.1")
    try:
        assert infer(server, "signed").status_code == 200
        for model, why in [("flipped", "model.onnx changed after signing"),
                           ("edited", "ferry.json changed after signing"),
                           ("extra_file", "warmup/1.json was added after signing"),
                           ("unsigned", "not signed"),
                           ("other_key", "not a trusted key")]:
            state, reason = status(server, model)[1]
            assert state == "END" and why in reason, (model, reason)
            assert infer(server, model).status_code == 503, model

        # Hot reload: an unsigned new version is refused and the signed one keeps serving; once signed, it loads.
        v2 = copy_iris(root, "signed", 2)
        wait_for(lambda: status(server, "signed").get(2, ("", ""))[0] == "END", 30, what="unsigned v2 refused")
        assert "not signed" in status(server, "signed")[2][1]
        assert infer(server, "signed").json()["model_version"] == "1"
        ferry("sign", v2, "--key", str(tmp_path / "trusted.key"))
        wait_for(lambda: infer(server, "signed").json().get("model_version") == "2", 30, what="signed v2 serving")
        # A signed version copied under another number does not verify: the signature binds the version.
        shutil.copytree(v2, os.path.join(root, "signed", "3"))
        wait_for(lambda: status(server, "signed").get(3, ("", ""))[0] == "END", 30, what="copied v3 refused")
        assert "signed for signed version 2, not signed version 3" in status(server, "signed")[3][1]
        assert infer(server, "signed").json()["model_version"] == "2"
        log = open(server.log).read()
        assert "signature verified" in log
    finally:
        server.stop()


def test_without_trusted_keys_unsigned_models_serve(tmp_path):
    root = str(tmp_path / "repo")
    copy_iris(root, "iris")
    server = start_ferry(root, str(tmp_path / "ferry.log"), "--model-control-mode", "none")
    try:
        assert infer(server, "iris").status_code == 200
    finally:
        server.stop()


def add_model(location_or_none, n=4):
    """y = x + w for x float [N, n], with w inside the file or, given a location, in an external file there."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [n], np.arange(n, dtype=np.float32).tobytes(), raw=True)
    if location_or_none is not None:
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[n])
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=location_or_none)
        w.external_data.add(key="length", value=str(4 * n))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_external_data_outside_the_version_and_oversized_models_are_refused_before_loading(tmp_path):
    root = tmp_path / "repo"
    for name, location in [("dotdot", "../../etc/passwd"), ("absolute", "/etc/passwd"),
                           ("inside", None), ("plain", None)]:
        (root / name / "1").mkdir(parents=True)
        path = str(root / name / "1" / "model.onnx")
        if name == "inside":
            # As onnx saves large models: the weights in a file beside model.onnx.
            onnx.save_model(add_model(None), path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="weights.bin", size_threshold=0)
            assert os.path.exists(root / name / "1" / "weights.bin")
        else:
            onnx.save_model(add_model(location), path)
    # A model a few bytes over --max-model-bytes.
    (root / "big" / "1").mkdir(parents=True)
    onnx.save_model(add_model(None, n=4096), str(root / "big" / "1" / "model.onnx"))
    limit = os.path.getsize(root / "big" / "1" / "model.onnx") - 1
    assert os.path.getsize(root / "plain" / "1" / "model.onnx") < limit
    server = start_ferry(str(root), str(tmp_path / "ferry.log"), "--model-control-mode", "none",
                         "--max-model-bytes", str(limit))
    try:
        for model, why in [("dotdot", "outside the version directory (a `..` component)"),
                           ("absolute", "outside the version directory (an absolute path)"),
                           ("big", f"larger than the {limit} bytes --max-model-bytes allows")]:
            state, reason = status(server, model)[1]
            assert state == "END" and why in reason, (model, reason)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
        # As onnx saves it, with its weights in weights.bin beside model.onnx: served like the self-contained one.
        for model in ("plain", "inside"):
            r = requests.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=10)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1, 2, 3, 4], (model, r.text)
    finally:
        server.stop()


def sign_upload_and_serve(tmp_path, s3, pub, version, model, names):  # noqa: F811  (the fixture's value)
    """Signs a staged version with trusted.key, puts its files `names` on S3 as version 1 of `model`, and starts a
    server over the bucket that trusts `pub`; returns the files' bytes by name and the server."""
    client, aws = s3
    ferry("sign", version, "--key", str(tmp_path / "trusted.key"))
    files = {name: open(os.path.join(version, name), "rb").read() for name in names}
    for name, data in files.items():
        client.put_object(Bucket="models", Key=f"team/{model}/1/{name}", Body=data)
    # The trusted keys from the environment, as a Kubernetes Secret would give them.
    env = dict(os.environ, **aws, FERRY_TRUSTED_KEYS=pub)
    server = start_ferry("s3://models/team", str(tmp_path / "ferry.log"), "--repository-poll-secs", "0.2",
                         "--cache-dir", str(tmp_path / "cache"), env=env)
    return files, server


def test_external_data_is_fetched_from_s3_with_its_version_and_signed(tmp_path, s3):  # noqa: F811
    client, _ = s3
    pub = make_key(tmp_path / "trusted.key")
    version = tmp_path / "staged" / "add" / "1"
    version.mkdir(parents=True)
    onnx.save_model(add_model(None), str(version / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    files, server = sign_upload_and_serve(tmp_path, s3, pub, str(version), "add",
                                          ("ferry.sig", "model.onnx", "weights.bin"))
    try:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
        r = requests.post(f"{server.url}/v2/models/add/infer", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1, 2, 3, 4], r.text
        fetched = [p for p in (tmp_path / "cache").rglob("weights.bin")]
        assert fetched, "the data file is fetched into the cache with its version"
        # Version 2: version 1's files, signature included, with one byte of the data flipped.
        tampered = bytearray(files["weights.bin"])
        tampered[0] ^= 0x01
        for name, data in [("ferry.sig", files["ferry.sig"]), ("weights.bin", bytes(tampered)),
                           ("model.onnx", files["model.onnx"])]:
            client.put_object(Bucket="models", Key=f"team/add/2/{name}", Body=data)
        wait_for(lambda: status(server, "add").get(2, ("", ""))[0] == "END", 30, what="tampered v2 refused")
        reason = status(server, "add")[2][1]
        assert "weights.bin changed after signing" in reason, reason
    finally:
        server.stop()


def test_signed_versions_from_s3(tmp_path, s3):  # noqa: F811  (the fixture)
    client, _ = s3
    pub = make_key(tmp_path / "trusted.key")
    staged = tmp_path / "staged"
    version = copy_iris(str(staged), "iris")
    files, server = sign_upload_and_serve(tmp_path, s3, pub, version, "iris",
                                          ("background.csv", "ferry.json", "ferry.sig", "model.onnx"))
    try:
        assert infer(server, "iris").json()["model_version"] == "1"
        # Version 2 on S3: version 1's files, signature included, with one byte of the model flipped.
        tampered = bytearray(files["model.onnx"])
        tampered[-1] ^= 0x01
        for name, data in [("background.csv", files["background.csv"]), ("ferry.json", files["ferry.json"]),
                           ("ferry.sig", files["ferry.sig"]), ("model.onnx", bytes(tampered))]:
            client.put_object(Bucket="models", Key=f"team/iris/2/{name}", Body=data)
        wait_for(lambda: status(server, "iris").get(2, ("", ""))[0] == "END", 30, what="tampered v2 refused")
        reason = status(server, "iris")[2][1]
        assert "model.onnx changed after signing" in reason and "version 1, not iris version 2" in reason, reason
        assert infer(server, "iris").json()["model_version"] == "1"
    finally:
        server.stop()
