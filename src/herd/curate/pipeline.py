"""A curation recipe as datatrove executor runs, and the per-step statistics they leave.

The steps are cut into stages at every corpus-wide step (herd.curate.corpus):

    stage 0:  reader, per-document steps..., Collect(A), write WORK/stage-0
    A decide: one task
    stage 1:  read WORK/stage-0, Apply(A), per-document steps..., Collect(B), write ...
    ...
    final:    ..., write OUTPUT/documents; then `herd tokenize` shards if the recipe ends so

Every run has its own logging folder (WORK/logs/STAGE) with datatrove's completion markers, so
running the recipe again skips finished tasks and reruns the rest: a task's output files are
rewritten whole, so nothing is lost or written twice.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from herd.config.curate import CurateConfig
from herd.curate.corpus import Apply, Collect, CorpusStep, Decide
from herd.curate.mix import Resample

CORPUS_STEPS = ("url_dedup", "minhash", "line_dedup", "kl", "mix")
EXECUTORS = ("local", "slurm", "ray")


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int
    logs: Path


def reader(config: CurateConfig):
    c = config.curate
    if not Path(c.input).exists():
        raise FileNotFoundError(f"[curate] input {c.input}: no such file or folder")
    folder, pattern = (c.input, None) if Path(c.input).is_dir() else (
        str(Path(c.input).parent), Path(c.input).name)  # fmt: skip
    if c.reader == "warc":
        from herd.curate.read import WarcReader

        return WarcReader(folder, glob_pattern=pattern or "**/*.warc*")
    if c.reader == "html":
        from herd.curate.read import HtmlFolderReader

        return HtmlFolderReader(folder, base_url=c.base_url, date=c.date)
    if c.reader == "parquet":
        return ParquetReader(folder, glob_pattern=pattern or "**/*.parquet")
    return JsonlReader(folder, glob_pattern=pattern or "**/*.jsonl*")


def document_step(name: str, params: Any, excluded: Callable[[str], Any], config=None):
    """The datatrove step for per-document step `name` of the recipe."""
    if name == "blocklist":
        from herd.curate.safety import Blocklist

        return Blocklist(params.default, params.lists, exclusion_writer=excluded(name))
    if name == "pii":
        from herd.curate.safety import PIIMask

        return PIIMask(params.email, params.ip, params.phone)
    if name == "extract":
        from herd.curate.extract import Extract

        return Extract(params.min_chars, exclusion_writer=excluded(name))
    if name == "repetition":
        from herd.curate.filters import Repetition

        return Repetition(params.top, params.duplicated, exclusion_writer=excluded(name))
    if name == "dirty_words":
        from herd.curate.filters import DirtyWords

        return DirtyWords(params.lists, params.max_count, params.max_ratio, excluded(name))
    if name == "language":
        from herd.curate.language import Language

        return Language(params.keep, params.min_confidence, params.confidence, excluded(name))
    if name == "quality":
        from herd.curate.classify import Quality

        return Quality(config.classifier_model(name), params.threshold, excluded(name))
    if name == "domain":
        from herd.curate.classify import Domain

        return Domain(config.classifier_model(name), params.english)
    if name == "decontaminate":
        from herd.curate.filters import Decontaminate

        return Decontaminate(params.tasks, params.n, params.threshold, params.remove,
                             params.tokenizer, exclusion_writer=excluded(name))  # fmt: skip
    raise ValueError(f"{name}: not a per-document step")


def corpus_step(name: str, params: Any, work: str, config: CurateConfig) -> CorpusStep:
    from herd.curate.dedup import LineDedup, MinHashDedup, URLDedup
    from herd.curate.filters import TokenKL
    from herd.curate.mix import Mix

    if name == "url_dedup":
        return URLDedup(work)
    if name == "minhash":
        return MinHashDedup(work, params.shingle, params.bands, params.rows, params.threshold,
                            params.seed)  # fmt: skip
    if name == "line_dedup":
        return LineDedup(work, params.bucket_docs, params.max_count, params.min_chars)
    if name == "mix":
        return Mix(work, params.proportions, params.max_repeat, params.seed,
                   config.steps["tokenize"].tokenizer, f"{config.curate.output}/mix.json")  # fmt: skip
    return TokenKL(work, params.tokenizer, params.threshold, params.top_percent, params.min_tokens)


def stages(config: CurateConfig) -> list[Stage]:
    c = config.curate
    work = Path(config.work_dir())
    out = Path(c.output)

    def excluded(step: str):
        if not c.excluded:
            return None
        return JsonlWriter(str(out / "excluded" / step), output_filename="${rank}.jsonl.gz")

    result: list[Stage] = []
    pipeline: list = [reader(config)]
    for name in (s for s in c.steps if s != "tokenize"):
        params = config.steps[name]
        if name not in CORPUS_STEPS:
            pipeline.append(document_step(name, params, excluded, config))
            continue
        step = corpus_step(name, params, str(work), config)
        index = len([s for s in result if s.name.startswith("stage-")])
        folder = work / f"stage-{index}"
        pipeline += [Collect(step), JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")]
        result.append(Stage(f"stage-{index}", pipeline, c.tasks, work / "logs" / f"stage-{index}"))
        result.append(Stage(f"{name}-decide", [Decide(step, c.tasks)], 1,
                            work / "logs" / f"{name}-decide"))  # fmt: skip
        pipeline = [JsonlReader(str(folder), glob_pattern="*.jsonl.gz"),
                    step.applier(excluded(name))]  # fmt: skip
    pipeline.append(JsonlWriter(str(out / "documents"), output_filename="${rank}.jsonl.gz"))
    result.append(Stage("final", pipeline, c.tasks, work / "logs" / "final"))
    if "tokenize" in c.steps:
        step = Tokenize(str(out / "documents"), str(out / "tokens"),
                        config.steps["tokenize"].tokenizer, c.workers)  # fmt: skip
        result.append(Stage("tokenize", [step], 1, work / "logs" / "tokenize"))
    return result


class Tokenize(PipelineStep):
    """The kept documents as `herd tokenize` shards (one per file of OUTPUT/documents)."""

    name = "tokenize"
    type = "TOKENIZE"

    def __init__(self, documents: str, out: str, tokenizer: str, workers: int):
        super().__init__()
        self.documents, self.out, self.tokenizer, self.workers = documents, out, tokenizer, workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from herd.data import tokenize_corpus

        with self.track_time("corpus"):
            shards = tokenize_corpus([self.documents], self.out, self.tokenizer, self.workers)
        self.stat_update("documents", value=sum(s.documents for s in shards))
        self.stat_update("tokens", value=sum(s.tokens for s in shards))
        yield from ()


def _terminal_warnings_only() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor with every task logging like a non-first one: the full log
    in LOGS/logs/task_N.log, only errors (warnings from this process) on the terminal."""

    def run(self):
        _terminal_warnings_only()
        try:
            return super().run()
        finally:
            _terminal_warnings_only()

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        try:
            return super()._run_for_rank(rank, max(local_rank, 1), node_rank)
        finally:
            _terminal_warnings_only()


