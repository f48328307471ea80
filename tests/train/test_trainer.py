"""The training loop against a plain PyTorch loop over transformers' Llama; skipped non-finite
steps; divergence; exact resume (in process and after a real SIGKILL); checkpoint safety;
metrics files; export."""

from __future__ import annotations

import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from herd.config.train import ConfigError, from_dict
from herd.data import PackedLoader
from herd.train import trainer as trainer_module
from herd.train.checkpoint import CheckpointCorrupt, complete_checkpoints, load_run_model
from herd.train.metrics import read_metrics
from herd.train.trainer import Trainer, TrainingDiverged
from tests.train.conftest import recipe


def run(corpus, run_dir, resume=False, on_step=None, **sections) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(from_dict(recipe(corpus, run_dir, **sections)), resume=resume)
    records: list[dict] = []

    def collect(step: int, record: dict) -> None:
        records.append(record)
        if on_step:
            on_step(trainer, step)

    trainer.fit(collect)
    return trainer, records


def reference_lr(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def test_loop_matches_a_plain_loop_over_transformers(corpus, tmp_path):
    """Same initial weights and batches: transformers' LlamaForCausalLM, each document of a
    packed row run on its own, torch AdamW with the recipe's groups, clipping and schedule."""
    from transformers import LlamaForCausalLM

    from herd.checkpoint import save_model

    raw = recipe(corpus, tmp_path / "run", optim={"steps": 5, "lr": 3e-3, "warmup_steps": 2})
    config = from_dict(raw)
    trainer = Trainer(config)
    save_model(trainer.model, tmp_path / "init", "hf")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "init", dtype=torch.float32)
    records: list[dict] = []
    trainer.fit(lambda step, r: records.append(r))

    decay = [p for n, p in ref.named_parameters() if "norm" not in n and "embed" not in n]
    no_decay = [p for n, p in ref.named_parameters() if "norm" in n or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    loader = PackedLoader(corpus["train"], seq_len=48, batch_size=2, seed=0)
    for step in range(5):
        for group in opt.param_groups:
            group["lr"] = reference_lr(step, 3e-3, 2, 5, 3e-4)
        opt.zero_grad()
        total = 0.0
        for micro in range(2):
            batch = loader.batch(0, 2 * step + micro)
            loss_sum = torch.zeros(())
            for row in range(2):
                ids = batch.doc_ids[row]
                for doc in ids.unique():
                    span = (ids == doc).nonzero().flatten()
                    a, b = int(span[0]), int(span[-1]) + 1
                    logits = ref(
                        input_ids=batch.tokens[row, a:b][None],
                        position_ids=torch.arange(b - a)[None],
                    ).logits
                    loss_sum = loss_sum + F.cross_entropy(
                        logits[0].float(), batch.targets[row, a:b], reduction="sum"
                    )
            loss = loss_sum / batch.tokens.numel() / 2
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        assert records[step]["loss"] == pytest.approx(total, rel=1e-5), step
        assert records[step]["grad_norm"] == pytest.approx(norm.item(), rel=1e-4), step
        assert records[step]["lr"] == pytest.approx(reference_lr(step, 3e-3, 2, 5, 3e-4))
    assert records[-1]["loss"] < records[0]["loss"]


def nan_hook(steps: set[int], trainer_ref: list):
    def hook(module, args, output):
        if trainer_ref[0].step in steps:
            return output * float("nan")
        return output

    return hook


def test_non_finite_steps_are_skipped_then_the_run_stops(corpus, tmp_path):
    raw = recipe(
        corpus,
        tmp_path / "run",
        optim={"steps": 8},
        run={"save_every": 1, "max_bad_steps": 3, "precision": "fp32"},
    )
    trainer = Trainer(from_dict(raw))
    bad = {1, 4, 5, 6, 7}  # trainer.step during the step: steps 2, 5, 6, 7 are non-finite
    trainer.model.layers["0"].register_forward_hook(nan_hook(bad, [trainer]))
    before: dict[int, torch.Tensor] = {}
    records: list[dict] = []

    def on_step(step: int, r: dict) -> None:
        records.append(r)
        before[step] = trainer.model.layers["1"].feed_forward.w2.weight.detach().clone()

    with pytest.raises(TrainingDiverged, match="3 steps in a row.*step-00000004"):
        trainer.fit(on_step)
    assert [r["skipped"] for r in records] == [False, True, False, False, True, True]
    assert records[1]["skipped_total"] == 1 and records[-1]["skipped_total"] == 3
    assert torch.equal(before[1], before[2])  # the skipped step changed nothing
    assert not torch.equal(before[2], before[3])
    # the non-finite streak saved nothing; the newest checkpoint is the last good step
    newest = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest.name == "step-00000004"
    model, _ = load_run_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6, 7]


