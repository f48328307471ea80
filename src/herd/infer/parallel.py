"""Tensor-parallel inference: a model's weights split over the processes of a torchrun job.

Every block's projections are split as in training (herd.train.parallel): wq, wk, wv, w1 and
w3 by output rows, wo and w2 by input columns, so each process holds 1/N of them, computes
its own heads against its own share of the KV cache, and wo and w2 end in an all-reduce. The
embedding is split by vocabulary rows and the output head by vocabulary columns (gathered:
every process gets the whole logits); tied embeddings stay whole. Unlike training there is no
sequence parallelism: a decode step has one token per row, nothing to split.

The processes run the same forward passes on the same inputs. Offline, each one calls
`Llama.generate` with the same prompts (sampling agrees on a seed first); the server's rank 0
schedules and sends every step's inputs to the others (herd.serve.parallel).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from herd.model import Transformer

BLOCK_PLAN = {
    "attention.wq": ColwiseParallel,
    "attention.wk": ColwiseParallel,
    "attention.wv": ColwiseParallel,
    "attention.wo": RowwiseParallel,
    "feed_forward.w1": ColwiseParallel,
    "feed_forward.w2": RowwiseParallel,
    "feed_forward.w3": ColwiseParallel,
}


def tensor_parallel(model: Transformer, tp: int) -> DeviceMesh:
    """Split `model` over the `tp` processes of this torchrun job, in place; returns the mesh.

    Raises ValueError when the job does not have `tp` processes or the heads do not split
    evenly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(
            f"tensor parallelism over {tp} processes needs a torchrun job of {tp} "
            f"(torchrun --nproc-per-node {tp} -m herd ...); this one has {world}"
        )
    config = model.config
    if config.n_kv_heads % tp:
        raise ValueError(
            f"tp {tp} must divide the model's {config.n_kv_heads} key/value heads "
            "(each process keeps whole groups of query heads with their key/value head)"
        )
    device = model.tok_embeddings.weight.device
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    if not config.tie_word_embeddings:
        plan = {
            "tok_embeddings": RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Replicate()
            ),
            "output": ColwiseParallel(output_layouts=Replicate()),
        }
        parallelize_module(model, mesh, plan)
    for block in model.layers.values():
        parallelize_module(block, mesh, {name: style() for name, style in BLOCK_PLAN.items()})
    _own_shards(model)
    return mesh


def _own_shards(model: Transformer) -> None:
    """Give every shard its own storage: a row split is a view of the whole weight, which
    would otherwise stay alive in every process."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                local = param.to_local()
                if local.untyped_storage().nbytes() > local.numel() * local.element_size():
                    shard = DTensor.from_local(
                        local.clone(), param.device_mesh, param.placements, run_check=False
                    )
                    setattr(module, name, torch.nn.Parameter(shard, requires_grad=False))


def tp_size(model: Transformer) -> int:
    """Over how many processes `model`'s blocks are split (1: not split)."""
    weight = getattr(next(iter(model.layers.values())).attention.wk, "weight", None)
    return weight.device_mesh.size() if isinstance(weight, DTensor) else 1


def local_kv_heads(model: Transformer) -> int:
    """The key/value heads this process computes and caches."""
    return model.config.n_kv_heads // tp_size(model)


def shared_seed(model: Transformer) -> int:
    """A random seed every process of a split model agrees on (rank 0's)."""
    seed = torch.randint(0, 2**62, (1,), device=model.tok_embeddings.weight.device)
    if tp_size(model) > 1:
        dist.broadcast(seed, src=0)
    return int(seed)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weight storage this process holds (each storage counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
