"""Peak memory and time of loading a checkpoint: herd vs transformers, same files, same run.

    python benchmarks/load_memory.py [--model smollm2] [--workdir out/bench]

The real SmolLM2-135M model is converted once to each format (HF float32 safetensors, Meta
bf16, GGUF F32/Q8_0); each load then runs in a fresh process, which reports its peak resident
memory above the interpreter's baseline (torch and the library already imported).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(2)
kind, path = sys.argv[1], sys.argv[2]
if kind == "herd":
    import herd
    load = lambda: herd.load_model(path)
else:
    import os
    from transformers import AutoModelForCausalLM
    if path.endswith(".gguf"):
        load = lambda: AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype="auto")
    else:
        load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype="auto")
def rss():
    # (resident, anonymous): file-backed pages of a memory map are reclaimable page cache.
    fields = dict(l.split(":") for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon")))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024
peak = [0, 0]
def sample():
    while not done.is_set():
        now = rss()
        peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
        time.sleep(0.002)
done = threading.Event()
base = rss()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
model = load()
# Touch every weight: memory-mapped tensors count only once they are actually read.
with torch.no_grad():
    for p in model.parameters():
        p.sum()
seconds = time.perf_counter() - start
done.set(); sampler.join()
params = sum(p.numel() * p.element_size() for p in model.parameters())
end = rss()
print(json.dumps({"delta": max(peak[0], end[0]) - base[0], "anon": max(peak[1], end[1]) - base[1], "seconds": seconds, "param_bytes": params}))
"""


def measure(kind: str, path: Path) -> dict | None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {kind} failed on {path.name}: {tail}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(model: str, workdir: Path) -> list[tuple[str, Path]]:
    import herd

    targets = [
        ("hf f32", workdir / "hf", "hf", "f32"),
        ("meta bf16", workdir / "meta", "meta", "bf16"),
        ("gguf f32", workdir / "f32.gguf", "gguf", "f32"),
        ("gguf q8_0", workdir / "q8_0.gguf", "gguf", "q8_0"),
    ]
    source = None
    for _, path, fmt, dtype in targets:
        if not path.exists():
            source = source or herd.load_model(model)
            herd.save_model(source, path, fmt, dtype=dtype, tokenizer_from=model)
    return [(label, path) for label, path, _, _ in targets]


def size_of(path: Path) -> int:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix != ".json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="source checkpoint (default: smollm2)")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench-load"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    rows = []
    for label, path in prepare(args.model, args.workdir):
        size = size_of(path)
        ours = measure("herd", path)
        peer = measure("transformers", path) if label != "meta bf16" else None
        rows.append((label, size, ours, peer))

    mib = 2**20
    header = (
        f"{'checkpoint':<10} {'file MiB':>8} {'model MiB':>9} | {'herd RSS':>8} "
        f"{'anon':>6} {'RSS/model':>9} {'load s':>6} | {'transformers RSS':>16} {'anon':>6} "
        f"{'RSS/model':>9} {'load s':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, size, ours, peer in rows:

        def cells(r):
            if r is None:
                return ("n/a",) * 4
            return (
                f"{r['delta'] / mib:.0f}",
                f"{r['anon'] / mib:.0f}",
                f"{r['delta'] / r['param_bytes']:.2f}",
                f"{r['seconds']:.2f}",
            )

        o, p = cells(ours), cells(peer)
        model_mib = f"{ours['param_bytes'] / mib:.0f}" if ours else "n/a"
        print(
            f"{label:<10} {size / mib:>8.0f} {model_mib:>9} | {o[0]:>8} {o[1]:>6} {o[2]:>9} "
            f"{o[3]:>6} | {p[0]:>16} {p[1]:>6} {p[2]:>9} {p[3]:>6}"
        )
    print(
        "\nRSS/anon = peak resident / anonymous memory in MiB (sampled every 2 ms) while loading"
        " and reading every weight,\nabove the process's memory before the load. Anonymous memory"
        " excludes memory-mapped file pages, which the kernel\ncan drop and re-read. model = bytes of"
        " the loaded parameters. transformers cannot read Meta checkpoints."
    )


if __name__ == "__main__":
    main()
