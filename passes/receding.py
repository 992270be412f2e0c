"""receding: receding neuron importances with bounded BatchNorm (RNI; Suteu & Guo, 2022).

METHODS.md, "Receding neuron importances". A bounded BN scales each normalized channel by
s = sigmoid(w) in (0, 1), and the regularizer lam * sum s'(1 - ln s') with s' = sigmoid(w + b)
pushes unimportant channels to 0 while leaving those near 1 alone, so importances become bimodal.

Converting a *trained* BN (gamma, beta) without changing its outputs (`to_bounded`):
    y = sigmoid(w) * (alpha * x_hat + delta)
with alpha = gamma / s0 a fixed buffer (it carries gamma's sign and scale) and delta = beta / s0 a
trainable shift. The start importance s0 = clip(0.5 * |gamma| / max |gamma| of the layer, 1e-3, 0.5),
so a trained model's weak channels start low, and every channel can grow to twice the layer's
largest |gamma|. The shift is multiplied by s too: a channel whose s recedes to 0 outputs 0
(not beta), so removing it changes the output by at most s * |alpha x_hat + delta|.
`to_standard` turns it back: gamma = sigmoid(w) * alpha, beta = sigmoid(w) * delta, same outputs.

Selection is global by default (RNI's own): the r-quantile of sigmoid(w) over every prunable
group, a group's importance per channel the max over its norms, at least 3 channels kept per
group. Groups without a BatchNorm get no importance and are not pruned (said in the report).
The bounded-BN parameters get 10x the learning rate and no weight decay.

Budget: the paper trains 160 epochs from scratch at lr 0.1 (BN parameters 1.0). A budget of N
steps at the regularization lr scales lam by (160 epochs * paper lr) / (N * lr), so the total
push sum(lr * lam) is the paper's (`lam_used` in the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcompiler.ir import Program
from pcompiler.passes.regularize import MethodHooks, RegMethod, has_residual_add
from pcompiler.passmanager import CompileError, register_pass

PAPER_EPOCHS = 160
PAPER_LR = 0.1
START_MAX = 0.5  # the start importance of a layer's strongest channel
START_MIN = 1e-3


class BoundedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """y = sigmoid(weight) * (scale * x_hat + bias); `scale` a buffer. Any BatchNorm dimension."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, True, bn.track_running_stats)
        self.standard = type(bn)
        gamma, beta = bn.weight.detach(), bn.bias.detach()
        top = gamma.abs().max().clamp_min(1e-12)
        s0 = (START_MAX * gamma.abs() / top).clamp(START_MIN, START_MAX)
        with torch.no_grad():
            self.weight.copy_(torch.logit(s0))
            self.bias.copy_(beta / s0)
        self.register_buffer("scale", gamma / s0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(bn, name) is not None:
                getattr(self, name).copy_(getattr(bn, name))
        self.to(bn.weight.device)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.weight)
        training = self.training or self.running_mean is None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, s * self.scale, s * self.bias,
                            training, momentum, self.eps)

    def importance(self) -> torch.Tensor:
        return torch.sigmoid(self.weight.detach())

    def to_standard(self) -> nn.modules.batchnorm._BatchNorm:
        bn = self.standard(self.num_features, self.eps, self.momentum, True, self.track_running_stats)
        s = torch.sigmoid(self.weight.detach())
        with torch.no_grad():
            bn.weight.copy_(s * self.scale)
            bn.bias.copy_(s * self.bias.detach())
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(self, name) is not None:
                    getattr(bn, name).copy_(getattr(self, name))
        return bn.to(self.weight.device).train(self.training)


def _swap(gm: nn.Module, find: type, make) -> list[str]:
    names = [n for n, m in gm.named_modules() if isinstance(m, find)]
    for n in names:
        parent, _, attr = n.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, make(gm.get_submodule(n)))
    return names


def to_bounded(gm: nn.Module) -> list[str]:
    """Replace every affine BatchNorm of `gm` (in place) by a BoundedBatchNorm with the same outputs."""
    return _swap(gm, nn.modules.batchnorm._BatchNorm,
                 lambda m: BoundedBatchNorm(m) if m.affine and not isinstance(m, BoundedBatchNorm) else m)


