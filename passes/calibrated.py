"""calib: one-shot selection by what each channel carries on calibration data.

The magnitude of a weight says little about a language model's channels: a few input channels
carry activations 100x larger than the rest, and a small weight on one of them matters more
than a large one on a quiet channel. This method runs the model on `samples` windows (or
batches) of the training data (pcompiler.calibration: a module at a time, on the runtime's
device) and scores channel c of a group from the inputs X_j and input columns W[:, j] of every
weight that consumes it (j: c's positions there: a head's dims in its output projection, an MLP
channel in the down projection, a stream channel in every q, k, v, gate, up and head projection):

    fluctuation  (FLAP, An et al. 2024)   sum_j Var(X_j) * ||W[:, j]||^2: the variance its removal
                                           takes from the consumers' outputs once compensate has
                                           put its mean back (`--compensate`, the default)
    wanda        (Wanda-sp, Sun et al.)    sum_j RMS(X_j) * ||W[:, j]||
    activation   (Minitron, Sreenivas et al.) sum_j RMS(X_j): the activation alone

`score` picks one; by default it follows what compensate folds back after slim (`fit`):
activation with the least-squares fold (the default for text data), fluctuation otherwise. Both
by measurement: on the bundled language model and two held-out ones
(docs/bench_lm_heldout.md), with the least-squares fold, activation gave the lowest perplexity
of the three at 20% and 50% of the parameters each time (at 50%: 63.4, 122.3, 110.5 against
fluctuation's 68.8, 135.7, 115.4): what a channel carries beyond what the kept channels
predict is restored by the fold, and the activation's size then ranks better. With constant
folds, on the digits networks at ratio 0.5 right after slim, fluctuation kept 78.6% and 79.4%
right against activation's 67.8% and 75.3%. A group none of
whose consumers is a Linear or convolution read as such (a consumer the graph reads another
way) is scored by l1. Selection is the usual layer-wise one (the same width per layer: configs
and kernels want that), or global with --global.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pcompiler.calibration import Calibration, calibrate
from pcompiler.data import DataSource
from pcompiler.dtypes import HALF, dtype_of
from pcompiler.errors import CompileError
from pcompiler.ir import Program, Role
from pcompiler.passes.l1 import group_l1
from pcompiler.passes.select import MethodPass
from pcompiler.passmanager import ANALYSIS, DATA, register_pass
from pcompiler.runtime import CPU, Runtime

log = logging.getLogger("pcompiler")

SCORES = ("fluctuation", "wanda", "activation")
BATCH = 8  # windows (or samples) per calibration batch


def channel_score(stats: Any, score: str) -> torch.Tensor:
    """Per input channel of one consumer weight (module docstring)."""
    rms, column = stats.mean_square.sqrt(), stats.column_norms / stats.kernel
    if score == "fluctuation":
        return stats.variance * column
    if score == "wanda":
        return rms * column.sqrt()
    return rms


def batches(data: DataSource, model: torch.nn.Module, samples: int, seed: int,
            device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """`samples` training samples (windows of text) drawn with `seed`, the same in every process,
    in batches of BATCH, as the data's task calls `model`."""
    n = min(samples, len(data.train))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    out = []
    for i in range(0, n, BATCH):
        x = torch.stack([torch.as_tensor(data.train[j][0]) for j in order[i:i + BATCH]])
        out.append(data.task.inputs(model, x.to(device)))
    return out


@register_pass
@dataclass(frozen=True)
class Calibrated(MethodPass):
    """Remove the channels that carry the least on calibration data (`score`: module docstring)."""

    name: ClassVar[str] = "calib"
    requires: ClassVar = (ANALYSIS, DATA)
    data: DataSource | None = None
    samples: int = 128
    score: str | None = None  # None: by `fit`
    fit: str = "constant"  # what compensate folds back after slim (its `fit`), which the default score follows
    seed: int = 0
    runtime: Runtime = CPU

    def check(self) -> None:
        super().check()
        if self.data is None:
            raise CompileError("calib measures activations on calibration data and needs --data",
                               hint="e.g. --data text:FILE or tokens:FILE for a language model, --data digits")
        if self.score is not None and self.score not in SCORES:
            raise CompileError(f"calib: unknown score {self.score!r}", hint=f"-p score= one of {', '.join(SCORES)}")
        if self.samples < 1:
            raise CompileError(f"--calibration-samples must be >= 1, got {self.samples}")

    @property
    def chosen_score(self) -> str:
        return self.score or ("activation" if self.fit == "lstsq" else "fluctuation")

    def settings(self) -> dict:
        out = {k: v for k, v in super().settings().items() if k not in ("data", "runtime")}
        return {**out, "score": self.chosen_score}

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        analysis = prog.require_analysis(self.name)
        consumers = {p.param for g in analysis.prunable for p in g.params
                     if p.role == Role.CONSUME and p.dim == 1 and p.param.endswith("weight")}
        half = torch.float32 if dtype_of(prog.gm) in HALF else None
        device = self.runtime.device
        measured = calibrate(prog.gm, consumers, batches(self.data, prog.gm, self.samples, self.seed, device),
                             device=device, dtype=half, norms=True)
        out, fallback = {}, 0
        for g in analysis.prunable:
            total, seen = np.zeros(g.size), False
            for p in g.params:
                stats = measured.stats.get(p.param)
                if p.role != Role.CONSUME or p.dim != 1 or stats is None or stats.total is None:
                    continue
                per_position = channel_score(stats, self.chosen_score).cpu().numpy()
                total += per_position[p.index].sum(1)
                seen = True
            if not seen:
                fallback += 1
            out[g.id] = total if seen else group_l1(prog.gm, g)
        log.info("calib: %s scores from %s; %d of %d groups by l1 (no consumer measured)", self.chosen_score,
                 _text(measured), fallback, len(out))
        return out


def _text(c: Calibration) -> str:
    return f"{c.batches} batches ({c.rows} rows at the widest consumer), {len(c.stats)} consumer weights"
