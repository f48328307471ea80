"""Parallelism for a built model, with torch's own stack: one DeviceMesh, DTensor tensor
parallelism, FSDP2 data parallelism. The model file knows nothing of it; these functions take a
built `Transformer` and change how its parameters are held and its activations laid out.

Mesh order follows the paper: [pp, dp_replicate, dp_shard, cp, tp], tp varying fastest so a
tensor-parallel group stays inside a node. Launch with torchrun; each process reads its rank
from the environment. Pipeline and context parallelism are validated here but not built yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from herd.config.train import ConfigError, ParallelConfig
from herd.model import Transformer

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp


def resolve_dims(config: ParallelConfig, world_size: int) -> ParallelDims:
    """Check the layout against the world size; dp_shard = -1 takes what the others leave."""
    fixed = config.pp * config.dp_replicate * config.cp * config.tp
    for name in ("tp", "cp", "pp", "dp_replicate"):
        if getattr(config, name) < 1:
            raise ConfigError(f"[parallel] {name} must be at least 1, got {getattr(config, name)}")
    dp_shard = config.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"[parallel] tp x cp x pp x dp_replicate = {fixed} does not divide the world "
                f"size {world_size}"
            )
        dp_shard = world_size // fixed
    dims = ParallelDims(config.pp, config.dp_replicate, dp_shard, config.cp, config.tp)
    if dims.world_size != world_size:
        raise ConfigError(
            f"[parallel] pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard "
            f"{dims.dp_shard} x cp {dims.cp} x tp {dims.tp} = {dims.world_size} processes, "
            f"but the job has {world_size} (set dp_shard = -1 to fill the rest)"
        )
    if dims.pp > 1:
        raise ConfigError("[parallel] pipeline parallelism (pp > 1) is not available yet")
    if dims.cp > 1:
        raise ConfigError("[parallel] context parallelism (cp > 1) is not available yet")
    return dims


def init_distributed(device: torch.device) -> int:
    """Join the torchrun job (NCCL on GPUs, gloo on the CPU); returns the world size (1 when
    not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    return init_device_mesh(
        device_type,
        tuple(getattr(dims, name) for name in MESH_ORDER),
        mesh_dim_names=MESH_ORDER,
    )


def data_parallel_coordinates(mesh: DeviceMesh) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas."""
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    rank = replicate.get_local_rank() * shard.size() + shard.get_local_rank()
    return rank, replicate.size() * shard.size()


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism: wq/wk/wv/w1/w3 split by output rows, wo/w2
    by input columns, norms and the residual stream split along the sequence. Heads are split
    evenly, so tp must divide the key/value heads (GQA groups stay on one rank)."""
    config = model.config
    tp = mesh.size()
    if config.n_kv_heads % tp:
        raise ConfigError(f"[parallel] tp {tp} must divide the {config.n_kv_heads} key/value heads")
    if model.output is None:
        raise ConfigError("[parallel] tensor parallelism of tied embeddings is not supported")
    parallelize_module(
        model,
        mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    for block in model.layers.values():
        parallelize_module(
            block,
            mesh,
            {
                "attention_norm": SequenceParallel(),
                # x, cos, sin, mask, kv_update: only x is gathered from its sequence shards
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None, None),
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            },
        )


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> None:
    """FSDP2 per transformer block, then the rest. `mesh` is 1-D (shard) or 2-D (replicate,
    shard: HSDP). param_dtype gathers and computes in that dtype with fp32 gradient reduction."""
    kwargs: dict = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by the backward pass
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    dims: ParallelDims,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> None:
    """TP first (innermost), then FSDP over the data-parallel dimensions."""
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if dims.dp_shard > 1 or dims.dp_replicate > 1:
        if dims.dp_replicate > 1:
            dp_mesh = mesh["dp_replicate", "dp_shard"]
        else:
            dp_mesh = mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, param_dtype, cpu_offload)


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the norm over every shard of every gradient (plain tensors or DTensors)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of `value` over every process (gloo has no AVG reduction)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()
