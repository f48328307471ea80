"""Document masking: a packed row's logits (and so its loss) equal those of each document run
on its own from position 0, through both the SDPA mask and the flex-attention BlockMask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.model.masks import document_block_mask, document_causal_mask
from tests.conftest import hf_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_llama(n_kv_heads=2, n_heads=8).save_pretrained(path)
    return herd.load_model(path).eval()


def packed_row(lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 320, (sum(lengths) + 1,), generator=gen)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    return tokens[:-1], tokens[1:], doc_ids, positions


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
def test_packed_loss_equals_sum_of_separate_documents(tiny, kind):
    rows = [packed_row([5, 17, 1, 9], seed=0), packed_row([32], seed=1)]
    tokens, targets, doc_ids, positions = (torch.stack(x) for x in zip(*rows))
    if kind == "sdpa":
        mask = document_causal_mask(doc_ids)
    else:
        mask = document_block_mask(doc_ids, block_size=16)
    with torch.no_grad():
        packed = tiny(tokens, positions, mask)
        packed_loss = F.cross_entropy(packed.flatten(0, 1), targets.flatten(), reduction="sum")
        separate_loss = 0.0
        for row in range(2):
            for doc in doc_ids[row].unique():
                where = doc_ids[row] == doc
                alone = tiny(tokens[row, where][None])[0]  # positions 0.. by default
                torch.testing.assert_close(packed[row, where], alone, rtol=1e-5, atol=1e-5)
                separate_loss += F.cross_entropy(alone, targets[row, where], reduction="sum")
    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-6, atol=1e-4)
    # without the mask the documents would see each other
    with torch.no_grad():
        leaky = tiny(tokens, positions)
    assert not torch.allclose(leaky[0, 5:22], packed[0, 5:22], atol=1e-3)


def test_mask_shapes_agree():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    dense = document_causal_mask(doc_ids)
    assert dense.shape == (1, 1, 8, 8)
    assert dense[0, 0, 4].tolist() == [False, False, True, True, True, False, False, False]
    block = document_block_mask(doc_ids, block_size=8)
    assert block.shape[-2:] == (8, 8)
