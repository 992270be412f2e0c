"""Calibration statistics: what each layer reads, measured on a few batches of the user's data.

For each weight that consumes channels by its input dim (a Linear's or a convolution's weight,
called as a module or as `linear` / `conv*` on a graph attribute, as torch.export leaves them),
the per-input-channel count, sum and sum of squares (float64) of the activation the layer
reads, and the squared norm of each of the weight's input columns; where asked, the sum of the
input's outer products (its second-moment matrix, for compensate's least-squares fit). The
calibration method (passes/calibrated.py) scores channels from them.

The graph runs under `dtypes.PromotedInterpreter`: a module's weights at a time on the device
(float32 copies for a half-precision model), so a model runs block by block where it fits, and
under `memory.streamed` its memory-mapped pages are given back as it goes; the statistics stay on the device until the
end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from pcompiler.costs import eval_mode
from pcompiler.dtypes import PromotedInterpreter
from pcompiler.ir import op_name, tensor_of
from pcompiler.memory import streamed

GRAM_BYTES = 2 << 30  # second-moment matrices measured per run over the data (more: several runs)
_LINEAR = ("linear",)
_CONV = ("conv1d", "conv2d", "conv3d", "convolution")
_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class InputStats:
    """Per input channel of one consumer weight: rows seen, sum and sum of squares of its input."""

    rows: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    low: torch.Tensor | None = None  # smallest and largest value seen per channel
    high: torch.Tensor | None = None
    column_norms: torch.Tensor | None = None  # ||W[:, j]||^2 over the other dims, float64
    kernel: int = 1  # a convolution's taps per input channel (1 for a Linear)
    # Where asked for: the sum over rows of (x - shift)(x - shift)^T (channels x channels, float64), each
    # batch's product in float32 on inputs shifted by the first batch's mean (`shift`, float32), so the
    # float32 product loses nothing to a large mean.
    gram: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """`x`: the input with its channel dim last, any leading dims."""
        rows = x.detach().reshape(-1, x.shape[-1])
        flat = rows.double()
        total, squares = flat.sum(0), (flat * flat).sum(0)
        low, high = flat.min(0).values, flat.max(0).values
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.rows += flat.shape[0]
        if self.gram is not None:
            if self.shift is None:
                self.shift = (total / max(flat.shape[0], 1)).float()
            centred = rows.float() - self.shift
            self.gram += (centred.T @ centred).double()

    @property
    def covariance(self) -> torch.Tensor:
        """Of the input's channels over the calibration rows (needs `gram`)."""
        offset = self.mean - self.shift.double()
        return self.gram / max(self.rows, 1) - torch.outer(offset, offset)

    @property
    def input_rms(self) -> float:
        """The RMS of the whole input (every channel)."""
        return math.sqrt(float(self.squares.sum()) / max(self.rows * len(self.squares), 1))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.squares / max(self.rows, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Of each channel's input over the calibration rows (FLAP's "fluctuation")."""
        return (self.mean_square - self.mean**2).clamp_min(0.0)


@dataclass
class Calibration:
    """InputStats by consumer weight name, and what was run."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    batches: int = 0
    rows: int = 0

    def info(self) -> dict[str, Any]:
        return {"batches": self.batches, "weights": len(self.stats), "rows": self.rows}


def readers(gm: fx.GraphModule, weights: Iterable[str]) -> dict[str, fx.Node]:
    """The node that reads each of `weights` (parameter names) as a Linear's or convolution's
    weight: a call of that module, or `linear` / `conv*` with the weight's get_attr as its second
    argument. Weights read otherwise (a transposed matmul, twice) are left out."""
    wanted, found, twice = set(weights), {}, set()
    for node in gm.graph.nodes:
        name = None
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _MODULES):
            name = f"{node.target}.weight"
        elif node.op == "call_function" and op_name(node.target) in (*_LINEAR, *_CONV) and len(node.args) > 1:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                name = str(w.target)
        if name in wanted:
            (twice.add(name) if name in found else found.__setitem__(name, node))
    return {k: v for k, v in found.items() if k not in twice}


def _linear(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether reader `n` reads its input's channels last (a linear), not at dim 1 (a convolution)."""
    return n.op == "call_function" and op_name(n.target) in _LINEAR or \
        n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)


def _input_of(gm: fx.GraphModule, n: fx.Node) -> Hashable:
    """What reader `n` reads, as a key: readers of one input the same way (a block's q, k and v
    projections; gate and up) share its statistics, measured once."""
    return (n.args[0], _linear(gm, n)) if isinstance(n.args[0], fx.Node) else n


def shared_inputs(gm: fx.GraphModule, weights: Iterable[str]) -> list[list[str]]:
    """`weights` (those `readers` finds) grouped by the input they read: `calibrate` measures each
    group's statistics, its second moments included, once, so a run's memory plan counts one
    matrix per group."""
    return list(_by_input(gm, readers(gm, weights)).values())


