"""llama.cpp's own OpenAI-compatible server (`python -m llama_cpp.server`, from llama-cpp-python's [server] extra,
installed in .venv by scripts/setup-llama-cpp-python) as a peer for Ferry's LLM serving: started on a free port of
127.0.0.1 and ready once /v1/models answers.

The chat format is `chat_template.default`: the GGUF's own `tokenizer.chat_template`, rendered with Jinja2 (left
out, llama-cpp-python would swap a template equal to its built-in ChatML for its own formatter, and fall back to
`llama-2` for a GGUF without one).

From a shell (prints the base URL, serves until interrupted or terminated):
    .venv/bin/python tests/python/llm_peer.py .ferry/examples/smollm2/1/model.gguf
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

from conftest import stop_process


class Peer:
    """A running llama_cpp.server: url (http://127.0.0.1:PORT, the OpenAI API under /v1), process, log (path)."""

    def __init__(self, process, url, log, log_file):
        self.process = process
        self.url = url
        self.log = log
        self._log_file = log_file

    def stop(self):
        stop_process(self.process, self._log_file)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(model, log_path, *extra, n_ctx=8192, n_threads=2, chat_format="chat_template.default",
               python=sys.executable, timeout=120, tries=3):
    """Starts llama_cpp.server on `model` (a GGUF path) and waits until it answers; `extra` are more server options
    (`--n_parallel 4`, ...). A port taken between picking and binding it is retried on another."""
    for _ in range(tries):
        port = free_port()
        log_file = open(log_path, "w")
        process = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(n_threads),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--chat_format", chat_format,
             *extra],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            try:
                if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                    return Peer(process, url, log_path, log_file)
            except requests.RequestException:
                pass
            time.sleep(0.1)
        stop_process(process, log_file)
        if "address already in use" not in open(log_path).read().lower():
            break
    raise RuntimeError("llama_cpp.server did not become ready:\n" + open(log_path).read())


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: llm_peer.py MODEL.gguf [server options...]")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the peer on SIGTERM as on Ctrl-C
    log = os.path.join(tempfile.mkdtemp(), "llama_cpp_server.log")
    peer = start_peer(sys.argv[1], log, *sys.argv[2:])
    print(peer.url, flush=True)
    print(f"log: {log}", file=sys.stderr, flush=True)
    try:
        peer.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
