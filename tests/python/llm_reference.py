"""A tiny Llama-architecture GGUF made in code, and an independent NumPy forward pass of it: the reference that
llama.cpp (through llama-cpp-python, tests/python/test_llm_reference.py) and Ferry's LLM serving are checked against.

The model: float32 weights drawn from a fixed seed, `general.architecture = llama`, embedding 64, 2 blocks, 4 query
heads sharing 2 key/value heads (grouped-query attention), feed-forward 128 (SwiGLU), RoPE base 10000, RMSNorm eps
1e-5, context 256, untied output head by default (`tied=True` leaves `output.weight` out, so the token embedding
serves as the head, as in SmolLM2). Its tokenizer is SmolLM2's kind: `gpt2` byte-level BPE (the 256 byte tokens in
GPT-2's byte-to-unicode mapping plus a few merges), pre-tokenizer `smollm`, `<|endoftext|>`, `<|im_start|>` (BOS) and
`<|im_end|>` (EOS) as control tokens, no BOS added, and a ChatML chat template.

Conventions, as llama.cpp reads a GGUF of the `llama` architecture, which the reference follows:
- A matrix stored with NumPy shape (out, in) maps x to W @ x (GGUF lists the dimensions the other way round, as
  ggml's ne = [in, out]). The token embedding is stored (n_vocab, n_embd): row t is token t's vector.
- Within the rows of q (and k), head h owns rows h*head_dim .. (h+1)*head_dim - 1.
- RoPE is llama.cpp's "normal" mode (LLAMA_ROPE_TYPE_NORM, the one for `llama`): in each head, the ADJACENT pair
  (x[2i], x[2i+1]) is rotated by the angle pos * base^(-2i/head_dim). Hugging Face's Llama rotates the two HALVES
  (x[i], x[i + head_dim/2]) instead, and llama.cpp's converter permutes the rows of q and k of each head when it
  writes a GGUF so that the two agree. The weights here are made in the GGUF's convention directly, so no permutation
  is done anywhere: the same arrays go into the file and into `forward`. (An HF checkpoint would need
  `hf_rows_from_gguf` to be compared with HF's code.)
- Query head h reads key/value head h // (n_head // n_head_kv) (consecutive query heads share one).
- Attention is causal with scale 1/sqrt(head_dim); RMSNorm is x / sqrt(mean(x^2) + eps) * w; the feed-forward is
  down(silu(gate(x)) * up(x)); the output is head(norm(x)).

`forward` runs in float64 from the float32 weights; llama.cpp with float32 weights and a float32 KV cache agrees to
about 1e-5.
"""
import dataclasses

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID = 1  # <|im_start|>, as in SmolLM2
EOS_ID = 2  # <|im_end|>

# A few byte-pair merges in rank order (byte-level strings: "Ġ" is a space), enough for common English words to
# take fewer tokens than bytes; each merge's parts are bytes or earlier merges.
MERGES = [
    "Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e", "a t", "e n", "Ġ s", "Ġ o", "Ġ w", "i s", "Ġ c", "o r",
    "e s", "a n", "Ġ i", "Ġ f", "Ġ p", "i t", "a l", "Ġ b", "Ġo f", "Ġ m", "l e", "o u", "in g", "Ġ P", "Ġ F", "Ġ W",
    "Ġ T", "Ġ is", "a p", "Ġc ap", "Ġcap it", "Ġcapit al", "ĠF r", "c e", "an ce", "ĠFr ance", "W h",
    "Wh at", "a r", "ĠP ar", "ĠPar is", "Ġ h", "Ġ d", "l l", "Ġ y", "ou r", "Ġy our", "he ll", "hell o",
]
# ChatML, as SmolLM2's template without its default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def vocabulary():
    """(tokens, token types, merges): the special tokens (control), the 256 byte tokens in byte order, then one
    token per merge."""
    from gguf import TokenType

    tokens = SPECIAL_TOKENS + [bytes_to_unicode()[b] for b in range(256)]
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens and left + right not in tokens, merge
        tokens.append(left + right)
    types = [TokenType.CONTROL] * len(SPECIAL_TOKENS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, [int(t) for t in types], MERGES


@dataclasses.dataclass
class TinyLlama:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    rope_base: float = 10000.0
    eps: float = 1e-5
    n_ctx: int = 256
    seed: int = 0
    tied: bool = False
    weights: dict = dataclasses.field(default_factory=dict)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def n_vocab(self):
        return len(SPECIAL_TOKENS) + 256 + len(MERGES)


def tiny_llama(seed=0, tied=False, **sizes):
    """The tiny Llama with random float32 weights from `seed`, keyed by their GGUF tensor names."""
    m = TinyLlama(seed=seed, tied=tied, **sizes)
    assert m.n_head % m.n_head_kv == 0 and m.head_dim % 2 == 0
    rng = np.random.default_rng(seed)
    kv = m.n_head_kv * m.head_dim

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(m.n_embd)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((m.n_vocab, m.n_embd)).astype(np.float32)}
    for i in range(m.n_layer):
        w[f"blk.{i}.attn_norm.weight"] = norm()
        w[f"blk.{i}.attn_q.weight"] = matrix(m.n_embd, m.n_embd)
        w[f"blk.{i}.attn_k.weight"] = matrix(kv, m.n_embd)
        w[f"blk.{i}.attn_v.weight"] = matrix(kv, m.n_embd)
        w[f"blk.{i}.attn_output.weight"] = matrix(m.n_embd, m.n_embd)
        w[f"blk.{i}.ffn_norm.weight"] = norm()
        w[f"blk.{i}.ffn_gate.weight"] = matrix(m.n_ff, m.n_embd)
        w[f"blk.{i}.ffn_up.weight"] = matrix(m.n_ff, m.n_embd)
        w[f"blk.{i}.ffn_down.weight"] = matrix(m.n_embd, m.n_ff)
    w["output_norm.weight"] = norm()
    if not tied:
        w["output.weight"] = matrix(m.n_vocab, m.n_embd)
    m.weights = w
    return m


