"""Training throughput and communication share per parallel layout, on this machine.

    python benchmarks/parallel.py [--config tiny] [--layouts single,fsdp2,tp2,...]
                                  [--steps 6] [--warmup 2] [--workdir out/bench-parallel]

Each layout is one `torchrun --standalone` job of herd's Trainer on the same recipe shape as
benchmarks/train.py's (Shakespeare shards, same batch), in fp32. Reported per layout:
tokens/s for the whole job and per process, the share of step time with a gloo/NCCL
collective or pipeline send/receive in flight (from the torch profiler, averaged over ranks;
for a pipeline it includes waiting for the other stage), the largest
per-process peak RSS and its growth over the process's RSS before the model was built next to
herd.train.flops' memory model of it (states plus fp32 activations), and the fp32 parameters
+ gradients + AdamW state one process holds, as the model predicts them and as the process's
own tensors measure (the largest rank). On a
CPU with fewer cores than processes the figures only compare layouts with each other; they
say nothing about GPUs.
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
from worker import peak_rss_mib, status_mib

LAYOUTS = {  # name: (processes, [parallel] table)
    "single": (1, {}),
    "fsdp2": (2, {}),
    "tp2": (2, {"tp": 2}),
    "replicate2": (2, {"dp_replicate": 2, "dp_shard": 1}),
    "pp2": (2, {"pp": 2}),
    "pp2_interleaved": (2, {"pp": 2, "pp_schedule": "Interleaved1F1B"}),
    "cp2": (2, {"cp": 2}),
    "fsdp2_tp2": (4, {"tp": 2}),
    "pp2_fsdp2": (4, {"pp": 2}),
    "cp2_tp2": (4, {"cp": 2, "tp": 2}),
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
    rss_before = status_mib("VmRSS")
    trainer = Trainer(from_dict(job["config"]))
    for _ in range(job["warmup"]):
        trainer.train_step()
    times = []
    with profile() as prof:
        for _ in range(job["steps"]):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
    spans = [e.time_range for e in prof.events() if e.name.lower().startswith(COLLECTIVES)]
    share = in_flight_us(spans) / 1e6 / sum(times)
    peak = peak_rss_mib()
    stats = torch.tensor(
        [share, peak, statistics.median(times), peak - rss_before, state_mib(trainer)],
        dtype=torch.float64,
    )
    if dist.is_initialized():
        shares = stats.clone()
        dist.all_reduce(shares)
        largest = stats.clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        stats = torch.cat([shares[:1] / dist.get_world_size(), largest[1:]])
    if trainer.is_main:
        tokens = job["tokens_per_step"]
        print(
            "RESULT "
            + json.dumps(
                {
                    "tokens_per_s": tokens / float(stats[2]),
                    "comm_share": float(stats[0]),
                    "peak_rss_mib": float(stats[1]),
                    "rss_growth_mib": float(stats[3]),
                    "state_mib": float(stats[4]),
                }
            ),
            flush=True,
        )
    trainer.close()


def in_flight_us(spans) -> float:
    """Time with at least one collective or point-to-point transfer in flight: the union of
    their intervals (a pipeline keeps several sends and receives outstanding at once)."""
    total, end = 0.0, float("-inf")
    for span in sorted(spans, key=lambda r: r.start):
        if span.end > end:
            total += span.end - max(span.start, end)
            end = span.end
    return total


def state_mib(trainer) -> float:
    """Bytes of this process's own parameters, gradients and AdamW state (local shards)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = []
    for p in trainer.model.parameters():
        tensors.append(local(p))
        if p.grad is not None:
            tensors.append(local(p.grad))
    for state in trainer.optimizer.state.values():
        tensors += [local(v) for v in state.values() if v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def estimate_mib(model: dict, parallel: dict, procs: int, micro_batch: int, seq_len: int):
    """herd.train.flops' memory model for one process, in fp32: (parameters + gradients + AdamW
    state, that plus activations). The model counts activations in bf16; fp32 doubles them."""
    from herd.config import ModelConfig
    from herd.train.flops import memory_per_device

    dims = {k: parallel.get(k, 1) for k in ("tp", "pp", "cp", "dp_replicate")}
    dp_shard = procs // (dims["tp"] * dims["pp"] * dims["cp"] * dims["dp_replicate"])
    config = ModelConfig(**model)
    m = memory_per_device(
        config, seq_len, micro_batch, dims["tp"], dims["pp"], dims["cp"], dp_shard
    )
    states = m.params + m.grads + m.optimizer
    return states / 2**20, (states + 2 * m.activations) / 2**20


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
    print(
        "| layout | processes | tokens/s | tokens/s per process | comm share | peak RSS MiB "
        "| RSS growth MiB | estimate MiB | states estimate MiB | states measured MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in layouts:
        procs, parallel = LAYOUTS[name]
        config = recipe(shape, "fp32", 1, data, args.workdir / "runs" / name)
        config["parallel"] = parallel
        model_parallel = parallel.get("tp", 1) * parallel.get("pp", 1) * parallel.get("cp", 1)
        local = shape.batch_size // (procs // model_parallel)
        # a pipeline runs 2 x pp micro-batches per step to keep its bubble small
        pp = parallel.get("pp", 1)
        config["batch"]["micro_batch_size"] = local // (2 * pp) if pp > 1 else local
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
            print(f"| {name} | {procs} | failed | | | | | | | |")
            continue
        micro = config["batch"]["micro_batch_size"]
        states, total = estimate_mib(config["model"], parallel, procs, micro, shape.seq_len)
        print(
            f"| {name} | {procs} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / procs:.0f} "
            f"| {100 * r['comm_share']:.0f}% | {r['peak_rss_mib']:.0f} "
            f"| {r['rss_growth_mib']:.0f} | {total:.0f} | {states:.1f} | {r['state_mib']:.1f} |"
        )


if __name__ == "__main__":
    main()
