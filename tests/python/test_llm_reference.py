"""The tiny Llama GGUF of llm_reference.py against llama.cpp itself (through llama-cpp-python): llama.cpp loads the
file, its tokenizer and chat template, and its logits equal the NumPy reference's to 1e-4, in one batch and through
its KV cache; its greedy chat completion is the reference's. This is what makes the writer and the reference fit to
check Ferry's LLM serving against."""
import numpy as np
import pytest

import llm_reference as ref

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    """(the model, its GGUF path, llama.cpp's Llama over it with float32 KV cache and all logits kept)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (scripts/setup-llama-cpp-python installs it)")
    model = ref.tiny_llama(seed=0, tied=request.param)
    path = ref.write_gguf(model, tmp_path_factory.mktemp("tiny") / "model.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.n_ctx, n_batch=64, n_threads=2, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                          verbose=False)
    yield model, path, llm
    llm.close()


def tokens_for_test(model, n, seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(0, model.n_vocab, n)]


def llama_logits(llm, *chunks):
    llm.reset()
    for chunk in chunks:
        llm.eval(chunk)
    return np.array(llm.scores[:llm.n_tokens], dtype=np.float64)


def test_llama_cpp_reads_the_hyperparameters_and_vocabulary(tiny):
    model, _, llm = tiny
    assert llm.n_vocab() == model.n_vocab
    assert llm.n_embd() == model.n_embd
    assert llm.n_ctx() == model.n_ctx
    assert llm.token_bos() == ref.BOS_ID and llm.token_eos() == ref.EOS_ID
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["tokenizer.chat_template"] == ref.CHAT_TEMPLATE


def test_logits_match_the_reference_in_one_batch(tiny):
    model, _, llm = tiny
    tokens = tokens_for_test(model, 48)
    got = llama_logits(llm, tokens)
    want = ref.forward(model, tokens)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOLERANCE
    assert want.std() > 0.5  # logits of a useful size, so the tolerance means something


def test_logits_match_the_reference_through_the_kv_cache(tiny):
    # A prompt in chunks across n_batch (64), then single tokens: later positions attend to cached keys and values.
    model, _, llm = tiny
    tokens = tokens_for_test(model, 100, seed=2)
    got = llama_logits(llm, tokens[:70], tokens[70:97], *[[t] for t in tokens[97:]])
    assert np.abs(got - ref.forward(model, tokens)).max() < TOLERANCE


def test_logits_at_the_end_of_the_context(tiny):
    model, _, llm = tiny
    tokens = tokens_for_test(model, model.n_ctx, seed=3)
    got = llama_logits(llm, tokens)
    assert np.abs(got - ref.forward(model, tokens)).max() < TOLERANCE


def test_tokenizer_merges_and_special_tokens(tiny):
    _, _, llm = tiny
    vocab = ref.vocabulary()[0]
    ids = llm.tokenize(b"What is the capital of France? Paris", add_bos=False, special=False)
    assert [vocab[i] for i in ids] == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?", "ĠParis"]
    chat = b"<|im_start|>user\nhello<|im_end|>\n"
    ids = llm.tokenize(chat, add_bos=False, special=True)
    assert ids[0] == ref.BOS_ID and ref.EOS_ID in ids
    assert llm.detokenize(ids, special=True) == chat
    # Byte tokens decode to their byte, also when that is no valid UTF-8 (token 3 + b is byte b).
    raw = bytes([0xff, 0x00, 0x80, 0x41])
    assert llm.detokenize([len(ref.SPECIAL_TOKENS) + b for b in raw], special=False) == raw


def test_greedy_chat_completion_matches_the_reference(tiny):
    """The GGUF's own chat template (Jinja, as llama-cpp-python renders it) and greedy decoding."""
    model, _, llm = tiny
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                          add_bos=False, special=True)
    want = ref.greedy(model, prompt, 12)
    llm.reset()
    out = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0, repeat_penalty=1.0)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    text = llm.detokenize([t for t in want if t != ref.EOS_ID]).decode("utf-8", errors="ignore")
    assert out["choices"][0]["message"]["content"] == text
    assert out["choices"][0]["finish_reason"] == ("stop" if want[-1] == ref.EOS_ID else "length")


def test_hf_row_order_is_the_rotate_half_convention():
    """`hf_rows_from_gguf` undoes llama.cpp's converter permutation: Hugging Face's rotate-half RoPE on the HF rows
    gives the same per-head vectors (up to that row order) as llama.cpp's adjacent-pair RoPE on the GGUF rows."""
    model = ref.tiny_llama()
    n, hd, heads = 5, model.head_dim, model.n_head
    x = np.random.default_rng(4).standard_normal((n, model.n_embd))
    w = model.weights["blk.0.attn_q.weight"].astype(np.float64)
    positions = np.arange(n, dtype=np.float64)
    gguf_q = ref.rope((x @ w.T).reshape(n, heads, hd), positions, model.rope_base)
    hf_q = (x @ ref.hf_rows_from_gguf(w, heads).T).reshape(n, heads, hd)
    angles = positions[:, None] * model.rope_base ** (-np.arange(0, hd, 2) / hd)
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    rotate_half = np.concatenate([-hf_q[..., hd // 2:], hf_q[..., :hd // 2]], axis=-1)
    hf_q = hf_q * cos + rotate_half * sin
    # HF's element i (first half) and i + hd/2 are GGUF's 2i and 2i+1.
    assert np.allclose(hf_q[..., :hd // 2], gguf_q[..., 0::2]) and np.allclose(hf_q[..., hd // 2:], gguf_q[..., 1::2])
