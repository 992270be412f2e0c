"""compensate: fold the constant outputs of removed channels into their consumers' biases.

A removed channel whose producer filter is zero can still output a constant: a norm's shift
after it, an activation with f(0) != 0. Removing it then moves each consumer's input by that
constant. For a Linear consumer the fix is exact: bias += W[:, cols] @ const, where cols are the
consumer's input features that carry the channel (several after a flatten). For a Conv consumer
with groups 1: bias += sum over the kernel taps of W[:, c] * const_c, exact when the conv does
not zero-pad (padding 0, or a non-zero padding mode); with zero padding the border outputs see
fewer taps, so the fold is exact only in the interior and `verify` measures the deviation.

Where the constants come from, per consumer input position of a removed channel, measured on
`prog.reference` (the model before `slim`, eval mode, no gradients) by forward pre-hooks on the
consumer modules:
- without data: the example inputs and a second random draw; a position is folded only if all
  its values are equal (max == min over both);
- with data (`data`, `batches` batches of `batch_size` from data.train): a position is folded if
  std <= tol * (|mean| + RMS of the whole consumer input), with its mean as the constant. Each
  folded position's relative std is recorded in the Fold.
Positions whose constant is zero need nothing. Consumers that are not Linear / Conv modules
with groups 1 called as modules (transposed convs, functional calls, attention) are skipped,
with the reason. Grouped and depthwise convs never consume a removed channel alone: the
analysis removes their matching outputs with it, so its constant is measured further on.

Assumes `slim` ran (prog.reference, prog.removal). The result is a copy of the slim model with
the folds applied, the record in `prog.compensation` and a summary in prog.info["compensation"].
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pcompiler.calibration import GRAM_BYTES, InputStats, calibrate_runs, in_runs, readers, shared_inputs
from pcompiler.data import DataSource
from pcompiler.dtypes import HALF, dtype_of
from pcompiler.errors import CompileError, VerifyError
from pcompiler.ir import Compensation, DimRef, Fold, Program, Removal, Role, op_name, shared_copy, tensor_of
from pcompiler.passmanager import SLIMMED, PassResult, register_pass
from pcompiler.runtime import CPU, Runtime

log = logging.getLogger("pcompiler")

# ---------------------------------------------------------------------------------------------
# Which consumers, and the layout of their inputs


@dataclass(frozen=True)
class Consumer:
    """A weight that reads removed channels by its input dim, and the node that reads it: a
    Linear or convolution module's call, or `linear` / `conv*` on the weight's get_attr."""

    module: str  # the weight's owner: the module whose bias takes the fold
    node: str  # the reading node's name (the slim graph keeps node names)
    kind: str  # the module's class name, or the op's
    conv: bool  # the channel dim is 1 (else last)
    exact: bool  # a constant input folded into the bias reproduces the output everywhere


def consumers(prog: Program) -> tuple[dict[str, np.ndarray], dict[str, Consumer], tuple[tuple[str, str], ...]]:
    """The consumers of removed channels: their module -> input positions that carry them
    (numbering before slim), module -> Consumer, and the consuming parameters that cannot be
    folded into, with why."""
    analysis, ref = prog.require_analysis("compensate"), prog.reference
    positions: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for gid, channels in prog.require_selection("compensate").items():
        ch = np.asarray(channels, dtype=np.int64)
        for p in analysis.groups[gid].params:
            if p.role == Role.CONSUME:
                positions[(p.param, p.dim)].append(p.index[ch].ravel())
    nodes = readers(ref, {param for param, _ in positions})
    found, described, skipped = {}, {}, []
    for (param, dim), parts in positions.items():
        module, _, attr = param.rpartition(".")
        consumer, why = _consumer(ref, module, nodes.get(param))
        if consumer is not None and (attr != "weight" or dim != 1):
            consumer, why = None, f"it is consumed through {attr}[dim {dim}], not the weight's input dim"
        if consumer is None:
            skipped.append((param, why))
        else:
            found[module], described[module] = np.unique(np.concatenate(parts)), consumer
    return found, described, tuple(skipped)


def _consumer(gm: fx.GraphModule, module: str, node: fx.Node | None) -> tuple[Consumer | None, str]:
    """The Consumer that `node` (the reader `readers` found, or None) is; else why it cannot take a fold."""
    if node is None:
        owner = next((type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
                      if n.op == "call_module" and n.target == module), None)
        if owner is not None:
            return None, f"a {owner} consumes it: only Linear and Conv (groups 1) consumers are folded into"
        return None, "the weight is read by an op other than a linear or convolution, or twice (no bias to fold into)"
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        groups, conv = getattr(m, "groups", 1), not isinstance(m, nn.Linear)
        exact = not conv or _unpadded(m.padding, m.kernel_size) or m.padding_mode != "zeros"
        kind = type(m).__name__
    else:
        kind, conv = op_name(node.target), op_name(node.target) != "linear"
        if kind == "convolution":  # aten: (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
            if _arg(node, 6, "transposed", False):
                return None, "a transposed convolution consumes it: only Linear and Conv (groups 1) consumers are folded into"
            groups = _arg(node, 8, "groups", 1)
        else:
            groups = _arg(node, 6, "groups", 1)
        weight = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
        kernel = tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) else ()
        exact = not conv or (bool(kernel) and _unpadded(_arg(node, 4, "padding", 0), kernel))
    if groups != 1:
        return None, f"grouped conv (groups={groups}): each output sees only its group's inputs"
    return Consumer(module, node.name, kind, conv, exact), ""


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _unpadded(padding: Any, kernel: tuple[int, ...]) -> bool:
    if isinstance(padding, str):
        return padding == "valid" or all(k == 1 for k in kernel)
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


# ---------------------------------------------------------------------------------------------
# The inputs the constants are measured on


def _random_draws(prog: Program) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(1)
    second = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) if t.is_floating_point() else t
                   for t in prog.example_inputs)
    return [prog.example_inputs, second]


def _data_batches(data: DataSource, model: nn.Module, batches: int, batch_size: int, seed: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """`model`'s inputs (as the data's task calls it) for `batches` seeded batches of training data."""
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        yield data.task.inputs(model, x.to(device))


# ---------------------------------------------------------------------------------------------
# The fold (one place: compensate adds it, verify takes it out again)


def bias_delta(module: nn.Module, positions: np.ndarray, constants: np.ndarray) -> torch.Tensor:
    """The change of `module`'s output (every output channel, numbering before slim) that its
    input positions held at `constants` cause, summed over all kernel taps (float64)."""
    w = module.weight.detach().double()
    cols = w[:, torch.as_tensor(positions, device=w.device)]
    cols = cols.reshape(cols.shape[0], cols.shape[1], -1).sum(-1)
    return cols @ torch.as_tensor(constants, dtype=torch.float64, device=w.device)


def _kept_outputs(removal: Removal, f: Fold, size: int, device: torch.device) -> torch.Tensor:
    removed = removal.removed(DimRef(0, param=f"{f.module}.weight"))
    return torch.as_tensor(np.setdiff1d(np.arange(size), removed), device=device)


def slim_delta(reference: fx.GraphModule, removal: Removal, f: Fold) -> torch.Tensor:
    """`bias_delta` of fold `f`, restricted to the output channels the slim model kept."""
    delta = bias_delta(reference.get_submodule(f.module), f.positions, f.constants)
    return delta[_kept_outputs(removal, f, delta.shape[0], delta.device)]


def weight_delta(reference: fx.GraphModule, removal: Removal, f: Fold) -> torch.Tensor | None:
    """The change of the slim consumer's weight a least-squares fold makes: W[:, sources] +=
    W[:, positions] @ predict, per kernel tap, on the kept outputs (float64; None for a constant
    fold)."""
    if f.predict is None:
        return None
    w = reference.get_submodule(f.module).weight.detach()
    w = w[_kept_outputs(removal, f, w.shape[0], w.device)].double()
    removed = w[:, torch.as_tensor(f.positions, device=w.device)]
    return torch.einsum("or...,rk->ok...", removed, torch.as_tensor(f.predict, dtype=torch.float64, device=w.device))


def add_to_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """bias += delta, as a new Parameter (created when the module had no bias)."""
    w = module.weight
    if delta.shape != (w.shape[0],):
        raise CompileError(f"a bias change of shape {tuple(delta.shape)} does not fit a {type(module).__name__} "
                           f"with {w.shape[0]} outputs", hint="this is a bug in compensate: please report it")
    old = getattr(module, "bias", None)
    old = old.detach() if old is not None else w.new_zeros(w.shape[0])
    if "bias" in vars(module) and not isinstance(vars(module)["bias"], nn.Parameter):
        delattr(module, "bias")
    module.bias = nn.Parameter(old + delta.to(old), requires_grad=w.requires_grad)


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """weight += delta, as a new Parameter (the slim model shares its weights with the input)."""
    w = module.weight
    if delta.shape != w.shape:
        raise CompileError(f"a weight change of shape {tuple(delta.shape)} does not fit the weight {tuple(w.shape)} of "
                           f"a {type(module).__name__}", hint="this is a bug in compensate: please report it")
    module.weight = nn.Parameter((w.detach().double() + delta).to(w.dtype), requires_grad=w.requires_grad)


def _reads_bias(gm: fx.GraphModule, f: Fold) -> None:
    """Make the node that reads `f`'s consumer weight in `gm` read its bias too: a functional
    linear or convolution called without one gets the module's new bias as a get_attr."""
    node = next(n for n in gm.graph.nodes if n.name == f.node)
    if node.op != "call_function":
        return
    bias = _arg(node, 2, "bias", None)
    if isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{f.module}.bias":
        return
    if bias is not None:
        raise CompileError(f"the bias of '{f.module}' is not a weight of its own ({bias}): cannot fold into it",
                           hint="this is a bug in compensate: please report it with the model")
    with gm.graph.inserting_before(node):
        read = gm.graph.get_attr(f"{f.module}.bias")
    node.args = (*node.args[:2], read, *node.args[3:])  # readers: (input, weight) come first, positionally
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    gm.recompile()


