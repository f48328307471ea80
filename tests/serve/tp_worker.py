"""`torchrun --nproc-per-node 2 -m tests.serve.tp_worker MODEL_DIR OUT`: a tensor-parallel
model generating offline (greedy, seeded and unseeded sampling) and through the serving
engine; each rank writes OUT.RANK.json with its tokens and the weight bytes it holds."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from herd.infer import Llama, SamplingParams
from herd.infer.parallel import weight_bytes
from herd.serve.engine import Request, run_to_completion
from herd.serve.parallel import TensorParallelEngine

PROMPTS = [[128000, 791, 4062, 14198], [128000, 9906, 1917], [128000, 40, 1093, 264, 2678, 11]]
NEW = 12


def main(path: str, out: str) -> None:
    llama = Llama.load(path, tp=2)
    rank = dist.get_rank()

    def ids(**kwargs) -> list[list[int]]:
        done = llama.generate(PROMPTS, max_new_tokens=NEW, stop_ids=(), **kwargs)
        return [c.token_ids for c in done]

    result = {
        "weight_bytes": weight_bytes(llama.model),
        "greedy": ids(temperature=0),
        "seeded": ids(temperature=1.0, top_p=1.0, seed=5),
        "unseeded": ids(temperature=1.0, top_p=1.0),
    }
    engine = TensorParallelEngine(
        llama.model, llama.tokenizer, num_blocks=64, block_size=4, prefill_chunk=3, max_seq_len=64
    )
    if rank == 0:
        greedy = SamplingParams(temperature=0)
        requests = [
            Request(str(i), p, NEW, greedy, stop_ids=frozenset()) for i, p in enumerate(PROMPTS)
        ]
        events = run_to_completion(engine.start(), requests)
        engine.stop()
        result["served"] = [
            [e.token for e in events[str(i)][0] if e.token is not None] for i in range(len(PROMPTS))
        ]
    else:
        engine.follow()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
