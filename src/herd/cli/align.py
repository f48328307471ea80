"""`herd reward train|score`, `herd sample`, `herd dpo` and `herd align`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail
from herd.cli.train import Overrides, Resume, train

app = typer.Typer(help="Reward models: train one on preference pairs, score one on held-out pairs.")

Recipe = Annotated[Path, typer.Argument(help="Recipe (TOML).")]


def _errors():
    from herd.config.train import ConfigError
    from herd.finetune.data import DataError
    from herd.train.checkpoint import CheckpointCorrupt

    return ConfigError, DataError, FileNotFoundError, CheckpointCorrupt, ValueError


def _pack_lines(trainer) -> None:
    s = trainer.read_stats
    console.print(
        f"{s.pairs} preference records ({s.identical} with identical answers and {s.empty} with "
        "empty ones dropped)"
    )
    for what, stats in trainer.pack_stats.items():
        console.print(
            f"{what}: {stats.groups} prompts, {stats.responses} responses in {stats.rows} rows, "
            f"{stats.scored_tokens:,} scored tokens, {stats.dropped} too long for a row (dropped)"
        )


def _trainer(recipe: Path, set_: list[str] | None, resume: bool, build, cls):
    """The recipe's trainer (errors end the command), its packing report printed."""
    import logging

    from herd.config.train import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        trainer = cls(load_config(recipe, set_ or [], build=build), resume=resume)
    except _errors() as e:
        fail(str(e))
    _pack_lines(trainer)
    return trainer


@app.command("train")
def reward_train(recipe: Recipe, set_: Overrides = None, resume: Resume = False) -> None:
    """Train a reward model: the recipe's [finetune] base with a scalar head on the last token
    of each response, on preference JSONL ({"prompt", "chosen", "rejected", "edited"?}),
    Bradley-Terry loss over every ordered pair, no margin. Each prompt and its responses share
    one packed row. Reports held-out pair accuracy before and after, and writes RUN/model as
    a Hugging Face LlamaForSequenceClassification."""
    from herd.align.reward import RewardTrainer
    from herd.config.align import reward_from_dict

    trainer = _trainer(recipe, set_, resume, reward_from_dict, RewardTrainer)
    before = trainer.pair_accuracy()
    train(trainer, "reward model")
    after = trainer.pair_accuracy()
    if before is not None:
        console.print(f"held-out pair accuracy: {100 * before:.1f}% -> {100 * after:.1f}%")
    out = trainer.run_dir / "model"
    trainer.export(out)
    console.print(f"reward model (HF LlamaForSequenceClassification): {out}")


@app.command("score")
def reward_score(
    model: Annotated[Path, typer.Argument(help="A reward model directory (herd reward train).")],
    data: Annotated[Path, typer.Option(help="Preference JSONL to rank.")],
    seq_len: Annotated[int, typer.Option(help="Packed row length.")] = 1024,
) -> None:
    """Pairwise accuracy of a reward model on preference pairs."""
    from herd.align.reward import load_reward_model, preference_accuracy
    from herd.tokenizer import load_tokenizer

    try:
        rm = load_reward_model(model)
        accuracy, stats = preference_accuracy(rm, load_tokenizer(model), data, seq_len)
    except _errors() as e:
        fail(str(e))
    console.print(f"{stats.pairs} rankings: pair accuracy {100 * accuracy:.1f}%")


def dpo(recipe: Recipe, set_: Overrides = None, resume: Resume = False) -> None:
    """Direct preference optimisation as the paper runs it: the sigmoid DPO loss (beta 0.1)
    plus 0.2 x the chosen responses' length-normalised NLL, with header and termination tokens
    masked out of both responses ([dpo] in the recipe switches each). Reference
    log-probabilities are computed once before training (the base itself, or [dpo] reference).
    Metrics per step: reward accuracy, margin, chosen/rejected log-probabilities."""
    from herd.align.dpo import DPOTrainer
    from herd.config.align import dpo_from_dict

    trainer = _trainer(recipe, set_, resume, dpo_from_dict, DPOTrainer)
    train(trainer, "dpo")
    if trainer.config.finetune.method != "full":
        console.print(f"adapter (PEFT format): {trainer.run_dir / 'adapter'}")