def to_standard(gm: nn.Module) -> list[str]:
    """Turn every BoundedBatchNorm of `gm` back into the BatchNorm it came from (same outputs)."""
    return _swap(gm, BoundedBatchNorm, lambda m: m.to_standard())


def rni_penalty(w: torch.Tensor, b: float) -> torch.Tensor:
    """sum s (1 - ln s), s = sigmoid(w + b); d/ds = -ln s. (ln s computed stably as logsigmoid.)"""
    return (torch.sigmoid(w + b) * (1 - F.logsigmoid(w + b))).sum()


class RecedingHooks(MethodHooks):
    def __init__(self, model: nn.Module, lam: float, b: float, lr_scale: float, converted: list[str]):
        self.lam, self.b, self.lr_scale, self.converted = lam, b, lr_scale, converted
        self.bounded = [m for m in model.modules() if isinstance(m, BoundedBatchNorm)]
        self.size = 0.0

    def param_groups(self, model):
        params = [p for m in self.bounded for p in (m.weight, m.bias)]
        return [{"params": params, "lr_scale": self.lr_scale, "weight_decay": 0.0}] if params else None

    def loss_term(self, model, step: int) -> torch.Tensor | None:
        if not self.bounded:
            return None
        term = self.lam * sum(rni_penalty(m.weight, self.b) for m in self.bounded)
        self.size = float(term.detach())
        return term

    def importances(self) -> torch.Tensor:
        return torch.cat([m.importance() for m in self.bounded]) if self.bounded else torch.zeros(1)

    def after_step(self, model, step: int) -> dict[str, Any]:
        return {"penalty": self.size, "receded": lambda: float((self.importances() < 0.05).float().mean()),
                "importance_mean": lambda: float(self.importances().mean())}

    def summary(self) -> dict[str, Any]:
        return {"lam_used": self.lam, "shift_used": self.b, "bounded_norms": self.converted}


@register_pass
@dataclass(frozen=True)
class Receding(RegMethod):
    """Bounded BNs whose unimportant scales recede to 0 under a -ln s push; remove them globally."""

    name: ClassVar[str] = "receding"
    global_ranking: bool = True
    min_keep: int = 3
    lam: float | None = None  # None: 1e-4 for nets with residual adds (ResNets), 1e-3 otherwise (VGG)
    shift: float | None = None  # b; None: 0 with residual adds, 3 otherwise
    lr_scale: float = 10.0  # learning-rate multiplier of the bounded-BN parameters
    scale_lam: bool = True  # scale lam by the budget (see the module docstring)

    comparable: ClassVar[bool] = True  # sigmoid importances are ranked globally as they are

    def paper_steps(self, prog: Program) -> int:
        return PAPER_EPOCHS * max(1, len(self.data.train) // self.train.batch_size)

    def lam_used(self, prog: Program, budget: int) -> tuple[float, float]:
        resnet = has_residual_add(prog)
        lam = self.lam if self.lam is not None else (1e-4 if resnet else 1e-3)
        b = self.shift if self.shift is not None else (0.0 if resnet else 3.0)
        if self.scale_lam and budget > 0 and self.train.lr > 0:
            lam *= (self.paper_steps(prog) * PAPER_LR) / (budget * self.train.lr)
        return lam, b

    def make_hooks(self, prog: Program, budget: int, ratio: float | None) -> RecedingHooks:
        converted = to_bounded(prog.gm)
        if not converted:
            raise CompileError("receding works on BatchNorm scales, and this model has no affine BatchNorm",
                               hint="use tpp, greg1 or greg2, which regularize the filters themselves")
        lam, b = self.lam_used(prog, budget)
        return RecedingHooks(prog.gm, lam, b, self.lr_scale, converted)

    def after_training(self, prog: Program, hooks: RecedingHooks) -> Program:
        importance = {}
        for name, m in prog.gm.named_modules():
            if isinstance(m, BoundedBatchNorm):
                importance[name + ".weight"] = m.importance().cpu().numpy()
        to_standard(prog.gm)
        prog.gm.recompile()
        info = {**prog.info, "receding_importance": importance}
        return prog.replace(info=info)

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        importance = prog.info.get("receding_importance", {})
        out = {}
        for g in prog.require_analysis(self.name).prunable:
            per = [importance[p.param][p.index[:, 0]] for p in g.producers if p.param in importance]
            if per:
                out[g.id] = np.max(per, axis=0)
        return out