STAGED = {
    "optim": {"steps": 9},
    # 4 x 32 = 128 tokens per step; after 4 steps the batch doubles and the sequence lengthens
    "batch": {
        "seq_len": 32,
        "batch_size": 4,
        "micro_batch_size": 2,
        "stages": [{"after_tokens": 512, "batch_size": 8, "seq_len": 48}],
    },
    "run": {"save_every": 3, "keep": 5, "eval_every": 4},
}


def test_batch_stages_and_exact_resume_in_process(corpus, tmp_path):
    _, whole = run(corpus, tmp_path / "a", **STAGED)
    assert [(r["batch_size"], r["seq_len"]) for r in whole] == [(4, 32)] * 4 + [(8, 48)] * 5
    assert [r["tokens"] for r in whole][3:5] == [512, 512 + 384]
    assert "val_loss" in whole[3] and "val_loss" in whole[8]

    # resume from the checkpoints at step 3 (before the stage change) and at step 6 (after it)
    for step in (3, 6):
        ckpt = tmp_path / "a" / "checkpoints" / f"step-{step:08d}"
        _, rest = run(corpus, tmp_path / f"b{step}", resume=ckpt, **STAGED)
        assert [r["loss"] for r in rest] == [r["loss"] for r in whole[step:]]
        assert [r["grad_norm"] for r in rest] == [r["grad_norm"] for r in whole[step:]]


def test_async_save_writes_the_same_checkpoints(corpus, tmp_path):
    sections = {"optim": {"steps": 4}, "run": {"save_every": 2, "async_save": True}}
    trainer, _ = run(corpus, tmp_path / "async", **sections)
    assert [p.name for p in complete_checkpoints(trainer.checkpoints.directory)] == [
        "step-00000002",
        "step-00000004",
    ]
    run(corpus, tmp_path / "sync", optim={"steps": 4}, run={"save_every": 2})
    a, _ = load_run_model(tmp_path / "async")
    b, _ = load_run_model(tmp_path / "sync")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_existing_run_needs_resume_and_corrupt_checkpoints_are_named(corpus, tmp_path):
    run(corpus, tmp_path / "run", optim={"steps": 2})
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(from_dict(recipe(corpus, tmp_path / "run", optim={"steps": 2})))
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    # an unfinished save (crash mid-write) is ignored and cleaned up
    partial = ckpt.with_name("step-00000009.tmp")
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    trainer = Trainer(from_dict(recipe(corpus, tmp_path / "run")), resume=True)
    assert trainer.step == 2 and not partial.exists()

    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointCorrupt, match=str(ckpt)):
        Trainer(from_dict(recipe(corpus, tmp_path / "run")), resume=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointCorrupt, match="refusing to load posix.system|os.system"):
        Trainer(from_dict(recipe(corpus, tmp_path / "run")), resume=True)
    assert not (tmp_path / "pwned").exists()


def planted(marker: str, value):
    """What a swapped-in `.metadata` runs when unpickled: leave a file, then pass for valid."""
    Path(marker).write_text("code ran")
    return value


class _Swapped:
    def __init__(self, marker: Path, metadata):
        self.marker, self.metadata = marker, metadata

    def __reduce__(self):
        return planted, (str(self.marker), self.metadata)


def test_metadata_swapped_after_verification_is_never_unpickled(corpus, tmp_path, monkeypatch):
    """The metadata file is read once: a valid one checked, then replaced by a pickle that
    runs code before DCP reads it, does not get its code run (a time-of-check/time-of-use race)."""
    run(corpus, tmp_path / "run", optim={"steps": 2})
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    with (ckpt / ".metadata").open("rb") as f:
        metadata = pickle.load(f)  # our own file: the test's trusted copy
    marker = tmp_path / "marker"
    evil = pickle.dumps(_Swapped(marker, metadata))
    assert pickle.loads(evil) is not None and marker.exists()  # the payload works
    marker.unlink()

    real_open, opens = Path.open, []

    def open_then_swap(self, *args, **kwargs):
        stream = real_open(self, *args, **kwargs)
        if self.name == ".metadata" and not opens:
            opens.append(self)
            (self.parent / "swap").write_bytes(evil)
            os.replace(self.parent / "swap", self)  # the open stream still reads the old file
        return stream

    monkeypatch.setattr(Path, "open", open_then_swap)
    trainer = Trainer(from_dict(recipe(corpus, tmp_path / "run")), resume=True)
    assert opens and trainer.step == 2
    assert not marker.exists()