def fold(gm: fx.GraphModule, reference: fx.GraphModule, removal: Removal, f: Fold, sign: int = 1) -> None:
    """Add fold `f` to its consumer in `gm` (the slim model): its bias, and a least-squares
    fold's weight. sign -1 takes it out again (verify): the weight is then the reference's own
    slice, exactly (a half-precision weight would not come back by subtraction)."""
    module = gm.get_submodule(f.module)
    add_to_bias(module, sign * slim_delta(reference, removal, f))
    if sign > 0:
        if (delta := weight_delta(reference, removal, f)) is not None:
            add_to_weight(module, delta)
        _reads_bias(gm, f)
    elif f.predict is not None:
        w = reference.get_submodule(f.module).weight.detach()
        kept = w[_kept_outputs(removal, f, w.shape[0], w.device)][:, torch.as_tensor(f.sources, device=w.device)]
        folded = (kept.double() + weight_delta(reference, removal, f)).to(kept.dtype)
        if folded.shape != module.weight.shape or not torch.equal(folded, module.weight.detach().to(folded.device)):
            raise VerifyError(f"the weight of '{f.module}' in the slim model is not the reference's kept slice plus its "
                              "least-squares fold", hint="this is a bug in compensate: please report it with the model")
        module.weight = nn.Parameter(kept.clone(), requires_grad=module.weight.requires_grad)


