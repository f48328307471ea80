"""`herd distill`: a student trained on a teacher's next-token distributions (logit
distillation, as Llama 3.2 1B and 3B learnt from 8B and 70B logits).

The FineTuner with two changes: the student is the recipe's base with only the `[distill]
layers` blocks kept (embeddings, norm and head stay, so the vocabulary is the teacher's), and the
loss compares its distribution at every trained position with the frozen teacher's. The newest
student is also written as an HF checkpoint to RUN/student, for `Llama.load(..., draft=...)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.checkpoint import save_model
from herd.config.distill import DistillConfig
from herd.config.train import ConfigError
from herd.finetune.trainer import FineTuner, load_base, replace_directory
from herd.model import Transformer
from herd.tokenizer import Tokenizer
from herd.train.trainer import IGNORE, Batch

STUDENT_DIR = "student"


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """kl_weight * T^2 * KL(teacher_T || student_T) + (1 - kl_weight) * CE(student, targets),
    each a mean over positions; logits (n, vocab) in float32. T^2 keeps the soft term's gradient
    scale independent of T (Hinton et al. 2015)."""
    s = student.float() / temperature
    t = teacher.float() / temperature
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
    loss = kl_weight * temperature**2 * kl
    if kl_weight < 1:
        loss = loss + (1 - kl_weight) * F.cross_entropy(student.float(), targets)
    return loss


def keep_layers(model: Transformer, layers: list[int]) -> Transformer:
    """A model of the blocks `layers` of `model`, in that order, with its embeddings, final
    norm and head; the weights are copied."""
    n = model.config.n_layers
    if any(i >= n for i in layers):
        raise ConfigError(f"[distill] layers {layers}: the base's blocks are 0 to {n - 1}")
    device = model.tok_embeddings.weight.device
    with torch.device(device):
        student = Transformer(dataclasses.replace(model.config, n_layers=len(layers)))
    state = {}
    for name, value in model.state_dict().items():
        if not name.startswith("layers."):
            state[name] = value
            continue
        _, index, rest = name.split(".", 2)
        if int(index) in layers:
            state[f"layers.{layers.index(int(index))}.{rest}"] = value
    student.load_state_dict(state)
    return student


class Distiller(FineTuner):
    config: DistillConfig

    def __init__(self, config: DistillConfig, resume: bool | str | Path = False):
        super().__init__(config, resume)
        self.teacher = load_base(config.distill.teacher).to(self.device).eval()
        self.teacher.requires_grad_(False)
        t, s = self.teacher.config.vocab_size, self.model_config.vocab_size
        if t != s:
            raise ConfigError(
                f"the teacher's vocabulary has {t} ids and the student's {s}: start the "
                "student from the teacher (the default base) or a model of its family"
            )

    def _build_model(self) -> Transformer:
        model = super()._build_model()
        layers = self.config.distill.layers
        return keep_layers(model, layers) if layers else model

    def loss(self, batch: Batch) -> torch.Tensor:
        tokens, targets, positions, mask = self._inputs(batch)
        keep = targets != IGNORE
        with self._autocast():
            student = self._forward(tokens, positions, mask, keep=keep)
            with torch.no_grad():
                teacher = self.teacher(tokens, positions, mask, keep=keep)
        d = self.config.distill
        return distill_loss(student, teacher, targets[keep], d.temperature, d.kl_weight)

    @torch.no_grad()
    def agreement(self, batches: int = 8) -> float | None:
        """Share of validation positions where the student's likeliest next token is the
        teacher's: the acceptance rate of its greedy drafts, token by token."""
        loader = self._validation_loader()
        if loader is None:
            return None
        self.model.eval()
        same = total = 0
        for i in range(min(batches, loader.batches_per_epoch)):
            tokens, targets, positions, mask = self._inputs(loader.batch(0, i))
            keep = targets != IGNORE
            with self._autocast():
                student = self.model(tokens, positions, mask, keep=keep).argmax(-1)
                teacher = self.teacher(tokens, positions, mask, keep=keep).argmax(-1)
            same += int((student == teacher).sum())
            total += len(student)
        self.model.train()
        return same / total if total else None

    def save(self) -> Path:
        path = super().save()
        if self.is_main:
            write_student(self.model, self.tokenizer, self.run_dir / STUDENT_DIR)
        return path


def write_student(model: Transformer, tokenizer: Tokenizer, out: Path) -> None:
    """The student as an HF checkpoint with its tokenizer, replaced whole."""
    replace_directory(out, lambda tmp: save_model(model, tmp, format="hf", tokenizer=tokenizer))


__all__ = ["Distiller", "distill_loss", "keep_layers"]
