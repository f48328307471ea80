"""`herd synth-task`, `herd finetune` and `herd export` of a LoRA run through the CLI: the
exact-match table, the adapter in PEFT's format, and the exported model equal to PEFT's
merge_and_unload of that adapter as transformers reads both."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from herd.cli.main import app

runner = CliRunner()


def test_finetune_a_lora_adapter_and_export_it(llama3_base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    result = runner.invoke(
        app, ["synth-task", str(tmp_path / "sft"), "--train", "24", "--test", "4"]
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "sft" / "train.jsonl").read_text().splitlines()) == 24
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[finetune]\nbase = "{llama3_base}"\nexact_match = "{tmp_path / "sft" / "test.jsonl"}"\n'
        "[lora]\nrank = 4\n"
        f'[[data.sources]]\npath = "{tmp_path / "sft" / "train.jsonl"}"\n'
        '[data]\ntokenizer = "llama3"\n[batch]\nseq_len = 96\nbatch_size = 2\n'
        f'[optim]\nsteps = 3\nlr = 1e-2\n[run]\ndir = "{tmp_path / "run"}"\nprecision = "fp32"\n'
    )
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "exact match, 4 held-out questions" in result.output
    assert "after (lora)" in result.output
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    result = runner.invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    tokens = torch.tensor([[128000, 12, 345, 6789, 10]])
    with torch.no_grad():
        exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf")(tokens).logits
        base = LlamaForCausalLM.from_pretrained(llama3_base)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()(tokens).logits
    assert (exported - merged).abs().max() <= 1e-5 * merged.abs().max()

    again = runner.invoke(app, ["finetune", str(recipe)])
    assert again.exit_code == 1 and "--resume" in again.output


def test_finetune_errors_name_the_problem(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[finetune]\nbase = "smollm2"\nmethod = "adapter"\n[[data.sources]]\npath = "x"\n'
    )
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 1
    assert "method = 'adapter'" in result.output
