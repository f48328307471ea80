"""`herd align RECIPE.toml`: the paper's post-training rounds (§4.1), each in DIR/round-N/:

    sample   K responses per training prompt from the round's policy, on the serving engine,
             checked by the verifier                                      samples/
    reward   a reward model trained on the pairs the verifier derives
             (a right response over a wrong one)                          reward/
    select   the samples ranked by (verifier, reward): each prompt's best
             for SFT, best vs worst for DPO                               select/
    sft      herd finetune on the selected responses                      sft/
    dpo      herd dpo from the SFT model on the pairs                     dpo/
    average  the stage models named in [average] averaged                 model/
    report   held-out accuracy of the start, SFT, DPO and final models,
             and the reward model's win rate of the final model against
             the round's start                                            report.json

A stage is marked done in round-N/state.json once its outputs are written; a killed loop run
again skips the done stages and resumes a training stage from its last checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from herd.align.dpo import DPOTrainer
from herd.align.reward import RewardTrainer, load_reward_model, score_responses
from herd.align.sample import (
    draw,
    read_samples,
    rejection_sample,
    verified_pairs,
    write_samples,
)
from herd.align.tasks import Prompt, arithmetic_problems, read_prompts, verify, write_prompts
from herd.checkpoint import save_model
from herd.config.align import AlignConfig, dpo_from_dict, reward_from_dict
from herd.config.finetune import finetune_from_dict
from herd.finetune.trainer import FineTuner, base_tokenizer, load_base
from herd.finetune.weights import average_models
from herd.infer import Llama
from herd.infer.sampling import SamplingParams
from herd.tokenizer import load_tokenizer

STAGES = ("sample", "reward", "select", "sft", "dpo", "average", "report")

# Trains a stage: the CLI passes one that draws a progress bar; plain fit() otherwise.
Train = Callable[[Any, str], None]


def _fit(trainer, name: str) -> None:
    trainer.fit()


class Round:
    """A round's directory and which of its stages are done."""

    def __init__(self, root: Path, number: int):
        self.number = number
        self.dir = root / f"round-{number}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._state = self.dir / "state.json"
        self.done: dict[str, Any] = (
            json.loads(self._state.read_text()) if self._state.is_file() else {}
        )

    def mark(self, stage: str, result: Any = None) -> None:
        self.done[stage] = result
        _write_json(self._state, self.done)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def task_prompts(config: AlignConfig, root: Path) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts: the recipe's files, or generated problems (written to
    DIR once, so a resumed loop sees the same ones)."""
    t = config.task
    if t.prompts:
        train = read_prompts(t.prompts)
        test = read_prompts(t.test_prompts) if t.test_prompts else []
        return train, test
    problems = arithmetic_problems(t.train + t.test, t.seed)
    write_prompts(problems[: t.train], root / "prompts.jsonl")
    write_prompts(problems[t.train :], root / "test.jsonl")
    return problems[: t.train], problems[t.train :]


class Aligner:
    def __init__(
        self, config: AlignConfig, train: Train = _fit, say: Callable[[str], None] = print
    ):
        self.config, self.train, self.say = config, train, say
        a = config.align
        if a.threads:
            torch.set_num_threads(a.threads)
        self.root = Path(a.dir)
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / "config.json", config.to_dict())
        self.tokenizer = load_tokenizer(base_tokenizer(a.base))
        self.prompts, self.test = task_prompts(config, self.root)

    # -- models -------------------------------------------------------------------------------

    def llama(self, path: str | Path) -> Llama:
        window = self.config.align.seq_len + self.config.sample.max_new_tokens
        return Llama(load_base(path), self.tokenizer, max_seq_len=window)

    def accuracy(self, path: str | Path) -> tuple[float | None, list[str]]:
        """Greedy held-out accuracy (verifier) of a model, and its answers."""
        if not self.test:
            return None, []
        llama = self.llama(path)
        texts, _ = draw(
            llama, [p.messages for p in self.test], 1, self.config.sample.max_new_tokens,
            SamplingParams(temperature=0), seed=0, max_batch=self.config.sample.max_batch,
        )  # fmt: skip
        answers = [t[0] for t in texts]
        scores = [verify(p, a) for p, a in zip(self.test, answers)]
        known = [s for s in scores if s is not None]
        return (sum(known) / len(known) if known else None), answers

    def _recipe(self, base: str | Path, data: Path, run_dir: Path, stage) -> dict[str, Any]:
        a = self.config.align
        raw = {
            "finetune": {"base": str(base), "method": a.method},
            "data": {"sources": [str(data)], "tokenizer": str(base_tokenizer(a.base))},
            "run": {"dir": str(run_dir), "precision": a.precision, "seed": a.seed,
                    "log_every": a.log_every, "save_every": max(1, stage.steps // 4)},
            **stage.recipe(),
        }  # fmt: skip
        raw["batch"]["seq_len"] = a.seq_len
        if a.method == "lora" and self.config.lora:
            raw["lora"] = dict(self.config.lora)
        return raw

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        reports = []
        policy: str | Path = self.config.align.base
        for number in range(1, self.config.align.rounds + 1):
            rnd = Round(self.root, number)
            report = self.round(rnd, policy)
            reports.append(report)
            policy = report["model"]
        return reports

    def round(self, rnd: Round, policy: str | Path) -> dict[str, Any]:
        s, d = self.config.sample, rnd.dir
        if "sample" not in rnd.done:
            self.say(f"round {rnd.number}: sampling {s.k} responses for each of "
                     f"{len(self.prompts)} prompts")  # fmt: skip
            results, report = rejection_sample(
                self.llama(policy), self.prompts, k=s.k, system_prompts=s.system_prompts,
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                seed=self.config.align.seed + rnd.number, max_batch=s.max_batch, progress=True,
            )  # fmt: skip
            write_samples(results, d / "samples")
            rnd.mark("sample", {**asdict(report), "samples_per_s": report.samples_per_s})
        results = read_samples(d / "samples" / "samples.jsonl")

        if "reward" not in rnd.done:
            pairs = verified_pairs(results)
            model_dir, accuracy = None, None
            if pairs:
                self.say(f"round {rnd.number}: reward model on {len(pairs)} verified pairs")
                data = d / "reward" / "pairs.jsonl"
                data.parent.mkdir(parents=True, exist_ok=True)
                data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
                raw = self._recipe(policy, data, d / "reward" / "run", self.config.reward)
                if len(pairs) >= 10:  # a fifth held out, to report the pair accuracy on
                    raw["data"]["valid_fraction"] = 0.2
                trainer = RewardTrainer(reward_from_dict(raw), resume=True)
                accuracy = {"before": trainer.pair_accuracy()}
                self.train(trainer, "reward")
                accuracy["after"] = trainer.pair_accuracy()
                model_dir = d / "reward" / "model"
                trainer.export(model_dir)
            rnd.mark("reward", {"pairs": len(pairs), "model": model_dir and str(model_dir),
                                "held_out_pair_accuracy": accuracy})  # fmt: skip
        rm_path = rnd.done["reward"]["model"]
        reward_model = load_reward_model(rm_path) if rm_path else None

        if "select" not in rnd.done:
            if reward_model is not None:
                for r in results:
                    r.rewards = score_responses(
                        reward_model, self.tokenizer, r.messages, r.responses
                    )
            paths = write_samples(results, d / "select")
            counts = {k: len(p.read_text().splitlines()) for k, p in paths.items()}
            rnd.mark("select", counts)
        if not rnd.done["select"]["sft"]:
            raise RuntimeError(
                f"round {rnd.number}: no prompt had a verified-correct sample to fine-tune on; "
                "raise [sample] k or use easier prompts"
            )

        sft_dir = d / "sft"
        if "sft" not in rnd.done:
            sel = rnd.done["select"]
            self.say(f"round {rnd.number}: SFT on {sel['sft']} selected responses")
            raw = self._recipe(policy, d / "select" / "sft.jsonl", sft_dir, self.config.sft)
            raw["data"]["sources"] = [{"path": str(d / "select" / "sft.jsonl")}]
            trainer = FineTuner(finetune_from_dict(raw), resume=True)
            self.train(trainer, "sft")
            rnd.mark("sft", {"steps": trainer.step})

        dpo_dir = d / "dpo"
        if "dpo" not in rnd.done:
            pairs = rnd.done["select"]["preferences"]
            if pairs:
                self.say(f"round {rnd.number}: DPO on {pairs} best-vs-worst pairs")
                raw = self._recipe(sft_dir, d / "select" / "preferences.jsonl", dpo_dir,
                                   self.config.dpo)  # fmt: skip
                trainer = DPOTrainer(dpo_from_dict(raw), resume=True)
                self.train(trainer, "dpo")
            rnd.mark("dpo", {"pairs": pairs})
        stage_models = {"sft": sft_dir, "dpo": dpo_dir if rnd.done["dpo"]["pairs"] else sft_dir}

        if "average" not in rnd.done:
            averaged = self.config.average.models
            final = stage_models["dpo"]
            if len(averaged) > 1:
                self.say(f"round {rnd.number}: averaging {' + '.join(averaged)}")
                exported = []
                for name in averaged:  # each stage model with its adapter folded in
                    out = d / "average" / name
                    save_model(load_base(stage_models[name]), out, format="hf")
                    exported.append(out)
                final = d / "model"
                model = average_models(exported, self.config.average.weights)
                save_model(model, final, format="hf", tokenizer=self.tokenizer)
            rnd.mark("average", {"model": str(final)})
        final = rnd.done["average"]["model"]

        if "report" not in rnd.done:
            self.say(f"round {rnd.number}: scoring {len(self.test)} held-out prompts")
            report: dict[str, Any] = {"round": rnd.number, "model": final}
            accuracy: dict[str, float | None] = {}
            accuracy["start"], start_answers = self.accuracy(policy)
            accuracy["sft"], answers = self.accuracy(sft_dir)
            if rnd.done["dpo"]["pairs"]:
                accuracy["dpo"], answers = self.accuracy(dpo_dir)
            if Path(final) != Path(stage_models["dpo"]):
                accuracy["final"], answers = self.accuracy(final)
            report["accuracy"] = accuracy
            if reward_model is not None and self.test:
                report["win_rate"] = win_rate(
                    reward_model, self.tokenizer, self.test, answers, start_answers
                )
            report["samples"] = rnd.done["sample"]
            report["reward"] = rnd.done["reward"]
            report["selected"] = rnd.done["select"]
            _write_json(d / "report.json", report)
            rnd.mark("report", report)
        return rnd.done["report"]


def win_rate(reward_model, tokenizer, prompts, new: list[str], old: list[str]) -> float:
    """Share of prompts where the reward model scores the new answer above the old (ties
    count half)."""
    wins = 0.0
    for prompt, a, b in zip(prompts, new, old):
        ra, rb = score_responses(reward_model, tokenizer, list(prompt.messages), [a, b])
        wins += 1.0 if ra > rb else 0.5 if ra == rb else 0.0
    return wins / len(prompts)


__all__ = ["STAGES", "Aligner", "Round", "win_rate"]
