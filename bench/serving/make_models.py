#!/usr/bin/env python3
"""Builds the benchmark models and repositories for bench/serving under a work dir (default .ferry/bench/).

- models/iris.onnx: a copy of examples/models/iris/1/model.onnx (input `features` FP32 [-1,4]; outputs `label`
  STRING [-1] and `probabilities` FP32 [-1,3]).
- models/mlp.onnx: a 64-feature MLP, two hidden layers of 256 (relu), 10 linear outputs, fixed seed, opset 17
  (input `input` FP32 [-1,64], output `logits` FP32 [-1,10]); models/mlp.weights: the same weights in the format
  of crates/server/examples/ceiling.rs `--mlp` (little-endian: u32 layer count, then per layer u32 rows, u32 cols,
  rows*cols f32 weights row-major input dimension first, cols f32 biases).
- ferry/: Ferry's repository: iris (examples/models/iris/config.toml: batching on, no queue delay), mlp (batching off), mlp_batched (dynamic batching on), mlp_overload (batching on,
  max_queue_size = 64, for the overload run).

Needs numpy and onnx (run.py runs it in its own venv). Usage: make_models.py [WORKDIR] [--batched-config TOML]
"""

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261128
# What mlp_batched runs with: the best of the settings `run.py --tune` tried on the 2-core machine (TUNING.md): one
# session taking the batches leaves the other core to HTTP and JSON.
BATCHED_CONFIG = """max_batch_size = 32
max_queue_delay_us = 500
max_queue_size = 1024
instances = 1
intra_op_threads = 1
"""
# iris runs as the bundled example does (dynamic batching without a queue delay, as Triton's iris in
# pytriton_server.py batches with its default batcher).
IRIS_CONFIG = (ROOT / "examples/models/iris/config.toml").read_text()
UNBATCHED_CONFIG = """instances = 2
intra_op_threads = 1
"""
OVERLOAD_CONFIG = """max_batch_size = 32
max_queue_delay_us = 500
preferred_batch_sizes = [16, 32]
max_queue_size = 64
instances = 2
intra_op_threads = 1
"""


def mlp_layers(seed=SEED):
    rng = np.random.default_rng(seed)
    sizes = [64, 256, 256, 10]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        layers.append((w, b))
    return layers


def mlp_onnx(layers):
    nodes, inits = [], []
    x = "input"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        mm = f"mm{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [mm]))
        last = i == len(layers) - 1
        added = "logits" if last else f"add{i}"
        nodes.append(helper.make_node("Add", [mm, f"b{i}"], [added]))
        if not last:
            nodes.append(helper.make_node("Relu", [added], [f"h{i}"]))
            x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp_64_256_256_10",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench/serving")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weights_file(layers):
    out = bytearray(struct.pack("<I", len(layers)))
    for w, b in layers:
        out += struct.pack("<II", w.shape[0], w.shape[1])
        out += w.astype("<f4").tobytes()
        out += b.astype("<f4").tobytes()
    return bytes(out)


def write_if_changed(path: Path, data: bytes):
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main():
    args = sys.argv[1:]
    batched = BATCHED_CONFIG
    if "--batched-config" in args:
        i = args.index("--batched-config")
        batched = args[i + 1].replace("\\n", "\n")
        del args[i : i + 2]
    work = Path(args[0]) if args else ROOT / ".ferry" / "bench"
    models = work / "models"
    layers = mlp_layers()
    iris = (ROOT / "examples/models/iris/1/model.onnx").read_bytes()
    mlp = mlp_onnx(layers).SerializeToString()
    write_if_changed(models / "iris.onnx", iris)
    write_if_changed(models / "mlp.onnx", mlp)
    write_if_changed(models / "mlp.weights", weights_file(layers))

    repo = work / "ferry"
    for name, data, config in [
        ("iris", iris, IRIS_CONFIG),
        ("mlp", mlp, UNBATCHED_CONFIG),
        ("mlp_batched", mlp, batched),
        ("mlp_overload", mlp, OVERLOAD_CONFIG),
    ]:
        write_if_changed(repo / name / "1" / "model.onnx", data)
        write_if_changed(repo / name / "config.toml", config.encode())
    # Only the benchmark's models in the repository.
    for extra in repo.iterdir():
        if extra.name not in {"iris", "mlp", "mlp_batched", "mlp_overload"}:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()

    # Reference outputs, so run.py can check each peer answers the same numbers.
    x = (np.arange(64, dtype=np.float32) % 7 - 3) / 3
    h = x[None, :]
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    write_if_changed(models / "mlp.reference.txt", (" ".join(f"{v:.6g}" for v in h[0]) + "\n").encode())
    print(work)


if __name__ == "__main__":
    main()
