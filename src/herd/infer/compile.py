"""A compiled decode step: torch.compile over a static KV cache, traced once per shape bucket.

Three things make decoding fast beyond removing Python overhead:
- the cache never changes shape (`StaticKVCache`, slots rounded up to a power of two), so the
  step compiles once per (batch, bucket) and, on CUDA, replays as a CUDA graph;
- inside the step, a one-row linear layer is written as a broadcast multiply and a sum over
  the inputs (`DecodeOps`), which inductor fuses into one vectorised reduction that streams
  the weight once: measured on a 2-core EPYC this reads ~26 GB/s against ~17 GB/s for the
  BLAS GEMV on the same float32 weights. Quantized layers call their own kernels;
- single-query attention runs herd's C++ kernel on the CPU (herd.kernels), which reads only
  the cache slots the mask marks valid, where a dense masked softmax reads the whole bucket.
"""

from __future__ import annotations

import math
import types
import weakref

import torch
import torch.nn.functional as F
from torch._dynamo import config as dynamo_config
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from herd import kernels
from herd.model import Transformer

MIN_SLOTS = 256
FEW_QUERIES = 16  # queries of one sequence that attend as rows of the decode kernel
RECOMPILE_LIMIT = 64
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class KernelOps(TorchFunctionMode):
    """The decode step's two heavy ops on herd's CPU kernels where they apply (herd.kernels),
    eager or compiled:

    - `F.linear` of up to `kernels.FLOAT_MAX_ROWS` rows with a float32 CPU weight as
      `kernels.float_mm`, which streams the weight once for all the rows (torch's float32 mm
      is 2-6x slower at up to 8 rows, benchmarks/kernel_speed.py);
    - `F.scaled_dot_product_attention` for one query per row as `kernels.decode_attention`,
      which reads only the cache slots the mask marks valid; and for the few queries of one
      sequence (a speculative round's fed tokens) as that kernel with each query a row over
      the shared cache (SmolLM2, 5 queries over 256 slots: ~30 us a layer against ~130 us in
      torch's flash attention).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            out = self.linear(*args, **kwargs)
        elif func is F.scaled_dot_product_attention:
            out = self.attention(*args, **kwargs)
        else:
            out = None
        return func(*args, **kwargs) if out is None else out

    def linear(self, x, weight, bias=None):
        if bias is None and linear_kernel_applies(x, weight):
            return kernels.float_mm(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return None

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        masked = not is_causal and attn_mask is not None and not dropout_p and scale is None
        if not masked or not attention_kernel_applies(q, k, v, attn_mask):
            return None
        if q.shape[2] == 1:
            return kernels.decode_attention(q, k, v, attn_mask)
        if q.shape[0] == 1 and q.shape[2] <= FEW_QUERIES:
            return few_query_attention(q, k, v, attn_mask)
        return None


class DecodeOps(KernelOps):
    """`KernelOps` for a compiled step, with inductor's own forms where they are faster or no
    kernel applies:

    - `F.linear` on one row as multiply-and-sum in float32 (one pass over the weight), which
      inductor fuses with its neighbours: SmolLM2's compiled float32 decode measured 76.8
      tok/s this way against 63.0 with `kernels.float_mm`'s ~210 calls per token; more rows
      take the kernel;
    - `F.scaled_dot_product_attention` for one query as explicit masked softmax attention over
      the grouped key/value heads where herd's kernel does not apply, which streams the cache
      once instead of running the flash kernel's tiling for a single row.
    """

    def linear(self, x, weight, bias=None):
        if bias is None and x.shape[:-1].numel() == 1:
            return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
        return super().linear(x, weight, bias)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        out = super().attention(q, k, v, attn_mask, dropout_p, is_causal, scale)
        one_query = q.shape[2] == 1 and not is_causal and attn_mask is not None and not dropout_p
        if out is None and one_query:
            return one_query_attention(q, k, v, attn_mask)
        return out


def linear_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """herd's float32 product takes a few rows of float32 CPU activations and a plain
    row-major float32 weight (not a tensor-parallel DTensor), outside autograd."""
    return (
        kernels.available(x.device)
        and x.dtype == weight.dtype == torch.float32
        and x.shape[:-1].numel() <= kernels.FLOAT_MAX_ROWS
        and weight.dim() == 2
        and weight.is_contiguous()
        and not isinstance(weight, DTensor)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def attention_kernel_applies(*tensors: torch.Tensor) -> bool:
    """herd's C++ decode attention takes float32 CPU tensors (herd.kernels)."""
    q, k, v, mask = tensors
    return (
        kernels.available(q.device)
        and q.dtype == k.dtype == v.dtype == torch.float32
        and mask.dtype == torch.bool
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and not isinstance(k, DTensor)
    )


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q (b, h, 1, d) over k, v (b, kv, s, d) with a boolean mask broadcastable to (b, 1, 1, s)."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.float().reshape(b, kv, h // kv, d)  # query heads grouped by their key/value head
    scores = (qg.unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1) / math.sqrt(d)  # (b,kv,g,s)
    scores = scores.masked_fill(~mask.reshape(b, 1, 1, -1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # (b, kv, g, d)
    return out.reshape(b, h, 1, d).to(q.dtype)


def few_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q (1, h, n, d) over k, v (1, kv, s, d) with a boolean mask of (n or 1) x s: herd's decode
    kernel with each query a row over the same (broadcast, not copied) keys and values."""
    _, h, n, d = q.shape
    rows = q.transpose(1, 2).reshape(n, h, 1, d)
    valid = mask.reshape(-1, mask.shape[-1]).expand(n, -1)
    out = kernels.decode_attention(rows, k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), valid)
    return out.reshape(1, n, h, d).transpose(1, 2)


def slot_bucket(needed: int) -> int:
    """The cache size for `needed` tokens: a power of two, so few sizes ever compile."""
    return max(MIN_SLOTS, 1 << (needed - 1).bit_length())


def compiled_step(model: Transformer):
    """The model's compiled `(tokens, positions, mask, cache) -> last logits` (batch, vocab),
    made once per model structure (see `structure`)."""
    return _compiled_forward(model, last_only=True)


def compiled_feed(model: Transformer):
    """The model's compiled `(tokens, positions, mask, cache) -> logits` (batch, seq, vocab) of
    every fed position, for verifying a few drafted tokens of one sequence in one pass."""
    return _compiled_forward(model, last_only=False)


def _compiled_forward(model: Transformer, last_only: bool):
    signature = structure(model)
    entries = _compiled.setdefault(model, {})
    entry = entries.get(last_only)
    if entry is None or entry[0] != signature:
        # One graph per (batch, cache size) bucket and cache kind; dynamo's default of 8
        # graphs per function would drop a busy server back to eager without a word.
        limit = (
            "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        )
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), RECOMPILE_LIMIT))

        def step(tokens, positions, mask, cache):
            with DecodeOps():
                logits = model(tokens, positions, mask, cache=cache)
            return logits[:, -1] if last_only else logits

        if model.tok_embeddings.weight.device.type == "cuda":
            compiled = torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            kernels.load()  # before tracing: the attention kernel is used only if built
            # Dynamo's guards on the module tree (~240 attribute checks) cost ~1 ms per CPU
            # step, 6% of a SmolLM2 token. They are skipped; `structure` checks the same
            # things once per call of this function instead, and each model gets its own copy
            # of `step`'s code, because dynamo keeps graphs per code object and, without
            # those guards, would hand one model's graph to another.
            step = types.FunctionType(
                step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__
            )
            compiled = torch.compile(
                step,
                fullgraph=True,
                dynamic=False,
                options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
            )
        entries[last_only] = (signature, compiled)
    return entries[last_only][1]


def structure(model: torch.nn.Module) -> tuple:
    """What a compiled step depends on beyond its inputs: each module's type and plain
    attributes (flags such as `use_kernel`, sizes), and each tensor's dtype, shape and device."""
    plain = (bool, int, float, str, type(None))
    modules = tuple(
        (name, type(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, plain)))
        for name, m in model.named_modules()
    )
    tensors = tuple(
        (name, t.dtype, t.shape, t.device)
        for name, t in (*model.named_parameters(), *model.named_buffers())
    )
    return modules, tensors
