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
    reconstruction (the optimal brain surgeon's error, structured: ZipLM, SlimGPT) the output
                 error its removal adds once the kept inputs predict it by least squares, in
                 greedy order (`reconstruction`); only for a group read by one Linear weight
                 (heads, MLP channels): a stream's channels also pass residual adds that no fold
                 refits, so it is scored by activation. Opt-in (-p score=reconstruction): on the
                 bundled model at 50% it gave 60.4 against activation's 63.4 (heads and MLP by
                 it, the stream by activation; 67.1 with the stream by it too), but on the
                 held-out wiki_a 122.2 against 122.3 at 50% and 83.65 against 83.79 at 20%
                 (docs/bench_lm_heldout.md): no gain worth its cost, so not the default.

`score` picks one; by default it follows what compensate folds back after slim (`fit`):
activation with the least-squares fold (the default for text data), fluctuation otherwise. Both
by measurement: on the bundled language model and two held-out ones
(docs/bench_lm_heldout.md), with the least-squares fold, activation gave the lowest perplexity
of the three at 20% and 50% of the parameters each time (at 50%: 63.4, 122.3, 110.5 against
fluctuation's 68.8, 135.7, 115.4): what a channel carries beyond what the kept channels
predict is restored by the fold, and the activation's size then ranks better. With constant
folds, on the digits networks at ratio 0.5 right after slim, fluctuation kept 78.6% and 79.4%
right against activation's 67.8% and 75.3%. A group none of whose consumers is a Linear or
convolution read as such (a consumer the graph reads another way) is scored by l1. Selection is
layer-wise (the same width per layer), or global with --global, or (the default for a causal
language model on text data, `-p allocation=measured`) each group's share of the ratio measured
by select.measured_shares: the model's perplexity on calibration windows with that group alone
cut by half, over the parameters the cut saves. On held-out models at 50% of the parameters,
one-shot with least squares: wiki_a 96.8 against 122.3 with one ratio for all, wiki_b 86.2
against 110.5, the bundled kjv_llama 45.4 against 63.4 (docs/bench_lm_heldout.md); its cost on a
200M LLaMA, 20 s beside calibration's 43 s. The layers then differ in width: the `hf/` folder
holds each layer's widths and a modeling file (trust_remote_code); `-p allocation=uniform` keeps
one width per layer, a plain folder. With --global or --latency the default is uniform (global
ranking sets the widths itself; a latency budget spends its own).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from pcompiler.calibration import Calibration, calibrate, in_runs, readers
from pcompiler.data import DataSource
from pcompiler.dtypes import HALF, dtype_of
from pcompiler.errors import CompileError
from pcompiler.ir import Program, Role, tensor_of
from pcompiler.passes.compensate import RIDGE
from pcompiler.passes.l1 import group_l1
from pcompiler.passes.select import MethodPass, SelectOptions, measured_shares
from pcompiler.passmanager import ANALYSIS, DATA, register_pass
from pcompiler.runtime import CPU, Runtime
from pcompiler.tasks import CAUSAL_LM

log = logging.getLogger("pcompiler")

SCORES = ("fluctuation", "wanda", "activation", "reconstruction")
ALLOCATIONS = ("uniform", "measured")
BATCH = 8  # windows (or samples) per calibration batch
STEPS = 128  # the reconstruction's greedy removes a group's channels in at most this many steps
STATE = 1 << 28  # float64 elements a group's reconstruction may hold (its consumer's weight and inverse)


def channel_score(stats: Any, score: str) -> torch.Tensor:
    """Per input channel of one consumer weight (module docstring)."""
    rms, column = stats.mean_square.sqrt(), stats.column_norms / stats.kernel
    if score == "fluctuation":
        return stats.variance * column
    if score == "wanda":
        return rms * column.sqrt()
    return rms


def reconstruction(consumers: Sequence[tuple[torch.Tensor, torch.Tensor, np.ndarray]], size: int,
                   ridge: float = RIDGE, steps: int = STEPS) -> np.ndarray:
    """Per channel of a group, the output error its removal costs once the kept inputs predict the
    removed ones (compensate's least-squares fold), in greedy order: lower is removed first.

    Each consumer: its weight W (out x in), its inputs' covariance S over the calibration rows,
    and the positions index[c] of channel c among its inputs. Removing positions R and refitting
    the kept ones costs tr(W_R ((S^-1)_RR)^-1 W_R^T) in expected squared output (the optimal
    brain surgeon's error, structured: ZipLM, SlimGPT); after a removal, W absorbs the fit
    (W -= W_:R (S^-1)_RR^-1 (S^-1)_R:) and S^-1 loses R the same way, so the next channel's cost
    is the one it adds to those already gone. A channel's score is the largest cost paid up to
    its removal (monotone in the order); S is damped by `ridge` as compensate's fit is."""
    state = []
    for w, cov, index in consumers:
        damp = ridge * float(cov.diagonal().mean().clamp_min(1e-30))
        inverse = torch.linalg.inv(cov + damp * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
        state.append((w.detach().to(cov).clone(), inverse, torch.as_tensor(index, device=cov.device)))
    scores, alive, level = np.zeros(size), np.arange(size), 0.0
    chunk = max(1, math.ceil(size / steps))
    while len(alive):
        cost = torch.zeros(len(alive), dtype=torch.float64)
        for w, inverse, index in state:
            j = index[torch.as_tensor(alive, device=index.device)]  # (channels, positions)
            block = inverse[j[:, :, None], j[:, None, :]]
            cols = w[:, j]  # (out, channels, positions)
            gram = torch.einsum("ocp,ocq->cpq", cols, cols)
            cost += torch.linalg.solve(block, gram).diagonal(dim1=1, dim2=2).sum(1).cpu()
        order = torch.argsort(cost)[:chunk].numpy()
        level = max(level, float(cost[order].max()))
        scores[alive[order]] = level
        gone, alive = alive[order], np.delete(alive, order)
        for w, inverse, index in state:
            r = index[torch.as_tensor(gone, device=index.device)].reshape(-1)
            solved = torch.linalg.solve(inverse[r][:, r], inverse[r])  # (S^-1)_RR^-1 (S^-1)_R:
            w -= w[:, r] @ solved
            inverse -= inverse[:, r] @ solved
    return scores


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
    allocation: str | None = None  # ALLOCATIONS; None: `chosen_allocation`

    def check(self) -> None:
        super().check()
        if self.data is None:
            raise CompileError("calib measures activations on calibration data and needs --data",
                               hint="e.g. --data text:FILE or tokens:FILE for a language model, --data digits")
        if self.score is not None and self.score not in SCORES:
            raise CompileError(f"calib: unknown score {self.score!r}", hint=f"-p score= one of {', '.join(SCORES)}")
        if self.samples < 1:
            raise CompileError(f"--calibration-samples must be >= 1, got {self.samples}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise CompileError(f"calib: unknown allocation {self.allocation!r}", hint=f"-p allocation= one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "measured" and self.data.task is not CAUSAL_LM:
            raise CompileError("calib: -p allocation=measured measures perplexity: it needs a language model on text data",
                               hint="--data text:FILE or tokens:FILE; or leave allocation uniform")
        if self.allocation == "measured" and self.global_ranking:
            raise CompileError("calib: -p allocation=measured sets each group's share itself; --global ranks across groups instead",
                               hint="drop one of them")

    @property
    def chosen_allocation(self) -> str:
        """`allocation`, or by default measured for a causal language model on text data (module
        docstring) unless --global or --latency sets the widths another way."""
        if self.allocation is not None:
            return self.allocation
        lm = self.data is not None and self.data.task is CAUSAL_LM
        return "measured" if lm and not self.global_ranking and self.target is None else "uniform"

    @property
    def chosen_score(self) -> str:
        return self.score or ("activation" if self.fit == "lstsq" else "fluctuation")

    def settings(self) -> dict:
        out = {k: v for k, v in super().settings().items() if k not in ("data", "runtime")}
        return {**out, "score": self.chosen_score, "allocation": self.chosen_allocation}

    def allocated(self, prog: Program, analysis: Any, scores: dict[int, np.ndarray]) -> SelectOptions:
        if self.chosen_allocation == "uniform":
            return self
        shares = measured_shares(prog, analysis, scores, self, self.data, self.seed, self.runtime.device)
        log.info("calib: measured shares of the ratio %s", {g: round(v, 2) for g, v in shares.items()})
        return replace(self, shares=shares)

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        analysis = prog.require_analysis(self.name)
        consumers = {p.param for g in analysis.prunable for p in _consumed(g)}
        half = torch.float32 if dtype_of(prog.gm) in HALF else None
        device = self.runtime.device
        calls = batches(self.data, prog.gm, self.samples, self.seed, device)
        runs = self._gram_runs(prog, analysis) if self.chosen_score == "reconstruction" else [[]]
        grams = lambda run: {p.param for gid in run for p in _consumed(analysis.groups[gid])}  # noqa: E731
        measured = calibrate(prog.gm, consumers, calls, device=device, dtype=half, norms=True, grams=grams(runs[0]))
        rebuilt = {}
        for i, run in enumerate(runs):
            stats = measured.stats if i == 0 else calibrate(prog.gm, grams(run), calls, device=device, dtype=half,
                                                           grams=grams(run)).stats
            for gid in run:
                g = analysis.groups[gid]
                rebuilt[gid] = reconstruction([(tensor_of(prog.gm, p.param), stats[p.param].covariance, p.index)
                                               for p in _consumed(g)], g.size)
            for name in grams(run):
                stats[name].gram = None
        out, fallback = {}, 0
        base = "activation" if self.chosen_score == "reconstruction" else self.chosen_score
        for g in analysis.prunable:
            if g.id in rebuilt:
                out[g.id] = rebuilt[g.id]
                continue
            total, seen = np.zeros(g.size), False
            for p in g.params:
                stats = measured.stats.get(p.param)
                if p.role != Role.CONSUME or p.dim != 1 or stats is None or stats.total is None:
                    continue
                per_position = channel_score(stats, base).cpu().numpy()
                total += per_position[p.index].sum(1)
                seen = True
            if not seen:
                fallback += 1
            out[g.id] = total if seen else group_l1(prog.gm, g)
        log.info("calib: %s scores from %s; %d of %d groups by l1 (no consumer measured)%s", self.chosen_score,
                 _text(measured), fallback, len(out),
                 f"; {len(rebuilt)} by reconstruction in {len(runs)} runs, the rest by activation"
                 if self.chosen_score == "reconstruction" else "")
        return out

    def _gram_runs(self, prog: Program, analysis: Any) -> list[list[int]]:
        """The groups scored by reconstruction, in runs whose second moments fit GRAM_BYTES: those
        read by exactly one consumer, a Linear weight, with at most STATE elements of state."""
        sizes = {}
        read = readers(prog.gm, {p.param for g in analysis.prunable for p in _consumed(g)})
        for g in analysis.prunable:
            consumed = [p for p in g.params if p.role == Role.CONSUME]
            if len(consumed) != 1 or consumed != _consumed(g) or consumed[0].param not in read:
                continue
            w = tensor_of(prog.gm, consumed[0].param)
            if w.ndim == 2 and w.shape[1] * (w.shape[0] + w.shape[1]) <= STATE:
                sizes[g.id] = w.shape[1] ** 2 * 8
        return in_runs(sizes) if sizes else [[]]


def _consumed(g: Any) -> list:
    """The group's consumer weights read by their input dim."""
    return [p for p in g.params if p.role == Role.CONSUME and p.dim == 1 and p.param.endswith("weight")]


def _text(c: Calibration) -> str:
    return f"{c.batches} batches ({c.rows} rows at the widest consumer), {len(c.stats)} consumer weights"
