"""Parallel layouts on the CPU (gloo, torchrun, 2 and 4 processes): per-step losses equal the
single-process run's for FSDP2, HSDP, TP, PP (1F1B and interleaved), CP and their combinations;
a checkpoint saved in one layout resumes in another and exports as one HF checkpoint; a dying
rank stops the job with a clear message, and torchrun's restart (or --resume) continues it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from herd.config.train import ConfigError, ParallelConfig
from herd.train.metrics import read_metrics
from herd.train.parallel import resolve_dims
from tests.train.conftest import recipe, toml

STEPS = 10


def write(corpus, tmp_path: Path, name: str) -> Path:
    raw = recipe(
        corpus,
        tmp_path / name,
        # 4 layers: 2 pipeline ranks x 2 interleaved stages
        model={"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden_dim": 128},
        batch={"seq_len": 32, "batch_size": 4, "micro_batch_size": 1},
        optim={"steps": STEPS, "warmup_steps": 2},
        run={"save_every": 5, "eval_every": 5, "eval_batches": 4},
    )
    file = tmp_path / f"{name}.toml"
    file.write_text(toml(raw))
    return file


def launch(
    *args: str, procs: int, module: str = "herd", restarts: int = 0, env: dict | None = None
) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free port, so runs never share one. torchrun looks at its
    # workers every 2 s (not 0.1 s), so a survivor has time to report its failed collective
    # before torchrun stops it.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={procs}", f"--max-restarts={restarts}", "--monitor-interval=2"]
    command += ["-m", module, *args]
    # PYTHONFAULTHANDLER: a rank that crashes in native code prints its Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=400, check=False
    )


def pretrain(recipe_file: Path, *args: str, procs: int, **kwargs) -> subprocess.CompletedProcess:
    return launch("pretrain", str(recipe_file), *args, procs=procs, **kwargs)


@pytest.fixture(scope="module")
def single_run(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    done = pretrain(write(corpus, root, "run"), procs=1)
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.fixture(scope="module")
def single(single_run) -> list[dict]:
    return read_metrics(single_run / "metrics.jsonl")


def same_losses(got: list[dict], expected: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for key in ("loss", "grad_norm", "val_loss"):
        a = [r[key] for r in got if key in r]
        b = [r[key] for r in expected if key in r]
        assert len(a) == len(b) and a == pytest.approx(b, rel=rel), key


def setting(*pairs: str) -> list[str]:
    return [f"parallel.{pair}" for pair in pairs]


# name: (processes, parallel settings, the run whose step-5 checkpoint it resumes from)
RUNS = {
    "fsdp2": (2, [], None),
    "tp2": (2, setting("tp=2"), None),
    "replicate2": (2, setting("dp_replicate=2", "dp_shard=1"), None),
    "pp2_1f1b": (2, setting("pp=2"), None),
    "pp2_interleaved": (2, setting("pp=2", 'pp_schedule="Interleaved1F1B"'), None),
    "cp2": (2, setting("cp=2"), None),
    "fsdp2_bf16": (2, setting('fsdp_param_dtype="bf16"'), None),
    # the resumes the README promises: each layout reads a checkpoint another layout wrote
    "tp2_to_fsdp2": (2, [], "tp2"),
    "pp2_to_cp2": (2, setting("cp=2"), "pp2_1f1b"),
    "pp2_to_tp2": (2, setting("tp=2"), "pp2_1f1b"),
    "fsdp2_tp2": (4, setting("tp=2"), None),
    "pp2_fsdp2_paper_order": (4, setting("pp=2", 'order="dp,pp,cp,tp"'), None),
}
LAYOUTS = [n for n, (_, _, source) in RUNS.items() if source is None and n != "fsdp2_bf16"]
RESUMES = [n for n, (_, _, source) in RUNS.items() if source is not None]


def launch_runs(corpus, root: Path, procs: int) -> subprocess.CompletedProcess:
    """The runs of RUNS on `procs` processes, in one torchrun launch, writing under `root`."""
    jobs = []
    for name, (p, settings, source) in RUNS.items():
        if p == procs:
            resume = source and str(root / source / "checkpoints" / "step-00000005")
            recipe_file = str(write(corpus, root, name))
            jobs.append({"recipe": recipe_file, "set": settings, "resume_from": resume})
    (root / f"jobs-{procs}.json").write_text(json.dumps(jobs))
    return launch(str(root / f"jobs-{procs}.json"), procs=procs, module="tests.train.layouts")


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Path:
    """Every run of RUNS, in one torchrun launch per process count. A launch in which a rank
    died of a segmentation fault (once in CI, in torch's native code under a loaded machine; no
    herd native code runs in training) is repeated once from scratch, with a warning that
    carries the crashed rank's stack; any other failure, or a second crash, fails."""
    root = tmp_path_factory.mktemp("layouts")
    for procs in sorted({p for p, _, _ in RUNS.values()}):
        done = launch_runs(corpus, root, procs)
        if done.returncode != 0 and "(SIGSEGV)" in done.stderr:
            warnings.warn(
                f"a rank crashed; the {procs}-process runs start again:\n{done.stderr[-8000:]}"
            )
            for name, (p, _, _) in RUNS.items():
                if p == procs:
                    shutil.rmtree(root / name, ignore_errors=True)
            done = launch_runs(corpus, root, procs)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(runs, single, layout):
    same_losses(read_metrics(runs / layout / "metrics.jsonl"), single)


