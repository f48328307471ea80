"""Training throughput and communication share per parallel layout, on this machine.

    python benchmarks/parallel.py [--config tiny] [--layouts single,fsdp2,tp2,...]
                                  [--steps 6] [--warmup 2] [--workdir out/bench-parallel]

Each layout is one `torchrun --standalone` job of herd's Trainer on the same recipe shape as
benchmarks/train.py's (Shakespeare shards, same batch), in fp32. Reported per layout:
tokens/s for the whole job and per process, the share of step time the gloo/NCCL threads
spend inside collectives (from the torch profiler, averaged over ranks), and the largest
per-process peak RSS. On a CPU with fewer cores than processes the figures only compare
layouts with each other; they say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train import ROOT, SHAPES, prepare_data, recipe
from worker import peak_rss_mib

LAYOUTS = {  # name: (processes, [parallel] table)
    "single": (1, {}),
    "fsdp2": (2, {}),
    "tp2": (2, {"tp": 2}),
    "replicate2": (2, {"dp_replicate": 2, "dp_shard": 1}),
    "fsdp2_tp2": (4, {"tp": 2}),
}
COLLECTIVES = ("gloo:", "nccl:")


def worker(spec: str) -> None:
    """One rank of a torchrun job: train, profile the measured steps, report from rank 0."""
    import torch
    import torch.distributed as dist
    from torch.profiler import profile

    from herd.config.train import from_dict
    from herd.train.trainer import Trainer

    job = json.loads(spec)
    trainer = Trainer(from_dict(job["config"]))
    for _ in range(job["warmup"]):
        trainer.train_step()
    times = []
    with profile() as prof:
        for _ in range(job["steps"]):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
    comm_us = sum(e.cpu_time_total for e in prof.events() if e.name.lower().startswith(COLLECTIVES))
    share = comm_us / 1e6 / sum(times)
    stats = torch.tensor([share, peak_rss_mib(), statistics.median(times)], dtype=torch.float64)
    if dist.is_initialized():
        shares = stats.clone()
        dist.all_reduce(shares)
        peak = stats.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats = torch.stack([shares[0] / dist.get_world_size(), peak[1], peak[2]])
    if trainer.is_main:
        tokens = job["tokens_per_step"]
        print(
            "RESULT "
            + json.dumps(
                {
                    "tokens_per_s": tokens / float(stats[2]),
                    "comm_share": float(stats[0]),
                    "peak_rss_mib": float(stats[1]),
                }
            ),
            flush=True,
        )
    trainer.close()


def run_layout(name: str, job: dict, threads: int) -> dict | None:
    procs, _ = LAYOUTS[name]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={procs}", __file__, "--worker", json.dumps(job)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--steps", type=int, default=6, help="measured (profiled) steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-parallel")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    layouts = args.layouts.split(",")
    unknown = [n for n in layouts if n not in LAYOUTS] + [args.config] * (args.config not in SHAPES)
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    shape = SHAPES[args.config]
    cores = os.cpu_count() or 1
    data = prepare_data(shape.vocab_size, args.workdir, workers=cores)
    print(
        f"{args.config}, fp32, {shape.batch_size} x {shape.seq_len} tokens per step, {cores} cores"
    )
    print()
    print("| layout | processes | tokens/s | tokens/s per process | comm share | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name in layouts:
        procs, parallel = LAYOUTS[name]
        config = recipe(shape, "fp32", 1, data, args.workdir / "runs" / name)
        config["parallel"] = parallel
        config["batch"]["micro_batch_size"] = shape.batch_size // (procs // parallel.get("tp", 1))
        config["run"].pop("threads")
        job = {
            "config": config,
            "steps": args.steps,
            "warmup": args.warmup,
            "tokens_per_step": shape.batch_size * shape.seq_len,
        }
        shutil.rmtree(args.workdir / "runs" / name, ignore_errors=True)
        r = run_layout(name, job, threads=max(1, cores // procs))
        if r is None:
            print(f"| {name} | {procs} | failed | | | |")
            continue
        print(
            f"| {name} | {procs} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / procs:.0f} "
            f"| {100 * r['comm_share']:.0f}% | {r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
