"""The engine against offline generation: continuous batching, chunked prefill, paged blocks,
preemption and prefix caching must not change a single greedy token."""

from __future__ import annotations

import threading

import pytest
import torch

import herd
from herd.infer import SamplingParams, decode_steps
from herd.infer.paged import BlockManager, BlockName, OutOfBlocks
from herd.serve.engine import Engine, Request, in_passing_thread, run_to_completion
from tests.conftest import IdsTokenizer, hf_llama

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> herd.Transformer:
    path = tmp_path_factory.mktemp("tiny")
    hf_llama(n_kv_heads=2, n_heads=8).save_pretrained(path)
    return herd.load_model(path).eval()


def alone(model, prompt: list[int], n: int) -> list[int]:
    return [s.tokens[0] for s in decode_steps(model, [prompt], n, GREEDY)]


def tokens_of(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=gen).tolist()
    return [torch.randint(0, 320, (n,), generator=gen).tolist() for n in lengths]


def engine(model, **kwargs) -> Engine:
    kwargs = {"block_size": 4, "prefill_chunk": 7, "max_seq_len": 96} | kwargs
    return Engine(model, IdsTokenizer(), **kwargs).start()


def test_continuous_batching_matches_each_prompt_alone(tiny):
    e = engine(tiny, num_blocks=200)
    ps = prompts(10)
    budgets = [3 + 5 * i % 17 for i in range(10)]
    requests = [Request(str(i), p, m) for i, (p, m) in enumerate(zip(ps, budgets))]
    events = run_to_completion(e, requests)
    for i, (p, m) in enumerate(zip(ps, budgets)):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, m)
        assert events[str(i)][0][-1].finish_reason == "length"
    assert e.stats.batched_sequences > e.stats.steps  # rows really were batched
    assert e.free_blocks == e.total_blocks
    e.stop()


def test_preemption_recomputes_without_changing_outputs(tiny):
    # 26 blocks of 4 tokens: one full 96-token context, not eight 40-token sequences at once
    e = engine(tiny, num_blocks=26)
    ps = prompts(8, seed=1)
    requests = [Request(str(i), p, 40) for i, p in enumerate(ps)]
    events = run_to_completion(e, requests)
    assert e.stats.preemptions > 0
    for i, p in enumerate(ps):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, 40)
    assert e.free_blocks == e.total_blocks
    e.stop()


def test_prefix_cache_reuses_shared_prompt_blocks(tiny):
    e = engine(tiny, num_blocks=200)
    system = prompts(1, seed=2)[0] * 2  # a shared "system prompt" of whole blocks and more
    first = run_to_completion(e, [Request("a", system + [5, 6], 8)])
    assert e.stats.cached_prompt_tokens == 0
    ps = [system + [7], system + [9, 10, 11], system + [5, 6]]
    events = run_to_completion(e, [Request(str(i), p, 8) for i, p in enumerate(ps)])
    full_blocks = len(system) // 4
    assert e.stats.cached_prompt_tokens >= 3 * full_blocks * 4
    assert e.stats.prefix_blocks_hit >= 3 * full_blocks
    for i, p in enumerate(ps):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, 8)
    assert tokens_of(first["a"][0]) == tokens_of(events["2"][0])
    e.stop()


def test_n_choices_and_seeds(tiny):
    e = engine(tiny, num_blocks=200)
    params = SamplingParams(temperature=1.0, top_p=1.0)

    def request(rid: str, seed: int) -> Request:
        return Request(rid, [1, 2, 3, 4, 5], 12, params, n=3, seed=seed)

    a = run_to_completion(e, [request("a", 7)])["a"]
    b = run_to_completion(e, [request("b", 7)])["b"]
    assert [tokens_of(x) for x in a] == [tokens_of(x) for x in b]  # reproducible
    assert len({tuple(tokens_of(x)) for x in a}) > 1  # the choices differ
    e.stop()


def test_cancel_frees_blocks(tiny):
    e = engine(tiny, num_blocks=200)
    started = threading.Event()
    request = Request("x", [1, 2, 3], 90, on_event=lambda ev: started.set())
    e.submit(request)
    assert started.wait(30)
    e.cancel("x")
    for _ in range(200):
        if e.idle() and e.free_blocks == e.total_blocks:
            break
        threading.Event().wait(0.01)
    assert e.free_blocks == e.total_blocks
    e.stop()


