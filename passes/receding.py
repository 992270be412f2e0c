"""receding: receding neuron importances with bounded BatchNorm (RNI; Suteu & Guo, 2022).

docs/methods.md, "Receding neuron importances". A bounded BN scales each normalized channel by
s = sigmoid(w) in (0, 1), and the regularizer lam * sum s'(1 - ln s') with s' = sigmoid(w + b)
pushes unimportant channels to 0 while leaving those near 1 alone, so importances become bimodal.

Converting a *trained* BN (gamma, beta) without changing its outputs (`to_bounded`):
    y = sigmoid(w) * (alpha * x_hat + delta)
with alpha = gamma / s0 a fixed buffer (it carries gamma's sign and scale) and delta = beta / s0 a
trainable shift. The start importance s0 = clip(start * |gamma| / max |gamma| of the layer, 1e-3,
start) with start = 0.9: each layer's strongest channels start near 1, where -ln s is small,
and anchor the layer's scale, so the next norm cannot hide a uniform shrink. (With the strongest
at 0.5 and every channel pushed, importances fall together instead of polarizing.) The shift is multiplied by s too: a channel
whose s recedes to 0 outputs 0 (not beta), so removing it changes the output by at most
s * |alpha x_hat + delta|. `to_standard` turns it back: gamma = sigmoid(w) * alpha,
beta = sigmoid(w) * delta, same outputs.

On a trained model, with a target ratio r (`adapt`, the default): every 10 steps the method's own
selection runs on the current importances (a group's channel scored by the max over its norms,
so a residual stream's norms are pushed together; the ratio, global or layer-wise ranking,
min_keep and round_to as at the end), the channels it would remove carry the regularizer, and lam
grows geometrically (by up to `adapt_range` over the first half of the budget) until 95% of those
have receded below 0.05. The importances end in two modes: the pushed near 0, the rest where the
loss wants them.

Selection is global by default (RNI's own): the r-quantile of sigmoid(w) over every prunable
group, a group's importance per channel the max over its norms, at least 3 channels kept per
group. Groups without a BatchNorm get no importance and are not pruned (said in the report).
The bounded-BN parameters get 10x the learning rate and no weight decay.

Budget: the paper trains 160 epochs from scratch at lr 0.1 (BN parameters 1.0). A budget of N
steps at the regularization lr scales the starting lam by (160 epochs * paper lr) / (N * lr), so
the total push sum(lr * lam) is at least the paper's (`lam_used` in the report).
`from_scratch` is the paper's own setting: the network is re-initialized (each module's
`reset_parameters`), the bounded BNs start at w ~ N(0, 1) with alpha = 1 and delta = 0, and it
trains for the budget with the paper's fixed lam and b (1e-4 and 0 with residual adds, 1e-3 and
3 otherwise), no ratio target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcompiler.errors import CompileError
from pcompiler.ir import Program, Selection, tensor_of
from pcompiler.passes.regularize import MethodHooks, RegMethod, has_residual_add
from pcompiler.passes.select import Plan, candidates, select
from pcompiler.passmanager import register_pass

PAPER_EPOCHS = 160
PAPER_LR = 0.1
START_MAX = 0.9  # the start importance of a layer's strongest channel (measured: docs/benchmarks.md)
START_MIN = 1e-3
RECEDED = 0.05  # an importance below this has receded


class BoundedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """y = sigmoid(weight) * (scale * x_hat + bias); `scale` a buffer. Any BatchNorm dimension."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, start: float = START_MAX):
        super().__init__(bn.num_features, bn.eps, bn.momentum, True, bn.track_running_stats,
                         device=bn.weight.device, dtype=bn.weight.dtype)
        self.standard = type(bn)
        gamma, beta = bn.weight.detach(), bn.bias.detach()
        top = gamma.abs().max().clamp_min(1e-12)
        s0 = (start * gamma.abs() / top).clamp(START_MIN, start)
        with torch.no_grad():
            self.weight.copy_(torch.logit(s0))
            self.bias.copy_(beta / s0)
        self.register_buffer("scale", gamma / s0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(bn, name) is not None:
                getattr(self, name).copy_(getattr(bn, name))

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
        bn = self.standard(self.num_features, self.eps, self.momentum, True, self.track_running_stats,
                           device=self.weight.device, dtype=self.weight.dtype)
        s = torch.sigmoid(self.weight.detach())
        with torch.no_grad():
            bn.weight.copy_(s * self.scale)
            bn.bias.copy_(s * self.bias.detach())
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(self, name) is not None:
                    getattr(bn, name).copy_(getattr(self, name))
        return bn.train(self.training)


def _swap(gm: nn.Module, find: type, make) -> list[str]:
    names = [n for n, m in gm.named_modules() if isinstance(m, find)]
    for n in names:
        parent, _, attr = n.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, make(gm.get_submodule(n)))
    return names


