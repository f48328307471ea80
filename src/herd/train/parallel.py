"""Parallelism for a built model, with torch's own stack: one DeviceMesh; DTensor tensor
parallelism; FSDP2 data parallelism; pipeline stages run by torch.distributed.pipelining
schedules; context parallelism that all-gathers keys and values as the paper does. The model
file knows nothing of it: these functions take a built `Transformer` and change how its
parameters are held, which of its layers a process runs, and how activations are laid out.

The mesh is ordered [pp, dp_replicate, dp_shard, cp, tp] (or, as the paper nests them,
[dp_replicate, dp_shard, pp, cp, tp]), tp varying fastest so a tensor-parallel group stays
inside a node. Launch with torchrun; each process reads its rank from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleGPipe,
    _PipelineSchedule,
    get_schedule_class,
)
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from herd.config.train import ConfigError, ParallelConfig
from herd.data import Batch
from herd.model import Transformer
from herd.model.masks import document_causal_mask

# Outermost first. tp is innermost in both: it talks the most and stays inside a node. The
# paper's nesting, [TP, CP, PP, DP] from the inside out, puts data parallelism outermost;
# torchtitan (and the default here) puts the pipeline outermost.
MESH_ORDERS = {
    "pp,dp,cp,tp": ("pp", "dp_replicate", "dp_shard", "cp", "tp"),
    "dp,pp,cp,tp": ("dp_replicate", "dp_shard", "pp", "cp", "tp"),
}


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

    @property
    def uses_fsdp(self) -> bool:
        """FSDP shards over dp_shard x cp (replicated over dp_replicate)."""
        return self.dp_shard * self.cp * self.dp_replicate > 1


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
    return dims


def init_distributed(device: torch.device) -> int:
    """Join the torchrun job (NCCL on GPUs, gloo on the CPU); returns the world size (1 when
    not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A torchrun restart (--max-restarts) can reuse the first attempt's store, whose keys
        # would point gloo at the dead workers' ports: each attempt gets its own key space.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"herd/attempt-{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return world


# What gloo's TCP transport says when the process at the other end is gone or silent; NCCL
# and the stores raise torch.distributed's own error classes instead.
_GLOO_PEER_LOST = re.compile(
    r"gloo/transport|Connection (closed|reset) by peer|Broken pipe|Connection refused"
    r"|Timed out waiting|Socket Timeout|Application timeout caused pair closure"
)


def is_communication_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process died or stopped
    answering, as opposed to a bug or an out-of-memory on this one."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(error, RuntimeError) and bool(_GLOO_PEER_LOST.search(str(error)))


def build_mesh(dims: ParallelDims, device_type: str, order: str = "pp,dp,cp,tp") -> DeviceMesh:
    """One mesh over every process, named by kind of parallelism, outermost first."""
    if order not in MESH_ORDERS:
        raise ConfigError(f"[parallel] order must be one of {list(MESH_ORDERS)}, got {order!r}")
    names = MESH_ORDERS[order]
    return init_device_mesh(
        device_type, tuple(getattr(dims, name) for name in names), mesh_dim_names=names
    )


def data_parallel_coordinates(mesh: DeviceMesh) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas."""
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    rank = replicate.get_local_rank() * shard.size() + shard.get_local_rank()
    return rank, replicate.size() * shard.size()


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism: wq/wk/wv/w1/w3 split by output rows, wo/w2
    by input columns, norms and the residual stream split along the sequence. Heads are split
    evenly, so tp must divide the key/value heads (GQA groups stay on one rank). A pipeline
    stage without the embedding or the output gets only the plans for what it holds."""
    config = model.config
    tp = mesh.size()
    if config.n_kv_heads % tp:
        raise ConfigError(f"[parallel] tp {tp} must divide the {config.n_kv_heads} key/value heads")
    if config.tie_word_embeddings:
        raise ConfigError("[parallel] tensor parallelism of tied embeddings is not supported")
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
        plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if plan:
        parallelize_module(model, mesh, plan)
    if model.tok_embeddings is not None:
        # The sharded embedding's backward returns a replicated (full vocab x dim) gradient:
        # keep only this rank's rows, as the weight has.
        model.tok_embeddings.weight.register_post_accumulate_grad_hook(shard_grad_like_param)
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


def shard_grad_like_param(param: nn.Parameter) -> None:
    if param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 per transformer block, then the rest. `mesh` is 1-D (shard) or 2-D (replicate,
    shard: HSDP). param_dtype gathers and computes in that dtype with fp32 gradient reduction.
    reshard_after_forward=False keeps gathered parameters until the backward pass (a pipeline
    stage would otherwise gather them again for every micro-batch)."""
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
        last = i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


FSDP_PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def fsdp_policy(
    config: ParallelConfig, dims: ParallelDims, device: torch.device
) -> tuple[torch.dtype | None, bool]:
    """(param_dtype, cpu_offload) for FSDP, checked against the layout and the device."""
    if config.fsdp_param_dtype not in FSDP_PARAM_DTYPES:
        raise ConfigError(
            f"[parallel] fsdp_param_dtype must be one of {list(FSDP_PARAM_DTYPES)}, "
            f"got {config.fsdp_param_dtype!r}"
        )
    if (config.fsdp_param_dtype != "fp32" or config.cpu_offload) and not dims.uses_fsdp:
        raise ConfigError(
            "[parallel] fsdp_param_dtype and cpu_offload apply to FSDP, which this layout does "
            "not use (no dp_shard, dp_replicate or cp above 1)"
        )
    if config.cpu_offload and device.type == "cpu":
        raise ConfigError(
            "[parallel] cpu_offload keeps FSDP's parameters and AdamW state in host memory "
            "while a GPU computes; on the CPU device everything is there already"
        )
    return FSDP_PARAM_DTYPES[config.fsdp_param_dtype], config.cpu_offload


def data_parallel_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh | None:
    """The mesh FSDP shards over: dp_shard and cp together (context-parallel ranks hold the
    same parameters and each sees part of every sequence), HSDP with dp_replicate."""
    if not dims.uses_fsdp:
        return None
    shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    if dims.dp_replicate == 1:
        return shard
    return mesh["dp_replicate", "dp_shard_cp"]


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    dims: ParallelDims,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> None:
    """TP first (innermost), then FSDP over the data- and context-parallel dimensions. For a
    pipeline, call it on each stage's module."""
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    dp_mesh = data_parallel_mesh(mesh, dims)
    if dp_mesh is not None:
        apply_fsdp(model, dp_mesh, param_dtype, cpu_offload, reshard_after_forward=dims.pp == 1)


def clip_grad_norm_(
    parameters: list[nn.Parameter], max_norm: float, pp_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Clip by the norm over every shard of every gradient (plain tensors or DTensors), and
    over every pipeline stage when pp_mesh is given (each stage holds different parameters)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_mesh is not None:
        squared = total**2
        dist.all_reduce(squared, group=pp_mesh.get_group())
        total = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def mean_over_ranks(value: torch.Tensor, holders: int | None = None) -> torch.Tensor:
    """The average of `value` over the processes that hold it: all of them by default, or
    `holders` of them when the others pass zero (the last pipeline stage holds the loss)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)  # gloo has no AVG reduction
    return value / (holders or dist.get_world_size())


# -- context parallelism ------------------------------------------------------------------------


def context_parallel_indices(seq_len: int, cp: int) -> list[torch.Tensor]:
    """The sequence positions each context-parallel rank holds. The sequence is cut into 2 x cp
    chunks and rank i takes chunks i and 2cp-1-i, so under a causal mask every rank has the
    same amount of attention to compute (the paper's load balancing)."""
    if seq_len % (2 * cp):
        raise ConfigError(
            f"[parallel] cp {cp} needs seq_len to be a multiple of 2 x cp = {2 * cp}, got {seq_len}"
        )
    chunks = torch.arange(seq_len).chunk(2 * cp)
    return [torch.cat([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)]


@dataclass
class ContextShard:
    """One rank's part of a batch: its tokens, targets and positions, and the rows of the
    document-causal mask for its queries against every rank's keys in all-gather order."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


def shard_context(batch: Batch, cp_mesh: DeviceMesh) -> ContextShard:
    indices = context_parallel_indices(batch.tokens.shape[1], cp_mesh.size())
    mine = indices[cp_mesh.get_local_rank()]
    mask = document_causal_mask(batch.doc_ids, mine, torch.cat(indices))
    return ContextShard(
        batch.tokens[:, mine], batch.targets[:, mine], batch.positions[:, mine], mask
    )


def apply_context_parallel(model: Transformer, cp_mesh: DeviceMesh) -> None:
    """Each attention layer gathers every rank's keys and values (after RoPE, so each rank
    rotates its own) along the sequence; queries stay local. The backward pass reduce-scatters
    their gradients. Works with any mask, so document masking holds across ranks."""
    group = cp_mesh.get_group()

    def gather_keys_values(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, kv_heads, local seq, head_dim) -> (batch, kv_heads, seq, head_dim)
        return all_gather_tensor_autograd(k, 2, group), all_gather_tensor_autograd(v, 2, group)

    for block in model.layers.values():
        block.forward = partial(block.forward, kv_update=gather_keys_values)


# -- pipeline parallelism -----------------------------------------------------------------------


def stage_layers(n_layers: int, n_stages: int) -> list[list[str]]:
    """Layer ids of each stage: as even as possible, the extra layers on the middle stages (the
    first also embeds and the last computes logits and loss: the paper drops a layer from each
    for that reason)."""
    if n_layers < n_stages:
        raise ConfigError(
            f"[parallel] {n_stages} pipeline stages need at least as many layers, the model has "
            f"{n_layers}: lower pp or pp_stages_per_rank"
        )
    base, extra = divmod(n_layers, n_stages)
    middle = sorted(range(n_stages), key=lambda s: abs(s - (n_stages - 1) / 2))[:extra]
    sizes = [base + (s in middle) for s in range(n_stages)]
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [[str(i) for i in range(a, a + n)] for a, n in zip(starts, sizes)]


def stages_of_rank(pp_rank: int, pp: int, per_rank: int, v_shape: bool) -> list[int]:
    """Stage indices a pipeline rank runs: looped (rank r runs r, r+pp, ...) or, for the V
    schedules, r and 2pp-1-r."""
    if v_shape:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def split_stages(model: Transformer, stage_ids: list[int], n_stages: int) -> list[Transformer]:
    """Cut `model` down, in place, to the layers of this rank's stages, and return one module
    per stage that shares them. `model` keeps Meta's names for checkpoints and the optimizer."""
    plan = stage_layers(model.config.n_layers, n_stages)
    mine = {i for s in stage_ids for i in plan[s]}
    for name in list(model.layers):
        if name not in mine:
            del model.layers[name]
    if 0 not in stage_ids:
        model.tok_embeddings = None
    if n_stages - 1 not in stage_ids:
        model.norm, model.output = None, None
    stages = []
    for s in stage_ids:
        with torch.device("meta"):  # a shell: every module below is replaced by model's own
            stage = Transformer(model.config.replace(n_layers=1))
        stage.config = model.config
        stage.layers = nn.ModuleDict({i: model.layers[i] for i in plan[s]})
        stage.tok_embeddings = model.tok_embeddings if s == 0 else None
        last = s == n_stages - 1
        stage.norm, stage.output = (model.norm, model.output) if last else (None, None)
        stages.append(stage)
    return stages


@dataclass(frozen=True)
class PipelineSchedule:
    """A torch.distributed.pipelining schedule and how stages are laid out for it."""

    cls: type
    stages_per_rank: int
    v_shape: bool  # rank r runs stages r and 2pp-1-r (ZBV, DualPipeV) instead of r, r+pp, ...

    @property
    def single(self) -> bool:
        return issubclass(self.cls, PipelineScheduleSingle)


def pipeline_schedule(name: str, stages_per_rank: int = 0) -> PipelineSchedule:
    """Look up a schedule by torch's name (case-insensitive) and check the stages per rank it
    runs; 0 picks 1 for single-stage schedules (1F1B, GPipe) and 2 for the others."""
    try:
        cls = get_schedule_class(name)
    except ValueError as e:
        raise ConfigError(f"[parallel] pp_schedule: {e}") from None
    single = issubclass(cls, PipelineScheduleSingle)
    per_rank = stages_per_rank or (1 if single else 2)
    if single and per_rank != 1:
        raise ConfigError(
            f"[parallel] pp_schedule {name} runs one stage per rank, pp_stages_per_rank is "
            f"{per_rank}: use Interleaved1F1B for more"
        )
    v_shape = cls.__name__ in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")
    if v_shape and per_rank != 2:
        raise ConfigError(f"[parallel] pp_schedule {name} runs exactly 2 stages per rank")
    return PipelineSchedule(cls, per_rank, v_shape)


class Pipeline:
    """This rank's pipeline stages and the schedule that runs them. A schedule is built per
    batch shape (its stages infer activation shapes on first use), so a sequence-length ramp or
    a validation pass gets its own."""

    def __init__(
        self,
        model: Transformer,
        pp_mesh: DeviceMesh,
        schedule: PipelineSchedule,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
    ):
        self.pp_mesh, self.schedule, self.loss_fn, self.device = pp_mesh, schedule, loss_fn, device
        self.n_stages = pp_mesh.size() * schedule.stages_per_rank
        self.stage_ids = stages_of_rank(
            pp_mesh.get_local_rank(), pp_mesh.size(), schedule.stages_per_rank, schedule.v_shape
        )
        self.modules = split_stages(model, self.stage_ids, self.n_stages)
        self.has_last = self.n_stages - 1 in self.stage_ids
        self._schedules: dict[tuple, _PipelineSchedule] = {}

    def _schedule(self, training: bool, n_micro: int, shape: tuple[int, ...]) -> _PipelineSchedule:
        key = (training, n_micro, shape)
        if key not in self._schedules:
            stages = [
                PipelineStage(m, s, self.n_stages, self.device, group=self.pp_mesh.get_group())
                for m, s in zip(self.modules, self.stage_ids)
            ]
            # forward only: GPipe takes any number of micro-batches (1F1B wants >= stages)
            single = self.schedule.single
            cls = self.schedule.cls if training or not single else ScheduleGPipe
            try:
                self._schedules[key] = cls(
                    stages[0] if single else stages,
                    n_microbatches=n_micro,
                    loss_fn=self.loss_fn,
                    scale_grads=True,
                )
            except ValueError as e:
                raise ConfigError(
                    f"[parallel] pp_schedule {cls.__name__} with {self.n_stages} stages cannot "
                    f"run {n_micro} micro-batches: {e}"
                ) from None
        return self._schedules[key]

    def run(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        n_micro: int,
        training: bool,
        **kwargs: torch.Tensor,
    ) -> torch.Tensor:
        """Forward (and backward, when training) of a whole local batch as n_micro micro-batches.
        Returns the mean micro-batch loss on the rank holding the last stage, zero elsewhere;
        gradients are averaged over the micro-batches."""
        schedule = self._schedule(training, n_micro, tuple(tokens.shape))
        losses: list[torch.Tensor] = []
        run = schedule.step if training else schedule.eval
        run(tokens, target=targets, losses=losses, return_outputs=False, **kwargs)
        if not self.has_last:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach() for loss in losses]).mean()
