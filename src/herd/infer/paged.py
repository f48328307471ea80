"""A paged KV cache: fixed-size blocks shared by many sequences through block tables.

Keys and values of every layer live in one pool of `num_blocks * block_size` token slots. A
sequence owns a list of blocks (its block table); token i of it sits in slot
`table[i // block_size] * block_size + i % block_size`. Blocks are handed out from a free list
and given back when a sequence finishes, so sequences of any length share the memory.

Prefix caching: a full block is named by its tokens and the block before it (`BlockName`).
When a new sequence starts with the same tokens (a shared system prompt, the other choices of
an `n > 1` request), it takes the cached block instead of computing it again. Freed blocks
keep their contents and name until the free list needs them, oldest first. Names are compared
exactly, tokens and all, so two prefixes whose hashes collide can never share keys and values.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from herd import kernels
from herd.config import ModelConfig
from herd.infer.compile import compiled_step, slot_bucket
from herd.infer.parallel import local_kv_heads
from herd.model import Transformer
from herd.model.rope import inverse_frequencies, rope_cos_sin


class OutOfBlocks(RuntimeError):
    """No free block is left; the scheduler preempts a sequence and tries again."""


@dataclass(frozen=True)
class BlockName:
    """What a full block holds: these tokens, after the prefix whose last block got serial
    number `parent` (or, for a first block, after the chain root: None, or an adapter's)."""

    parent: Hashable
    tokens: tuple[int, ...]


class BlockManager:
    """Which blocks are free, which are in use (and by how many sequences), and which hold a
    known prefix. Pure bookkeeping: no tensors.

    A named block also gets a serial number, never reused, that names it as a parent: an
    evicted block's descendants then become unreachable instead of being found under a
    block that now holds other tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        # Free blocks in eviction order; those with a name are still reusable by it.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.by_name: dict[BlockName, int] = {}
        self.name_of: dict[int, BlockName] = {}
        self.serial_of: dict[int, int] = {}
        self._serials = itertools.count()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """A block for new tokens, taking the oldest free one (and forgetting its name)."""
        if not self.free:
            raise OutOfBlocks("the KV cache is full")
        block, _ = self.free.popitem(last=False)
        if (name := self.name_of.pop(block, None)) is not None:
            del self.by_name[name]
            del self.serial_of[block]
        self.refs[block] = 1
        return block

    def cached_prefix(
        self, tokens: Sequence[int], root: Hashable = None
    ) -> tuple[list[int], list[int]]:
        """Blocks already holding the leading full blocks of `tokens`, claimed for the caller,
        and their serial numbers. Stops at the first miss. The last token is never covered: its
        logits are needed, so at least one token is always computed. `root` starts the chain:
        keys and values computed under different weights (adapters) never match."""
        blocks, serials, parent = [], [], root
        size = self.block_size
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % size, size):
            block = self.by_name.get(BlockName(parent, tuple(tokens[start : start + size])))
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            blocks.append(block)
            parent = self.serial_of[block]
            serials.append(parent)
        return blocks, serials

    def name(self, block: int, parent: Hashable, tokens: Sequence[int]) -> int:
        """Record that a full, written block holds `tokens` after the prefix `parent` (the
        previous block's serial number, or the chain root); returns the serial number that
        names this prefix as the next block's parent."""
        name = BlockName(parent, tuple(tokens))
        if (known := self.by_name.get(name)) is not None:
            return self.serial_of[known]  # another sequence computed it first; keep that one
        if block in self.name_of:
            raise ValueError(f"block {block} already holds {self.name_of[block]}")
        self.by_name[name] = block
        self.name_of[block] = name
        self.serial_of[block] = next(self._serials)
        return self.serial_of[block]

    def release(self, blocks: Sequence[int]) -> None:
        """Give back a sequence's blocks; named ones stay findable until reused."""
        for block in reversed(blocks):  # a table's tail is evicted before its shared head
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None


class PagedKVCache:
    """The slot pools: per layer, keys and values of shape (slots, n_kv_heads, head_dim)."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_heads: int | None = None,
    ):
        slots = num_blocks * block_size
        # One slot past the blocks takes the writes and reads of a compiled step's pad rows.
        self.scratch = slots
        shape = (slots + 1, kv_heads or config.n_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.blocks = BlockManager(num_blocks, block_size)
        inv_freq = inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, torch.device(device)
        )
        self.cos, self.sin = rope_cos_sin(torch.arange(config.max_seq_len, device=device), inv_freq)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16
    ) -> PagedKVCache:
        weight = model.tok_embeddings.weight
        heads = local_kv_heads(model)  # a tensor-parallel process caches its share
        return cls(model.config, num_blocks, block_size, weight.dtype, weight.device, heads)

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, block_size: int, dtype: torch.dtype, kv_heads: int | None = None
    ) -> int:
        per_token = 2 * config.n_layers * (kv_heads or config.n_kv_heads) * config.head_dim
        return per_token * block_size * dtype.itemsize

    def view(
        self, tables: Sequence[Sequence[int]], starts: Sequence[int], new_tokens: int
    ) -> PagedView:
        """The cache as one forward pass sees it: row b writes `new_tokens` tokens from position
        `starts[b]` on, through block table `tables[b]`, and reads everything up to them. A
        decode step (one token a row) attends through the whole pool where herd's attention
        kernel applies (`PoolDecodeView`), so no row's keys are gathered."""
        if new_tokens == 1 and pool_attention_applies(self):
            view = PoolDecodeView(self, len(tables))
            view.fill([0] * len(tables), tables, starts)  # the caller feeds its own tokens
            return view
        return PagedView(self, tables, starts, new_tokens)


class PagedView:
    """`KVCacheLike` for one forward pass over a batch of sequences in a `PagedKVCache`.

    Each row's keys are gathered in token order into a (batch, n_kv_heads, width, head_dim)
    tensor, width the longest row's length (shorter rows padded with slot 0), and `mask()`
    hides from each query the keys after its own position, padding included.
    """

    length = 0  # Transformer.forward reads it only to default positions and mask; both given

    def __init__(
        self,
        cache: PagedKVCache,
        tables: Sequence[Sequence[int]],
        starts: Sequence[int],
        new_tokens: int,
    ):
        self.cache = cache
        device = cache.keys[0].device
        size = cache.blocks.block_size
        ends = torch.tensor([s + new_tokens for s in starts], device=device)
        width = int(ends.max())
        blocks = max(len(t) for t in tables)
        padded = torch.tensor([list(t) + [0] * (blocks - len(t)) for t in tables], device=device)
        token = torch.arange(width, device=device)
        slots = padded[:, token // size] * size + token % size  # (batch, width)
        self.read_slots = torch.where(token < ends[:, None], slots, 0)  # pads read slot 0
        start = torch.tensor(list(starts), device=device)
        self.positions = start[:, None] + torch.arange(new_tokens, device=device)  # (batch, new)
        self.write_slots = self.read_slots.gather(1, self.positions).reshape(-1)

    def mask(self) -> torch.Tensor:
        """(batch, 1, new, width): query at position p sees keys at positions <= p."""
        width = self.read_slots.shape[1]
        keys = torch.arange(width, device=self.read_slots.device)
        return (keys <= self.positions[..., None])[:, None]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.cos[positions], self.cache.sin[positions]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.write(layer, k, v)
        # (batch, width, kv, d) -> (batch, kv, width, d)
        return keys[self.read_slots].transpose(1, 2), values[self.read_slots].transpose(1, 2)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values at `write_slots`; returns the layer's slot pools."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        # (batch, kv, new, d) -> (batch * new, kv, d), the order of write_slots
        keys.index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(-1, *keys.shape[1:]))
        values.index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(-1, *keys.shape[1:]))
        return keys, values

    def advance(self, n: int) -> None:
        pass


class PagedDecodeView(PagedView):
    """`PagedView` for a compiled decode step: one new token for each of up to `batch` rows,
    reading up to `width` tokens each, in tensors that keep their shapes and identity between
    steps (`fill` writes them in place), so the step traces once per (batch, width) bucket.

    Rows past the real ones, and slots past a row's length, read the cache's scratch slot
    (pad rows also write there) and are masked out. The keys are indexed through `read_slots`
    inside the compiled graph, where inductor folds the indexing into the attention loop
    instead of materialising a gathered copy. The step's mask is `attend`.
    """

    def __init__(self, cache: PagedKVCache, batch: int, width: int):
        self.cache, self.batch, self.width = cache, batch, width
        device = cache.keys[0].device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.read_slots = torch.full((batch, width), cache.scratch, device=device)
        self.write_slots = torch.full((batch,), cache.scratch, device=device)
        self.attend = torch.zeros(batch, 1, 1, width, dtype=torch.bool, device=device)
        self.attend[..., 0] = True  # every row pads until filled

    def fill(
        self, tokens: Sequence[int], tables: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> None:
        """Row b feeds tokens[b] at position starts[b] through block table tables[b]."""
        rows = len(tables)
        if rows > self.batch or max(starts) >= self.width:
            raise ValueError(f"{rows} rows up to {max(starts) + 1} tokens exceed this bucket")
        slots, visible, start = self._slots(tables, starts, self.width)
        self.read_slots.fill_(self.cache.scratch)
        self.read_slots[:rows] = torch.where(visible, slots, self.cache.scratch)
        self.attend.zero_()
        self.attend[:rows, 0, 0] = visible
        self.attend[rows:, 0, 0, 0] = True  # pad rows see the scratch slot: no all -inf row
        self._feed(tokens, slots, start)

    def _slots(
        self, tables: Sequence[Sequence[int]], starts: Sequence[int], width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's cache slots for positions 0..width-1 (rows, width), which of them it
        sees (those up to its position), and the rows' positions."""
        device, size = self.tokens.device, self.cache.blocks.block_size
        blocks = -(-width // size)
        padded = torch.tensor(
            [list(t[:blocks]) + [0] * (blocks - len(t[:blocks])) for t in tables], device=device
        )
        token = torch.arange(width, device=device)
        start = torch.tensor(list(starts), device=device)
        return padded[:, token // size] * size + token % size, token <= start[:, None], start

    def _feed(self, tokens: Sequence[int], slots: torch.Tensor, start: torch.Tensor) -> None:
        """The real rows' tokens, positions and write slots; pad rows feed 0 into scratch."""
        rows = len(start)
        self.write_slots.fill_(self.cache.scratch)
        self.write_slots[:rows] = slots.gather(1, start[:, None])[:, 0]
        self.tokens.zero_()
        self.tokens[:rows, 0] = torch.tensor(list(tokens), device=self.tokens.device)
        self.positions.zero_()
        self.positions[:rows, 0] = start


class PoolDecodeView(PagedDecodeView):
    """`PagedDecodeView` whose attention reads the cache's whole slot pool, passed as every
    row's keys and values (an expanded view, no copy), through a mask of each row's own slots:
    herd's decode attention kernel lists a row's valid slots and reads only those. No row's
    keys are gathered, and one graph serves every length, so the step compiles once per batch
    bucket. For float32 CPU caches where the kernel is built (`pool_attention_applies`): any
    other attention would read the whole pool."""

    def __init__(self, cache: PagedKVCache, batch: int):
        self.cache, self.batch = cache, batch
        self.width = cache.scratch + 1
        device = cache.keys[0].device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.write_slots = torch.full((batch,), cache.scratch, device=device)
        self.attend = torch.zeros(batch, 1, 1, self.width, dtype=torch.bool, device=device)
        self.attend[:, 0, 0, cache.scratch] = True  # every row pads until filled

    def fill(
        self, tokens: Sequence[int], tables: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> None:
        rows = len(tables)
        if rows > self.batch:
            raise ValueError(f"{rows} rows exceed this bucket of {self.batch}")
        slots, visible, start = self._slots(tables, starts, max(starts) + 1)
        # Positions a row does not see scatter False to the scratch slot, which no real row
        # attends: a row's own slots are distinct, so each gets exactly its flag.
        target = torch.where(visible, slots, self.cache.scratch)
        self.attend.zero_()
        self.attend[:rows, 0, 0].scatter_(1, target, visible)
        self.attend[rows:, 0, 0, self.cache.scratch] = True
        self._feed(tokens, slots, start)

    def mask(self) -> torch.Tensor:
        return self.attend

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (slots, kv, d) -> (batch, kv, slots, d) without a copy
        pool_k, pool_v = (t.permute(1, 0, 2)[None] for t in self.write(layer, k, v))
        return pool_k.expand(self.batch, -1, -1, -1), pool_v.expand(self.batch, -1, -1, -1)


def pool_attention_applies(cache: PagedKVCache) -> bool:
    """Whether decode steps over `cache` can attend through its whole pool (`PoolDecodeView`):
    herd's attention kernel built, float32 keys on the CPU."""
    keys = cache.keys[0]
    return keys.dtype == torch.float32 and kernels.available(keys.device)


class CompiledPagedDecode:
    """Decode steps over a `PagedKVCache` through the model's compiled step: each call pads
    its rows to a batch bucket (powers of two up to `max_batch`) and its longest row to a
    width bucket (`slot_bucket`, whole blocks), and reuses that bucket's `PagedDecodeView`."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int):
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.step = compiled_step(model)
        self.pooled = pool_attention_applies(cache)
        self.views: dict[tuple[int, int], PagedDecodeView] = {}

    def buckets(self, rows: int, tokens: int) -> tuple[int, int]:
        """The (batch, width) bucket for `rows` rows reading at most `tokens` tokens; the width
        is the whole pool's where attention reads it through a mask."""
        if not 0 < rows <= self.max_batch:
            raise ValueError(f"{rows} rows: this decoder takes 1 to {self.max_batch}")
        batch = min(1 << (rows - 1).bit_length(), self.max_batch)
        if self.pooled:
            return batch, self.cache.scratch + 1
        size = self.cache.blocks.block_size
        return batch, -(-slot_bucket(tokens) // size) * size

    def __call__(
        self, tokens: Sequence[int], tables: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> torch.Tensor:
        """Logits (rows, vocab) after row b feeds tokens[b] at position starts[b]."""
        view = self._view(*self.buckets(len(tables), max(starts) + 1))
        view.fill(tokens, tables, starts)
        return self.step(view.tokens, view.positions, view.attend, view)[: len(tables)]

    def warm_up(self, rows: int = 1, tokens: int = 1) -> None:
        """Compile the bucket of `rows` rows and `tokens` tokens now, on pad rows only (they
        touch nothing but the scratch slot)."""
        view = self._view(*self.buckets(rows, tokens))
        with torch.inference_mode():
            self.step(view.tokens, view.positions, view.attend, view)

    def _view(self, batch: int, width: int) -> PagedDecodeView:
        if (batch, width) not in self.views:
            self.views[batch, width] = (
                PoolDecodeView(self.cache, batch)
                if self.pooled
                else PagedDecodeView(self.cache, batch, width)
            )
        return self.views[batch, width]
