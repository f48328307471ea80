"""scripts/gpu_report.py runs end to end on the CPU at debug sizes (--smoke), so a GPU session
spends its minutes measuring; its tables carry figures, and a bad section name is refused."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TITLES = (
    "decode:",
    "fp8 against bf16 logits",
    "perplexity: SmolLM2",
    "serving engine",
    "pretraining:",
)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prints_every_section(tmp_path, capsys):
    assert load_script().main(["--smoke", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert all(title in out for title in TITLES), out
    # Figures, not placeholders: decode speeds, logit agreement, perplexities and an MFU.
    for precision in ("bf16", "fp8-mixed"):
        assert re.search(rf"\| {precision} \| eager \| [\d,]+ \| [\d.]+ \| [\d.]+ \|", out), out
    assert re.search(r"\| fp8-mixed \| [\d.]+ \| [\d.]+% \|", out), out
    assert re.search(r"\| [\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+% \| 33-39% \|", out), out
    ppl = {m: float(re.search(rf"\| {m} \| ([\d.]+) \| [+-]", out)[1]) for m in ("bf16", "fp8")}
    assert 1.0 < ppl["bf16"] < 1000.0 and ppl["fp8"] != ppl["bf16"], ppl


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit):
        load_script().main(["--smoke", "--sections", "decode,nope"])
