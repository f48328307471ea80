"""The serving engine: continuous batching over a paged KV cache, in its own thread.

Every iteration the scheduler admits waiting sequences while the batch and the cache have
room, runs one prefill chunk (at most `prefill_chunk` prompt tokens of one sequence, so long
prompts never stall the others for long), then one decode step for every sequence that has
a token to feed. With prompt-lookup speculation (`draft="ngram"`) a decode step feeds each
sequence its last token and the tokens that followed the latest earlier occurrence of its
final n-gram, and keeps the drafts the model agrees with by the rule of
`herd.infer.speculative` (greedy output unchanged, sampled output the model's distribution).
Finished and cancelled sequences leave at once and give their blocks back.
When a sequence needs a block and none is free, the youngest running sequence is preempted:
its blocks are freed and it waits to be recomputed from its prompt and the tokens it has
already produced (its output so far stands). Requests arrive and results leave through
thread-safe callbacks, so an asyncio server never blocks on the model.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from herd.adapters.lora import MultiLoRALinear, select_adapters
from herd.infer.compile import KernelOps
from herd.infer.paged import CompiledPagedDecode, OutOfBlocks, PagedKVCache
from herd.infer.parallel import local_kv_heads
from herd.infer.sampling import SamplingParams, apply_penalties, sample, token_logprobs
from herd.infer.speculative import NgramDrafter, SpeculationStats, judge
from herd.infer.text import GeneratedText
from herd.model import Transformer
from herd.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    """One new token of one choice, or the end of it. text: what can be streamed now."""

    request_id: str
    index: int
    text: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Request:
    """A generation request: `n` choices continuing the same prompt.

    max_tokens is the budget of new tokens per choice (the caller has checked that the prompt
    plus it fits the context window). on_event is called from the engine thread.
    """

    id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    adapter: int | None = None  # an adapter attached to the engine's model (None: the base)
    on_event: Callable[[Event], None] = lambda event: None
    arrival: float = field(default_factory=time.monotonic)


class _Sequence:
    """One choice of a request: its tokens, its place in the cache, its output text."""

    def __init__(self, request: Request, index: int, text: GeneratedText, order: int):
        self.request, self.index, self.text, self.order = request, index, text, order
        self.tokens = list(request.prompt)
        self.table: list[int] = []
        self.names: list[int] = []  # serial numbers of the leading full blocks' prefix names
        self.computed = 0  # tokens whose keys and values are in the cache
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator().manual_seed(request.seed + index)
        self.counts: torch.Tensor | None = None  # generated-token counts, for penalties
        self.seen: torch.Tensor | None = None  # prompt tokens, for the repetition penalty

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


@dataclass
class EngineStats:
    """Counters the server exports as metrics (read from any thread)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0
    prefix_blocks_queried: int = 0  # full prompt blocks looked up in the prefix cache
    prefix_blocks_hit: int = 0
    preemptions: int = 0
    steps: int = 0  # forward passes
    last_batch: int = 0  # sequences in the latest forward pass
    batched_sequences: int = 0  # summed over forward passes: / steps is the mean batch