def _by_input(gm: fx.GraphModule, nodes: Mapping[str, fx.Node]) -> dict[Hashable, list[str]]:
    """The weights of `nodes` (name -> reader, as `readers` gives) by what they read (`_input_of`)."""
    groups: dict[Hashable, list[str]] = {}
    for name, node in nodes.items():
        groups.setdefault(_input_of(gm, node), []).append(name)
    return groups


def _last_read(gm: fx.GraphModule, watched: Iterable[fx.Node]) -> fx.Node | None:
    """The last node in graph order that computes what a watched reader reads: the nodes after
    it (a language model's head and its logits, the largest tensor of the run) change no
    statistic and are not run."""
    wanted = {n.args[0] for n in watched if isinstance(n.args[0], fx.Node)}
    return next((n for n in reversed(gm.graph.nodes) if n in wanted), None)


class _Collect(PromotedInterpreter):
    """Runs the graph, adding each watched reader's input to its statistics, up to `last` (the
    nodes after it return None). At `cut`, keeps `frontier`: the values computed so far that a
    later node reads, from which a run that starts after `cut` resumes (`calibrate_runs`)."""

    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, tuple[InputStats, bool]], dtype: torch.dtype | None,
                 device: torch.device | None, last: fx.Node | None, done: bool = False, cut: _Cut | None = None):
        super().__init__(gm, dtype, device)
        self.watched, self.added, self.last, self.done = watched, set(), last, done or last is None
        self.cut, self.frontier = cut, None

    def run_node(self, n: fx.Node) -> Any:
        stats, linear = self.watched.get(n, (None, False))
        if stats is not None and id(stats) not in self.added:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            if isinstance(x, torch.Tensor):
                stats.add(x if linear or x.ndim < 2 else x.movedim(1, -1))
                self.added.add(id(stats))
        if self.done and n.op != "output":
            return None  # past the last input a reader reads (`_last_read`)
        self.done = n is self.last
        value = super().run_node(n)
        if self.cut is not None and n is self.cut.node:
            self.frontier = {m: value if m is n else self.env[m] for m in self.cut.live}
        return value


@dataclass(frozen=True)
class _Cut:
    """A place in the graph to resume from: `node` (at `index`), the nodes up to it that a resumed
    run skips (`before`) and those of them a later node reads (`live`, the frontier's). An
    attribute a later node reads is in neither: a resumed run fetches it again (a weight's copy
    is not kept per batch)."""

    node: fx.Node
    index: int
    before: frozenset[fx.Node]
    live: tuple[fx.Node, ...]

    @classmethod
    def at(cls, gm: fx.GraphModule, index: int) -> _Cut:
        nodes = list(gm.graph.nodes)
        after = set(nodes[index + 1:])
        read = [m for m in nodes[:index + 1] if any(u in after for u in m.users)]
        refetched = {m for m in read if m.op == "get_attr"}
        return cls(nodes[index], index, frozenset(m for m in nodes[:index + 1] if m not in refetched),
                   tuple(m for m in read if m not in refetched))

    def env(self, frontier: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        """An interpreter's starting values: the frontier, and None for the other nodes up to the
        cut (computed already, and read by nothing after it), which it then skips."""
        return {**dict.fromkeys(self.before), **frontier}

    def resume(self, c: _Collect, frontier: dict[fx.Node, Any]) -> None:
        """Run `c` from this cut on one batch's frontier (no inputs: the placeholders are in it)."""
        c.run(initial_env=self.env(frontier), enable_io_processing=False)


def calibrate(gm: fx.GraphModule, weights: Iterable[str], batches: Iterable[tuple[torch.Tensor, ...]],
              device: torch.device | None = None, dtype: torch.dtype | None = None, norms: bool = False,
              grams: Iterable[str] = ()) -> Calibration:
    """Run `gm` (eval mode, no gradients) on `batches` (its positional inputs), a module's weights
    at a time on `device` (in `dtype` where half: see dtypes), and gather the InputStats of each
    of `weights` that `readers` finds (with `norms`, their weights' column norms too; for those
    in `grams`, their inputs' second-moment matrices: channels^2 float64 each, on `device`).
    Weights that read one input the same way share its statistics (the same tensors), measured
    once per batch: on a LLaMA block, q, k and v read one, gate and up another."""
    return next(calibrate_runs(gm, [list(weights)], lambda: batches, device, dtype, norms, grams))


def calibrate_runs(gm: fx.GraphModule, runs: Sequence[Sequence[str]],
                   batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]], device: torch.device | None = None,
                   dtype: torch.dtype | None = None, norms: bool = False,
                   grams: Iterable[str] = ()) -> Iterator[Calibration]:
    """`calibrate` for each run of weights in turn, yielding its Calibration before the next run
    allocates its own (a run's second moments are dropped once the caller lets go of them).

    The graph is run over the batches about once, not once per run: each batch's run stops at
    the last input its readers read and keeps the values a later node reads at a cut before the
    next run's first reader (the frontier: a language model's residual stream, its position
    embeddings and mask); the next run resumes each batch from there. A run whose readers do not
    all come after the previous cut starts again from `batches()` (called again: it must give
    the same batches)."""
    grams, order = set(grams), {n: i for i, n in enumerate(gm.graph.nodes)}
    found = [readers(gm, run) for run in runs]
    frontiers: list[dict[fx.Node, Any]] | None = None  # per batch, where the previous run stopped
    cut: _Cut | None = None
    for k, nodes in enumerate(found):
        if not nodes:
            yield Calibration()  # nothing to measure: no data read
            continue
        first = min(order[n] for n in nodes.values())
        start = cut if cut is not None and cut.index < first else None  # else readers before the cut: from the start
        following = [order[n] for later in found[k + 1:] for n in later.values()]
        out, frontiers, cut = _one_run(gm, order, nodes, batches, frontiers if start is not None else None, start,
                                       min(following) if following else None, grams, device, dtype, norms)
        yield out
        del out  # before the next run's records: one run's second moments at a time


