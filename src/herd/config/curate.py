"""Curation recipes (`herd curate RECIPE`): where the documents come from, the steps in order,
and one table of parameters per step.

    [curate]  input (a folder or file), reader (warc | jsonl | parquet | html), output, work
              (intermediate files; default OUTPUT/work), tasks, workers, excluded (write every
              removed document, with its step and reason, under OUTPUT/excluded), base_url and
              date for the html reader, steps (their names, in order)
    [NAME]    the parameters of step NAME (the tables below); a table for a step that is not
              in `steps` is still checked, so a misspelt key is an error either way

`--set minhash.threshold=0.7` or `--set curate.steps='["extract", "minhash"]'` override keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from herd.config.train import ConfigError, _build

READERS = ("warc", "jsonl", "parquet", "html")


@dataclass
class CurateSection:
    input: str = ""
    reader: str = "warc"
    output: str = "out/curated"
    work: str = ""  # default: OUTPUT/work
    tasks: int = 1
    workers: int = 1
    excluded: bool = True
    base_url: str = "https://example.org/"  # html reader: a file's URL is base_url + its path
    date: str = ""  # html reader: the crawl date of every page (default: the file's mtime)
    steps: list[str] = field(default_factory=list)


@dataclass
class BlocklistStep:
    """Documents whose URL's domain, or any parent domain of it, is on a list."""

    default: bool = True  # datatrove's shipped adult-domain list (4.5M domains)
    lists: list[str] = field(default_factory=list)  # files of one domain per line


@dataclass
class PIIStep:
    email: str = "[EMAIL]"
    ip: str = "[IP]"
    phone: str = "[PHONE]"


@dataclass
class ExtractStep:
    min_chars: int = 1  # a page whose main text is shorter is removed ("no_text")


@dataclass
class URLDedupStep:
    pass


@dataclass
class MinHashStep:
    shingle: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8
    threshold: float = 0.0  # > 0: a candidate pair must also reach this estimated Jaccard
    seed: int = 1


@dataclass
class LineDedupStep:
    bucket_docs: int = 30_000_000  # the paper's bucket of 30M documents
    max_count: int = 6  # a line occurring more often than this in its bucket is removed
    min_chars: int = 1  # a document left shorter than this is removed


@dataclass
class RepetitionStep:
    """Rae et al. (2021): duplicated n-gram and top n-gram character fractions (the defaults
    are Gopher's thresholds)."""

    top: dict[str, float] = field(default_factory=lambda: {"2": 0.20, "3": 0.18, "4": 0.16})
    duplicated: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
    )


@dataclass
class DirtyWordsStep:
    lists: list[str] = field(default_factory=list)  # default: datatrove's banned_words.txt
    max_count: int = 3  # removed when both the count exceeds this
    max_ratio: float = 0.002  # and the share of words that are dirty exceeds this


@dataclass
class KLStep:
    """KL(document || corpus) over token frequencies, in nats."""

    tokenizer: str = "llama3"
    threshold: float = 0.0  # remove documents above it (> 0), or
    top_percent: float = 1.0  # the most divergent share of documents (when threshold = 0)
    min_tokens: int = 20  # shorter documents are kept unscored


@dataclass
class LanguageStep:
    keep: list[str] = field(default_factory=lambda: ["en"])  # empty: keep every language
    min_confidence: float = 0.5
    confidence: dict[str, float] = field(default_factory=dict)  # per-language thresholds


@dataclass
class ClassifierStep:
    """A classifier trained by `herd curate train-classifier RECIPE --task NAME`."""

    model: str = ""  # the student the step uses: default OUTPUT/NAME.bin (fastText); a folder
    # OUTPUT/NAME-transformer (made when `transformer` is set) uses the transformer student
    teacher: str = "heuristic"  # or a chat checkpoint ("smollm2") asked `question`
    question: str = ""  # the teacher's prompt, {text} standing for the document (default: herd's)
    train_from: str = ""  # JSONL documents to label (default: OUTPUT/documents of a run)
    sample: int = 2000  # documents labelled
    transformer: str = ""  # a base checkpoint: also distil the labels into it (with a head)
    max_tokens: int = 256  # of each document, read by the transformer student


@dataclass
class QualityStep(ClassifierStep):
    threshold: float = 0.5  # documents with P(high quality) below it are removed


@dataclass
class DomainStep(ClassifierStep):
    english: list[str] = field(default_factory=lambda: ["en"])  # other languages: multilingual