def with_constants(x: torch.Tensor, positions: tuple[int, ...], constants: tuple[float, ...], dim: int,
                   sources: tuple[int, ...] = (), predict: torch.Tensor | None = None) -> torch.Tensor:
    """`x` with its positions `positions` along `dim` set to `constants`, plus with `predict`
    their linear prediction from the positions `sources` (a copy)."""
    x = x.clone()
    index = torch.as_tensor(positions, device=x.device)
    values = torch.as_tensor(constants, dtype=x.dtype, device=x.device)
    shape = [1] * x.ndim
    shape[dim] = len(positions)
    values = values.view(shape).expand(*[len(positions) if d == dim % x.ndim else s for d, s in enumerate(x.shape)])
    if predict is not None:
        known = x.movedim(dim, -1)[..., torch.as_tensor(sources, device=x.device)]
        values = values + (known @ predict.to(x).T).movedim(-1, dim)
    x.index_copy_(dim, index, values.contiguous())
    return x


def inject_constants(gm: fx.GraphModule, folds: Iterable[Fold]) -> None:
    """Rewrite `gm` (a pre-slim graph) so that each fold's consumer reads its input positions at
    the fold's constants, or least-squares predictions (what the slim model's folds stand for)."""
    by_node = {n.name: n for n in gm.graph.nodes}
    changed = False
    for n, f in enumerate(folds):
        node = by_node[f.node]
        args: tuple = (node.args[0], tuple(int(i) for i in f.positions), tuple(float(c) for c in f.constants),
                       1 if f.conv else -1)
        with gm.graph.inserting_before(node):
            if f.predict is not None:
                name = f"_compensate_predict_{n}"
                gm.register_buffer(name, torch.as_tensor(f.predict), persistent=False)
                args += (tuple(int(k) for k in f.sources), gm.graph.get_attr(name))
            x = gm.graph.call_function(with_constants, args)
        node.args = (x, *node.args[1:])
        changed = True
    if changed:
        gm.recompile()


