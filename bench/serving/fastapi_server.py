"""The server a user would write by hand: FastAPI + uvicorn + one onnxruntime session per model, KServe v2 JSON.

GET /v2/health/ready, GET /v2/models/{model} (metadata), POST /v2/models/{model}/infer (JSON tensors).
Usage: python fastapi_server.py PORT NAME=MODEL.onnx [NAME=MODEL.onnx ...]   (single uvicorn worker)
"""

import sys
from typing import Any, List, Optional

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

DATATYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32",
             "tensor(string)": "BYTES", "tensor(bool)": "BOOL"}
NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}


class Tensor(BaseModel):
    name: str
    shape: List[int]
    datatype: str
    data: List[Any]


class InferRequest(BaseModel):
    id: Optional[str] = None
    inputs: List[Tensor]


def dims(shape):
    return [d if isinstance(d, int) else -1 for d in shape]


# ferry bench (like many clients) sends no Content-Type header; FastAPI >= 0.13x refuses such bodies unless told not to.
app = FastAPI(strict_content_type=False)
sessions = {}


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.get("/v2/models/{name}")
def metadata(name: str):
    s = sessions.get(name)
    if s is None:
        raise HTTPException(404, f"model {name} not found")
    spec = lambda t: {"name": t.name, "datatype": DATATYPES.get(t.type, t.type), "shape": dims(t.shape)}
    return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [spec(i) for i in s.get_inputs()], "outputs": [spec(o) for o in s.get_outputs()]}


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest):
    s = sessions.get(name)
    if s is None:
        raise HTTPException(404, f"model {name} not found")
    feeds = {t.name: np.asarray(t.data, dtype=NUMPY[t.datatype]).reshape(t.shape) for t in request.inputs}
    results = s.run(None, feeds)
    outputs = []
    for meta, value in zip(s.get_outputs(), results):
        outputs.append({"name": meta.name, "datatype": DATATYPES.get(meta.type, meta.type),
                        "shape": list(value.shape), "data": value.ravel().tolist()})
    return {"model_name": name, "model_version": "1", "id": request.id, "outputs": outputs}


def main():
    port = int(sys.argv[1])
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
