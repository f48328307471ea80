"""Serving a tensor-parallel model (herd.infer.parallel): rank 0 schedules, every rank computes.

Rank 0 runs the engine (and the HTTP server); before each forward pass it broadcasts the
pass's inputs, token ids, start positions and block tables, and every other rank runs the
same pass on its share of the weights and its own KV cache, whose blocks mirror rank 0's
because they receive the same tables. Only rank 0 samples: the tokens it picked reach the
others as the next pass's inputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from herd.serve.engine import Engine

_STOP = -1


class TensorParallelEngine(Engine):
    """An `Engine` whose forward passes run on every process of the tensor-parallel model.
    Construct it with the same arguments on every rank; rank 0 calls `start()`, the others
    `follow()`."""

    def __init__(self, model, tokenizer, **kwargs):
        if kwargs.get("compile_batch"):
            raise ValueError("compiled decoding is not supported with tensor parallelism yet")
        if kwargs.get("draft"):
            raise ValueError("speculative decoding is not supported with tensor parallelism yet")
        super().__init__(model, tokenizer, **kwargs)
        if self.adapters:
            raise ValueError("adapters are not supported with tensor parallelism")
        self.device = model.tok_embeddings.weight.device

    def _run(self, tokens, tables, starts, adapters):
        self._send(tokens, tables, starts)
        return super()._run(tokens, tables, starts, adapters)

    def _loop(self) -> None:
        try:
            super()._loop()
        finally:  # stopped or failed: either way the followers must not wait forever
            self._header(_STOP, 0, 0)

    def follow(self) -> None:
        """On ranks other than 0: run rank 0's forward passes until it stops."""
        with torch.inference_mode():
            while True:
                rows, new, width = self._header()
                if rows == _STOP:
                    return
                tokens = self._receive((rows, new))
                starts = self._receive((rows,))
                tables = self._receive((rows, width))
                lists = [[b for b in row if b >= 0] for row in tables.tolist()]
                super()._run(tokens.tolist(), lists, starts.tolist(), [None] * rows)

    def _send(self, tokens, tables, starts) -> None:
        width = max(len(t) for t in tables)
        self._header(len(tokens), len(tokens[0]), width)
        padded = [list(t) + [-1] * (width - len(t)) for t in tables]
        for values in (tokens, starts, padded):
            dist.broadcast(torch.tensor(values, device=self.device), src=0)

    def _header(self, *values: int) -> tuple[int, int, int]:
        header = torch.tensor(values or (0, 0, 0), device=self.device)
        dist.broadcast(header, src=0)
        return tuple(header.tolist())

    def _receive(self, shape: tuple[int, ...]) -> torch.Tensor:
        values = torch.empty(shape, dtype=torch.long, device=self.device)
        dist.broadcast(values, src=0)
        return values
