"""What the Python peers and the engine limit share: the tokenizer and session set up as a careful user would, and the
embedding pipeline of all-MiniLM-L6-v2 (tokenize, sort by length, cut into runs of at most 64 texts and 16384 padded
tokens as Ferry does, pad each to its longest text, run, mean-pool over the attention mask, L2-normalize).

Kept to the standard library, numpy, tokenizers and onnxruntime, so the FastAPI and PyTriton servers import it too.
"""

import os

import numpy as np

MAX_TEXTS = 64  # Ferry's text batch (TEXT_BATCH_SIZE)
MAX_TOKENS = 16384  # Ferry's max_batch_tokens, TEI's --max-batch-tokens default
MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json max_seq_length


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    # The file pads and truncates to 128; pad per batch instead, and truncate at the model's maximum.
    tok.no_padding()
    tok.enable_truncation(MAX_LENGTH)
    return tok


def load_session(model_dir, threads=1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])


def feeds_for(session, ids_rows, pad_id=0):
    """Pads token-id rows to the longest and builds the session's feeds (input_ids, attention_mask, token_type_ids)."""
    width = max(len(r) for r in ids_rows)
    ids = np.full((len(ids_rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids_rows), width), dtype=np.int64)
    for i, r in enumerate(ids_rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    names = [i.name for i in session.get_inputs()]
    feeds = {}
    for name in names:
        if "mask" in name:
            feeds[name] = mask
        elif "type" in name:
            feeds[name] = np.zeros_like(ids)
        else:
            feeds[name] = ids
    return feeds, mask


def pool(hidden, mask):
    """sentence-transformers' mean pooling and L2 normalization; a 2-D output is taken as already pooled."""
    if hidden.ndim == 2:
        v = hidden
    else:
        m = mask[:, :, None].astype(np.float32)
        v = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def plan_runs(lens, max_texts=MAX_TEXTS, max_tokens=MAX_TOKENS, small_run=512):
    """Sorted lengths cut into consecutive runs of at most max_texts texts and max_tokens padded tokens, a new run
    starting when padding would pass a quarter of a run over small_run padded tokens: Ferry's rule
    (crates/server/src/batching/text.rs plan_runs), which TEI and Infinity approximate by sorting too. Without it a
    batch of mixed lengths wastes about 45% of its work on padding here."""
    runs, start, real = [], 0, 0
    for i, n in enumerate(lens):
        k = i - start + 1
        padded = k * n
        fits = k <= max(max_texts, 1) and padded <= max_tokens and (
            padded <= small_run or (padded - (real + n)) * 4 <= padded)
        if i > start and not fits:
            runs.append((start, i))
            start, real = i, 0
        real += n
    if start < len(lens):
        runs.append((start, len(lens)))
    return runs


def embed(tokenizer, session, texts):
    """Embeddings of `texts` (float32 [n, 384]), in order."""
    encodings = tokenizer.encode_batch(texts)
    rows = [e.ids for e in encodings]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    parts = []
    for a, b in plan_runs([len(rows[i]) for i in order]):
        feeds, mask = feeds_for(session, [rows[i] for i in order[a:b]])
        parts.append(pool(session.run(None, feeds)[0], mask))
    result = np.empty((len(rows), parts[0].shape[1]), dtype=np.float32)
    result[order] = np.concatenate(parts)
    return result