def _one_run(gm: fx.GraphModule, order: Mapping[fx.Node, int], nodes: Mapping[str, fx.Node],
             batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]], frontiers: list[dict[fx.Node, Any]] | None,
             start: _Cut | None, following: int | None, grams: set[str], device: torch.device | None,
             dtype: torch.dtype | None, norms: bool) -> tuple[Calibration, list[dict[fx.Node, Any]] | None, _Cut | None]:
    """One run of `calibrate_runs`: from the batches, or from `start` on `frontiers` (given
    together); with the frontiers at the cut before node index `following` (the next runs' first
    reader), if any. `order`: each node's index in the graph."""
    watched, of = _watch(gm, nodes, grams, device)
    last = _last_read(gm, watched)
    nxt = None
    if last is not None and following is not None:
        at = min(order[last], following - 1)
        nxt = start if start is not None and at <= start.index else _Cut.at(gm, at)  # else: where it started
    done = start is not None and last is not None and order[last] <= start.index  # nothing after the cut to run
    out, kept = Calibration(), []
    with torch.no_grad(), eval_mode(gm), streamed(gm):  # a memory-mapped checkpoint's pages go back after each module
        for item in (_drain(frontiers) if start is not None else batches()):
            c = _Collect(gm, watched, dtype, device, last, done=done, cut=nxt if nxt is not start else None)
            start.resume(c, item) if start is not None else c.run(*item)
            out.batches += 1
            if nxt is not None:
                kept.append(item if nxt is start else c.frontier)
    return _finished(out, gm, nodes, of, norms), kept if nxt is not None else None, nxt


def _drain(items: list) -> Iterator:
    """The items of `items`, each let go of as it is given."""
    while items:
        yield items.pop(0)


def _watch(gm: fx.GraphModule, nodes: Mapping[str, fx.Node], grams: set[str],
           device: torch.device | None) -> tuple[dict[fx.Node, tuple[InputStats, bool]], dict[str, InputStats]]:
    """The records of `nodes` (weight -> reader): one per input read, a second-moment matrix where
    one of its weights is in `grams`; the readers watched, and each weight's record."""
    of: dict[str, InputStats] = {}  # each weight's shared record
    for names in _by_input(gm, nodes).values():
        stats = InputStats()
        if grams.intersection(names):  # one input: one width
            w = tensor_of(gm, names[0])
            stats.gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=device or w.device)
        of.update(dict.fromkeys(names, stats))
    return {node: (of[name], _linear(gm, node)) for name, node in nodes.items()}, of


def _finished(out: Calibration, gm: fx.GraphModule, nodes: Mapping[str, fx.Node], of: Mapping[str, InputStats],
              norms: bool) -> Calibration:
    for name in nodes:  # each weight's own record of the shared input's (same tensors)
        stats = out.stats[name] = replace(of[name])
        w = tensor_of(gm, name).detach()
        stats.kernel = math.prod(w.shape[2:]) if w.ndim > 2 else 1
        if norms:
            stats.column_norms = column_norms(w).to(stats.total.device if stats.total is not None else w.device)
    out.rows = max((s.rows for s in out.stats.values()), default=0)
    return out


def column_norms(w: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """||W[:, j]||^2 over every dim but the input dim 1 (float64), `rows` output rows at a time:
    an LM head of 32000 x 2048 needs no float64 copy of itself."""
    total = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[0], rows):
        chunk = w[i:i + rows].double()
        total += chunk.square().sum(dim=[d for d in range(chunk.ndim) if d != 1])
    return total


def in_runs(sizes: Mapping[Hashable, int], budget: int = GRAM_BYTES) -> list[list]:
    """The keys of `sizes` (bytes each: second moments measured together) in runs of at most
    `budget` bytes, in order (a key larger than that alone)."""
    runs: list[list] = [[]]
    used = 0
    for key, size in sizes.items():
        if runs[-1] and used + size > budget:
            runs.append([])
            used = 0
        runs[-1].append(key)
        used += size
    return runs