def write_gguf(m, path, raw=None):
    """Writes `m` as a GGUF v3 file with gguf-py, llama.cpp's own writer: float32 tensors, except those `raw` maps
    to (bytes as gguf-py's quantizer made them, their GGMLQuantizationType)."""
    import gguf

    raw = raw or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("ferry-tiny-llama")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32) if not raw else int(gguf.LlamaFileType.GUESSED))
    writer.add_context_length(m.n_ctx)
    writer.add_embedding_length(m.n_embd)
    writer.add_block_count(m.n_layer)
    writer.add_feed_forward_length(m.n_ff)
    writer.add_head_count(m.n_head)
    writer.add_head_count_kv(m.n_head_kv)
    writer.add_rope_dimension_count(m.head_dim)
    writer.add_rope_freq_base(m.rope_base)
    writer.add_layer_norm_rms_eps(m.eps)
    writer.add_vocab_size(m.n_vocab)
    tokens, types, merges = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in m.weights.items():
        if name in raw:
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, base):
    """llama.cpp's normal RoPE on x of shape (tokens, heads, head_dim): adjacent pairs (2i, 2i+1) rotate by
    pos * base^(-2i/head_dim)."""
    d = x.shape[-1]
    angles = positions[:, None] * base ** (-np.arange(0, d, 2) / d)  # (tokens, d/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def hf_rows_from_gguf(w, n_head):
    """The rows of a GGUF q or k weight reordered to Hugging Face's rotate-half convention (the inverse of the
    permutation llama.cpp's converter applies), for comparing with HF's Llama; not used by `forward`."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def forward(m, tokens, start=0):
    """Logits, shape (len(tokens), n_vocab) in float64, for `tokens` at positions start, start+1, ... with no
    earlier tokens (start only shifts RoPE's positions)."""
    w = {k: v.astype(np.float64) for k, v in m.weights.items()}
    tokens = np.asarray(tokens, dtype=np.int64)
    n, hd = len(tokens), m.head_dim
    positions = np.arange(start, start + n, dtype=np.float64)
    group = m.n_head // m.n_head_kv
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    x = w["token_embd.weight"][tokens]
    for i in range(m.n_layer):
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], m.eps)
        q = (h @ w[f"blk.{i}.attn_q.weight"].T).reshape(n, m.n_head, hd)
        k = (h @ w[f"blk.{i}.attn_k.weight"].T).reshape(n, m.n_head_kv, hd)
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).reshape(n, m.n_head_kv, hd)
        q, k = rope(q, positions, m.rope_base), rope(k, positions, m.rope_base)
        heads = []
        for head in range(m.n_head):
            kv = head // group
            scores = q[:, head] @ k[:, kv].T / np.sqrt(hd) + causal
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            heads.append(p @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ w[f"blk.{i}.attn_output.weight"].T
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], m.eps)
        gate = h @ w[f"blk.{i}.ffn_gate.weight"].T
        up = h @ w[f"blk.{i}.ffn_up.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    head = w["token_embd.weight"] if m.tied else w["output.weight"]
    return rms_norm(x, w["output_norm.weight"], m.eps) @ head.T


def greedy(m, prompt, n_new, stop=(EOS_ID,)):
    """Greedy decoding from `prompt` (token ids): up to `n_new` new tokens, ending after a token in `stop`."""
    tokens = list(prompt)
    for _ in range(n_new):
        nxt = int(np.argmax(forward(m, tokens)[-1]))
        tokens.append(nxt)
        if nxt in stop:
            break
    return tokens[len(prompt):]
