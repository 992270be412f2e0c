"""greg2: growing regularization that picks by curvature first (GReg-2; Wang et al., ICLR 2021).

docs/methods.md, "GReg-2":
1. Picking: lambda_c += pick_delta for every channel of every prunable group each K_u steps
   until lambda >= pick_ceiling (L2 on all producer conv/linear rows). The growing penalty
   shrinks weights in flat directions of the loss more than in sharp ones; S_g is then chosen
   by L1 score at that moment.
2. Then lambda_c += delta every K_u for c in S_g (continuing from pick_ceiling); kept channels
   get lambda = kept_lambda (-1e-4, letting their magnitude recover), until lambda > tau or the
   magnitude ratio reaches the limit (as GReg-1).
3. K_s steps of stabilization.

A step budget N fits both phases as GReg-1 does (`regularize.Budget`): every length scales by
N / L0 and every lambda (pick_delta, pick_ceiling, delta, tau, kept_lambda) by the factor that
keeps the paper's total push on the pruned channels, within the stability cap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pcompiler.ir import Program
from pcompiler.passes.greg1 import GrowingHooks
from pcompiler.passes.regularize import (
    PAPER_LR,
    Budget,
    ChannelPenalty,
    Growth,
    RegMethod,
    fixed_selection,
    is_filter,
)
from pcompiler.passes.select import Plan, candidates
from pcompiler.passmanager import register_pass


class PickingHooks(GrowingHooks):
    """Phase 1 grows one lambda shared by all channels; at pick_ceiling it selects by L1 and
    becomes GReg-1's growth with kept channels at kept_lambda."""

    def __init__(self, prog: Program, method: GReg2, growth: Growth, pick: Growth, kept_lambda: float, plan: Plan):
        super().__init__(prog, {}, growth, method.ratio_limit, method.l2_norm)
        self.prog, self.method, self.plan = prog, method, plan
        self.pick_delta, self.pick_ceiling, self.kept_lambda = pick.delta, pick.ceiling, kept_lambda
        self.pick_push = 0.0
        self.stabilize_from = None
        self.picking = True
        self.picked_at: int | None = None
        self.all_groups = candidates(prog.require_analysis("greg2"), method.skip)
        # The picking phase's lambda: pick_lambda on every channel of every prunable group.
        self.all_penalty = ChannelPenalty(prog.gm, self.all_groups, lambda p: is_filter(prog.gm, p))
        self.all_penalty.set_lambda({g.id: torch.ones(g.size) for g in self.all_groups})
        self.pick_lambda = 0.0

    def after_backward(self, model, step: int) -> None:
        if self.picking:
            self.all_penalty.add_grad(self.pick_lambda)
        else:
            super().after_backward(model, step)

    def _pick(self, step: int) -> None:
        self._install(fixed_selection(self.prog, self.method, self.plan), step)

    def _install(self, selection, step: int) -> None:
        self.picking, self.picked_at = False, step
        self.install(selection, self.kept_lambda, self.pick_lambda)
        self.push = {g: self.pick_push for g in selection}
        if not selection:
            self.stabilize_from = step

    def after_step(self, model, step: int) -> dict[str, Any]:
        if self.picking:
            self.pick_push += self.lr_at(step - 1) * self.pick_lambda
            if step % self.growth.interval == 0:
                self.pick_lambda += self.pick_delta
                if self.pick_lambda >= self.pick_ceiling * (1 - 1e-9):
                    self._pick(step)
            return {"penalty": lambda: self.all_penalty.size(self.pick_lambda), "lambda": self.pick_lambda,
                    "mag_ratio": 0.0}
        return super().after_step(model, step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "picking": self.picking, "picked_at": self.picked_at,
                "pick_lambda": self.pick_lambda, "pick_push": self.pick_push}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.picking, self.picked_at, self.pick_lambda = state["picking"], state["picked_at"], state["pick_lambda"]
        self.pick_push = state["pick_push"]
        if not self.picking:
            self._install(dict(state["selection"]), self.picked_at)  # the saved lambdas follow
        super().load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "picked_at": self.picked_at, "pick_delta": self.pick_delta,
                "pick_ceiling": self.pick_ceiling, "kept_lambda": self.kept_lambda}


@register_pass
@dataclass(frozen=True)
class GReg2(RegMethod):
    """Let a uniformly growing penalty reveal the flat directions, pick by L1, then grow as GReg-1."""

    name: ClassVar[str] = "greg2"
    selects_by_l1: ClassVar[bool] = True
    pick_delta: float = 1e-5
    pick_ceiling: float = 1e-2
    delta: float = 1e-4
    interval: int = 10
    ceiling: float = 1.0
    stabilize: int = 10_000
    ratio_limit: float = 1000.0
    kept_lambda: float = -1e-4
    l2_norm: bool = True  # in the second phase, also the pruned channels' norm scale and shift (not in the paper)

    def growth(self) -> Growth:
        """The second phase, from pick_ceiling up to tau, then stabilization."""
        return Growth(self.delta, self.interval, self.ceiling - self.pick_ceiling, self.stabilize)

    def picking(self) -> Growth:
        return Growth(self.pick_delta, self.interval, self.pick_ceiling, 0)

    def paper_steps(self, prog: Program) -> int:
        return self.growth().length + self.picking().growth_steps

    def push(self, pick: Growth, growth: Growth, lr: float) -> float:
        """sum lr * lambda on a pruned channel: picking, then growth starting from pick's ceiling."""
        return pick.push(lr) + growth.push(lr) + lr * pick.ceiling * growth.length

    def make_hooks(self, prog: Program, budget: int, plan: Plan | None) -> PickingHooks:
        fit = Budget.fit(budget, self.paper_steps(prog), self.train, self.ceiling)
        pick = self.picking().scaled(fit.step_factor, fit.lam)
        growth = self.growth().scaled(fit.step_factor, fit.lam)
        hooks = PickingHooks(prog, self, dataclasses.replace(growth, ceiling=self.ceiling * fit.lam), pick,
                             self.kept_lambda * fit.lam, plan)
        hooks.schedule_fit = fit.record(self.push(self.picking(), self.growth(), PAPER_LR),
                                  self.push(pick, growth, self.train.lr))
        return hooks