# ---------------------------------------------------------------------------------------------
# The pass


FITS = ("constant", "mean", "lstsq")
RIDGE = 1e-2  # the least-squares fit's damping, relative to the kept inputs' mean variance (calib's reconstruction uses it too)


def _choose(consumer: Consumer, positions: np.ndarray, kept: np.ndarray, stats: InputStats | None, tol: float | None,
            fit: str, ridge: float) -> tuple[list[Fold], dict[str, Any]]:
    """The folds at one consumer and its summary. tol None: fold only positions whose values
    were all equal; else those with relative std <= tol; and by `fit` every other position too,
    as a fold of its own that is exact in expectation only: its mean ("mean"), or its
    least-squares prediction from the consumer's kept positions `kept` ("lstsq")."""
    summary: dict[str, Any] = {"kind": consumer.kind, "exact": consumer.exact}
    if stats is None or stats.rows == 0:
        return [], {**summary, "folded": 0, "not_constant": len(positions), "why": "no input reached it on the measured batches"}
    index = torch.as_tensor(positions, device=stats.total.device)
    low, high = stats.low[index].cpu().numpy(), stats.high[index].cpu().numpy()
    equal = low == high
    mean = np.where(equal, high, stats.mean[index].cpu().numpy())
    std = np.where(equal, 0.0, stats.variance[index].sqrt().cpu().numpy())
    rel_std = std / np.maximum(np.abs(mean) + stats.input_rms, 1e-30)
    constant = equal if tol is None else rel_std <= tol
    chosen = constant & (mean != 0) & np.isfinite(mean)
    spread = ~constant & np.isfinite(mean) & (fit != "constant") & (tol is not None)
    folds = [Fold(consumer.module, positions[chosen], mean[chosen], consumer.exact, rel_std[chosen],
                  consumer.node, consumer.conv)] if chosen.any() else []
    summary.update({"folded": int(chosen.sum()), "zero": int((constant & (mean == 0)).sum()),
                    "not_constant": int((~constant).sum()),
                    "max_abs_constant": float(np.abs(mean[chosen]).max()) if chosen.any() else 0.0,
                    "max_rel_std_folded": float(rel_std[chosen].max()) if chosen.any() else 0.0,
                    "min_rel_std_not_folded": float(rel_std[~constant].min()) if (~constant).any() else None})
    if fit == "lstsq" and spread.any() and len(kept) and stats.gram is not None:
        predict, intercept, explained = least_squares(stats, positions[spread], kept, ridge)
        folds.append(Fold(consumer.module, positions[spread], intercept, False, rel_std[spread], consumer.node,
                          consumer.conv, kept, predict))
        summary.update({"fitted": int(spread.sum()), "variance_explained": explained})
    elif (spread := spread & (mean != 0)).any():
        folds.append(Fold(consumer.module, positions[spread], mean[spread], False, rel_std[spread], consumer.node,
                          consumer.conv))
        summary["mean_folded"] = int(spread.sum())
    return folds, summary