def test_fsdp_bf16_parameters_train_like_fp32(runs, single):
    """FSDP's mixed precision gathers and computes in bf16 (reducing in fp32): not equal to the
    fp32 run, but within bf16's rounding of it."""
    got = read_metrics(runs / "fsdp2_bf16" / "metrics.jsonl")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in single], rel=2e-3)
    assert [r["loss"] for r in got] != [r["loss"] for r in single]


@pytest.mark.parametrize("name", RESUMES)
def test_a_checkpoint_resumes_in_another_layout(runs, single, name):
    """Saved by one layout (2 pipeline stages each writing its own layers, or 2 tensor-parallel
    ranks each writing a slice of every layer), resumed by another from step 5: the continued
    losses match the single-process run's."""
    same_losses(read_metrics(runs / name / "metrics.jsonl"), single[5:])


def test_a_pipeline_run_exports_one_hf_checkpoint(runs, single_run, tmp_path):
    """The finished pipeline run (each stage saved its own layers) exports one HF checkpoint
    equal to the single-process run's."""
    from safetensors.torch import load_file

    import herd
    from herd.train.checkpoint import load_run_model

    exported = {}
    for name, run in (("pp", runs / "pp2_1f1b"), ("single", single_run)):
        model, _ = load_run_model(run)
        herd.save_model(model, tmp_path / name, format="hf")
        exported[name] = load_file(tmp_path / name / "model.safetensors")
    assert exported["pp"].keys() == exported["single"].keys()
    assert len([k for k in exported["pp"] if ".layers." in k]) == 4 * 9
    for key, value in exported["single"].items():
        # Adam magnifies float32 rounding on tiny gradients: compare to 0.1% of the init std
        torch.testing.assert_close(exported["pp"][key], value, rtol=1e-4, atol=2e-5)


def dying(marker: Path, failure: str = "kill") -> dict:
    return {"HERD_TEST_DIE_MARKER": str(marker), "HERD_TEST_FAILURE": failure}


def test_a_dying_rank_stops_the_job_and_resume_continues_it(corpus, tmp_path, single):
    """Rank 1 SIGKILLs itself in step 7: the job ends (no hang) with torchrun naming the dead
    rank and herd's one-line message on the survivor; relaunching with --resume continues from
    the step-5 checkpoint with the uninterrupted run's losses."""
    env = dying(tmp_path / "died-once")
    file = write(corpus, tmp_path, "dies")
    done = pretrain(file, "--resume", procs=2, module="tests.train.dying_rank", env=env)
    assert done.returncode != 0 and (tmp_path / "died-once").exists()
    assert "Signal 9 (SIGKILL) received" in done.stderr  # torchrun names the dead rank
    assert "rank 0: a collective failed" in done.stderr
    assert "another rank has probably died" in done.stderr
    logged = read_metrics(tmp_path / "dies" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    done = pretrain(file, "--resume", procs=2, module="tests.train.dying_rank", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    same_losses(read_metrics(tmp_path / "dies" / "metrics.jsonl"), single)


def test_a_bug_on_one_rank_keeps_its_traceback(corpus, tmp_path):
    """An ordinary error on rank 1 (not a failed collective) is shown with its traceback, not
    passed off as another rank's death; rank 0, whose collective then fails, says so."""
    env = dying(tmp_path / "failed-once", failure="bug")
    done = pretrain(
        write(corpus, tmp_path, "bug"), procs=2, module="tests.train.dying_rank", env=env
    )
    assert done.returncode != 0 and (tmp_path / "failed-once").exists()
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: shapes (3, 4) and (5, 6) do not match: a bug in step 7" in done.stderr
    assert "rank 1: a collective failed" not in done.stderr


def test_torchrun_restarts_a_job_whose_rank_died(corpus, tmp_path, single):
    """With --max-restarts 1, torchrun itself relaunches the workers after rank 1 kills itself
    once; they resume from the last checkpoint and finish with the uninterrupted run's losses."""
    env = dying(tmp_path / "died-once")
    file = write(corpus, tmp_path, "restarts")
    done = pretrain(file, "--resume", procs=2, module="tests.train.dying_rank", restarts=1, env=env)
    assert (tmp_path / "died-once").exists() and done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 5" in done.stdout
    same_losses(read_metrics(tmp_path / "restarts" / "metrics.jsonl"), single)


def test_communication_failures_are_told_from_other_errors():
    from herd.train.parallel import is_communication_failure

    # what gloo raised on the survivor when its peer was SIGKILLed (torch 2.13)
    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
        "closed by peer [127.0.0.1]:3476. This is typically caused by a remote worker crashing."
    )
    assert is_communication_failure(gloo)
    assert is_communication_failure(dist.DistNetworkError("store unreachable"))
    assert is_communication_failure(dist.DistBackendError("NCCL watchdog timeout"))
    assert not is_communication_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_communication_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_communication_failure(ValueError("bad value"))


@pytest.mark.parametrize(
    "layout, world, message",
    [
        ({"tp": 3}, 4, "does not divide the world size 4"),
        ({"tp": 2, "dp_shard": 3}, 4, "= 6 processes, but the job has 4"),
        ({"pp": 3}, 4, "does not divide the world size 4"),
        ({"cp": 0}, 4, "cp must be at least 1"),
    ],
)
def test_layouts_that_do_not_fit_are_refused(layout, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_dims(ParallelConfig(**layout), world)
