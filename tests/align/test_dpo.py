"""`herd dpo`: loss and gradients against TRL's DPOTrainer (sigmoid + "sft" weighted 0.2) on
the same sequences, completion masks and models; the paper's length-normalised NLL against a
float64 computation; the formatting mask checked by hand on the Llama 3 and SmolLM2 formats;
bad preference data and a reference of another tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from herd.align.data import (
    Preference,
    ReadStats,
    encode_group,
    encode_response,
    in_order,
    read_preferences,
)
from herd.align.dpo import DPOTrainer, best_and_worst
from herd.config.align import dpo_from_dict
from herd.config.train import ConfigError
from herd.finetune.data import DataError
from herd.tokenizer import load_tokenizer
from herd.tokenizer.chat import chat_format
from tests.align.conftest import write_preferences

BETA, NLL = 0.1, 0.2


def dpo_recipe(base, reference, data, run_dir, **dpo) -> dict:
    return {
        "finetune": {"base": str(base), "method": "full"},
        "dpo": {"reference": str(reference), "beta": BETA, "nll": NLL, **dpo},
        "data": {"sources": [str(data)]},
        "batch": {"seq_len": 256, "batch_size": 1, "micro_batch_size": 1},
        "optim": {"steps": 2, "lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "run": {"dir": str(run_dir), "precision": "fp32", "threads": 2},
    }


def trl_inputs(groups, pad: int):
    """TRL's batch: [chosen..., rejected...] as prompt + response ids, right-padded, with the
    completion mask on exactly the scored tokens."""
    rows = [
        (g.prompt + g.responses[k], [False] * len(g.prompt) + g.scored[k])
        for k in (0, 1)
        for g in groups
    ]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
    completion = torch.tensor([[int(m) for m in c] + [0] * (width - len(c)) for _, c in rows])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def trl_trainer(policy, reference, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        beta=BETA,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, NLL],
        use_cpu=True,
        bf16=False,  # else accelerate runs the reference model under bf16 autocast
    )
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    return TRLDPOTrainer(
        model=policy,
        ref_model=reference_model(reference),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def reference_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("mask_formatting", [True, False])
def test_loss_and_gradients_equal_trl(llama3_pair, preference_records, tmp_path, mask_formatting):
    policy_path, reference_path = llama3_pair
    data = write_preferences(tmp_path / "prefs.jsonl", preference_records)
    raw = dpo_recipe(
        policy_path,
        reference_path,
        data,
        tmp_path / "run",
        nll_normalize="tokens",
        mask_formatting=mask_formatting,
    )
    trainer = DPOTrainer(dpo_from_dict(raw))
    (batch,) = in_order(trainer.train_rows, len(trainer.train_rows.tokens))
    trainer.model.train()
    loss = trainer.loss(batch)
    loss.backward()

    fmt = chat_format(trainer.tokenizer)
    groups = [encode_group(fmt, best_and_worst(p), mask_formatting) for p in read_preferences(data)]
    policy = reference_model(policy_path).train()
    theirs = trl_trainer(policy, reference_path, tmp_path)
    their_loss = theirs._compute_loss(policy, trl_inputs(groups, 0), False)
    their_loss.backward()

    assert abs(loss.item() - their_loss.item()) < 1e-6
    assert loss.item() > 0.1  # the policy differs from the reference: a real log-ratio term
    ours = dict(trainer.model.named_parameters())
    for hf_name, name in (
        ("model.layers.0.mlp.down_proj.weight", "layers.0.feed_forward.w2.weight"),
        ("model.layers.1.self_attn.v_proj.weight", "layers.1.attention.wv.weight"),
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        ("lm_head.weight", "output.weight"),
    ):
        theirs_grad = dict(policy.named_parameters())[hf_name].grad
        # float32 sums in another order: an element near zero may differ by a rounding of
        # the largest ones (1e-7 in an embedding gradient whose largest entries are ~0.2).
        scale = float(theirs_grad.abs().max())
        torch.testing.assert_close(ours[name].grad, theirs_grad, rtol=1e-4, atol=1e-5 * scale)


def test_sequence_normalised_nll_against_float64(llama3_pair, preference_records, tmp_path):
    """The paper's NLL: each chosen response's NLL over its own length, averaged; computed
    here in float64 from transformers' logits of each sequence alone."""
    policy_path, reference_path = llama3_pair
    data = write_preferences(tmp_path / "prefs.jsonl", preference_records)
    trainer = DPOTrainer(dpo_from_dict(dpo_recipe(policy_path, reference_path, data, tmp_path)))
    (batch,) = in_order(trainer.train_rows, len(trainer.train_rows.tokens))
    with torch.no_grad():
        ours = trainer.loss(batch).item()

    fmt = chat_format(trainer.tokenizer)
    groups = [encode_group(fmt, best_and_worst(p), True) for p in read_preferences(data)]
    policy, reference = reference_model(policy_path).double(), reference_model(reference_path)
    reference = reference.double()

    def logp(model, prompt, ids, scored):
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            lp = model(full).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        picked = lp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        return float(picked[torch.tensor(scored)].sum())

    total = 0.0
    for g in groups:
        pc, pr = (logp(policy, g.prompt, g.responses[k], g.scored[k]) for k in (0, 1))
        rc, rr = (logp(reference, g.prompt, g.responses[k], g.scored[k]) for k in (0, 1))
        margin = BETA * ((pc - rc) - (pr - rr))
        total += math.log1p(math.exp(-margin)) + NLL * (-pc / sum(g.scored[0]))
    assert abs(ours - total / len(groups)) < 1e-5