def test_engine_rejects_what_cannot_fit(tiny):
    with pytest.raises(ValueError, match="cannot hold one full"):
        Engine(tiny, IdsTokenizer(), num_blocks=4, block_size=4, max_seq_len=96)
    e = Engine(tiny, IdsTokenizer(), num_blocks=40, block_size=4, max_seq_len=96)
    with pytest.raises(ValueError, match="context window"):
        e.submit(Request("x", [1] * 90, 10))
    with pytest.raises(ValueError, match="at least one token"):
        e.submit(Request("x", [], 10))


def test_block_manager_prefix_lookup_and_eviction():
    blocks = BlockManager(num_blocks=3, block_size=2)
    a, b = blocks.allocate(), blocks.allocate()
    first_serial = blocks.name(a, None, [5, 6])
    second_serial = blocks.name(b, first_serial, [7, 8])
    blocks.release([a, b])
    assert blocks.num_free == 3
    # found again by their prefix; the last token is always left to compute
    assert blocks.cached_prefix([5, 6, 7, 8, 9]) == ([a, b], [first_serial, second_serial])
    assert blocks.cached_prefix([5, 6, 7, 8])[0] == [a]  # b would cover the last token
    assert blocks.cached_prefix([6, 6, 7, 8])[0] == []  # a different first block
    assert blocks.refs[a] == 2 and blocks.refs[b] == 1 and blocks.num_free == 1
    blocks.release([a, b]), blocks.release([a])
    assert blocks.num_free == 3
    # fresh blocks come from the never-named one first, then the oldest freed (evicting it)
    first, second = blocks.allocate(), blocks.allocate()
    assert first not in (a, b) and second == b
    assert a in blocks.name_of and b not in blocks.name_of
    third = blocks.allocate()
    assert third == a and not blocks.name_of
    with pytest.raises(OutOfBlocks):
        blocks.allocate()
    blocks.release([first, second, third])
    assert blocks.cached_prefix([5, 6, 7, 8, 9])[0] == []  # evicted names are gone


def test_block_names_are_exact_under_colliding_hashes(monkeypatch):
    monkeypatch.setattr(BlockName, "__hash__", lambda self: 0)  # every name in one bucket
    blocks = BlockManager(num_blocks=4, block_size=2)
    a, b, c = blocks.allocate(), blocks.allocate(), blocks.allocate()
    root = blocks.name(a, None, [5, 6])
    blocks.name(b, root, [7, 8])
    adapter_root = blocks.name(c, ("adapter", 1), [5, 6])  # same tokens, other weights
    assert adapter_root != root
    assert blocks.cached_prefix([5, 6, 7, 8, 0]) == ([a, b], [root, blocks.serial_of[b]])
    assert blocks.cached_prefix([5, 6, 7, 8, 0], ("adapter", 1))[0] == [c]
    assert blocks.cached_prefix([7, 8, 5, 6, 0])[0] == []
    assert blocks.cached_prefix([5, 7, 0])[0] == []
    # the same prefix computed twice keeps the first block's name
    d = blocks.allocate()
    assert blocks.name(d, None, [5, 6]) == root and d not in blocks.name_of


def test_an_evicted_parent_orphans_its_descendants():
    blocks = BlockManager(num_blocks=2, block_size=2)
    a, b = blocks.allocate(), blocks.allocate()
    blocks.name(b, blocks.name(a, None, [5, 6]), [7, 8])
    blocks.release([a]), blocks.release([b])  # a is evicted first, b stays named
    assert blocks.allocate() == a
    blocks.name(a, None, [1, 2])
    blocks.release([a])
    # b followed [5, 6], not [1, 2]: it must not be found after the block that now holds [1, 2]
    assert blocks.cached_prefix([1, 2, 7, 8, 0])[0] == [a]