def to_bounded(gm: nn.Module, start: float = START_MAX) -> list[str]:
    """Replace every affine BatchNorm of `gm` (in place) by a BoundedBatchNorm with the same outputs."""
    return _swap(gm, nn.modules.batchnorm._BatchNorm,
                 lambda m: BoundedBatchNorm(m, start) if m.affine and not isinstance(m, BoundedBatchNorm) else m)


def to_standard(gm: nn.Module) -> list[str]:
    """Turn every BoundedBatchNorm of `gm` back into the BatchNorm it came from (same outputs)."""
    return _swap(gm, BoundedBatchNorm, lambda m: m.to_standard())


def bimodality(s: np.ndarray) -> dict[str, float]:
    """How polarized importances are: the shares of channels that receded (s < 0.05), that stayed
    (s > 0.5), and in between. Two modes: the first two add up to nearly 1."""
    if not len(s):
        return {"receded": 0.0, "stayed": 0.0, "between": 0.0}
    receded, stayed = float((s < RECEDED).mean()), float((s > 0.5).mean())
    return {"receded": receded, "stayed": stayed, "between": 1.0 - receded - stayed}


def reinitialize(gm: nn.Module) -> None:
    """Every module's parameters drawn anew by its own `reset_parameters`, running statistics reset."""
    for m in gm.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()


def rni_penalty(w: torch.Tensor, b: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum s (1 - ln s), s = sigmoid(w + b); d/ds = -ln s. (ln s computed stably as logsigmoid.)
    With `mask`, only the channels where it is 1."""
    per = torch.sigmoid(w + b) * (1 - F.logsigmoid(w + b))
    return (per if mask is None else per * mask.to(per)).sum()


class RecedingHooks(MethodHooks):
    """The RNI loss term. With a `target` (the ratio), only the channels the final selection would
    remove carry it (`choose`, re-run every `interval` steps on the current importances), and lam
    grows by `grow` per interval (up to `lam_max`) until 95% of those have receded (s < RECEDED)."""

    def __init__(self, model: nn.Module, lam: float, b: float, lr_scale: float, converted: list[str],
                 target: float | None = None, grow: float = 1.0, interval: int = 10, lam_max: float = math.inf,
                 groups: dict[int, list[tuple[int, torch.Tensor]]] | None = None,
                 choose: Callable[[dict[int, np.ndarray]], Selection] | None = None):
        self.lam, self.b, self.lr_scale, self.converted = lam, b, lr_scale, converted
        self.lam_start, self.target, self.grow, self.interval = lam, target, grow, interval
        self.lam_max, self.choose = lam_max, choose
        self.groups = groups or {}  # per prunable group id: (index into self.bounded, channel -> norm position)
        self.bounded = [m for m in model.modules() if isinstance(m, BoundedBatchNorm)]
        self.size = 0.0
        self.receded = 0.0
        self.masks: list[torch.Tensor] | None = None  # with a target: the channels pushed (the lowest ranked)

    def group_importance(self) -> dict[int, torch.Tensor]:
        """Per channel group, each channel's importance: the max of its norms' sigmoid(w)."""
        imps = [m.importance() for m in self.bounded]
        return {gid: torch.stack([imps[k][idx] for k, idx in members]).amax(0) for gid, members in self.groups.items()}

    def rank_masks(self, importance: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Per norm, 1 for the channels the final selection would remove given the groups'
        `importance` (`choose`: the method's own selection, with its ratio, ranking, min_keep and
        round_to). Coupled norms (a residual stream's) are pushed together."""
        selection = self.choose({gid: s.cpu().numpy() for gid, s in importance.items()})
        masks = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.bounded]
        for gid, chans in selection.items():
            for k, idx in self.groups[gid]:
                masks[k][idx[list(chans)]] = 1.0
        return masks

    def pushed_done(self) -> bool:
        """Whether nearly every pushed channel receded (then lam stops growing)."""
        s = torch.cat([m.importance() for m in self.bounded])
        pushed = torch.cat(self.masks) > 0
        return not bool(pushed.any()) or float((s[pushed] < RECEDED).float().mean()) >= 0.95

    def param_groups(self, model):
        params = [p for m in self.bounded for p in (m.weight, m.bias)]
        return [{"params": params, "lr_scale": self.lr_scale, "weight_decay": 0.0}] if params else None

    def loss_term(self, model, step: int) -> torch.Tensor | None:
        if not self.bounded:
            return None
        if self.target is not None and self.groups and self.masks is None:
            self.masks = self.rank_masks(self.group_importance())
        masks = self.masks or [None] * len(self.bounded)
        term = self.lam * sum(rni_penalty(m.weight, self.b, mask) for m, mask in zip(self.bounded, masks))
        self.size = term.detach()  # a tensor on the device: the loop reads it at log points
        return term

    def after_step(self, model, step: int) -> dict[str, float]:
        if self.target is not None and self.groups and step % self.interval == 0:
            importance = self.group_importance()
            self.receded = float((torch.cat(list(importance.values())) < RECEDED).float().mean())
            if self.masks is not None and not self.pushed_done():
                self.lam = min(self.lam * self.grow, self.lam_max)
            self.masks = self.rank_masks(importance)
        return {"penalty": self.size, "receded": self.receded, "lambda": self.lam}

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "receded": self.receded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.receded = state["lam"], state["receded"]

    def summary(self) -> dict[str, Any]:
        imps = list(self.group_importance().values()) if self.groups else [m.importance() for m in self.bounded]
        s = torch.cat(imps).cpu().numpy() if imps else np.zeros(0)
        return {"bimodality": bimodality(s), "lam_used": self.lam_start, "lam_final": self.lam, "shift_used": self.b,
                "target_receded": self.target, "bounded_norms": self.converted}


