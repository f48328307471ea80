import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

import herd
from herd.cli.main import app

runner = CliRunner()


def test_help_lists_every_command_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "herd", "--help"], capture_output=True, text=True, check=True
    )
    assert "inspect" in result.stdout and "convert" in result.stdout
    assert "Show a checkpoint's format" in result.stdout


def test_inspect_reports_format_params_and_size(hf_dir):
    result = runner.invoke(app, ["inspect", str(hf_dir)])
    assert result.exit_code == 0, result.output
    expected = sum(p.numel() for p in herd.load_model(hf_dir).parameters())
    assert "hf" in result.output
    assert f"{expected:,}" in result.output
    assert "F32×" in result.output


def test_convert_to_each_format_and_back(tmp_path, hf_dir):
    original = herd.load_model(hf_dir)
    for fmt, dst in [
        ("meta", tmp_path / "meta"),
        ("gguf", tmp_path / "m.gguf"),
        ("hf", tmp_path / "hf2"),
    ]:
        result = runner.invoke(app, ["convert", str(hf_dir), str(dst), "--to", fmt])
        assert result.exit_code == 0, result.output
        loaded = herd.load_model(dst)
        for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), (fmt, name)


def test_convert_dtype_and_bad_arguments(tmp_path, hf_dir):
    result = runner.invoke(app, ["convert", str(hf_dir), str(tmp_path / "b"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    result = runner.invoke(app, ["convert", str(hf_dir), str(tmp_path / "c"), "--to", "onnx"])
    assert result.exit_code == 1 and "choose one of hf, meta, gguf" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such file" in result.output


def test_convert_refuses_to_overwrite(tmp_path, hf_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["convert", str(hf_dir), str(tmp_path / "out"), "--to", "meta"])
    assert result.exit_code == 1
    assert "already exists" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