def test_engine_output_is_exact_when_every_block_name_collides(tiny, monkeypatch):
    monkeypatch.setattr(BlockName, "__hash__", lambda self: 0)
    e = engine(tiny, num_blocks=200)
    shared = prompts(1, seed=3)[0][:8]
    ps = prompts(6, seed=4) + [shared + [1, 2, 3, 4, 5], shared + [6]]
    events = run_to_completion(e, [Request(str(i), p, 12) for i, p in enumerate(ps)])
    events |= run_to_completion(e, [Request(f"again{i}", p, 12) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, 12)
        assert tokens_of(events[f"again{i}"][0]) == alone(tiny, p, 12)
    assert e.stats.prefix_blocks_hit > 0
    e.stop()


@pytest.mark.parametrize("pooled", [True, False], ids=["pool-attention", "gathered-keys"])
def test_compiled_decode_matches_eager_offline_on_mixed_concurrent_requests(tiny, pooled):
    # Batches of 1-2 decode compiled (pad rows in the batch-2 bucket when one row is left),
    # 3-4 eager; preemption (30 blocks) and a shared prefix mix in recomputed sequences. The
    # step attends through the whole pool with herd's kernel where it is built, else through
    # gathered keys (both forms, the first where it applies).
    e = engine(tiny, num_blocks=30, max_batch=4, compile_batch=2)
    if pooled and not e.compiled.pooled:
        pytest.skip("herd's attention kernel is not built")
    e.compiled.pooled = pooled
    ps = prompts(7, seed=4)
    ps[1] = ps[0] + [1, 2]
    budgets = [5 + 9 * i % 31 for i in range(7)]
    requests = [Request(str(i), p, m) for i, (p, m) in enumerate(zip(ps, budgets))]
    events = run_to_completion(e, requests)
    for i, (p, m) in enumerate(zip(ps, budgets)):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, m)
    width = e.cache.scratch + 1 if pooled else 256  # one graph per batch for the pool
    assert sorted(e.compiled.views) == [(1, width), (2, width)]
    assert e.free_blocks == e.total_blocks
    e.stop()


def test_setup_in_a_passing_thread_hands_back_its_result_or_error():
    assert in_passing_thread(lambda: threading.current_thread().name) == "herd-setup"
    assert threading.current_thread() is threading.main_thread()

    def broken():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        in_passing_thread(broken)


def test_an_engine_not_started_runs_offline_jobs_in_the_callers_thread(tiny):
    e = Engine(tiny, IdsTokenizer(), block_size=4, prefill_chunk=7, max_seq_len=96, num_blocks=40)
    ps = prompts(3, seed=7)
    events = run_to_completion(e, [Request(str(i), p, 6) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, 6)
    assert e._thread is None and e.idle() and e.free_blocks == e.total_blocks
    e.start()
    with pytest.raises(RuntimeError, match="runs in its own thread"):
        e.run_until_done()
    e.stop()


@pytest.mark.parametrize(("compile_batch", "draft_tokens"), [(2, 3), (4, 1)])
def test_ngram_speculation_keeps_every_greedy_token(tiny, compile_batch, draft_tokens):
    # Prompts that repeat themselves give prompt lookup matches; 26 blocks of 4 tokens force
    # preemption. Rounds whose fed tokens fit the compiled step go through it, a token a row.
    e = engine(tiny, num_blocks=26, max_batch=4, compile_batch=compile_batch, draft="ngram",
               draft_tokens=draft_tokens)  # fmt: skip
    compiled_rounds = []
    verify = e._verify_compiled
    e._verify_compiled = lambda seqs, rows: compiled_rounds.append(rows) or verify(seqs, rows)
    ps = [p[:6] * 3 for p in prompts(6, seed=7)]
    budgets = [4 + 7 * i % 23 for i in range(6)]
    requests = [Request(str(i), p, m) for i, (p, m) in enumerate(zip(ps, budgets))]
    events = run_to_completion(e, requests)
    for i, (p, m) in enumerate(zip(ps, budgets)):
        assert tokens_of(events[str(i)][0]) == alone(tiny, p, m)
        assert events[str(i)][0][-1].finish_reason == "length"
    stats = e.speculation
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted, stats
    assert e.stats.preemptions > 0
    # With one draft each, rounds of up to 4 fed tokens (the compiled step's largest batch) ran
    # compiled; with three, rounds are wider than 2 tokens and ran eagerly.
    assert bool(compiled_rounds) == (draft_tokens == 1)
    assert all(sum(map(len, rows)) <= e.compiled.max_batch for rows in compiled_rounds)
    assert e.free_blocks == e.total_blocks
    e.stop()


def test_engine_refuses_unknown_drafters(tiny):
    with pytest.raises(ValueError, match="prompt lookup only"):
        Engine(tiny, IdsTokenizer(), draft="path/to/model")
    with pytest.raises(ValueError, match="draft_tokens"):
        Engine(tiny, IdsTokenizer(), draft="ngram", draft_tokens=0)
