"""What the regularizing methods (slimming, greg1, greg2, tpp, receding) share; not a pass itself.

- `RegMethod`: the base pass. It copies the graph, trains the copy with the method's hooks in
  the one training loop (`pcompiler.train`), then selects. Methods that fix S_g before training
  (GReg-1, TPP) or during it (GReg-2) hand their selection over through `hooks.selection`; the
  others select after training from `scores`.
- `Growth`: the growing-lambda schedule of GReg/TPP and how a step budget scales it. The papers'
  constants (delta lambda every K_u steps up to tau, then K_s steps of stabilization) describe a
  run of L0 = K_u * tau / delta + K_s steps; a budget of N steps keeps K_u and tau and scales the
  increments by L0 / N and K_s by N / L0, so N = L0 gives the papers' numbers exactly.
- `ChannelPenalty`: "apply L2 with lambda" (docs/methods.md, "ChannelPenalty"): grad(w) += lambda_c * w on the chosen
  producer slices of each channel, after backward, before the optimizer step; its size (a
  logged number) on demand, so that hooks pay for it only on the steps the loop logs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pcompiler.costs import device_of
from pcompiler.data import DataSource
from pcompiler.distill import with_teacher
from pcompiler.errors import CompileError
from pcompiler.ir import ChannelGroup, ParamSlice, Program, Selection, owner_of, tensor_of
from pcompiler.passes.l1 import group_l1, l1_scores
from pcompiler.passes.select import MethodPass, Plan, plan_for
from pcompiler.passmanager import ANALYSIS, DATA, PassResult
from pcompiler.runtime import CPU, Runtime, copy_to
from pcompiler.train import Hooks, TrainConfig, lr_at, train

log = logging.getLogger("pcompiler")

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
DEFAULT_EPOCH_CAP = 100  # with no step budget: the paper's schedule, or this many epochs if shorter
PAPER_LR = 1e-3  # the SGD lr of the GReg and TPP schedules (docs/methods.md, "Step budgets")


def is_norm_param(gm: nn.Module, p: ParamSlice) -> bool:
    return isinstance(owner_of(gm, p.param)[0], NORMS)


def is_filter(gm: nn.Module, p: ParamSlice) -> bool:
    """A conv/linear weight row (or column of a transposed conv): what GReg and TPP penalize."""
    return p.role == "produce" and not p.is_buffer and not is_norm_param(gm, p) and tensor_of(gm, p.param).ndim >= 2


def has_residual_add(prog: Program) -> bool:
    """Whether two computed tensors are added somewhere (a ResNet-style net, for per-family defaults)."""
    import operator

    for n in prog.gm.graph.nodes:
        if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add):
            if sum(isinstance(a, torch.fx.Node) for a in n.args[:2]) == 2:
                return True
    return False


@dataclass(frozen=True)
class Growth:
    """delta every `interval` steps up to `ceiling`, then `stabilize` steps (all in optimizer steps)."""

    delta: float = 1e-4
    interval: int = 10
    ceiling: float = 1.0
    stabilize: int = 10_000

    @property
    def growth_steps(self) -> int:
        return int(round(self.interval * self.ceiling / self.delta))

    @property
    def length(self) -> int:
        return self.growth_steps + self.stabilize

    def push(self, lr: float) -> float:
        """The schedule's total push sum_t lr * lambda_t at a constant lr: lambda climbs in steps of
        delta held `interval` steps each (its mean over the growth phase is (ceiling - delta) / 2),
        then stays at `ceiling` for `stabilize` steps."""
        return lr * (self.growth_steps * (self.ceiling - self.delta) / 2 + self.stabilize * self.ceiling)

    def scaled(self, steps: float, lam: float = 1.0) -> Growth:
        """This schedule with its phases `steps` times as long and every lambda `lam` times as large
        (K_u stays: delta scales by lam / steps)."""
        return dataclasses.replace(self, delta=self.delta * lam / steps, ceiling=self.ceiling * lam,
                                   stabilize=max(1, int(round(self.stabilize * steps))))


def lambda_cap(train: TrainConfig) -> float:
    """The largest lambda a growing penalty may reach: lr * lambda <= 1 + momentum.

    SGD with momentum mu (heavy ball) on the penalty's quadratic lambda / 2 * w^2 converges only
    while lr * lambda < 2 * (1 + mu); half of that leaves room for the loss's own curvature and
    weight decay. (Momentum amplifies a steady push about 1 / (1 - mu) times: that is what lets a
    short budget deliver the paper's total push at a moderate lambda.)"""
    return (1.0 + train.momentum) / max(train.lr, 1e-12)


@dataclass(frozen=True)
class Budget:
    """How a paper schedule of `paper_steps` steps at lr PAPER_LR is fitted to `steps` steps at `lr`.

    Phases scale by `steps / paper_steps`; every lambda by `lam`, chosen so the total push
    sum_t lr * lambda_t equals the paper's (lam = (PAPER_LR / lr) * paper_steps / steps), unless that
    would pass `lambda_cap`: then lam is lowered to the cap (`capped`) and the push falls short."""

    steps: int
    paper_steps: int
    lr: float
    lam: float
    capped: bool

    @property
    def step_factor(self) -> float:
        return self.steps / self.paper_steps

    @staticmethod
    def fit(steps: int, paper_steps: int, train: TrainConfig, ceiling: float) -> Budget:
        lam = (PAPER_LR / max(train.lr, 1e-12)) * paper_steps / max(steps, 1)
        cap = lambda_cap(train) / ceiling
        return Budget(steps, paper_steps, train.lr, min(lam, cap), lam > cap)

    def record(self, paper: float, planned: float) -> dict[str, Any]:
        """What goes to report.json: the pushes (sum of lr * lambda) of the paper and of this run."""
        return {"steps": self.steps, "paper_steps": self.paper_steps, "lambda_scale": self.lam,
                "capped": self.capped, "push_paper": paper, "push_planned": planned}


class ChannelPenalty:
    """grad(w) += scale * lambda_c * w for the slices of channel c of each group that `which` accepts.

    Each slice's positions and broadcast shape are fixed at construction, on its weight's device.
    `set_lambda` spreads each group's per-channel lambda over the positions (a vector as long as the
    dimension, made once per change of the lambdas, on the weights' device); a step then adds the
    gradient in one fused pass per slice (`add_grad`), with a Python number as `scale` (a lambda
    that grows uniformly): no tensor crosses devices in a step. The penalty's size costs another
    pass and is computed only when asked (`size`)."""

    def __init__(self, gm: nn.Module, groups: Iterable[ChannelGroup], which: Callable[[ParamSlice], bool]):
        self.slices: dict[int, list[tuple[torch.Tensor, int, torch.Tensor, int, tuple[int, ...]]]] = {}
        for g in groups:
            items = []
            for p in g.params:
                if which(p):
                    t = tensor_of(gm, p.param)
                    shape = tuple(-1 if d == p.dim else 1 for d in range(t.ndim))
                    items.append((t, p.dim, torch.as_tensor(p.index.reshape(-1), device=t.device),
                                  p.index.shape[1], shape))
            if items:
                self.slices[g.id] = items
        self.spread: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def set_lambda(self, lam: dict[int, torch.Tensor]) -> None:
        """lambda per channel (a vector per group; groups not in `lam` carry none) from now on."""
        self.spread = []
        for gid, items in self.slices.items():
            lg = lam.get(gid)
            if lg is None:
                continue
            for w, dim, flat, mult, shape in items:
                pos = torch.zeros(w.shape[dim], device=w.device, dtype=w.dtype)
                pos[flat] = lg.to(w.device, w.dtype).repeat_interleave(mult)
                self.spread.append((w, pos.view(shape)))

    @torch.no_grad()
    def add_grad(self, scale: float = 1.0) -> None:
        """Add the penalty's gradient scale * lambda_c * w_c (one pass over each slice's parameter)."""
        for w, pos in self.spread:
            if w.grad is not None:
                w.grad.addcmul_(pos, w, value=scale)

    @torch.no_grad()
    def size(self, scale: float = 1.0) -> float:
        """scale * sum(lambda_c * |w_c|^2) / 2 at the current weights."""
        return scale * sum(0.5 * float((pos * w.square()).sum()) for w, pos in self.spread)


def magnitude_ratio(gm: nn.Module, group: ChannelGroup, pruned: tuple[int, ...]) -> float:
    """mean L1 of the kept filters / mean L1 of the pruned ones (GReg's stopping signal)."""
    l1 = group_l1(gm, group)
    mask = np.zeros(group.size, dtype=bool)
    mask[list(pruned)] = True
    if not mask.any() or mask.all():
        return math.inf
    return float(l1[~mask].mean() / max(l1[mask].mean(), 1e-30))


class MethodHooks(Hooks):
    """Hooks that may fix the selection themselves (GReg, TPP) and report their settings.

    `lr_at(step)` is the regularization lr at a step (set by `RegMethod.run`), for the hooks that
    measure the push they deliver."""

    selection: Selection | None = None
    lr_at: Callable[[int], float] = staticmethod(lambda step: PAPER_LR)

    def summary(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class RegMethod(MethodPass):
    """Base of the training methods: selection options, the data, the step budget and the
    training settings of the regularization phase (lr, batch, device, checkpoints ...)."""

    requires: ClassVar = (ANALYSIS, DATA)

    data: DataSource | None = None
    steps: int | None = None  # the step budget; None: the paper's schedule (capped at 100 epochs)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Distill from it during regularization (train.distill's settings; the defaults when None). The
    # user's input model: the Program trained here is a copy of the graph, not a teacher.
    teacher: nn.Module | None = None
    runtime: Runtime = CPU  # where the copy trains; it comes back to where the given model lives

    # S_g is chosen by L1 (before training, or after GReg-2's picking): the plan (a ratio, searched
    # for a --speedup, or --latency's per-group counts) on the starting L1 scores is fixed before training.
    selects_by_l1: ClassVar[bool] = False

    def paper_steps(self, prog: Program) -> int:
        raise NotImplementedError

    def make_hooks(self, prog: Program, budget: int, plan: Plan | None) -> MethodHooks:
        raise NotImplementedError

    def after_training(self, prog: Program, hooks: MethodHooks) -> Program:
        return prog

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        return l1_scores(prog)

    def budget(self, prog: Program) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = max(1, len(self.data.train) // self.train.batch_size)
        return min(self.paper_steps(prog), DEFAULT_EPOCH_CAP * per_epoch)

    def settings(self) -> dict:
        out = super().settings()
        out["data"] = None if self.data is None else self.data.spec
        out["train"] = dataclasses.asdict(with_teacher(self.train, self.teacher))
        out["teacher"] = None if self.teacher is None else type(self.teacher).__name__
        out["runtime"] = self.runtime.describe()
        return out

    def run(self, prog: Program) -> PassResult:
        self.check()
        analysis = prog.require_analysis(self.name)
        if self.data is None:
            raise CompileError(f"method '{self.name}' trains the model and needs data",
                               hint="pass --data (e.g. --data digits), or data=... in the pass API")
        if prog.source is not None:  # checked now: after training, the user's model is not the reference
            from pcompiler.passes.trace import check_program

            check_program(prog, prog.gm)
        # Train a copy made on the training device: the input Program stays as it was. The hooks
        # are built on it there (their index tensors live beside the weights). The trained graph is
        # its own source.
        home = device_of(prog.gm)
        prog = prog.replace(gm=copy_to(prog.gm, self.runtime.device), source=None)
        plan = None
        if self.selects_by_l1:
            plan = plan_for(prog, analysis, l1_scores(prog), self)
        budget = self.budget(prog)
        cfg = dataclasses.replace(with_teacher(self.train, self.teacher), steps=budget, label=f"{self.name} regularization")
        hooks = self.make_hooks(prog, budget, plan)
        hooks.lr_at = functools.partial(lr_at, cfg)
        result = train(prog.gm, self.data, cfg, hooks, teacher=self.teacher, runtime=self.runtime)
        prog.gm.eval()
        prog = self.after_training(prog, hooks)
        if self.runtime.device != home:
            prog = prog.replace(gm=copy_to(prog.gm, home))
        scores = self.scores(prog)
        if hooks.selection is not None:
            selection = hooks.selection
        else:
            plan = plan_for(prog, analysis, scores, self)
            selection = plan.selection(analysis, scores, self)
        removed = sum(len(v) for v in selection.values())
        log.info("%s: %d steps, removes %d channels in %d groups", self.name, result.steps, removed, len(selection))
        method = {"name": self.name, "ratio_used": plan.ratio if plan is not None else None, **self.settings(), "budget": budget,
                  "steps_done": result.steps, **hooks.summary()}
        regularization = {"curve": result.curve, "steps": result.steps, "seconds": result.seconds,
                          "resumed_from": result.resumed_from, "world_size": result.world_size}
        info = {**prog.info, "method_settings": method, "regularization": regularization,
                **({"budget_search": plan.search} if plan is not None and plan.search else {})}
        return PassResult(prog.replace(scores=scores, selection=selection, info=info), changed=True)


def fixed_selection(prog: Program, opts: MethodPass, plan: Plan) -> Selection:
    """S_g by L1 score at this moment (GReg-1 and TPP before training, GReg-2 after picking)."""
    return plan.selection(prog.require_analysis(opts.name), l1_scores(prog), opts)
