"""The data mix (paper §3.1.2): documents sampled per domain so that the tokens written reach
target proportions (the paper's final mix: ~50% general knowledge, 25% math and reasoning, 17%
code, 8% multilingual).

Collect counts every document's tokens per domain (`metadata.domain`, from the domain step;
"multilingual" for a non-English `metadata.language`, else "general" when there is no domain).
Decide picks the largest mix the corpus can give: a domain may be sampled down, or repeated up
to `max_repeat` times, and the domain that runs out first sets the total. Each document is then
written floor(rate) times plus once more with probability frac(rate), the draw seeded by its id,
so the result does not depend on the task split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from herd.curate.corpus import CorpusStep, hash64, load_npz

PAPER_MIX = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}


def domain_of(metadata: dict) -> str:
    if metadata.get("domain"):
        return metadata["domain"]
    return "general" if metadata.get("language", "en") == "en" else "multilingual"


def mix_rates(
    available: dict[str, int], target: dict[str, float], max_repeat: float = 1.0
) -> tuple[dict[str, float], list[str]]:
    """(sampling rate per domain, target domains with no tokens): rates r_d with r_d * T_d
    proportional to the targets renormalised over the domains present, every r_d <= max_repeat
    and the total as large as that allows."""
    missing = [d for d, p in target.items() if p > 0 and not available.get(d)]
    present = {d: p for d, p in target.items() if p > 0 and available.get(d)}
    if not present:
        raise ValueError(
            f"[mix] no tokens in any target domain ({', '.join(target)}); "
            f"the documents have {', '.join(available) or 'none'}"
        )
    norm = sum(present.values())
    share = {d: p / norm for d, p in present.items()}
    total = min(available[d] * max_repeat / s for d, s in share.items())
    rates = {d: share[d] * total / available[d] if d in share else 0.0 for d in available}
    return rates, missing


def copies(doc_id: str, rate: float, seed: int) -> int:
    whole = math.floor(rate)
    u = hash64(f"{seed}:{doc_id}") / 2.0**64
    return whole + (u < rate - whole)


class Mix(CorpusStep):
    """Documents resampled per domain to the target proportions of tokens."""

    name = "mix"

    def __init__(self, work: str, proportions: dict[str, float], max_repeat: float = 1.0,
                 seed: int = 0, tokenizer: str = "llama3", report: str = ""):  # fmt: skip
        super().__init__(work)
        self.proportions, self.max_repeat, self.seed = proportions, max_repeat, seed
        self.tokenizer_name, self.report = tokenizer, report
        self._tokenizer = None

    def tokens(self, text: str) -> int:
        if self._tokenizer is None:
            from herd.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return len(self._tokenizer.encode(text))

    def observe(self, doc, records):
        domain = domain_of(doc.metadata)
        records[domain] = records.get(domain, 0) + self.tokens(doc.text)

    def record_arrays(self, records):
        return {"domains": np.array(sorted(records)), "tokens": np.array(
            [records[d] for d in sorted(records)], np.int64)}  # fmt: skip

    def decide(self, records):
        available: dict[str, int] = {}
        for r in records:
            for d, t in zip(r["domains"].tolist(), r["tokens"].tolist()):
                available[d] = available.get(d, 0) + t
        rates, missing = mix_rates(available, self.proportions, self.max_repeat)
        if self.report:
            plan = {"target": self.proportions, "max_repeat": self.max_repeat,
                    "missing": missing, "domains": {d: {"available_tokens": t,
                    "rate": rates[d], "expected_tokens": round(t * rates[d])}
                    for d, t in sorted(available.items())}}  # fmt: skip
            Path(self.report).parent.mkdir(parents=True, exist_ok=True)
            Path(self.report).write_text(json.dumps(plan, indent=1) + "\n")
        names = sorted(rates)
        return {"domains": np.array(names), "rates": np.array([rates[d] for d in names])}

    def applier(self, exclusion_writer=None) -> PipelineStep:
        return Resample(self)


class Resample(PipelineStep):
    """Writes each document as many times as its domain's rate draws (repeats get `#k` ids)."""

    type = "MIX"

    def __init__(self, step: Mix):
        self.name = step.name
        super().__init__()
        self.step = step

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        path = self.step.work / "decision.npz"
        if not path.exists():
            raise FileNotFoundError(f"{self.step.name}: {path} missing (run its decide)")
        d = load_npz(path)
        rates = dict(zip(d["domains"].tolist(), d["rates"].tolist()))
        for doc in data:
            self.stat_update("total")
            domain = domain_of(doc.metadata)
            with self.track_time():
                n = copies(doc.id, rates.get(domain, 0.0), self.step.seed)
            if n == 0:
                self.stat_update("dropped_mix_sampled_out")
                continue
            self.stat_update("forwarded", value=n)
            self.stat_update(f"mix_{domain}", value=n)
            for k in range(n):
                if k:
                    doc = type(doc)(text=doc.text, id=f"{doc.id}#{k}", metadata=dict(doc.metadata))
                yield doc
