"""The Llama 3 decoder. Module names are Meta's checkpoint keys, so a consolidated.pth state dict
loads with no renaming. This file holds no I/O and no distributed code."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from herd.config import ModelConfig
from herd.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

# An attention mask is a boolean/additive tensor broadcastable to (batch, heads, q_len, k_len)
# for SDPA, or a flex-attention BlockMask (document masking); None means causal.
AttentionMask = torch.Tensor | BlockMask | None

# Stores a layer's new keys/values (batch, kv_heads, seq, head_dim) and returns every cached one.
KVUpdate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVCacheLike(Protocol):
    """What `Transformer.forward(cache=...)` needs (herd.infer.KVCache implements it): keys are
    cached after RoPE, so a decode step only rotates its own token."""

    length: int  # tokens already cached; the next token's slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, n: int) -> None: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype; scale in the activation dtype.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        kv_update: KVUpdate | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # Head counts come from the projections: tensor parallelism leaves each rank a slice.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (batch, heads, seq, head_dim) for the attention kernels
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if kv_update is not None:
            k, v = kv_update(k, v)
        gqa = k.shape[1] != q.shape[1]
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            # A single query (a decode step) sees every cached key; SDPA's causal flag would
            # align it with the first key instead.
            causal = mask is None and seqlen > 1
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
            )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        kv_update: KVUpdate | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_update)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 decoder: `model(tokens) -> logits (batch, seq, vocab)`.

    Built on the meta device it allocates nothing (for counting or for loading with
    `load_state_dict(..., assign=True)`); built anywhere else it is initialised with
    `init_weights(seed=0)`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        # Keyed by layer id so pipeline stages can drop layers and keep Meta's names. A stage
        # holds tok_embeddings only if it is the first, norm and output only if it is the last.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(config) for i in range(config.n_layers)}
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied models have no `output` module: the logits reuse the embedding matrix (unless a
        # quantized copy of it is attached as `output`, see herd.quantize).
        self.output = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.dim, config.vocab_size, bias=False)
        )
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Pretraining init: truncated normal(std) everywhere, with the projections that write
        into the residual stream (wo, w2) scaled by 1/sqrt(2 * n_layers); norms to one."""
        gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                    continue
                s = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
                nn.init.trunc_normal_(param, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=gen)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: AttentionMask = None,
        cache: KVCacheLike | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: (batch, seq) ids (hidden states, (batch, seq, dim), for a pipeline stage
        without tok_embeddings). positions: (seq,) or (batch, seq) RoPE positions, default
        0..seq-1 (document masking restarts them per document). mask: see `AttentionMask`.

        cache: keys/values of the tokens before these ones (inference). The tokens fill the
        cache's next slots; positions then default to those slots and a None mask to causal
        attention over everything cached. The cache is advanced past the tokens.

        last_only: return the logits of the last position only, (batch, 1, vocab): a prefill
        needs no more, and a long prompt's full logits can outweigh the model.

        keep: a boolean (batch, seq) mask of the positions whose logits are wanted, returned as
        (n kept, vocab): fine-tuning's loss needs only the trained tokens', and the output layer
        over a 128K vocabulary is a large share of a step."""
        if cache is None:
            return self._forward(tokens, positions, mask, last_only, keep)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        seqlen, start = tokens.shape[1], cache.length
        if positions is None:
            positions = torch.arange(start, start + seqlen, device=tokens.device)
        if mask is None and start > 0 and seqlen > 1:
            mask = causal_mask(seqlen, start, tokens.device)
        cos, sin = cache.rope(positions)
        h = self.tok_embeddings(tokens)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, mask, partial(cache.update, int(name)))
        cache.advance(seqlen)
        return self._logits(h if keep is None else h[keep], last_only)

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        mask: AttentionMask,
        last_only: bool,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self._blocks(tokens, positions, mask)
        if self.norm is None:  # a pipeline stage before the last: hidden states out
            return h
        return self._logits(h if keep is None else h[keep], last_only)

    def final_hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: AttentionMask = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The normed last hidden states (those the output layer reads) of the `keep`
        positions, (n kept, dim), or of all, (batch, seq, dim): a reward model's head reads
        them instead of the vocabulary logits."""
        h = self._blocks(tokens, positions, mask)
        return self.norm(h if keep is None else h[keep])

    def _blocks(
        self, tokens: torch.Tensor, positions: torch.Tensor | None, mask: AttentionMask
    ) -> torch.Tensor:
        if self.tok_embeddings is None:  # a pipeline stage after the first: hidden states in
            h = tokens
        elif tokens.dim() == 2:
            h = self.tok_embeddings(tokens)
        else:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        inv_freq = inverse_frequencies(
            self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, tokens.device
        )
        cos, sin = rope_cos_sin(positions, inv_freq)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        return h

    def _logits(self, h: torch.Tensor, last_only: bool) -> torch.Tensor:
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)


def causal_mask(seqlen: int, start: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (seqlen, start + seqlen) mask: query i (at slot start + i) sees slots <= its own."""
    slots = torch.arange(start + seqlen, device=device)
    return slots <= torch.arange(start, start + seqlen, device=device)[:, None]
