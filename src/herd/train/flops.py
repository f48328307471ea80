"""Training cost from a model's shape: FLOPs per token (for MFU) and memory per device.

FLOPs follow the convention of PaLM, the Llama 3 paper's MFU figures and torchtitan: 6 FLOPs
per matmul parameter per token (forward 2, backward 4) plus 12 * layers * heads * head_dim *
seq_len for attention scores and values, counted without the causal half so figures compare
with published MFU. The embedding lookup is no matmul; the output head is one even when tied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token."""
    norms = (2 * config.n_layers + 1) * config.dim
    lookup = config.vocab_size * config.dim
    head = config.vocab_size * config.dim if config.tie_word_embeddings else 0
    return config.num_params() - norms - lookup + head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context length `seq_len`."""
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6.0 * matmul_params(config) + attention


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of a known GPU, or None (unknown GPU; the CPU is measured instead)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def measured_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """What this host's matmul reaches (the CPU has no published peak to divide by)."""
    import time

    gen = torch.Generator().manual_seed(0)  # the training RNG (dropout) stays untouched
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. fp32 parameters, gradients and AdamW state are sharded over
    tp x pp x dp_shard x cp; the bf16 parameters FSDP gathers for the step are sharded over tp x pp;
    activations are bf16 for one micro-batch per pipeline stage in flight."""

    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations


def memory_per_device(
    config: ModelConfig,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dp_shard: int = 1,
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    """Rough peak memory of one device for a layout (Korthikanti et al.'s activation model with
    a fused attention kernel, so no seq x seq scores are kept; sequence parallelism divides
    everything by tp, context parallelism the sequence by cp). FSDP is counted as the paper
    runs it: parameters are not resharded after the forward pass (no second all-gather in the
    backward), so a device holds its whole tp x pp slice in bf16 during the step."""
    # FSDP shards over the data- and context-parallel ranks together (they hold the same
    # parameters), as herd.train.parallel does
    n = config.num_params() / (tp * pp * dp_shard * cp)
    gathered = 2 * config.num_params() / (tp * pp) if dp_shard * cp > 1 else 0.0
    tokens = seq_len * micro_batch / cp
    # One layer keeps ~34 bytes per token per model dim in bf16 (inputs of every matmul,
    # norms, SwiGLU and attention), spread over tp by sequence parallelism. 1F1B keeps up to
    # pp micro-batches of its n_layers/pp layers in flight: the whole model's worth.
    per_layer = 34 * tokens * config.dim / tp
    if activation_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        layers = 2 * tokens * config.dim * config.n_layers / tp + per_layer
    else:
        layers = per_layer * config.n_layers
    logits = tokens * config.vocab_size * (2 + 4) / tp  # bf16 logits and their fp32 softmax
    return MemoryEstimate(
        params=4 * n, grads=4 * n, optimizer=8 * n, gathered=gathered, activations=layers + logits
    )


# An "80 GB" H100 holds 81,559 MiB (what nvidia-smi reports); about 1 GiB of it goes to the CUDA
# context and NCCL's buffers before training allocates anything.
H100_USABLE_BYTES = 81_559 * 2**20 - 2**30


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    memory: MemoryEstimate


def plan_layout(
    config: ModelConfig,
    gpus: int,
    seq_len: int,
    batch_tokens: int,
    gpu_memory: float = H100_USABLE_BYTES,
    gpus_per_node: int = 8,
) -> Layout:
    """The layout the paper's reasoning picks for a model on `gpus` GPUs: context parallelism
    only as far as a sequence needs it; then the shallowest pipeline, with the smallest tensor
    parallelism (within a node, dividing the key/value heads), that fits the memory model
    without recomputation (TP inside a node costs no pipeline bubble); data parallelism for
    the rest. Each data-parallel rank needs whole sequences, and a pipeline at least as many
    micro-batches as stages."""
    sequences = batch_tokens // seq_len
    powers = [2**i for i in range(20)]
    for cp in (c for c in powers if c == 1 or (c <= gpus and seq_len % (2 * c) == 0)):
        for pp in (p for p in powers if p <= config.n_layers):
            for tp in (t for t in powers if t <= gpus_per_node and config.n_kv_heads % t == 0):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                if sequences % dp or (pp > 1 and sequences // dp < pp):
                    continue
                memory = memory_per_device(config, seq_len, 1, tp, pp, cp, dp)
                if memory.total <= gpu_memory:
                    return Layout(tp, cp, pp, dp, memory)
    raise ValueError(
        f"no layout of {gpus} GPUs fits {config.num_params() / 1e9:.0f}B parameters at "
        f"{seq_len} tokens in {gpu_memory / 2**30:.1f} GiB each by the memory model"
    )