def test_formatting_mask_llama3_by_hand():
    tok = load_tokenizer("llama3")
    fmt = chat_format(tok)
    special = tok.special_tokens
    prompt, ids, scored = encode_response(
        fmt, [{"role": "user", "content": "Hi"}], "Hello there", mask_formatting=True
    )
    content = tok.encode("Hello there", bos=False, eos=False)
    header = [
        special["<|start_header_id|>"],
        *tok.encode("assistant", bos=False, eos=False),
        special["<|end_header_id|>"],
        *tok.encode("\n\n", bos=False, eos=False),
    ]
    assert ids == header + content + [special["<|eot_id|>"]]
    assert scored == [False] * len(header) + [True] * len(content) + [False]
    assert prompt[-1] == special["<|eot_id|>"]  # the user turn's end, before the response
    _, ids_off, scored_off = encode_response(
        fmt, [{"role": "user", "content": "Hi"}], "Hello there", mask_formatting=False
    )
    assert ids_off == ids and all(scored_off)


def test_formatting_mask_smollm2_by_hand(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    fmt = chat_format(tok)
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    _, ids, scored = encode_response(
        fmt, [{"role": "user", "content": "Hi"}], "Hello there", mask_formatting=True
    )
    content = tok.encode("Hello there", bos=False, eos=False)
    header = [start, *tok.encode("assistant\n", bos=False, eos=False)]
    assert ids == header + content + [end]
    assert scored == [False] * len(header) + [True] * len(content) + [False]


def test_bad_preferences_are_dropped_and_counted(tmp_path):
    path = write_preferences(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "4"},
            {"prompt": "2+2?", "chosen": " 4 ", "rejected": "4"},
            {"prompt": "3+3?", "chosen": "", "rejected": "5"},
            {"prompt": "3+3?", "chosen": "6", "rejected": "5", "edited": "6"},
            {
                "chosen": [
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "2"},
                ],
                "rejected": [
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "3"},
                ],
            },
        ],
    )
    stats = ReadStats()
    kept = read_preferences(path, stats)
    assert (stats.identical, stats.empty, stats.pairs) == (2, 1, 2)
    assert kept[0] == Preference(({"role": "user", "content": "3+3?"},), ("6", "5"))
    assert kept[1].responses == ("2", "3")
    with pytest.raises(DataError, match=r"bad2.jsonl:1: .*chosen.*rejected"):
        read_preferences(write_preferences(tmp_path / "bad2.jsonl", [{"prompt": "x"}]))
    with pytest.raises(DataError, match="no usable preference records"):
        read_preferences(
            write_preferences(
                tmp_path / "bad3.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "a"}]
            )
        )


def test_a_reference_with_another_tokenizer_is_refused(
    llama3_pair, preference_records, smollm2_path, tmp_path
):
    from herd.tokenizer.formats import save_tokenizer
    from tests.conftest import hf_llama

    other = tmp_path / "other"
    hf_llama(vocab_size=49152).save_pretrained(other)
    save_tokenizer(load_tokenizer(smollm2_path), other, "hf")
    data = write_preferences(tmp_path / "prefs.jsonl", preference_records)
    with pytest.raises(ConfigError, match="another tokenizer"):
        DPOTrainer(dpo_from_dict(dpo_recipe(llama3_pair[0], other, data, tmp_path / "run")))


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="beta must be positive"):
        dpo_from_dict({"finetune": {"base": "x"}, "data": {"sources": ["p"]}, "dpo": {"beta": 0}})
    with pytest.raises(ConfigError, match="format 'chat'"):
        dpo_from_dict(
            {"finetune": {"base": "x"}, "data": {"sources": [{"path": "p", "format": "chat"}]}}
        )
