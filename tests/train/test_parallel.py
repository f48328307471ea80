"""Parallel layouts on the CPU (gloo, torchrun, 2 and 4 processes): per-step losses equal the
single-process run's for FSDP2, HSDP, TP, PP (1F1B and interleaved), CP and their combinations;
a checkpoint saved in one layout resumes in another and exports as one HF checkpoint; a dying
rank stops the job with a clear message, and torchrun's restart (or --resume) continues it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def launch(recipe_file: Path, procs: int, *args: str, module: str = "herd", restarts: int = 0):
    # --standalone: a rendezvous on a free port, so runs never share one. torchrun looks at its
    # workers every 2 s (not 0.1 s), so a survivor has time to report its failed collective
    # before torchrun stops it.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={procs}", f"--max-restarts={restarts}", "--monitor-interval=2"]
    command += ["-m", module, "pretrain", str(recipe_file), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=240, check=False
    )


@pytest.fixture(scope="module")
def single_run(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    done = launch(write(corpus, root, "run"), 1)
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
    return [arg for pair in pairs for arg in ("--set", f"parallel.{pair}")]


LAYOUTS = {
    "fsdp2": (2, []),
    "tp2": (2, setting("tp=2")),
    "replicate2": (2, setting("dp_replicate=2", "dp_shard=1")),
    "pp2_1f1b": (2, setting("pp=2")),
    "pp2_interleaved": (2, setting("pp=2", 'pp_schedule="Interleaved1F1B"')),
    "cp2": (2, setting("cp=2")),
    "fsdp2_tp2": (4, setting("tp=2")),
    "pp2_fsdp2_paper_order": (4, setting("pp=2", 'order="dp,pp,cp,tp"')),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(corpus, tmp_path, single, layout):
    procs, args = LAYOUTS[layout]
    done = launch(write(corpus, tmp_path, layout), procs, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    same_losses(read_metrics(tmp_path / layout / "metrics.jsonl"), single)


def test_fsdp_bf16_parameters_train_like_fp32(corpus, tmp_path, single):
    """FSDP's mixed precision gathers and computes in bf16 (reducing in fp32): not equal to the
    fp32 run, but within bf16's rounding of it."""
    done = launch(write(corpus, tmp_path, "bf16"), 2, *setting('fsdp_param_dtype="bf16"'))
    assert done.returncode == 0, done.stderr[-3000:]
    got = read_metrics(tmp_path / "bf16" / "metrics.jsonl")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in single], rel=2e-3)
    assert [r["loss"] for r in got] != [r["loss"] for r in single]


def test_a_pipeline_run_resumes_with_tp_and_exports_one_hf_checkpoint(
    corpus, tmp_path, single, single_run
):
    """Saved by 2 pipeline stages (each rank writes its own layers), resumed by 2 tensor-
    parallel ranks (each reads a slice of every layer): the continued losses match. The
    finished pipeline run exports one HF checkpoint equal to the single-process run's."""
    from safetensors.torch import load_file

    procs, args = LAYOUTS["pp2_1f1b"]
    done = launch(write(corpus, tmp_path, "pp"), procs, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "pp" / "checkpoints" / "step-00000005"
    procs, args = LAYOUTS["tp2"]
    done = launch(write(corpus, tmp_path, "tp"), procs, *args, "--resume-from", str(checkpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    same_losses(read_metrics(tmp_path / "tp" / "metrics.jsonl"), single[5:])

    exported = {}
    for name, run in (("pp", tmp_path / "pp"), ("single", single_run)):
        command = [sys.executable, "-m", "herd", "export", str(run), str(tmp_path / f"{name}-hf")]
        subprocess.run([*command, "--to", "hf"], check=True, capture_output=True, timeout=120)
        exported[name] = load_file(tmp_path / f"{name}-hf" / "model.safetensors")
    assert exported["pp"].keys() == exported["single"].keys()
    assert len([k for k in exported["pp"] if ".layers." in k]) == 4 * 9
    for key, value in exported["single"].items():
        # Adam magnifies float32 rounding on tiny gradients: compare to 0.1% of the init std
        torch.testing.assert_close(exported["pp"][key], value, rtol=1e-4, atol=2e-5)


def test_a_dying_rank_stops_the_job_and_resume_continues_it(corpus, tmp_path, single):
    """Rank 1 SIGKILLs itself in step 7: the job ends (no hang) with torchrun naming the dead
    rank and herd's one-line message on the survivor; relaunching with --resume continues from
    the step-5 checkpoint with the uninterrupted run's losses."""
    marker = tmp_path / "died-once"
    os.environ["HERD_TEST_DIE_MARKER"] = str(marker)
    try:
        file = write(corpus, tmp_path, "dies")
        done = launch(file, 2, "--resume", module="tests.train.dying_rank")
        assert done.returncode != 0 and marker.exists()
        assert "Signal 9 (SIGKILL) received" in done.stderr  # torchrun names the dead rank
        assert "another rank has probably died" in done.stderr
        logged = read_metrics(tmp_path / "dies" / "metrics.jsonl")
        assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
        done = launch(file, 2, "--resume", module="tests.train.dying_rank")
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        del os.environ["HERD_TEST_DIE_MARKER"]
    same_losses(read_metrics(tmp_path / "dies" / "metrics.jsonl"), single)


def test_torchrun_restarts_a_job_whose_rank_died(corpus, tmp_path, single):
    """With --max-restarts 1, torchrun itself relaunches the workers after rank 1 kills itself
    once; they resume from the last checkpoint and finish with the uninterrupted run's losses."""
    marker = tmp_path / "died-once"
    os.environ["HERD_TEST_DIE_MARKER"] = str(marker)
    try:
        file = write(corpus, tmp_path, "restarts")
        done = launch(file, 2, "--resume", module="tests.train.dying_rank", restarts=1)
    finally:
        del os.environ["HERD_TEST_DIE_MARKER"]
    assert marker.exists() and done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 5" in done.stdout
    same_losses(read_metrics(tmp_path / "restarts" / "metrics.jsonl"), single)


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
