"""tpp: trainability-preserving pruning (Wang & Fu, ICLR 2023).

docs/methods.md, "TPP":
1. S_g by L1 score once, before training.
2. lambda(t): delta every K_u steps up to tau, one value shared by all groups.
3. Gram decorrelation: for every conv/linear producer weight W (N x K after moving the
   producing dim first and flattening), G = W W^T and T = G.detach() with the rows and columns of
   the pruned filters set to zero; loss += lw * lambda(t) * sum over layers of mean((G - T)^2).
   A weight whose rows belong to several groups (a concat, a split) has its pruned rows united.
   Its weight per layer is lw * min(lambda(t), that layer's stability cap, `gram_lambda_cap`).
4. L2 with lambda(t) on the pruned producer weights and biases (`l2_weights`), and on the pruned
   norm scales and shifts (`l2_norm`); both on by default.
5. Stabilization: K_s steps with lambda at tau; the pruned producer slices of the i-th layer (in
   graph order) are set to exactly zero once (i+1) * zero_interval stabilization steps passed.
   A "layer" here is a channel group: coupled producers (a conv and its norm, the convs feeding
   one residual stream) lose their slices at the same step.
   The paper's zero_interval is 100 steps of a 10k-step K_s; a budget scales both.

A step budget N fits the schedule as GReg-1's (`regularize.Budget`): lengths scale by N / L0,
lambda (and with it the Gram term's weight) by the factor that keeps the paper's total push.

Cost: the Gram term is computed from A = W_S W^T (|S| x N, see `gram_term`), and a weight whose
pruned rows are all zero (zeroed in stabilization) contributes nothing and is skipped. Even so,
its exact value and gradient cost about 3 |S| N K multiply-adds per layer, close to a plain
training step on a CNN at small inputs; so it is applied on every `gram_every`-th step (4) with
`gram_every` times its weight: the same total push, its pulses smoothed by momentum, within the
stability cap (divided by `gram_every`). `-p gram_every=1` computes it every step, as the paper.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pcompiler.errors import CompileError
from pcompiler.ir import Program, tensor_of
from pcompiler.passes.regularize import (
    PAPER_LR,
    Budget,
    ChannelPenalty,
    Growth,
    MethodHooks,
    RegMethod,
    fixed_selection,
    is_filter,
    is_norm_param,
)
from pcompiler.passes.select import Plan
from pcompiler.passmanager import register_pass
from pcompiler.train import TrainConfig


def gram_term(w: torch.Tensor, dim: int, pruned: torch.Tensor) -> torch.Tensor:
    """mean((G - T)^2) over the N x N Gram matrix G = W W^T of `w`, whose rows along `dim` are
    its N filters; T = G.detach() with the rows and columns of `pruned` (distinct row indices, on
    `w`'s device) set to zero.

    G - T is G on the pruned rows and columns and identically 0 (value and gradient) elsewhere, so
    with A = W_S W^T (|S| x N) the sum is 2 sum(A^2) - sum(A[:, S]^2) (the S x S block lies in both
    the rows and the columns): |S| / N of the N x N product's cost, the same loss and gradient."""
    n = w.shape[dim]
    rows = w.movedim(dim, 0).reshape(n, -1)
    a = rows[pruned] @ rows.t()
    return (2 * a.square().sum() - a[:, pruned].square().sum()) / (n * n)


def gram_lambda_cap(w: torch.Tensor, dim: int, lw: float, train: TrainConfig) -> float:
    """The largest lambda at which SGD steps the Gram term of `w` stably.

    The term's curvature along a filter row is at most 12 * lw * lambda * ||W||_2^2 / N^2 (W the
    N x K filter matrix; the pruned rows' Gram entries w_i . w_j, squared and averaged over N^2:
    4 W^T W from the entries with the other rows, 12 |w_i|^2 from a pruned row's own |w_i|^4).
    The pruned rows also carry the L2 penalty, whose lr * lambda may reach 1 + momentum
    (`lambda_cap`); heavy-ball SGD is stable while lr times the summed curvature stays below
    2 * (1 + momentum), so the Gram term gets half of what is left: lr * curvature <= (1 + momentum) / 2.
    ||W||_2 by power iteration, with a 10% margin."""
    rows = w.detach().movedim(dim, 0).reshape(w.shape[dim], -1).float()
    v = torch.ones(rows.shape[1], device=rows.device)
    for _ in range(30):
        v = rows.t() @ (rows @ v)
        v = v / v.norm().clamp_min(1e-30)
    sigma_sq = 1.1 * float((rows @ v).square().sum())
    n = rows.shape[0]
    return 0.5 * (1.0 + train.momentum) * n * n / max(12.0 * lw * sigma_sq * train.lr, 1e-30)


class TPPHooks(MethodHooks):
    def __init__(self, prog: Program, method: TPP, selection, growth: Growth, zero_interval: int):
        analysis = prog.require_analysis("tpp")
        gm = prog.gm
        self.method, self.growth, self.zero_interval = method, growth, zero_interval
        self.selection = dict(selection)
        groups = [analysis.groups[g] for g in selection]

        def l2_on(p) -> bool:
            if p.role != "produce" or p.is_buffer:
                return False
            return method.l2_norm if is_norm_param(gm, p) else method.l2_weights

        self.penalty = ChannelPenalty(gm, groups, l2_on)  # lambda(t) times 1 on the pruned channels
        self.penalty.set_lambda({g.id: self._mask(g.size, self.selection[g.id]) for g in groups})
        # Per producer weight: its pruned rows, united over the groups that own rows of it.
        order = {name: i for i, (name, _) in enumerate(gm.named_parameters())}
        rows: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
        owners: dict[tuple[str, int], set[int]] = defaultdict(set)  # the layers that own pruned rows of a weight
        self.layers = []  # per group, in graph order: its pruned producer slices, zeroed together
        for g in sorted(groups, key=lambda g: min(order.get(p.param, 0) for p in g.producers)):
            ch = list(self.selection[g.id])
            slices = []
            for p in g.producers:
                if not p.is_buffer:
                    t = tensor_of(gm, p.param)
                    slices.append((t, p.dim, torch.as_tensor(p.index[ch].ravel(), device=t.device)))
                    if is_filter(gm, p):
                        rows[(p.param, p.dim)].append(p.index[ch].ravel())
                        owners[(p.param, p.dim)].add(len(self.layers))
            self.layers.append(slices)
        # (weight, dim, its pruned rows on its device, the last layer that owns some of them)
        self.grams = [(tensor_of(gm, k[0]), k[1],
                       torch.as_tensor(np.unique(np.concatenate(v)), device=tensor_of(gm, k[0]).device), max(owners[k]))
                      for k, v in sorted(rows.items(), key=lambda kv: order.get(kv[0][0], 0))]
        self.zeroed = 0  # layers whose pruned slices stabilization has set to 0 (self.layers[:zeroed])
        # Each weight's Gram term uses min(lambda(t), its stability cap); keyed by the tensor's id.
        self.gram_caps = {id(w): gram_lambda_cap(w, dim, method.lw, method.train) for w, dim, _, _ in self.grams}
        self.lam = 0.0
        self.stabilize_from: int | None = None if self.selection else 0
        self.gram_size = 0.0
        self.push = 0.0  # sum of lr * lambda so far
        self.schedule_fit: dict[str, Any] = {}

    @staticmethod
    def _mask(n: int, chans) -> torch.Tensor:
        m = torch.zeros(n)
        m[list(chans)] = 1.0
        return m

    def loss_term(self, model, step: int) -> torch.Tensor | None:
        k = self.method.gram_every
        if step % k:
            return None
        self.gram_size = 0.0  # the term's size: a tensor on the device, read by the loop at log points
        if self.lam == 0.0:
            return None
        grams = self.live_grams()
        if not grams:
            return None
        # every k-th step, k times as heavy; the stability cap then applies to the heavier term
        terms = [(k * min(self.lam, self.gram_caps[id(w)] / k), gram_term(w, dim, idx)) for w, dim, idx in grams]
        self.gram_size = sum(t.detach() for _, t in terms)
        return self.method.lw * sum(lam * t for lam, t in terms)

    def live_grams(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """The Gram terms to compute. Once stabilization zeroes layers, a weight whose pruned rows
        all belong to zeroed layers (exactly 0 since the last step) is left out: its G - T is 0, and
        so is its gradient (proportional to (G - T) W): the loss and the gradient are the same
        without it. Known from the schedule, not read from the weights (no device sync)."""
        return [(w, dim, idx) for w, dim, idx, last in self.grams if last >= self.zeroed]

    def after_backward(self, model, step: int) -> None:
        self.penalty.add_grad(self.lam)

    def after_step(self, model, step: int) -> dict[str, Any]:
        self.push += self.lr_at(step - 1) * self.lam
        if self.stabilize_from is None and step % self.growth.interval == 0:
            if self.lam >= self.growth.ceiling:
                self.stabilize_from = step
            else:
                self.lam = min(self.growth.ceiling, self.lam + self.growth.delta)
        if self.stabilize_from is not None:
            self._zero_out(step - self.stabilize_from)
        return {"penalty": lambda: self.penalty.size(self.lam), "gram": self.gram_size, "lambda": self.lam}

    @torch.no_grad()
    def _zero_out(self, since: int) -> None:
        """Zero the pruned slices of the first since // zero_interval layers. A zeroed slice is
        zeroed again every step: momentum and weight decay would move it off 0."""
        self.zeroed = min(len(self.layers), max(0, since // self.zero_interval))
        for slices in self.layers[:self.zeroed]:
            for w, dim, idx in slices:
                w.index_fill_(dim, idx, 0.0)

    def finished(self, step: int) -> bool:
        return self.stabilize_from is not None and step >= self.stabilize_from + self.growth.stabilize

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "stabilize_from": self.stabilize_from, "push": self.push}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.stabilize_from = state["lam"], state["stabilize_from"]
        self.push = state.get("push", 0.0)  # absent from checkpoints written before the push was tracked

    def summary(self) -> dict[str, Any]:
        return {"schedule": dataclasses.asdict(self.growth), "schedule_fit": self.schedule_fit, "push_delivered": self.push,
                "gram_lambda_cap": min(self.gram_caps.values(), default=None), "gram_every": self.method.gram_every,
                "gram_layers_capped": sum(cap < self.growth.ceiling for cap in self.gram_caps.values()),
                "zero_interval": self.zero_interval,
                "stabilization_started_at": self.stabilize_from, "layers_zeroed": len(self.layers)}


@register_pass
@dataclass(frozen=True)
class TPP(RegMethod):
    """Decorrelate the pruned filters from the kept ones (Gram term) while an L2 penalty grows."""

    name: ClassVar[str] = "tpp"
    selects_by_l1: ClassVar[bool] = True
    delta: float = 1e-4
    interval: int = 10
    ceiling: float = 1.0
    stabilize: int = 10_000
    zero_interval: int = 100  # stabilization steps between zeroing one layer and the next (paper scale)
    lw: float = 1000.0  # weight of the Gram term
    gram_every: int = 4  # the Gram term on every k-th step, k times as heavy (the same push; 1: every step)
    l2_weights: bool = True  # L2 on pruned producer weights and biases
    l2_norm: bool = True  # L2 on pruned norm scales and shifts

    def growth(self) -> Growth:
        return Growth(self.delta, self.interval, self.ceiling, self.stabilize)

    def paper_steps(self, prog: Program) -> int:
        return self.growth().length

    def make_hooks(self, prog: Program, budget: int, plan: Plan | None) -> TPPHooks:
        if self.gram_every < 1:
            raise CompileError(f"tpp: gram_every must be at least 1, got {self.gram_every}", hint="-p gram_every=1 "
                               "applies the Gram term on every step")
        paper = self.growth()
        fit = Budget.fit(budget, paper.length, self.train, paper.ceiling)
        growth = paper.scaled(fit.step_factor, fit.lam)
        zero = max(1, int(round(self.zero_interval * fit.step_factor)))
        hooks = TPPHooks(prog, self, fixed_selection(prog, self, plan), growth, zero)
        hooks.schedule_fit = fit.record(paper.push(PAPER_LR), growth.push(self.train.lr))
        return hooks
