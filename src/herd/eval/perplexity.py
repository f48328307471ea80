"""Perplexity of text: bits per byte, bits per token and perplexity of a text file, a directory
(or list) of text/JSONL/Parquet files, or a `herd tokenize` shard directory.

Documents are laid end to end, each opened by the tokenizer's BOS (or end-of-text) so that its
first token is scored too, and scored by sliding windows (herd.quantize.perplexity): windows of
`seq_len` tokens every `stride`, each token predicted once with at least seq_len - stride
tokens of context. Bits per byte divide the summed negative log-likelihood by the documents'
UTF-8 bytes, so models with different tokenizers compare.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from herd.quantize.perplexity import perplexity


def text_perplexity(
    llama, source: str | Path, seq_len: int | None = None, stride: int | None = None,
    limit: int | None = None,
) -> dict:  # fmt: skip
    """Perplexity of `source` (see the module docstring); `limit` keeps the first N tokens."""
    tokens, n_bytes, documents = _tokens_and_bytes(llama.tokenizer, Path(source))
    if limit is not None:
        n_bytes = round(n_bytes * min(1.0, limit / len(tokens)))  # bytes in proportion
        tokens = tokens[:limit]
    if len(tokens) < 2:
        raise ValueError(f"{source}: fewer than two tokens to score")
    if int(tokens.max()) >= llama.model.config.vocab_size:
        raise ValueError(
            f"{source}: token id {int(tokens.max())} is outside the model's vocabulary of "
            f"{llama.model.config.vocab_size}: the shards were written with another tokenizer"
        )
    seq_len = min(seq_len or 1024, llama.max_seq_len)
    stride = stride or max(1, seq_len // 2)
    result = perplexity(llama.model, torch.from_numpy(tokens.astype(np.int64)), seq_len, stride)
    nats = result.nll * result.tokens
    return {
        "task": f"perplexity:{source}",
        "bits_per_byte": nats / math.log(2) / n_bytes,
        "bits_per_token": result.nll / math.log(2),
        "perplexity": result.value,
        "tokens": result.tokens,
        "bytes": n_bytes,
        "documents": documents,
        "seq_len": seq_len,
        "stride": stride,
    }


def _tokens_and_bytes(tokenizer, source: Path) -> tuple[np.ndarray, int, int]:
    opener = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if source.is_dir() and any(source.glob("*.idx.npy")):
        from herd.data.shards import load_shards

        shards = load_shards(source)
        ids = np.concatenate([np.asarray(s.token_ids()) for s in shards]).astype(np.int64)
        special = np.isin(ids, list(tokenizer.special_tokens.values()))
        text = tokenizer.decode(ids[~special].tolist())
        documents = sum(s.documents for s in shards)
        return np.concatenate([[opener], ids]), len(text.encode("utf-8")), documents
    from herd.tokenizer.train import corpus_files, read_documents

    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    pieces, n_bytes, documents = [], 0, 0
    for text in read_documents(corpus_files([source])):
        if text.strip():
            pieces.append([opener, *tokenizer.encode(text)])
            n_bytes += len(text.encode("utf-8"))
            documents += 1
    if not pieces:
        raise ValueError(f"{source}: no text to score")
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]), n_bytes, documents
