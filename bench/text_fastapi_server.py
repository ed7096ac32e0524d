"""Peer (a): the Python server a user would write for sentence embeddings: FastAPI + uvicorn (uvloop, httptools) +
the Python `tokenizers` + `onnxruntime`, with TEI's `POST /embed` ({"inputs": "text"} or {"inputs": [...]}).

Workers: WORKERS uvicorn worker processes (default: one per core, 2 here), each with one ONNX Runtime session of one
intra-op thread (so 2 x 1 engine threads, as Ferry's default 2 instances x 1 thread). Processes rather than threads
because request parsing, JSON and pooling hold the GIL; the kernel spreads connections over the workers' shared socket.

Micro-batching (BATCHING=1, default): in each worker, requests queue their texts; one batcher task takes everything
waiting (up to 64 texts) as soon as the engine is free, with no added delay, and runs tokenization + inference in a
single executor thread (both release the GIL, so the event loop keeps reading requests meanwhile). Texts are sorted
by length and cut into runs (at most 64 texts / 16384 padded tokens, at most a quarter padding: Ferry's rule),
each padded to its longest text.
BATCHING=0 runs each request alone in the executor.

Usage: MODEL_DIR=... python text_fastapi_server.py PORT
"""

import asyncio
import concurrent.futures
import os
import sys
from typing import List, Union

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker; no rayon pool fighting the engine

import orjson  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from pydantic import BaseModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import text_common  # noqa: E402

MODEL_DIR = os.environ.get("MODEL_DIR", "")
BATCHING = os.environ.get("BATCHING", "1") == "1"


class EmbedRequest(BaseModel):
    inputs: Union[str, List[str]]


class State:
    tokenizer = None
    session = None
    executor = None
    queue = None


async def batcher():
    loop = asyncio.get_running_loop()
    while True:
        items = [await State.queue.get()]
        n = len(items[0][0])
        while n < text_common.MAX_TEXTS and not State.queue.empty():
            item = State.queue.get_nowait()
            items.append(item)
            n += len(item[0])
        texts = [t for texts, _ in items for t in texts]
        try:
            out = await loop.run_in_executor(State.executor, text_common.embed, State.tokenizer, State.session, texts)
        except Exception as e:  # answer every waiter, keep batching
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
            continue
        i = 0
        for texts_, fut in items:
            if not fut.done():
                fut.set_result(out[i : i + len(texts_)])
            i += len(texts_)


async def lifespan(app):
    State.tokenizer = text_common.load_tokenizer(MODEL_DIR)
    State.session = text_common.load_session(MODEL_DIR, threads=1)
    State.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    State.queue = asyncio.Queue()
    task = asyncio.create_task(batcher()) if BATCHING else None
    yield
    if task:
        task.cancel()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health():
    return {"ok": True}


@app.post("/embed")
async def embed(request: EmbedRequest):
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    if not texts:
        return Response(b'{"error":"inputs is empty"}', status_code=422, media_type="application/json")
    if BATCHING:
        fut = asyncio.get_running_loop().create_future()
        State.queue.put_nowait((texts, fut))
        out = await fut
    else:
        out = await asyncio.get_running_loop().run_in_executor(
            State.executor, text_common.embed, State.tokenizer, State.session, texts)
    return Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def main():
    port = int(sys.argv[1])
    workers = int(os.environ.get("WORKERS", os.cpu_count() or 1))
    uvicorn.run("text_fastapi_server:app", app_dir=os.path.dirname(os.path.abspath(__file__)), host="127.0.0.1",
                port=port, workers=workers, log_level="warning", access_log=False, loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
