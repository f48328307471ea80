"""PNG plots of evaluation results (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def niah_heat_map(result: dict, path: str | Path, title: str = "needle in a haystack") -> None:
    """The depth x length grid as a PNG (green: found, red: missed)."""
    plt = _pyplot()
    lengths = sorted({c["length"] for c in result["grid"]})
    depths = sorted({c["depth"] for c in result["grid"]})
    scores = np.full((len(depths), len(lengths)), np.nan)
    for c in result["grid"]:
        scores[depths.index(c["depth"]), lengths.index(c["length"])] = c["score"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.6 * len(depths)))
    image = ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}: {100 * result['retrieval']['mean']:.0f}% retrieved")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def subject_bars(result: dict, path: str | Path, title: str = "MMLU") -> None:
    """Accuracy per subject (records with "subject/i" ids), sorted, with the overall mean."""
    plt = _pyplot()
    by_subject: dict[str, list[bool]] = {}
    for record in result["records"]:
        by_subject.setdefault(record["id"].split("/")[0], []).append(record["correct"])
    names = sorted(by_subject, key=lambda s: np.mean(by_subject[s]))
    scores = [100 * np.mean(by_subject[s]) for s in names]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.18 * len(names)))
    ax.barh(range(len(names)), scores, color="tab:blue")
    ax.set_yticks(range(len(names)), [s.replace("_", " ") for s in names], fontsize=7)
    overall = 100 * result["acc"]["mean"]
    ax.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"all: {overall:.1f}%")
    ax.axvline(25, color="grey", linestyle=":", linewidth=1, label="chance: 25%")
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_title(f"{title}: accuracy by subject")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
