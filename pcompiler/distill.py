"""Distillation from the input model (Hinton et al., 2015): the loss term and the teacher's lending.

With a teacher, the training loss is (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T)
|| softmax(z_s / T)). The teacher sees the student's (augmented) batch, in eval mode under
no_grad, on the training device and inside autocast; under DDP each rank runs it on its own share
of the batch. It is never trained, and never moved: where it does not live on the training
device, a copy made there runs (`runtime.placed`); its modes are restored after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pcompiler.errors import CompileError
from pcompiler.runtime import placed

if TYPE_CHECKING:
    from pcompiler.train import TrainConfig


@dataclass(frozen=True)
class Distillation:
    """How a teacher's logits z_t join the loss: temperature T (> 0) softens both distributions,
    alpha (in [0, 1]) weighs the T^2 * KL term against the cross-entropy (0: cross-entropy only).
    The defaults are a common choice in the distillation literature; docs/bench_distill.md compares others."""

    temperature: float = 4.0
    alpha: float = 0.9

    def check(self, label: str) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise CompileError(f"{label}: distillation temperature must be > 0, got {self.temperature}",
                               hint="e.g. --distill-temperature 4; 1 leaves the teacher's probabilities as they are")
        if not 0.0 <= self.alpha <= 1.0:
            raise CompileError(f"{label}: distillation alpha must be in [0, 1], got {self.alpha}",
                               hint="e.g. --distill-alpha 0.9; 0 is cross-entropy only, 1 the teacher only")


def with_teacher(cfg: TrainConfig, teacher: nn.Module | None) -> TrainConfig:
    """`cfg` for a run with `teacher`: the default `Distillation` when it sets none; unchanged without one."""
    if teacher is None or cfg.distill is not None:
        return cfg
    return dataclasses.replace(cfg, distill=Distillation())


def distill_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                            reduction="batchmean", log_target=True)


def check_teacher(model: nn.Module, teacher: nn.Module | None, cfg: TrainConfig) -> None:
    """A teacher comes with distillation settings and never shares weights with the model trained."""
    if (teacher is None) != (cfg.distill is None):
        given, missing = ("a teacher", "TrainConfig.distill") if cfg.distill is None else ("distill", "teacher")
        raise CompileError(f"{cfg.label}: {given} is set but {missing} is not",
                           hint="pass both (teacher=the input model, distill=Distillation(...)), or neither")
    if teacher is None:
        return

    def storages(m: nn.Module) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers())
                if t.device.type != "meta" and t.numel()}

    if storages(model) & storages(teacher):
        raise CompileError(f"{cfg.label}: the teacher shares weights with the model being trained",
                           hint="pass the input model (or a copy of it) as teacher, not the model being trained")


@contextlib.contextmanager
def lent(teacher: nn.Module | None, device: torch.device) -> Iterator[nn.Module | None]:
    """The teacher on `device` in eval mode for the block (itself, or a copy made there); every
    module's mode restored after."""
    if teacher is None:
        yield None
        return
    modes = [(m, m.training) for m in teacher.modules()]
    net = placed(teacher, device)
    for m in net.modules():
        m.training = False  # not .eval(): a torch.export module refuses it
    try:
        yield net
    finally:
        for m, mode in modes:
            m.training = mode
