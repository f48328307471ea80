"""Imports point down the layers (STYLE.md): every `import herd.X` in src/herd, including the
ones inside functions, goes to a package on the same layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "herd"

# STYLE.md's order: config -> tokenizer, model, kernels (herd's C++ ops; torch only) ->
# checkpoint, data, quantize, adapters -> train, infer -> serve -> eval (it generates through
# the serving engine) -> finetune -> align (preference tuning on the fine-tuning Trainer),
# curate (datatrove steps; it tokenizes through data) -> cli.
# Packages on one layer do not import each other either.
LAYERS = {
    "config": 0,
    "tokenizer": 1,
    "model": 1,
    "kernels": 1,
    "checkpoint": 2,
    "data": 2,
    "quantize": 2,
    "adapters": 2,
    "train": 3,
    "infer": 3,
    "serve": 4,
    "eval": 5,
    "finetune": 6,
    "align": 7,
    "curate": 7,
    "cli": 8,
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported herd package) for every import of herd in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        packages = {n.split(".")[1] for n in names if n.startswith("herd.")}
        found += [(node.lineno, p) for p in sorted(packages & set(LAYERS))]
    return found


def violations(package: str, src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted((src / package).rglob("*.py")):
        for line, target in imports(path):
            if target == package:
                continue
            if LAYERS[target] >= LAYERS[package]:
                bad.append(f"{path.relative_to(src)}:{line} imports herd.{target}")
    return bad


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_down(package):
    assert violations(package) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    """The check itself can fail: a lazy upward import is caught."""
    fake = tmp_path / "herd"
    (fake / "tokenizer").mkdir(parents=True)
    (fake / "tokenizer" / "x.py").write_text("def f():\n    from herd.checkpoint import y\n")
    assert violations("tokenizer", fake) == ["tokenizer/x.py:2 imports herd.checkpoint"]
