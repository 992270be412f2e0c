"""greg1: growing regularization with a fixed selection (GReg-1; Wang et al., ICLR 2021).

METHODS.md, "GReg-1":
1. S_g by L1 score once, before training.
2. Every K_u steps lambda_c += delta for c in S_g of every group still growing (kept channels
   stay at 0); L2 with lambda on the producer conv/linear rows of S_g (`ChannelPenalty`).
3. A group stops growing when its lambda > tau, or when its smoothed magnitude ratio
   (m <- 0.9 m + 0.1 new; the first value is taken as is) reaches the limit.
4. When every group has stopped, K_s more steps with lambda fixed, then training ends.

With a step budget the schedule is scaled (see `regularize.Growth`): delta and K_s follow the
budget so that lambda can reach tau and stabilize within it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pcompiler.ir import Program
from pcompiler.passes.regularize import (
    ChannelPenalty,
    Growth,
    MethodHooks,
    RegMethod,
    fixed_selection,
    is_filter,
    magnitude_ratio,
)
from pcompiler.passmanager import register_pass


class GrowingHooks(MethodHooks):
    """Per-group lambda on the selected channels, grown by `growth` until each group is done."""

    def __init__(self, prog: Program, selection, growth: Growth, ratio_limit: float):
        self.analysis = prog.require_analysis("greg")
        self.gm, self.growth, self.limit = prog.gm, growth, ratio_limit
        self.mag: dict[int, float] = {}
        self.done: dict[int, int] = {}  # group -> step it stopped growing
        self.install(selection, kept_lambda=0.0, start_lambda=0.0)
        self.stabilize_from: int | None = None if self.selection else 0

    def install(self, selection, kept_lambda: float, start_lambda: float) -> None:
        """Penalize `selection`: its channels start at start_lambda, the groups' other channels
        stay at kept_lambda (0 for GReg-1; GReg-2 gives them -1e-4)."""
        self.groups = {gid: self.analysis.groups[gid] for gid in selection}
        self.selection = dict(selection)
        self.penalty = ChannelPenalty(self.gm, self.groups.values(), lambda p: is_filter(self.gm, p))
        self.lam: dict[int, torch.Tensor] = {}
        for gid, chans in self.selection.items():
            lam = torch.full((self.groups[gid].size,), kept_lambda)
            lam[list(chans)] = start_lambda
            self.lam[gid] = lam

    def after_backward(self, model, step: int) -> None:
        self.penalty.add_grad(self.lam)

    def grow(self, step: int) -> None:
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
        if self.stabilize_from is None and len(self.done) == len(self.selection):
            self.stabilize_from = step

    def after_step(self, model, step: int) -> dict[str, Any]:
        if self.stabilize_from is None and step % self.growth.interval == 0:
            self.grow(step)
        mags = [min(v, 1e6) for v in self.mag.values()]
        return {"penalty": lambda: self.penalty.size(self.lam), "lambda": self.pruned_lambda,
                "mag_ratio": min(mags) if mags else 0.0}

    def pruned_lambda(self) -> float:
        """The largest mean lambda of a group's selected channels (logged)."""
        return max((float(self.lam[g][list(c)].mean()) for g, c in self.selection.items()), default=0.0)

    def finished(self, step: int) -> bool:
        return self.stabilize_from is not None and step >= self.stabilize_from + self.growth.stabilize

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "mag": self.mag, "done": self.done, "stabilize_from": self.stabilize_from,
                "selection": self.selection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = state["lam"]
        self.mag, self.done = dict(state["mag"]), dict(state["done"])
        self.stabilize_from, self.selection = state["stabilize_from"], dict(state["selection"])

    def summary(self) -> dict[str, Any]:
        return {"schedule": dataclasses.asdict(self.growth),
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

    def growth(self) -> Growth:
        return Growth(self.delta, self.interval, self.ceiling, self.stabilize)

    def paper_steps(self, prog: Program) -> int:
        return self.growth().length

    def make_hooks(self, prog: Program, budget: int, ratio: float | None) -> GrowingHooks:
        growth = self.growth().scaled(budget / self.growth().length)
        return GrowingHooks(prog, fixed_selection(prog, self, ratio), growth, self.ratio_limit)