@register_pass
@dataclass(frozen=True)
class Receding(RegMethod):
    """Bounded BNs whose unimportant scales recede to 0 under a -ln s push; remove them globally."""

    name: ClassVar[str] = "receding"
    global_ranking: bool = True
    min_keep: int = 3
    lam: float | None = None  # None: 1e-4 for nets with residual adds (ResNets), 1e-3 otherwise (VGG)
    shift: float | None = None  # b; None: 0 (from_scratch: the paper's 0 with residual adds, 3 otherwise)
    lr_scale: float = 10.0  # learning-rate multiplier of the bounded-BN parameters
    scale_lam: bool = True  # scale lam by the budget (see the module docstring)
    start: float = START_MAX  # start importance of each layer's strongest channel
    adapt: bool = True  # push the channels the selection would remove now, lam growing until they recede
    adapt_range: float = 1000.0  # how far lam may grow over the first half of the budget
    from_scratch: bool = False  # the paper's setting: re-initialize, train with its fixed lam and b

    comparable: ClassVar[bool] = True  # sigmoid importances are ranked globally as they are

    def paper_steps(self, prog: Program) -> int:
        return PAPER_EPOCHS * max(1, len(self.data.train) // self.train.batch_size)

    def lam_used(self, prog: Program, budget: int) -> tuple[float, float]:
        resnet = has_residual_add(prog)
        lam = self.lam if self.lam is not None else (1e-4 if resnet else 1e-3)
        paper_b = 0.0 if resnet or not self.from_scratch else 3.0
        b = self.shift if self.shift is not None else paper_b
        if self.scale_lam and not self.from_scratch and budget > 0 and self.train.lr > 0:
            lam *= (self.paper_steps(prog) * PAPER_LR) / (budget * self.train.lr)
        return lam, b

    def make_hooks(self, prog: Program, budget: int, plan: Plan | None) -> RecedingHooks:
        if self.from_scratch:
            reinitialize(prog.gm)
        converted = to_bounded(prog.gm, self.start)
        if not converted:
            raise CompileError("receding works on BatchNorm scales, and this model has no affine BatchNorm",
                               hint="use tpp, greg1 or greg2, which regularize the filters themselves")
        lam, b = self.lam_used(prog, budget)
        if self.from_scratch:
            with torch.no_grad():
                for m in prog.gm.modules():
                    if isinstance(m, BoundedBatchNorm):  # the paper's y = sigmoid(w) x_hat, w ~ N(0, 1)
                        m.weight.normal_()
                        m.scale.fill_(1.0)
                        m.bias.zero_()
            return RecedingHooks(prog.gm, lam, b, self.lr_scale, converted)
        if not self.adapt:
            return RecedingHooks(prog.gm, lam, b, self.lr_scale, converted)
        interval = 10
        grow = math.exp(math.log(self.adapt_range) * interval / max(budget / 2, interval))
        target = None if self.searched else self.ratio
        analysis = prog.require_analysis(self.name)
        return RecedingHooks(prog.gm, lam, b, self.lr_scale, converted, target, grow, interval,
                             lam_max=lam * self.adapt_range, groups=self.norm_groups(prog),
                             choose=lambda scores: select(analysis, scores, self, target))

    def norm_groups(self, prog: Program) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """For each prunable group with a bounded BN among its producers: (position of the BN in
        the model's bounded BNs, the BN position of each channel of the group)."""
        position = {name + ".weight": k for k, (name, m) in enumerate(
            (n, m) for n, m in prog.gm.named_modules() if isinstance(m, BoundedBatchNorm))}
        out = {}
        for g in candidates(prog.require_analysis(self.name), self.skip):
            members = [(position[p.param], torch.as_tensor(p.index[:, 0], device=tensor_of(prog.gm, p.param).device))
                       for p in g.producers if p.param in position]
            if members:
                out[g.id] = members
        return out

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
