"""greg1: growing regularization with a fixed selection (GReg-1; Wang et al., ICLR 2021).

docs/methods.md, "GReg-1":
1. S_g by L1 score once, before training.
2. Every K_u steps lambda_c += delta for c in S_g of every group still growing (kept channels
   stay at 0); L2 with lambda on the producer conv/linear rows of S_g (`ChannelPenalty`).
3. A group stops growing when its lambda > tau, or when its smoothed magnitude ratio
   (m <- 0.9 m + 0.1 new; the first value is taken as is) reaches the limit.
4. When every group has stopped, K_s more steps with lambda fixed, then training ends.

With a step budget N the schedule is fitted to it (`regularize.Budget`): its phases scale by
N / L0 and every lambda by the factor that keeps the paper's total push sum(lr * lambda), within
the stability cap. The push each group received and its magnitude ratio go to the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pcompiler.ir import ParamSlice, Program
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
    magnitude_ratio,
)
from pcompiler.passes.select import Plan
from pcompiler.passmanager import register_pass


class GrowingHooks(MethodHooks):
    """Per-group lambda on the selected channels, grown by `growth` until each group is done."""

    def __init__(self, prog: Program, selection, growth: Growth, ratio_limit: float, l2_norm: bool = False):
        self.analysis = prog.require_analysis("greg")
        self.gm, self.growth, self.limit, self.l2_norm = prog.gm, growth, ratio_limit, l2_norm
        self.mag: dict[int, float] = {}
        self.done: dict[int, int] = {}  # group -> step it stopped growing
        self.push: dict[int, float] = {}  # group -> sum of lr * lambda on its pruned channels so far
        self.schedule_fit: dict[str, Any] = {}  # Budget.record(), for the report
        self.install(selection, kept_lambda=0.0, start_lambda=0.0)
        self.stabilize_from: int | None = None if self.selection else 0

    def install(self, selection, kept_lambda: float, start_lambda: float) -> None:
        """Penalize `selection`: its channels start at start_lambda, the groups' other channels
        stay at kept_lambda (0 for GReg-1; GReg-2 gives them -1e-4)."""
        self.groups = {gid: self.analysis.groups[gid] for gid in selection}
        self.selection = dict(selection)
        self.penalty = ChannelPenalty(self.gm, self.groups.values(), self.penalized)
        self.lam: dict[int, torch.Tensor] = {}
        self.level = {gid: start_lambda for gid in self.selection}  # the selected channels' lambda, per group
        for gid, chans in self.selection.items():
            lam = torch.full((self.groups[gid].size,), kept_lambda)
            lam[list(chans)] = start_lambda
            self.lam[gid] = lam
        self.penalty.set_lambda(self.lam)

    def penalized(self, p: ParamSlice) -> bool:
        """Filter rows; with `l2_norm` also the scale and shift of the norms the channel passes."""
        if is_filter(self.gm, p):
            return True
        return self.l2_norm and p.role == "produce" and not p.is_buffer and is_norm_param(self.gm, p)

    def after_backward(self, model, step: int) -> None:
        self.penalty.add_grad()

    def grow(self, step: int) -> None:
        """Every K_u steps: each group still growing gets delta more on its selected channels, unless
        its magnitude ratio (read from the weights: a device-to-host copy per group) says it is done."""
        grown = False
        for gid, chans in self.selection.items():
            if gid in self.done:
                continue
            ratio = magnitude_ratio(self.gm, self.groups[gid], chans)
            self.mag[gid] = ratio if gid not in self.mag else 0.9 * self.mag[gid] + 0.1 * ratio
            lam = self.lam[gid]
            if float(lam[list(chans)].max()) > self.growth.ceiling or self.mag[gid] >= self.limit:
                self.done[gid] = step
                continue
            lam[list(chans)] += self.growth.delta
            self.level[gid] += self.growth.delta
            grown = True
        if grown:
            self.penalty.set_lambda(self.lam)
        if self.stabilize_from is None and len(self.done) == len(self.selection):
            self.stabilize_from = step

    def after_step(self, model, step: int) -> dict[str, Any]:
        lr = self.lr_at(step - 1)  # the lr of the step just taken, with the lambdas it used
        for g in self.selection:
            self.push[g] = self.push.get(g, 0.0) + lr * self.level[g]
        if self.stabilize_from is None and step % self.growth.interval == 0:
            self.grow(step)
        mags = [min(v, 1e6) for v in self.mag.values()]
        return {"penalty": self.penalty.size, "lambda": self.pruned_lambda,
                "mag_ratio": min(mags) if mags else 0.0}

    def pruned_lambda(self) -> float:
        """The largest lambda of a group's selected channels (logged)."""
        return max(self.level.values(), default=0.0)

    def finished(self, step: int) -> bool:
        return self.stabilize_from is not None and step >= self.stabilize_from + self.growth.stabilize

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "mag": self.mag, "done": self.done, "stabilize_from": self.stabilize_from,
                "selection": self.selection, "push": self.push}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = state["lam"]
        self.penalty.set_lambda(self.lam)
        self.mag, self.done = dict(state["mag"]), dict(state["done"])
        self.stabilize_from, self.selection = state["stabilize_from"], dict(state["selection"])
        self.level = {g: float(self.lam[g][c[0]]) for g, c in self.selection.items()}
        self.push = dict(state["push"])

    def summary(self) -> dict[str, Any]:
        pushes = list(self.push.values())
        return {"schedule": dataclasses.asdict(self.growth), "schedule_fit": self.schedule_fit,
                "push_delivered": {"min": min(pushes, default=0.0), "max": max(pushes, default=0.0),
                                   "per_group": {str(g): v for g, v in self.push.items()}},
                "groups_stopped_at": {str(g): s for g, s in self.done.items()},
                "stabilization_started_at": self.stabilize_from,
                "magnitude_ratio": {str(g): v for g, v in self.mag.items()}}


@register_pass
@dataclass(frozen=True)
class GReg1(RegMethod):
    """Grow an L2 penalty on the L1-selected channels until they vanish, then remove them."""

    name: ClassVar[str] = "greg1"
    selects_by_l1: ClassVar[bool] = True
    delta: float = 1e-4  # lambda increment per update (paper scale)
    interval: int = 10  # K_u: steps between updates
    ceiling: float = 1.0  # tau
    stabilize: int = 10_000  # K_s (paper scale)
    ratio_limit: float = 1000.0  # magnitude ratio that stops a group's growth
    l2_norm: bool = True  # also penalize the pruned channels' norm scale and shift (not in the paper)

    def growth(self) -> Growth:
        return Growth(self.delta, self.interval, self.ceiling, self.stabilize)

    def paper_steps(self, prog: Program) -> int:
        return self.growth().length

    def make_hooks(self, prog: Program, budget: int, plan: Plan | None) -> GrowingHooks:
        paper = self.growth()
        fit = Budget.fit(budget, paper.length, self.train, paper.ceiling)
        growth = paper.scaled(fit.step_factor, fit.lam)
        hooks = GrowingHooks(prog, fixed_selection(prog, self, plan), growth, self.ratio_limit, self.l2_norm)
        hooks.schedule_fit = fit.record(paper.push(PAPER_LR), growth.push(self.train.lr))
        return hooks