def executor(stage: Stage, kind: str, workers: int, depends=None, quiet=False, **options):
    """A datatrove executor for `stage`: local processes, Slurm (sbatch) or Ray."""
    if kind == "local":
        cls = QuietLocalExecutor if quiet else LocalPipelineExecutor
        return cls(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                   logging_dir=str(stage.logs), depends=depends)  # fmt: skip
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        venv = f"{sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else None
        return SlurmPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=-1,
                                     time=options.get("time", "12:00:00"),
                                     partition=options["partition"], venv_path=venv,
                                     logging_dir=str(stage.logs), depends=depends,
                                     job_name=f"herd-{stage.name}")  # fmt: skip
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(stage.pipeline, tasks=stage.tasks,
                                   workers=min(workers, stage.tasks),
                                   logging_dir=str(stage.logs), depends=depends)  # fmt: skip
    raise ValueError(f"executor {kind!r}: one of {', '.join(EXECUTORS)}")


def run(config: CurateConfig, kind: str = "local", quiet: bool = False, **options) -> None:
    """Run every stage (finished tasks are skipped); Slurm chains them with dependencies.
    quiet: task logs go to their files only (local executor)."""
    Path(config.curate.output).mkdir(parents=True, exist_ok=True)
    (Path(config.curate.output) / "recipe.json").write_text(
        json.dumps(config.to_dict(), indent=1) + "\n"
    )
    if kind == "ray":
        import ray

        if not ray.is_initialized():  # RAY_ADDRESS names a cluster; without it Ray starts one here
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=not quiet)
    previous = None
    for stage in stages(config):
        ex = executor(stage, kind, config.curate.workers, depends=previous, quiet=quiet, **options)
        if kind == "slurm":
            previous = ex  # the last one's run() submits the whole chain
        else:
            ex.run()
    if kind == "slurm":
        previous.run()


