"""`herd distill`: the loss against a float64 computation, the layer-pruned student against
transformers' model with the same blocks removed, and a run whose student learns the teacher,
lands in RUN/student and drafts for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import herd
from herd.cli.main import app
from herd.config.distill import distill_from_dict
from herd.config.train import ConfigError
from herd.finetune.distill import distill_loss, keep_layers
from herd.finetune.tasks import unit_conversions, write_dialogs
from herd.infer import Llama
from herd.tokenizer import load_tokenizer
from tests.conftest import hf_llama


@pytest.mark.parametrize(("temperature", "kl_weight"), [(1.0, 1.0), (2.0, 0.7), (0.5, 0.0)])
def test_distill_loss_equals_a_float64_computation(temperature, kl_weight):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 9, 13, generator=gen) * 3
    targets = torch.randint(0, 13, (9,), generator=gen)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    s, t = student.double().numpy(), teacher.double().numpy()
    log_s, log_t = log_softmax(s / temperature), log_softmax(t / temperature)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean()
    ce = -log_softmax(s)[np.arange(9), targets.numpy()].mean()
    expected = kl_weight * temperature**2 * kl + (1 - kl_weight) * ce
    got = distill_loss(student, teacher, targets, temperature, kl_weight)
    assert abs(got.item() - expected) < 1e-5 * max(1.0, abs(expected))
    assert distill_loss(teacher, teacher, targets, temperature, 1.0).abs().item() < 1e-6


def test_kept_layers_equal_transformers_without_the_others(tmp_path):
    reference = hf_llama(n_kv_heads=2)
    reference.save_pretrained(tmp_path)
    student = keep_layers(herd.load_model(tmp_path), [1])
    del reference.model.layers[0]  # transformers' model with block 0 removed
    reference.config.num_hidden_layers = 1
    tokens = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(tokens, use_cache=False).logits
        got = student(tokens)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert student.config.n_layers == 1
    with pytest.raises(ConfigError, match="blocks are 0 to 0"):
        keep_layers(student, [0, 3])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random 2-layer model over SmolLM2's vocabulary with sharp distributions."""
    path = tmp_path_factory.mktemp("teacher")
    hf_llama(vocab_size=49152, seed=3).save_pretrained(path)
    return path


def test_distill_run_learns_the_teacher_and_writes_a_draft(teacher, tmp_path):
    dialogs = tmp_path / "dialogs.jsonl"
    write_dialogs(unit_conversions(60, seed=2), dialogs)
    raw = {
        "distill": {"layers": [1]},
        "data": {
            "sources": [{"path": str(dialogs)}],
            "valid_fraction": 0.2,
            "tokenizer": "smollm2",
        },
        "batch": {"seq_len": 128, "batch_size": 2},
        "optim": {"steps": 16, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "run": {"dir": str(tmp_path / "run"), "precision": "fp32", "threads": 2},
    }
    recipe = tmp_path / "distill.toml"
    recipe.write_text(_toml(raw))
    result = CliRunner().invoke(app, ["distill", str(teacher), str(recipe)])
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/metrics.jsonl").open()
              if "loss" in json.loads(line)]  # fmt: skip
    assert len(losses) == 16 and losses[-1] < 0.7 * losses[0]
    before, after = (float(x.rstrip("%")) for x in _agreement(result.output))
    assert after > before
    student = herd.load_model(tmp_path / "run/student")
    assert student.config.n_layers == 1 and student.config.vocab_size == 49152
    # the student drafts for its teacher; the output stays the teacher's own
    target = herd.load_model(teacher)
    tokenizer = load_tokenizer("smollm2")
    plain = Llama(target, tokenizer).generate([1, 2, 3], max_new_tokens=24, temperature=0)
    drafted = Llama(target, tokenizer, draft=student)
    assert drafted.generate([1, 2, 3], max_new_tokens=24, temperature=0)[0].token_ids == (
        plain[0].token_ids
    )
    assert drafted.speculation.drafted > 0


def test_distill_recipe_errors():
    with pytest.raises(ConfigError, match="teacher is required"):
        distill_from_dict({"data": {"sources": ["x.jsonl"]}})
    with pytest.raises(ConfigError, match="trains in full"):
        distill_from_dict(
            {"distill": {"teacher": "t"}, "finetune": {"method": "lora"},
             "data": {"sources": ["x.jsonl"]}}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="distinct"):
        distill_from_dict({"distill": {"teacher": "t", "layers": [1, 1]},
                           "data": {"sources": ["x.jsonl"]}})  # fmt: skip


def _agreement(output: str) -> list[str]:
    line = next(x for x in output.splitlines() if "agreement" in x)
    return [line.split(": ")[1].split(" -> ")[0], line.split(" -> ")[1]]


def _toml(raw: dict) -> str:
    lines = []
    for section, values in raw.items():
        if section == "data":
            for source in values["sources"]:
                lines += ["[[data.sources]]", f"path = {json.dumps(source['path'])}", ""]
            values = {k: v for k, v in values.items() if k != "sources"}
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
