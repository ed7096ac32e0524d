"""Peer (c): NVIDIA Triton through PyTriton (the `nvidia-pytriton` wheel's bundled tritonserver), tokenization in
Python: the inference callable takes a BYTES tensor of raw texts [n, 1] and returns FP32 embeddings [n, 384]
(tokenizers + onnxruntime + mean pooling + normalization, as text_common.embed). Called over KServe v2 HTTP JSON.

Instances: INSTANCES callables (default 2, one per core), each with its own ONNX Runtime session of one intra-op
thread (Ferry's default 2 instances x 1 thread). Triton's dynamic batcher is on: max_batch_size 64 (Ferry's text
batch) and a 500 us queue delay (Ferry's default max_queue_delay_us).

Usage: MODEL_DIR=... python text_pytriton_server.py HTTP_PORT GRPC_PORT METRICS_PORT
"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import text_common  # noqa: E402

MODEL_DIR = os.environ["MODEL_DIR"]


def make_infer():
    tokenizer = text_common.load_tokenizer(MODEL_DIR)
    session = text_common.load_session(MODEL_DIR, threads=1)

    @batch
    def infer(text):
        texts = [row[0].decode("utf-8") for row in text]
        return {"embedding": text_common.embed(tokenizer, session, texts)}

    return infer


def main():
    http_port, grpc_port, metrics_port = (int(a) for a in sys.argv[1:4])
    instances = int(os.environ.get("INSTANCES", os.cpu_count() or 1))
    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, metrics_port=metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="minilm",
            infer_func=[make_infer() for _ in range(instances)],
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="embedding", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=text_common.MAX_TEXTS,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=500)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
