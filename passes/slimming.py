"""slimming: sparsify BatchNorm scales, then remove the smallest (Liu et al., 2017, Network Slimming).

docs/methods.md, "slimming": train with loss += s * sum |gamma| over every BatchNorm scale, applied as
its subgradient (grad(gamma) += s * sign(gamma)) after backward, as the authors' code does; then
select by |gamma|, per group the mean over the group's norms. s defaults to 1e-4, or 1e-5 for
nets with residual adds (ResNets). A group with no norm falls back to its L1 filter score.
The paper trains 160 epochs; a budget replaces that length (s is not rescaled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pcompiler.ir import Program, tensor_of
from pcompiler.passes.l1 import group_l1, slice_magnitude
from pcompiler.passes.regularize import MethodHooks, RegMethod, has_residual_add, is_norm_param
from pcompiler.passes.select import Plan
from pcompiler.passmanager import register_pass

PAPER_EPOCHS = 160


class SparsityHooks(MethodHooks):
    def __init__(self, model: nn.Module, s: float):
        self.s = s
        self.scales = [m.weight for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]

    @torch.no_grad()
    def after_backward(self, model, step: int) -> None:
        scales = [g for g in self.scales if g.grad is not None]
        if scales:
            torch._foreach_add_([g.grad for g in scales], torch._foreach_sign(scales), alpha=self.s)

    @property
    def size(self) -> float:
        """s * sum |gamma| at the current scales (logged)."""
        return self.s * sum(float(g.detach().abs().sum()) for g in self.scales)

    def after_step(self, model, step: int) -> dict[str, Any]:
        return {"penalty": lambda: self.size}

    def summary(self) -> dict[str, Any]:
        return {"sparsity_used": self.s, "norms": len(self.scales)}


@register_pass
@dataclass(frozen=True)
class Slimming(RegMethod):
    """L1 on BatchNorm scales during training; remove the channels with the smallest |gamma|."""

    name: ClassVar[str] = "slimming"
    sparsity: float | None = None  # s; None: 1e-5 with residual adds, else 1e-4

    def paper_steps(self, prog: Program) -> int:
        return PAPER_EPOCHS * max(1, len(self.data.train) // self.train.batch_size)

    def make_hooks(self, prog: Program, budget: int, plan: Plan | None) -> SparsityHooks:
        s = self.sparsity if self.sparsity is not None else (1e-5 if has_residual_add(prog) else 1e-4)
        return SparsityHooks(prog.gm, s)

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        out = {}
        for g in prog.require_analysis(self.name).prunable:
            norms = [p for p in g.producers if is_norm_param(prog.gm, p) and p.param.endswith("weight")]
            if norms:
                out[g.id] = np.mean([slice_magnitude(tensor_of(prog.gm, p.param), p) for p in norms], axis=0)
            else:
                out[g.id] = group_l1(prog.gm, g)
        return out
