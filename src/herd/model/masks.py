"""Attention masks for packed sequences: causal attention that never crosses a document.

`doc_ids` (batch, seq) numbers the documents of each packed row (herd.data.PackedLoader gives
them). Both forms below mean the same thing to `Transformer.forward`: a flex-attention
BlockMask, which skips whole blocks that cross documents, and a dense boolean mask for SDPA,
the fallback where flex attention is not available or not compiled.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def document_causal_mask(
    doc_ids: torch.Tensor,
    queries: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, 1, queries, keys) bool for SDPA: the query at position i sees the key at
    position j <= i of the same document. queries/keys: the positions in the window of the
    mask's rows and columns, in order (default all of them; context parallelism gives each
    rank its own rows and the keys in all-gather order)."""
    every = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    q = every if queries is None else queries.to(doc_ids.device)
    k = every if keys is None else keys.to(doc_ids.device)
    causal = k[None, :] <= q[:, None]
    return ((doc_ids[:, q, None] == doc_ids[:, None, k]) & causal)[:, None]


def document_block_mask(doc_ids: torch.Tensor, block_size: int = 128) -> BlockMask:
    """The same mask as a flex-attention BlockMask (shared by all heads)."""
    batch, seq = doc_ids.shape

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(
        same_document_causal, batch, None, seq, seq, device=doc_ids.device, BLOCK_SIZE=block_size
    )


def shared_prompt_mask(groups: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) bool for SDPA over rows that pack a prompt and its responses: the
    query at position i sees the key at j <= i of the same group when the key is in the
    group's prompt (part 0) or in the query's own response (the same part). Each response then
    computes as if it followed the prompt alone, and the prompt is encoded once for all."""
    seq = groups.shape[1]
    every = torch.arange(seq, device=groups.device)
    causal = every[None, :] <= every[:, None]
    same_group = groups[:, :, None] == groups[:, None, :]
    visible = (parts[:, None, :] == 0) | (parts[:, :, None] == parts[:, None, :])
    return (same_group & visible & causal)[:, None]
