"""NVIDIA Triton through PyTriton: the wheel's bundled tritonserver fronts Python inference functions that run
onnxruntime (one session per model, one intra-op thread). Dynamic batching: Triton's dynamic batcher, on for both
models (PyTriton's default for batching models), with a 500 us queue delay for the MLP as Ferry's mlp_batched.

Usage: python pytriton_server.py HTTP_PORT GRPC_PORT METRICS_PORT NAME=MODEL.onnx [...]
"""

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
          "tensor(string)": bytes}


def make_infer(session):
    outputs = session.get_outputs()

    @batch
    def infer(**inputs):
        results = session.run(None, inputs)
        out = {}
        for meta, value in zip(outputs, results):
            if value.dtype == object:
                value = np.char.encode(value.astype(str), "utf-8").reshape(-1, 1)
            out[meta.name] = value
        return out

    return infer


def main():
    http_port, grpc_port, metrics_port = (int(a) for a in sys.argv[1:4])
    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, metrics_port=metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        for arg in sys.argv[4:]:
            name, path = arg.split("=", 1)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            spec = lambda t: Tensor(name=t.name, dtype=DTYPES[t.type],
                                    shape=tuple(d if isinstance(d, int) else -1 for d in t.shape[1:]) or (1,))
            batcher = DynamicBatcher(max_queue_delay_microseconds=500) if name.startswith("mlp") else DynamicBatcher()
            triton.bind(
                model_name=name,
                infer_func=make_infer(session),
                inputs=[spec(i) for i in session.get_inputs()],
                outputs=[spec(o) for o in session.get_outputs()],
                config=ModelConfig(max_batch_size=32, batcher=batcher),
                strict=False,
            )
        triton.serve()


if __name__ == "__main__":
    main()