@dataclass
class StepStats:
    step: str
    docs_in: int = 0
    docs_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _total(value: Any) -> float:
    if isinstance(value, dict):  # a stats file's {"total": ..., "mean": ...}
        return value["total"]
    return value if isinstance(value, (int, float)) else value.total


def collect_stats(config: CurateConfig) -> list[StepStats]:
    """Per-step counts merged over every task of every stage (datatrove's per-task stats files,
    so tasks finished by an earlier, interrupted run count too)."""
    out: list[StepStats] = []
    corpus_seconds: dict[str, float] = {}  # collect + decide time of each corpus-wide step
    for index, stage in enumerate(stages(config)):
        files = sorted((stage.logs / "stats").glob("*.json"))
        if not files:
            continue
        merged = sum((PipelineStats.from_json(json.loads(f.read_text())) for f in files),
                     start=PipelineStats())  # fmt: skip
        for position, (block, step) in enumerate(zip(merged.stats, stage.pipeline)):
            counts = {k: _total(v) for k, v in block.stats.items()}
            if isinstance(step, (Collect, Decide)):
                name = step.step.name
                corpus_seconds[name] = corpus_seconds.get(name, 0.0) + block.time_stats.total
            rereading = position == 0 and index and not isinstance(step, Tokenize)
            if isinstance(step, (Collect, Decide, JsonlWriter)) or rereading:
                continue  # bookkeeping, and the re-reading of a previous stage's output
            row = StepStats(getattr(step, "name", block.name), seconds=block.time_stats.total)
            if isinstance(step, (Apply, Resample)):
                row.seconds += corpus_seconds.get(step.step.name, 0.0)
            if isinstance(step, Tokenize):
                row.docs_in = row.docs_out = int(counts.get("documents", 0))
                row.other = {"tokens": int(counts.get("tokens", 0))}
                out.append(row)
                continue
            if position == 0:  # the reader
                row.step = f"read ({config.curate.reader})"
                row.docs_in = row.docs_out = int(counts.get("documents", 0))
            else:
                row.docs_in = int(counts.get("total", 0))
                row.docs_out = int(counts.get("forwarded", row.docs_in))
            row.removed = {k.removeprefix("dropped_"): int(v) for k, v in counts.items()
                           if k.startswith("dropped_")}  # fmt: skip
            row.other = {k: int(v) for k, v in counts.items()
                         if k.startswith(("masked_", "lines_removed", "damaged", "undecodable",
                                          "overlaps_", "mix_", "domain_"))}  # fmt: skip
            out.append(row)
    return out


def write_stats(config: CurateConfig, steps: list[StepStats]) -> Path:
    path = Path(config.curate.output) / "stats.json"
    path.write_text(json.dumps([s.__dict__ for s in steps], indent=1) + "\n")
    return path


def clean(config: CurateConfig) -> None:
    """Remove the output and intermediate folders (for a fresh run)."""
    for folder in (Path(config.curate.output), Path(config.work_dir())):
        shutil.rmtree(folder, ignore_errors=True)
