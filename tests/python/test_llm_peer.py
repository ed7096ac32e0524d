"""The LLM peer (llm_peer.py: llama.cpp's OpenAI-compatible server from llama-cpp-python) serving SmolLM2-135M-Instruct
(scripts/fetch-smollm2), called with OpenAI's own Python client: it answers the capital of France, streams, and
renders the GGUF's own chat template. Proves the peer that Ferry's LLM serving is compared with."""
import os
import subprocess

import pytest

from conftest import ROOT
from llm_peer import start_peer

QUESTION = "What is the capital of France? Answer with one word."


@pytest.fixture(scope="module")
def smollm2():
    folder = subprocess.run([os.path.join(ROOT, "scripts", "fetch-smollm2")], check=True, capture_output=True,
                            text=True).stdout.strip()
    return os.path.join(ROOT, folder, "1", "model.gguf")


@pytest.fixture(scope="module")
def peer(smollm2, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup-llama-cpp-python "
                                            "installs it)")
    p = start_peer(smollm2, str(tmp_path_factory.mktemp("peer") / "llama_cpp_server.log"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(peer):
    from openai import OpenAI

    return OpenAI(base_url=peer.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def model_id(client):
    return client.models.list().data[0].id


def test_chat_completion_names_paris(client):
    out = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": QUESTION}],
                                         temperature=0, max_tokens=32)
    choice = out.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert 0 < out.usage.completion_tokens <= 32


def test_streaming_chat_completion(client):
    stream = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=32, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_uses_the_gguf_chat_template(client, smollm2):
    """The prompt is SmolLM2's own Jinja template, with its default system message (llama-cpp-python's built-in
    ChatML would leave that out): the prompt token count says which."""
    import jinja2
    from llama_cpp import Llama

    vocab = Llama(model_path=smollm2, vocab_only=True, verbose=False)
    try:
        template = vocab.metadata["tokenizer.chat_template"]
        messages = [{"role": "user", "content": QUESTION}]
        prompt = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
        assert "You are a helpful AI assistant named SmolLM" in prompt
        want = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    finally:
        vocab.close()
    out = client.chat.completions.create(model=model_id(client), messages=messages, temperature=0, max_tokens=1)
    assert out.usage.prompt_tokens == want
