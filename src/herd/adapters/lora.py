"""LoRA: a frozen linear layer plus a trained low-rank update, y = W x + (alpha / r) B A x.

`apply_lora` swaps the targeted `nn.Linear`s of a `Transformer` for `LoRALinear`s holding the
original layer; A is initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B at zero, so
the adapted model starts equal to the base. Everything but A and B is frozen. `merge_lora`
folds B A into the weights and swaps the plain layers back. Adapter weights are addressed by
the adapted layer's Meta name ("layers.0.attention.wq"), the form checkpoint/peft.py converts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.config.adapter import LoraConfig


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, config: LoraConfig):
        super().__init__()
        self.base = base
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    def delta(self) -> torch.Tensor:
        """The update (alpha / r) B A as a weight (out_features, in_features), in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, str]]:
    """(Meta name, parent module, attribute) of each linear layer to adapt."""
    found = []
    for name, module in model.named_modules():
        for attr in config.targets:
            child = getattr(module, attr, None)
            if isinstance(child, nn.Linear):
                found.append((f"{name}.{attr}" if name else attr, module, attr))
    return found


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Adapt `model` in place; only the LoRA weights train afterwards."""
    targets = _targets(model, config)
    if "output" in config.targets and not isinstance(getattr(model, "output", None), nn.Linear):
        raise ValueError(
            "this model's output head is its token embedding (tied): adapting it would change "
            "the embedding when merged; leave 'output' out of the targets"
        )
    if not targets:
        raise ValueError(f"the model has no linear layers named {', '.join(config.targets)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, parent, attr in targets:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by Meta name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{Meta layer name: (A, B)}: what an adapter checkpoint holds."""
    return {name: (m.lora_A.detach(), m.lora_B.detach()) for name, m in lora_layers(model).items()}


def load_lora_state_dict(
    model: nn.Module, state: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Copy adapter weights into an adapted model; names and shapes must match exactly."""
    layers = lora_layers(model)
    if set(state) != set(layers):
        missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise ValueError(
            f"the adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, (a, b) in state.items():
            layer = layers[name]
            if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                raise ValueError(
                    f"{name}: the adapter's A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"this model's {tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)} "
                    "(an adapter for another base model?)"
                )
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)


def fold_adapter(
    model: nn.Module, config: LoraConfig, state: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> nn.Module:
    """Apply an adapter's weights to `model` and fold them in at once (no LoRA layers stay,
    and the parameters train or not as before)."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_lora(model, config)
    load_lora_state_dict(model, state)
    merge_lora(model)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear layers back."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        setattr(parent, attr, layer.base)
    return model


class MultiLoRALinear(nn.Module):
    """A frozen linear layer serving several adapters in one batch, the base weights shared (as
    vLLM's multi-LoRA serving): row r of the batch gets adapter `rows[r]` (None: the base)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.rows: list[int | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.rows:
            return y
        for index in set(self.rows) & set(self.adapters):
            a, b, scaling = self.adapters[index]
            picked = torch.tensor([r == index for r in self.rows], device=x.device)
            y[picked] += F.linear(F.linear(x[picked], a), b) * scaling
        return y


def attach_adapters(
    model: nn.Module,
    adapters: list[tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]],
) -> None:
    """Give `model` adapters 0, 1, ... (each a config and its {Meta layer name: (A, B)}) for
    `select_adapters` to pick per batch row; the model's own weights are untouched."""
    for index, (config, state) in enumerate(adapters):
        for name, (a, b) in state.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, attr, None)
            if layer is None or not isinstance(layer, (nn.Linear, MultiLoRALinear)):
                raise ValueError(f"adapter {index}: {name} is not a linear layer of this model")
            if isinstance(layer, nn.Linear):
                layer = MultiLoRALinear(layer)
                setattr(parent, attr, layer)
            weight = layer.base.weight
            if (a.shape[1], b.shape[0]) != (weight.shape[1], weight.shape[0]):
                raise ValueError(
                    f"adapter {index}: {name} A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"the layer's {tuple(weight.shape)} weight (an adapter for another model?)"
                )
            factory = {"device": weight.device, "dtype": weight.dtype}
            layer.adapters[index] = (a.to(**factory), b.to(**factory), config.scaling)


def select_adapters(model: nn.Module, rows: list[int | None] | None) -> None:
    """The adapter of each row of the next batches (None: the base model's)."""
    for module in model.modules():
        if isinstance(module, MultiLoRALinear):
            module.rows = rows