class Engine:
    """Continuous batching over a `PagedKVCache`. `start()` runs the loop in a daemon thread;
    `submit()` and `cancel()` are safe from any thread."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        num_blocks: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
        max_seq_len: int | None = None,
        cache_bytes: int = 512 * 2**20,
        preempt: bool = True,
        compile_batch: int = 0,
        draft: str | None = None,
        draft_tokens: int = 4,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # adapters attached to the model (herd.adapters.attach_adapters), by request index
        self.adapters = any(isinstance(m, MultiLoRALinear) for m in model.modules())
        self.max_batch = max_batch
        # Without preemption a sequence is admitted only when the cache can hold its prompt
        # and all max_tokens of output next to what the running ones may still grow to (the
        # paper's rejection-sampling engine): nothing is ever recomputed, at some batch size.
        self.preempt = preempt
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        dtype = model.tok_embeddings.weight.dtype
        per_block = PagedKVCache.bytes_per_block(
            model.config, block_size, dtype, local_kv_heads(model)
        )
        if num_blocks is None:
            num_blocks = max(cache_bytes // per_block, 1)
        needed = -(-self.max_seq_len // block_size) + 1
        if num_blocks < needed:
            raise ValueError(
                f"{num_blocks} KV blocks of {block_size} tokens cannot hold one full "
                f"{self.max_seq_len}-token context: give at least {needed} blocks "
                f"({needed * per_block / 2**20:.0f} MiB) or a smaller max_seq_len"
            )
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        # Decode steps of up to compile_batch sequences run compiled (a graph per batch
        # bucket), larger batches eager. Adapters switch per request, so they stay eager.
        self.compiled = None
        if compile_batch > 0 and not self.adapters:
            self.compiled = CompiledPagedDecode(model, self.cache, min(compile_batch, max_batch))
        if draft not in (None, "ngram"):
            raise ValueError(
                f"the engine drafts by prompt lookup only: draft='ngram', not {draft!r}"
            )
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.drafter = NgramDrafter() if draft == "ngram" else None
        self.draft_tokens = draft_tokens
        self.speculation = SpeculationStats()
        self.stats = EngineStats()
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ outside the thread

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise ValueError("a prompt must have at least one token")
        if len(request.prompt) + request.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens})"
                f" exceeds the context window of {self.max_seq_len} tokens"
            )
        self._inbox.put(("submit", request))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queue_depth(self) -> int:
        """Sequences waiting to start, counting requests not yet picked up by the loop."""
        return len(self._waiting) + self._inbox.qsize()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def free_blocks(self) -> int:
        return self.cache.blocks.num_free

    @property
    def total_blocks(self) -> int:
        return self.cache.blocks.num_blocks

    def idle(self) -> bool:
        return not self._waiting and not self._running and self._inbox.empty()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._drain(block=not (self._waiting or self._running))
                    self._admit()
                    self._step()
        except BaseException as e:  # a dead engine must not hang its clients
            self.error = e
            for seq in self._waiting + self._running:
                self._finish(seq, "error")
            raise

    def run_until_done(self) -> None:
        """Run the loop in the calling thread until no request waits or runs, for offline
        batch jobs on an engine that was not started: their torch work stays in the thread
        that loaded the model (see `in_passing_thread`). Errors propagate."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread: wait for its events instead")
        with torch.inference_mode():
            while not self.idle():
                self._drain(block=False)
                self._admit()
                self._step()

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            kind, payload = item
            if kind == "submit":
                self._enqueue(payload)
            else:
                self._drop(payload)

    def _enqueue(self, request: Request) -> None:
        stop_ids = self.tokenizer.stop_ids if request.stop_ids is None else request.stop_ids
        budget = min(request.max_tokens, self.max_seq_len - len(request.prompt))
        for index in range(request.n):
            text = GeneratedText(
                prompt_tokens=len(request.prompt),
                budget=budget,
                stop_ids=frozenset(stop_ids),
                stops=tuple(s for s in request.stop if s),
                decoder=self.tokenizer.stream_decoder(),
            )
            seq = _Sequence(request, index, text, next(self._order))
            if text.finish_reason is not None:  # max_tokens 0
                self._finish(seq, text.finish_reason)
                continue
            self._waiting.append(seq)
            self.stats.prompt_tokens += len(request.prompt)

    def _drop(self, request_id: str) -> None:
        for group in (self._waiting, self._running):
            for seq in [s for s in group if s.request.id == request_id]:
                group.remove(seq)
                self._release(seq)

    def _admit(self) -> None:
        """Start waiting sequences, oldest first, while the batch and the cache have room.
        Waiting sequences hold no blocks: a cached prefix is claimed only on admission."""
        blocks = self.cache.blocks
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            if self._first_choice_prefilling(seq):
                return  # its prompt blocks will be in the prefix cache in a step or two
            seq.table, seq.names = blocks.cached_prefix(seq.tokens, _cache_root(seq))
            seq.computed = len(seq.table) * blocks.block_size
            if self.preempt:
                # Room for its first chunk, and a block each for the running ones to grow into.
                first = min(seq.pending, self.prefill_chunk)
                need = self._blocks_for(seq, first) + len(self._running)
            else:
                need = sum(self._blocks_to_finish(s) for s in [seq, *self._running])
            if blocks.num_free < need and self._running:
                self._release(seq)
                seq.names, seq.computed = [], 0
                return
            self.stats.cached_prompt_tokens += seq.computed
            self.stats.prefix_blocks_queried += (len(seq.tokens) - 1) // blocks.block_size
            self.stats.prefix_blocks_hit += len(seq.table)
            self._waiting.pop(0)
            self._running.append(seq)

    def _first_choice_prefilling(self, seq: _Sequence) -> bool:
        """Whether `seq` is a later choice of a request whose first choice is still computing
        the prompt's full blocks: admitted now, it would compute them again."""
        if seq.index == 0:
            return False
        full = (len(seq.request.prompt) - 1) // self.cache.blocks.block_size
        return any(
            s.request is seq.request and s.index == 0 and len(s.names) < full for s in self._running
        )

    def _blocks_to_finish(self, seq: _Sequence) -> int:
        """Blocks a sequence may still claim: its prompt and whole output budget, less the
        blocks it holds."""
        total = min(len(seq.request.prompt) + seq.request.max_tokens, self.max_seq_len)
        return max(0, -(-total // self.cache.blocks.block_size) - len(seq.table))

    def _step(self) -> None:
        prefill = next((s for s in self._running if s.pending > 1), None)
        if prefill is not None:
            self._forward([prefill], min(prefill.pending, self.prefill_chunk))
        decode = [s for s in self._running if s.pending == 1]
        drafts = [self._draft(s) for s in decode] if self.drafter else []
        if any(drafts):
            self._speculate(decode, drafts)
        elif decode:
            self._forward(decode, 1)

    # ------------------------------------------------------------------ one forward pass

    def _forward(self, seqs: list[_Sequence], new: int) -> None:
        seqs = self._reserve(seqs, new)
        if not seqs:
            return
        tables = [s.table for s in seqs]
        starts = [s.computed for s in seqs]
        tokens = [s.tokens[s.computed : s.computed + new] for s in seqs]
        logits = self._run(tokens, tables, starts, [s.request.adapter for s in seqs])
        self._count_pass(len(seqs))
        for row, seq in enumerate(seqs):
            seq.computed += new
            self._name_blocks(seq)
            if seq.pending == 0:  # its last token's logits give the next token
                self._emit(seq, logits[row, -1])

    def _count_pass(self, rows: int) -> None:
        self.stats.steps += 1
        self.stats.last_batch = rows
        self.stats.batched_sequences += rows

    def _draft(self, seq: _Sequence) -> list[int]:
        """Up to `draft_tokens` prompt-lookup drafts to follow seq's tokens, leaving room in its
        budget for the token the target adds to every round."""
        generated = len(seq.tokens) - len(seq.request.prompt)
        room = min(self.draft_tokens, seq.request.max_tokens - generated - 1)
        if room <= 0:
            return []
        return self.drafter.propose(seq.tokens, room, seq.request.params, seq.generator)[0]

    def _speculate(self, seqs: list[_Sequence], drafts: list[list[int]]) -> None:
        """One pass feeding every decoding sequence its last token and its drafts (rows padded
        to the longest with repeats of the last token, whose outputs are never read), then
        each row's tokens judged left to right until one is rejected or the row finishes."""
        # Padding must stay inside every row's window and budget, so a row near its end
        # shortens the round for all.
        room = min(self._last_position(s) - s.computed + 1 for s in seqs)
        width = min(1 + max(len(d) for d in drafts), room)
        draft_of = {id(s): d[: width - 1] for s, d in zip(seqs, drafts)}
        seqs = self._reserve(seqs, width)
        if not seqs:
            return
        rows = [[s.tokens[-1], *draft_of[id(s)]] for s in seqs]
        if self.compiled and sum(map(len, rows)) <= self.compiled.max_batch:
            logits = self._verify_compiled(seqs, rows)
        else:
            tokens = [r + r[:1] * (width - len(r)) for r in rows]
            tables, starts = [s.table for s in seqs], [s.computed for s in seqs]
            logits = self._run(tokens, tables, starts, [s.request.adapter for s in seqs], False)
        self._count_pass(len(seqs))
        self.speculation.rounds += 1
        for row, seq in enumerate(seqs):
            drafted = draft_of[id(seq)]
            self.speculation.drafted += len(drafted)
            for i in range(len(drafted) + 1):
                seq.computed += 1  # the token fed at this position is context now
                self._name_blocks(seq)
                draft = drafted[i] if i < len(drafted) else None
                kept = self._emit(seq, logits[row, i], draft)
                self.speculation.accepted += kept
                if not kept or seq not in self._running:
                    break

    def _verify_compiled(self, seqs: list[_Sequence], rows: list[list[int]]) -> torch.Tensor:
        """The round through the compiled decode step, every fed token a row of its own at its
        own position: a step writes all rows' keys and values before any row attends, so each
        sees the tokens before it. Returns (sequences, width, vocab), unused positions 0."""
        out = self.compiled(
            [token for row in rows for token in row],
            [s.table for s, row in zip(seqs, rows) for _ in row],
            [s.computed + i for s, row in zip(seqs, rows) for i in range(len(row))],
        )
        return pad_sequence(out.split([len(row) for row in rows]), batch_first=True)

    def _last_position(self, seq: _Sequence) -> int:
        return min(self.max_seq_len, len(seq.request.prompt) + seq.request.max_tokens) - 1

    def _run(
        self,
        tokens: list[list[int]],
        tables: list[list[int]],
        starts: list[int],
        adapters: list[int | None],
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits (rows, new or 1, vocab) after row b feeds tokens[b] from position starts[b]
        on, through block table tables[b]: the last position's, or with last_only=False
        every position's."""
        if len(tokens[0]) == 1 and self.compiled and len(tokens) <= self.compiled.max_batch:
            return self.compiled([t[0] for t in tokens], tables, starts)[:, None]
        view = self.cache.view(tables, starts, len(tokens[0]))
        device = self.model.tok_embeddings.weight.device
        if self.adapters:
            select_adapters(self.model, adapters)
        with KernelOps():
            return self.model(
                torch.tensor(tokens, device=device),
                view.positions,
                view.mask(),
                cache=view,
                last_only=last_only,
            )

    def _reserve(self, seqs: list[_Sequence], new: int) -> list[_Sequence]:
        """Blocks for `new` more tokens of each sequence, preempting the youngest running
        sequences when the cache is full; returns the sequences still running."""
        for seq in sorted(seqs, key=lambda s: s.order):
            while seq in self._running:
                try:
                    for _ in range(self._blocks_for(seq, new)):
                        seq.table.append(self.cache.blocks.allocate())
                    break
                except OutOfBlocks:
                    self._preempt(max(self._running, key=lambda s: s.order))
        return [s for s in seqs if s in self._running]

    def _blocks_for(self, seq: _Sequence, new: int) -> int:
        size = self.cache.blocks.block_size
        return max(0, -(-(seq.computed + new) // size) - len(seq.table))

    def _preempt(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        self._release(seq)
        seq.table, seq.names, seq.computed = [], [], 0
        self._waiting.insert(0, seq)
        self._waiting.sort(key=lambda s: s.order)
        self.stats.preemptions += 1

    def _release(self, seq: _Sequence) -> None:
        self.cache.blocks.release(seq.table)
        seq.table = []

    def _name_blocks(self, seq: _Sequence) -> None:
        size = self.cache.blocks.block_size
        while len(seq.names) < seq.computed // size:
            i = len(seq.names)
            parent = seq.names[-1] if seq.names else _cache_root(seq)
            tokens = seq.tokens[i * size : (i + 1) * size]
            seq.names.append(self.cache.blocks.name(seq.table[i], parent, tokens))

    # ------------------------------------------------------------------ sampling and output

    def _emit(self, seq: _Sequence, logits: torch.Tensor, draft: int | None = None) -> bool:
        """Choose seq's next token from its logits, or judge `draft` against them, and hand it
        out; returns whether the draft was kept."""
        request = seq.request
        logits = logits.float()[None]
        seen, counts = self._penalty_state(seq, logits.shape[-1])
        kept = False
        if draft is None:
            token = sample(logits, request.params, seq.generator, seen, counts)
        else:
            penalised = apply_penalties(logits, request.params, seen, counts)
            chosen, kept = judge(penalised, draft, None, request.params, seq.generator)
            token = torch.tensor([chosen])
        token_id = int(token[0])
        logprob = top = None
        if request.logprobs:
            logprob = float(token_logprobs(logits, token)[0])
            if request.top_logprobs:
                values, ids = logits.log_softmax(-1)[0].topk(request.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        if counts is not None:
            counts[0, token_id] += 1
        seq.tokens.append(token_id)
        self.stats.generated_tokens += 1
        seq.text.add(token_id, logprob)
        event = Event(request.id, seq.index, seq.text.pending(), token_id, logprob, top)
        request.on_event(event)
        if seq.text.finish_reason is not None:
            self._running.remove(seq)
            self._release(seq)
            self._finish(seq, seq.text.finish_reason)
        return kept

    def _finish(self, seq: _Sequence, reason: str) -> None:
        event = Event(seq.request.id, seq.index, seq.text.pending(), None, finish_reason=reason)
        seq.request.on_event(event)

    def _penalty_state(
        self, seq: _Sequence, vocab: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not seq.request.params.uses_penalties:
            return None, None
        if seq.counts is None:
            seq.seen = torch.zeros(1, vocab, dtype=torch.bool)
            seq.seen[0, seq.request.prompt] = True
            seq.counts = torch.zeros(1, vocab, dtype=torch.long)
        return seq.seen, seq.counts


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn()'s result (or exception), computed in a thread that ends when fn returns.

    GNU OpenMP, torch's CPU thread pool, keeps a team of workers for every thread that has run
    a parallel region, and once the teams outnumber the cores their workers stop spinning
    between regions and sleep, so every parallel region (each kernel call, each compiled step)
    pays a wake-up. A server that loaded its model in the main thread and decodes in the engine
    thread has two teams: measured on 2 cores, a 1536x576 float32 product took 70 us instead of
    26 and a SmolLM2 decode step 49 ms instead of 30. Loading, quantizing and compiling in a
    passing thread leaves the engine thread the only team."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            result.append((False, error))

    thread = threading.Thread(target=run, name="herd-setup", daemon=True)  # Ctrl-C exits
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _cache_root(seq: _Sequence) -> tuple[str, int] | None:
    """Where a sequence's chain of prefix-block names starts: one chain per adapter."""
    return None if seq.request.adapter is None else ("adapter", seq.request.adapter)


def run_to_completion(
    engine: Engine,
    requests: Sequence[Request],
    on_finish: Callable[[Event], None] | None = None,
) -> dict[str, list[list[Event]]]:
    """Submit `requests` and wait for all of them: each request's events, per choice.
    on_finish(event) is called as each choice ends, for progress bars. A started engine runs
    them in its thread; one that was not started runs them in this one (`run_until_done`), as
    offline batch jobs do."""
    done = threading.Semaphore(0)
    events: dict[str, list[list[Event]]] = {r.id: [[] for _ in range(r.n)] for r in requests}
    for request in requests:

        def on_event(event: Event) -> None:
            events[event.request_id][event.index].append(event)
            if event.finish_reason is not None:
                if on_finish is not None:
                    on_finish(event)
                done.release()

        request.on_event = on_event
        engine.submit(request)
    if engine._thread is None:
        engine.run_until_done()
    for request in requests:
        for _ in range(request.n):
            done.acquire()
    return events