def test_metrics_jsonl_and_tensorboard(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(corpus, tmp_path / "run", optim={"steps": 3}, run={"eval_every": 3})
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    keys = {"loss", "grad_norm", "lr", "tokens_per_s", "mfu", "peak_memory_gib", "skipped"}
    assert [r["step"] for r in records] == [1, 2, 3] and keys <= set(records[0])
    assert 0 < records[0]["mfu"] < 1 and records[0]["tokens_per_s"] > 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    assert events.Scalars("val_loss")[0].step == 3


KILL_RECIPE = """
[model]
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden_dim = 128

[data]
tokenizer = "{tokenizer}"
train = "{train}"

[batch]
seq_len = 32
batch_size = 4
micro_batch_size = 2

[[batch.stages]]
after_tokens = 2048
batch_size = 8
seq_len = 48

[optim]
lr = 3e-3
warmup_steps = 4
steps = 40

[run]
dir = "{dir}"
precision = "fp32"
save_every = 1
keep = 2
async_save = {async_save}
"""


def pretrain(recipe_file: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "herd", "pretrain", str(recipe_file), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def kill_after(proc: subprocess.Popen, metrics: Path, step: int, rng: random.Random) -> None:
    """SIGKILL `proc` at a random moment after it has logged `step`."""
    deadline = time.monotonic() + 120
    while not any(r["step"] >= step for r in read_metrics(metrics)):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_recipe(corpus, directory: Path, name: str, async_save: bool) -> Path:
    text = KILL_RECIPE.format(
        tokenizer=corpus["tokenizer"],
        train=corpus["train"],
        dir=directory / name,
        async_save=str(async_save).lower(),
    )
    (directory / f"{name}.toml").write_text(text)
    return directory / f"{name}.toml"


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    """The run never stopped, saving synchronously: both kill tests compare with it."""
    root = tmp_path_factory.mktemp("whole")
    whole = pretrain(kill_recipe(corpus, root, "whole", async_save=False))
    assert whole.wait() == 0, whole.stderr.read().decode()
    return root / "whole"


@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_at_any_moment_then_resume_gives_identical_losses(
    corpus, tmp_path, uninterrupted, async_save
):
    """Two real SIGKILLs (one run, then its resumed run), each at a random moment, possibly
    mid-step or mid-save; the resumed run's per-step losses equal an uninterrupted run's bit for
    bit, across a batch-size/sequence-length stage change (and background saving changes
    nothing either)."""
    recipe_file = kill_recipe(corpus, tmp_path, "killed", async_save)
    rng = random.Random(async_save)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    first = rng.randint(3, 15)
    kill_after(pretrain(recipe_file), metrics, first, rng)
    kill_after(pretrain(recipe_file, "--resume"), metrics, first + rng.randint(4, 12), rng)
    last = pretrain(recipe_file, "--resume")
    assert last.wait() == 0, last.stderr.read().decode()

    expected = read_metrics(uninterrupted / "metrics.jsonl")
    got = read_metrics(metrics)
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in expected]
    a, _ = load_run_model(uninterrupted)
    b, _ = load_run_model(tmp_path / "killed")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_activation_checkpointing_changes_memory_not_results(corpus, tmp_path):
    _, plain = run(corpus, tmp_path / "plain", optim={"steps": 3})
    _, recomputed = run(
        corpus, tmp_path / "ckpt", optim={"steps": 3}, run={"activation_checkpointing": True}
    )
    assert [r["loss"] for r in recomputed] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert [r["grad_norm"] for r in recomputed] == pytest.approx(
        [r["grad_norm"] for r in plain], rel=1e-5
    )


def test_sequences_longer_than_the_model_are_refused(corpus, tmp_path):
    raw = recipe(corpus, tmp_path / "run", batch={"seq_len": 64})
    raw["model"]["max_seq_len"] = 32
    with pytest.raises(ConfigError, match="exceed the model's max_seq_len 32"):
        Trainer(from_dict(raw))


@pytest.mark.parametrize("speedup, auto", [(0.01, None), (1.6, torch.bfloat16)])
def test_auto_precision_takes_bf16_only_where_the_cpu_runs_it_natively(
    monkeypatch, caplog, speedup, auto
):
    """A CPU without native bf16 emulates it (0.008x fp32 measured on an AVX2 EPYC): "auto"
    stays in fp32 there, and asking for bf16 explicitly warns."""
    monkeypatch.setattr(trainer_module, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert trainer_module.autocast_dtype("auto", cpu) == auto
    assert trainer_module.autocast_dtype("fp32", cpu) is None
    assert trainer_module.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert ("training will be slow" in caplog.text) == (speedup < 1)
