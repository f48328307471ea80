"""The pieces of pipeline and context parallelism that need no process group: how layers are
cut into stages and stages placed on ranks, which schedules are accepted, how a sequence is
split over context-parallel ranks, and the mask rows each rank attends with."""

from __future__ import annotations

import pytest
import torch

from herd.config import ModelConfig
from herd.config.train import ConfigError, ParallelConfig
from herd.model import Transformer
from herd.model.masks import document_causal_mask
from herd.train.parallel import (
    ParallelDims,
    context_parallel_indices,
    fsdp_policy,
    pipeline_schedule,
    split_stages,
    stage_layers,
    stages_of_rank,
)


@pytest.mark.parametrize("n_layers, n_stages", [(4, 2), (7, 3), (126, 16), (32, 32), (80, 10)])
def test_stages_cover_every_layer_once_in_order(n_layers, n_stages):
    plan = stage_layers(n_layers, n_stages)
    assert len(plan) == n_stages
    assert [int(i) for stage in plan for i in stage] == list(range(n_layers))
    sizes = [len(stage) for stage in plan]
    assert max(sizes) - min(sizes) <= 1
    # the first and last stages also embed and compute the loss: never the larger ones
    if len(set(sizes)) > 1:
        assert sizes[0] == sizes[-1] == min(sizes)


@pytest.mark.parametrize("n_stages", [16, 32])
def test_the_405b_split_matches_the_paper(n_stages):
    """The 405B's 126 layers are 16 x 8 - 2: the paper took one layer off the first and the
    last pipeline stage, which hold the embedding and the loss."""
    sizes = [len(stage) for stage in stage_layers(126, n_stages)]
    per = 128 // n_stages
    assert sizes == [per - 1] + [per] * (n_stages - 2) + [per - 1]


def test_too_many_stages_are_refused():
    with pytest.raises(ConfigError, match="at least as many layers"):
        stage_layers(2, 4)


@pytest.mark.parametrize("pp, per_rank, v_shape", [(2, 1, False), (4, 2, False), (4, 2, True)])
def test_every_stage_runs_on_exactly_one_rank(pp, per_rank, v_shape):
    owned = [s for rank in range(pp) for s in stages_of_rank(rank, pp, per_rank, v_shape)]
    assert sorted(owned) == list(range(pp * per_rank))
    if v_shape:  # the first and last stage share rank 0: the loss starts the backward there
        assert stages_of_rank(0, pp, per_rank, v_shape) == [0, 2 * pp - 1]


@pytest.mark.parametrize(
    "name, per_rank, expected",
    [("1f1b", 0, 1), ("GPipe", 0, 1), ("Interleaved1F1B", 0, 2), ("Interleaved1F1B", 4, 4)],
)
def test_schedules_by_torchs_names(name, per_rank, expected):
    assert pipeline_schedule(name, per_rank).stages_per_rank == expected


@pytest.mark.parametrize(
    "name, per_rank, message",
    [
        ("ZeroBubbleMagic", 0, "Unknown schedule name"),
        ("1F1B", 2, "runs one stage per rank"),
        ("ZBVZeroBubble", 3, "exactly 2 stages per rank"),
    ],
)
def test_schedules_that_cannot_run_are_refused(name, per_rank, message):
    with pytest.raises(ConfigError, match=message):
        pipeline_schedule(name, per_rank)


@torch.no_grad()
@pytest.mark.parametrize("stage_ids_of_ranks", [[[0], [1], [2]], [[0, 2], [1, 3]]])
def test_stages_chained_give_the_whole_models_logits(stage_ids_of_ranks):
    """Each rank's cut-down model feeds the next; the last returns the unsplit model's
    logits (float64, so the comparison is exact up to summation order)."""
    config = ModelConfig(dim=32, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=97)
    full = Transformer(config).double()
    tokens = torch.randint(0, 97, (2, 10))
    expected = full(tokens)
    n_stages = sum(len(ids) for ids in stage_ids_of_ranks)
    modules = {}
    for ids in stage_ids_of_ranks:
        model = Transformer(config).double()
        model.load_state_dict(full.state_dict())
        for s, module in zip(ids, split_stages(model, ids, n_stages)):
            modules[s] = module
        # the rank's own model keeps Meta's names for exactly the layers it runs
        plan = stage_layers(config.n_layers, n_stages)
        assert set(model.layers) == {i for s in ids for i in plan[s]}
        assert (model.tok_embeddings is None) == (0 not in ids)
    h = tokens
    for s in range(n_stages):
        h = modules[s](h)
    torch.testing.assert_close(h, expected)


@pytest.mark.parametrize("seq_len, cp", [(8, 2), (48, 3), (64, 4)])
def test_context_parallel_ranks_get_equal_causal_work(seq_len, cp):
    parts = context_parallel_indices(seq_len, cp)
    assert sorted(torch.cat(parts).tolist()) == list(range(seq_len))
    # a query at position i attends to i + 1 keys: every rank gets the same total
    work = {int((part + 1).sum()) for part in parts}
    assert len(work) == 1


def test_a_sequence_that_does_not_split_is_refused():
    with pytest.raises(ConfigError, match="multiple of 2 x cp = 4"):
        context_parallel_indices(30, 2)


def test_context_parallel_mask_rows_are_the_full_masks():
    """Each rank's mask (its queries against keys in all-gather order) holds exactly the
    entries of the full document-causal mask, checked against a plain loop."""
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], [0] * 5 + [1] * 7])
    seq = doc_ids.shape[1]
    parts = context_parallel_indices(seq, 3)
    keys = torch.cat(parts)
    for part in parts:
        mask = document_causal_mask(doc_ids, part, keys)
        assert mask.shape == (2, 1, len(part), seq)
        for b in range(2):
            for row, q in enumerate(part.tolist()):
                for col, k in enumerate(keys.tolist()):
                    same = doc_ids[b, q] == doc_ids[b, k]
                    assert bool(mask[b, 0, row, col]) == bool(same and k <= q)


FSDP2 = ParallelDims(pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=1)
TP2 = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=2)


def test_fsdp_policy():
    cpu = torch.device("cpu")
    assert fsdp_policy(ParallelConfig(fsdp_param_dtype="bf16"), FSDP2, cpu) == (
        torch.bfloat16,
        False,
    )
    assert fsdp_policy(ParallelConfig(cpu_offload=True), FSDP2, torch.device("cuda")) == (
        None,
        True,
    )


@pytest.mark.parametrize(
    "options, dims, message",
    [
        ({"fsdp_param_dtype": "fp8"}, FSDP2, "must be one of"),
        ({"fsdp_param_dtype": "bf16"}, TP2, "this layout does not use"),
        ({"cpu_offload": True}, FSDP2, "on the CPU device everything is there already"),
    ],
)
def test_fsdp_options_that_cannot_apply_are_refused(options, dims, message):
    with pytest.raises(ConfigError, match=message):
        fsdp_policy(ParallelConfig(**options), dims, torch.device("cpu"))