@dataclass
class MixStep:
    """Documents sampled per domain to these shares of the tokens (the paper's final mix)."""

    proportions: dict[str, float] = field(
        default_factory=lambda: {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}
    )
    max_repeat: float = 1.0  # > 1: a scarce domain may be repeated up to this many times
    seed: int = 0


@dataclass
class DecontaminateStep:
    """Benchmark examples (prompt and answer) inside documents, by token n-grams."""

    tasks: list[str] = field(
        default_factory=lambda: ["gsm8k", "humaneval", "arc_easy", "arc_challenge", "mmlu"]
    )
    n: int = 8  # the paper's (§5.1.4)
    threshold: float = 0.5  # share of an example's n-grams in a document that make it contained
    remove: bool = True  # false: only count and tag (metadata.contamination)
    tokenizer: str = "llama3"


@dataclass
class TokenizeStep:
    tokenizer: str = "llama3"


STEPS: dict[str, type] = {
    "blocklist": BlocklistStep,
    "pii": PIIStep,
    "extract": ExtractStep,
    "url_dedup": URLDedupStep,
    "minhash": MinHashStep,
    "line_dedup": LineDedupStep,
    "repetition": RepetitionStep,
    "dirty_words": DirtyWordsStep,
    "kl": KLStep,
    "language": LanguageStep,
    "quality": QualityStep,
    "domain": DomainStep,
    "mix": MixStep,
    "decontaminate": DecontaminateStep,
    "tokenize": TokenizeStep,
}


@dataclass
class CurateConfig:
    curate: CurateSection
    steps: dict[str, Any]  # name -> its parameters (a STEPS dataclass), for every known step

    def work_dir(self) -> str:
        return self.curate.work or f"{self.curate.output.rstrip('/')}/work"

    def classifier_model(self, task: str) -> str:
        """Where the step of a classifier task reads its student, train-classifier writes it."""
        return self.steps[task].model or f"{self.curate.output.rstrip('/')}/{task}.bin"

    def to_dict(self) -> dict[str, Any]:
        return {"curate": dataclasses.asdict(self.curate)} | {
            name: dataclasses.asdict(p) for name, p in self.steps.items()
        }


def curate_from_dict(raw: dict[str, Any]) -> CurateConfig:
    unknown = sorted(set(raw) - set(STEPS) - {"curate"})
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; known: curate, {', '.join(STEPS)}"
        )
    section = _build(CurateSection, raw.get("curate", {}), "curate")
    if not section.input:
        raise ConfigError("[curate] input is required (a folder or file of documents)")
    if section.reader not in READERS:
        raise ConfigError(f"[curate] reader {section.reader!r}: one of {', '.join(READERS)}")
    if section.tasks < 1 or section.workers < 1:
        raise ConfigError("[curate] tasks and workers must be at least 1")
    if not section.steps:
        raise ConfigError(f"[curate] steps is empty; name some of: {', '.join(STEPS)}")
    for name in section.steps:
        if name not in STEPS:
            raise ConfigError(f"[curate] steps: unknown step {name!r}; known: {', '.join(STEPS)}")
    if len(set(section.steps)) != len(section.steps):
        raise ConfigError("[curate] steps: a step is named twice")
    if "tokenize" in section.steps and section.steps[-1] != "tokenize":
        raise ConfigError("[curate] steps: tokenize must be the last step")
    steps = {name: _build(cls, raw.get(name, {}), name) for name, cls in STEPS.items()}
    m = steps["minhash"]
    if m.bands < 1 or m.rows < 1 or m.shingle < 1 or not 0 <= m.threshold <= 1:
        raise ConfigError("[minhash] bands, rows and shingle must be >= 1, threshold in [0, 1]")
    k = steps["kl"]
    if k.threshold < 0 or not 0 < k.top_percent < 100:
        raise ConfigError("[kl] threshold must be >= 0 and top_percent in (0, 100)")
    mix = steps["mix"]
    if (
        mix.max_repeat < 1
        or any(p < 0 for p in mix.proportions.values())
        or not any(mix.proportions.values())
    ):
        raise ConfigError("[mix] proportions must be >= 0, not all 0, and max_repeat >= 1")
    if "mix" in section.steps and section.steps[-1] != "tokenize" and section.steps[-1] != "mix":
        raise ConfigError("[curate] steps: mix must come last (or just before tokenize)")
    if steps["line_dedup"].bucket_docs < 1 or steps["line_dedup"].max_count < 1:
        raise ConfigError("[line_dedup] bucket_docs and max_count must be >= 1")
    return CurateConfig(section, steps)