def least_squares(stats: InputStats, removed: np.ndarray, kept: np.ndarray,
                  ridge: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The ridge least-squares prediction of the inputs at `removed` from those at `kept` over the
    calibration rows: x_R ~ c + A x_K with A = S_RK (S_KK + ridge * mean(diag S_KK) I)^-1 (S: the
    inputs' covariance), c = mean_R - A mean_K. Returns A (float32), c (float64) and the fraction
    of the removed positions' variance it explains."""
    cov, mean = stats.covariance, stats.mean
    r, k = (torch.as_tensor(i, device=cov.device) for i in (removed, kept))
    s_kk, s_kr = cov[k][:, k], cov[k][:, r]
    damp = ridge * float(s_kk.diagonal().mean().clamp_min(1e-30))
    a = torch.linalg.solve(s_kk + damp * torch.eye(len(kept), dtype=cov.dtype, device=cov.device), s_kr).T
    residual = cov[r][:, r].diagonal() - (a * s_kr.T).sum(1)
    total = float(cov[r][:, r].diagonal().sum())
    explained = 1.0 - float(residual.sum()) / total if total > 0 else 0.0
    return a.float().cpu().numpy(), (mean[r] - a @ mean[k]).cpu().numpy(), explained


def _kept_inputs(prog: Program, module: str) -> np.ndarray:
    """The input positions of `module`'s weight that the slim model keeps (numbering before slim)."""
    size = prog.reference.get_submodule(module).weight.shape[1]
    return np.setdiff1d(np.arange(size), prog.removal.removed(DimRef(1, param=f"{module}.weight")))


@register_pass
@dataclass(frozen=True)
class Compensate:
    """Fold the values of removed channels into their consumers.

    data: calibration data (None: only exactly constant channels, from the example inputs and a
    random draw); batches, batch_size, seed: the calibration batches from data.train; tol: a
    channel is near-constant when std <= tol * (|mean| + RMS of the consumer's input), folded as
    its mean. fit, with data, for every other removed channel: "constant" leaves it; "mean" folds
    its mean (FLAP's bias compensation); "lstsq" its ridge least-squares prediction from the
    consumer's kept inputs (`ridge`: the damping, relative to their mean variance), which changes
    the kept weight columns too. Both are exact in expectation only, so verify proves the
    rewrite without them and reports their effect."""

    name: ClassVar[str] = "compensate"
    requires: ClassVar = (SLIMMED,)
    ensures: ClassVar = ()
    data: DataSource | None = None
    batches: int = 8
    batch_size: int = 64
    tol: float = 1e-2
    seed: int = 0
    fit: str = "constant"
    ridge: float = RIDGE
    bias_holders: frozenset[str] | None = None  # the modules that may gain a bias (None: any; an hf/ folder's config limits them)
    # Whether bias_holders applies to this program (None: always; with the default formats, only where hf/ will be written).
    holders_apply: Callable[[Program], bool] | None = None
    runtime: Runtime = CPU  # where the reference runs on the calibration batches, a module at a time

    def run(self, prog: Program) -> PassResult:
        if prog.reference is None or prog.removal is None:
            raise CompileError("compensate needs a slimmed program: run 'slim' before it")
        if prog.compensation is not None:
            raise CompileError("compensate already ran on this program (folding twice would add the constants twice)")
        if self.fit not in FITS:
            raise CompileError(f"compensate: unknown fit {self.fit!r}", hint=f"one of {', '.join(FITS)}")
        if self.ridge < 0:
            raise CompileError(f"compensate: ridge must be >= 0, got {self.ridge}")
        if prog.on_meta:
            info = {**prog.info, "compensation": {"skipped": "the model is on the meta device; nothing to run"}}
            return PassResult(prog.replace(info=info), changed=False)
        if self.data is not None and min(self.batches, self.batch_size) < 1:
            raise CompileError(f"compensate: batches ({self.batches}) and batch_size ({self.batch_size}) must be at "
                               "least 1", hint="or pass data=None to fold only exactly constant channels")
        targets, described, skipped = consumers(prog)
        if self.bias_holders is not None and (self.holders_apply is None or self.holders_apply(prog)):
            # a consumer without a bias whose folder cannot hold one
            cannot = [m for m in targets if m not in self.bias_holders and getattr(prog.reference.get_submodule(m), "bias",
                                                                                    None) is None]
            skipped += tuple((f"{m}.weight", "the hf/ folder's config cannot hold a bias here") for m in cannot)
            targets = {m: p for m, p in targets.items() if m not in cannot}
        device = self.runtime.device
        lstsq = self.fit == "lstsq" and self.data is not None
        if self.data is None:
            source, tol = "exact constants on the example inputs and a random draw", None
            draws = [tuple(t.to(device) for t in draw) for draw in _random_draws(prog)]
            batches = lambda: draws  # noqa: E731
        else:
            source, tol = f"{self.batches} batches of {self.batch_size} from the training data, tol {self.tol:g}", self.tol
            if self.fit == "mean":
                source += ", the other channels' means folded too (exact in expectation)"
            elif lstsq:
                source += (f", the other channels' least-squares predictions from the kept ones folded too (ridge "
                           f"{self.ridge:g}, exact in expectation)")
            batches = lambda: _data_batches(self.data, prog.reference, self.batches, self.batch_size,  # noqa: E731
                                            self.seed, device)
        half = torch.float32 if dtype_of(prog.reference) in HALF else None
        weights = [f"{m}.weight" for m in targets]
        if lstsq:  # readers of one input (q, k and v; gate and up) share one matrix, so they go in one run
            shared = {tuple(g): tensor_of(prog.reference, g[0]).shape[1] ** 2 * 8 for g in shared_inputs(prog.reference, weights)}
            runs = [[name for g in run for name in g] for run in in_runs(shared, GRAM_BYTES)]
        else:
            runs = [weights]
        if len(runs) > 1:
            log.info("compensate: the least-squares fits need more than %d GiB of second moments: %d runs, each fitted "
                     "and let go before the next, sharing one pass over the calibration batches", GRAM_BYTES >> 30,
                     len(runs))
        def choose(module: str, stats: InputStats | None) -> tuple[list[Fold], dict[str, Any]]:
            return _choose(described[module], targets[module], _kept_inputs(prog, module), stats, tol,
                           self.fit if self.data is not None else "constant", self.ridge)

        chosen: dict[str, tuple[list[Fold], dict[str, Any]]] = {}
        # Each run's consumers are fitted before the next run measures: one run's matrices at a time;
        # the runs share one pass over the batches, each resuming where the last stopped.
        for measured in calibrate_runs(prog.reference, runs, batches, device=device, dtype=half,
                                       grams=weights if lstsq else ()):
            stats = measured.stats
            chosen |= {m: choose(m, stats.get(f"{m}.weight")) for m in targets if f"{m}.weight" in stats}
            del stats, measured
        chosen |= {m: choose(m, None) for m in targets if m not in chosen}  # measured in no run
        folds = [f for module in targets for f in chosen[module][0]]
        per_consumer = {module: chosen[module][1] for module in targets}
        gm = prog.gm
        if folds:
            gm = shared_copy(prog.gm)  # add_to_bias and add_to_weight put new Parameters in place
            for f in folds:
                fold(gm, prog.reference, prog.removal, f)
        record = Compensation(tuple(folds), skipped, source)
        summary = {"source": source, "folded": sum(len(f.positions) for f in folds),
                   "exact": sum(len(f.positions) for f in folds if f.exact),
                   "approximate": sum(len(f.positions) for f in folds if not f.exact),
                   "fitted": sum(len(f.positions) for f in folds if f.predict is not None), "runs": len(runs),
                   "consumers": per_consumer, "skipped": dict(skipped)}
        log.info("compensate: %s", summary)
        out = prog.replace(gm=gm, compensation=record, info={**prog.info, "compensation": summary})
        return PassResult(out, changed=bool(folds))


compensate = Compensate