def sample(
    model: Annotated[str, typer.Argument(help="Policy: a checkpoint, 'smollm2' or a herd run.")],
    prompts: Annotated[
        Path, typer.Option(help='Prompt JSONL: {"prompt", "answer"?, "tests"?} per line.')
    ],
    out: Annotated[Path, typer.Option(help="Directory for samples/sft/preferences JSONL.")],
    k: Annotated[int, typer.Option("-k", help="Samples per prompt.")] = 16,
    reward_model: Annotated[
        Path | None, typer.Option(help="Reward model to rank with (herd reward train).")
    ] = None,
    system: Annotated[
        list[str] | None, typer.Option(help="A system prompt to draw from (repeatable).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per sample.")] = 256,
    temperature: Annotated[float, typer.Option()] = 0.8,
    top_p: Annotated[float, typer.Option()] = 0.95,
    seed: Annotated[int, typer.Option()] = 0,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 32,
) -> None:
    """Rejection sampling: K samples per prompt on the serving engine (the prompt computed
    once, shared through the prefix cache; no preemption), scored by the verifier (final
    answer, or unit tests in a sandbox) and/or a reward model. Writes OUT/samples.jsonl, each
    prompt's best to OUT/sft.jsonl and best-vs-worst pairs to OUT/preferences.jsonl."""
    from rich.table import Table

    from herd.align.reward import load_reward_model
    from herd.align.sample import rejection_sample, write_samples
    from herd.align.tasks import read_prompts
    from herd.finetune.trainer import base_tokenizer, load_base
    from herd.infer import Llama
    from herd.tokenizer import load_tokenizer

    try:
        items = read_prompts(prompts)
        llama = Llama(load_base(model), load_tokenizer(base_tokenizer(model)))
        rm = load_reward_model(reward_model) if reward_model else None
        results, report = rejection_sample(
            llama, items, k, rm, system or (), max_new_tokens, temperature, top_p, seed,
            max_batch, progress=True,
        )  # fmt: skip
    except _errors() as e:
        fail(str(e))
    paths = write_samples(results, out)
    table = Table(title=f"rejection sampling: {len(items)} prompts x {k}")
    for column in ("samples/s", "prefix-cache hits", "preemptions", "solved", "pairs"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{report.samples_per_s:.2f}", f"{100 * report.prefix_hit_rate:.0f}%",
        str(report.preemptions), f"{report.solved}/{report.prompts}", str(report.pairs),
    )  # fmt: skip
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def align(recipe: Recipe, set_: Overrides = None) -> None:
    """The paper's post-training rounds: rejection sampling from the policy, a reward model on
    verifier-derived pairs, SFT on the best samples, DPO on best-vs-worst pairs, model
    averaging; each round in DIR/round-N with its data, models and report.json. Run it again
    to resume a killed loop at the stage it was in."""
    from herd.align.loop import Aligner
    from herd.config.align import align_from_dict
    from herd.config.train import load_config

    try:
        config = load_config(recipe, set_ or [], build=align_from_dict)
        aligner = Aligner(config, train=train, say=lambda line: console.print(f"[bold]{line}[/]"))
        reports = aligner.run()
    except _errors() as e:
        fail(str(e))
    print_reports(reports)


def print_reports(reports: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="herd align: held-out accuracy (verifier, greedy)")
    for column in ("round", "start", "after SFT", "after DPO", "final", "RM win rate", "samples/s"):
        table.add_column(column, justify="right")

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for r in reports:
        a = r["accuracy"]
        dpo = a.get("dpo")
        table.add_row(
            str(r["round"]), pct(a["start"]), pct(a["sft"]), pct(dpo),
            pct(a.get("final", dpo if dpo is not None else a["sft"])), pct(r.get("win_rate")),
            f"{r['samples']['samples_per_s']:.2f}",
        )  # fmt: skip
    console.print(table)
