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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pcompiler.data import DataSource
from pcompiler.errors import CompileError
from pcompiler.ir import Compensation, DimRef, Fold, Program, Removal, Role, shared_copy
from pcompiler.memory import streamed
from pcompiler.passmanager import SLIMMED, PassResult, register_pass
from pcompiler.runtime import CPU, Runtime, placed

log = logging.getLogger("pcompiler")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------------------------
# Which consumers, and the layout of their inputs


def consumers(prog: Program) -> tuple[dict[str, np.ndarray], tuple[tuple[str, str], ...]]:
    """The consumer modules of removed channels -> their input positions that carry them
    (numbering before slim); and the consuming parameters that cannot be folded into, with why."""
    analysis, ref = prog.require_analysis("compensate"), prog.reference
    positions: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for gid, channels in prog.require_selection("compensate").items():
        ch = np.asarray(channels, dtype=np.int64)
        for p in analysis.groups[gid].params:
            if p.role == Role.CONSUME:
                positions[(p.param, p.dim)].append(p.index[ch].ravel())
    called = {str(n.target) for n in ref.graph.nodes if n.op == "call_module"}
    found, skipped = {}, []
    for (param, dim), parts in positions.items():
        module, _, attr = param.rpartition(".")
        why = _unsupported(ref, module, attr, dim, called)
        if why is None:
            found[module] = np.unique(np.concatenate(parts))
        else:
            skipped.append((param, why))
    return found, tuple(skipped)


def _unsupported(gm: fx.GraphModule, module: str, attr: str, dim: int, called: set[str]) -> str | None:
    if module not in called:
        return "the weight is used by a functional call, not by a module call (no hook sees its input)"
    m = gm.get_submodule(module)
    if not isinstance(m, (nn.Linear, *_CONVS)):
        return f"a {type(m).__name__} consumes it: only Linear and Conv (groups 1) consumers are folded into"
    if attr != "weight" or dim != 1:
        return f"it is consumed through {attr}[dim {dim}], not the weight's input dim"
    if isinstance(m, _CONVS) and m.groups != 1:
        return f"grouped conv (groups={m.groups}): each output sees only its group's inputs"
    return None


def channels_last(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` (a consumer's input) with the dim its weight's dim 1 indexes moved last."""
    return x if isinstance(m, nn.Linear) else x.movedim(1, -1)


def is_exact(m: nn.Module) -> bool:
    """Whether folding a constant input into `m`'s bias reproduces its output everywhere."""
    if isinstance(m, nn.Linear) or m.padding_mode != "zeros":
        return True
    if isinstance(m.padding, str):
        return m.padding == "valid" or all(k == 1 for k in m.kernel_size)
    return all(p == 0 for p in m.padding)


# ---------------------------------------------------------------------------------------------
# Measuring the values at the consumers' inputs


@dataclass
class _Stats:
    """Running per-position statistics (float64) at one consumer's input."""

    rows: int = 0
    total: torch.Tensor | float = 0.0
    squares: torch.Tensor | float = 0.0
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    input_squares: float = 0.0  # of the whole input, for its RMS
    input_count: int = 0

    def add(self, cols: torch.Tensor, whole: torch.Tensor) -> None:
        self.rows += cols.shape[0]
        self.total = self.total + cols.sum(0)
        self.squares = self.squares + (cols * cols).sum(0)
        low, high = cols.min(0).values, cols.max(0).values
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.input_squares += float(whole.double().square().sum())
        self.input_count += whole.numel()

    def summary(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, relative std, whether every value was equal) per position."""
        equal = (self.low == self.high).cpu().numpy()
        mean = np.where(equal, self.high.cpu().numpy(), (self.total / self.rows).cpu().numpy())
        var = np.maximum((self.squares / self.rows).cpu().numpy() - mean**2, 0.0)
        std = np.where(equal, 0.0, np.sqrt(var))
        scale = np.sqrt(self.input_squares / max(self.input_count, 1))
        return mean, std / np.maximum(np.abs(mean) + scale, 1e-30), equal


def _measure(reference: fx.GraphModule, targets: dict[str, np.ndarray],
             batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[str, _Stats]:
    """Run `reference` in eval mode on `batches`, collecting statistics at the targets' inputs.
    Hooks and training flags are restored afterwards."""
    stats = {name: _Stats() for name in targets}

    def hook_for(name: str):
        index = torch.as_tensor(targets[name])

        def hook(m: nn.Module, args: tuple) -> None:
            x = channels_last(m, args[0]).detach()
            cols = x[..., index.to(x.device)].reshape(-1, len(index)).double()
            stats[name].add(cols, x)

        return hook

    modes = {m: m.training for m in reference.modules()}
    handles = [reference.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in targets]
    try:
        reference.eval()
        with torch.no_grad():
            for inputs in batches:
                reference(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return stats


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


def slim_delta(reference: fx.GraphModule, removal: Removal, f: Fold) -> torch.Tensor:
    """`bias_delta` of fold `f`, restricted to the output channels the slim model kept."""
    delta = bias_delta(reference.get_submodule(f.module), f.positions, f.constants)
    removed = removal.removed(DimRef(0, param=f"{f.module}.weight"))
    keep = np.setdiff1d(np.arange(delta.shape[0]), removed)
    return delta[torch.as_tensor(keep, device=delta.device)]


def add_to_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """bias += delta, as a new Parameter (created when the module had no bias)."""
    w = module.weight
    if delta.shape != (w.shape[0],):
        raise CompileError(f"a bias change of shape {tuple(delta.shape)} does not fit a {type(module).__name__} "
                           f"with {w.shape[0]} outputs", hint="this is a bug in compensate: please report it")
    old = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
    module.bias = nn.Parameter(old + delta.to(old), requires_grad=w.requires_grad)


def fold(gm: fx.GraphModule, reference: fx.GraphModule, removal: Removal, f: Fold) -> None:
    """Add fold `f` to the bias of its consumer in `gm` (the slim model)."""
    add_to_bias(gm.get_submodule(f.module), slim_delta(reference, removal, f))


def inject_constants(gm: fx.GraphModule, folds: Iterable[Fold]) -> list[Any]:
    """Forward pre-hooks on `gm`'s consumer modules (numbering before slim) that set each fold's
    input positions to its constants. Returns the hook handles."""
    def hook_for(f: Fold):
        def hook(m: nn.Module, args: tuple) -> tuple:
            x = channels_last(m, args[0]).clone()
            x[..., torch.as_tensor(f.positions, device=x.device)] = torch.as_tensor(f.constants).to(x)
            return (x if isinstance(m, nn.Linear) else x.movedim(-1, 1), *args[1:])

        return hook

    return [gm.get_submodule(f.module).register_forward_pre_hook(hook_for(f)) for f in folds]


# ---------------------------------------------------------------------------------------------
# The pass


def _choose(module: str, m: nn.Module, positions: np.ndarray, stats: _Stats,
            tol: float | None) -> tuple[Fold | None, dict[str, Any]]:
    """The fold at one consumer (None when nothing is folded) and its summary. tol None: fold
    only positions whose values were all equal; else those with relative std <= tol."""
    if stats.rows == 0:
        return None, {"kind": type(m).__name__, "folded": 0, "not_constant": len(positions),
                      "why": "no input reached it on the measured batches"}
    mean, rel_std, equal = stats.summary()
    constant = equal if tol is None else rel_std <= tol
    chosen = constant & (mean != 0) & np.isfinite(mean)
    f = Fold(module, positions[chosen], mean[chosen], is_exact(m), rel_std[chosen]) if chosen.any() else None
    summary = {"kind": type(m).__name__, "exact": is_exact(m), "folded": int(chosen.sum()),
               "zero": int((constant & (mean == 0)).sum()), "not_constant": int((~constant).sum()),
               "max_abs_constant": float(np.abs(mean[chosen]).max()) if chosen.any() else 0.0,
               "max_rel_std_folded": float(rel_std[chosen].max()) if chosen.any() else 0.0,
               "min_rel_std_not_folded": float(rel_std[~constant].min()) if (~constant).any() else None}
    return f, summary


@register_pass
@dataclass(frozen=True)
class Compensate:
    """Fold the constant values of removed channels into their consumers' biases.

    data: calibration data (None: only exactly constant channels, from the example inputs and a
    random draw); batches, batch_size, seed: the calibration batches from data.train; tol: a
    channel is near-constant when std <= tol * (|mean| + RMS of the consumer's input)."""

    name: ClassVar[str] = "compensate"
    requires: ClassVar = (SLIMMED,)
    ensures: ClassVar = ()
    data: DataSource | None = None
    batches: int = 8
    batch_size: int = 64
    tol: float = 1e-2
    seed: int = 0
    runtime: Runtime = CPU  # where the reference runs on the calibration batches (a copy there if needed)

    def run(self, prog: Program) -> PassResult:
        if prog.reference is None or prog.removal is None:
            raise CompileError("compensate needs a slimmed program: run 'slim' before it")
        if prog.compensation is not None:
            raise CompileError("compensate already ran on this program (folding twice would add the constants twice)")
        if prog.on_meta:
            info = {**prog.info, "compensation": {"skipped": "the model is on the meta device; nothing to run"}}
            return PassResult(prog.replace(info=info), changed=False)
        if self.data is not None and min(self.batches, self.batch_size) < 1:
            raise CompileError(f"compensate: batches ({self.batches}) and batch_size ({self.batch_size}) must be at "
                               "least 1", hint="or pass data=None to fold only exactly constant channels")
        targets, skipped = consumers(prog)
        device = self.runtime.device
        if self.data is None:
            source, tol = "exact constants on the example inputs and a random draw", None
            batches = [tuple(t.to(device) for t in draw) for draw in _random_draws(prog)]
        else:
            source, tol = f"{self.batches} batches of {self.batch_size} from the training data, tol {self.tol:g}", self.tol
            batches = _data_batches(self.data, prog.reference, self.batches, self.batch_size, self.seed, device)
        with streamed(prog.reference):
            stats = _measure(placed(prog.reference, device), targets, batches) if targets else {}
        folds, per_consumer = [], {}
        for module, positions in targets.items():
            f, per_consumer[module] = _choose(module, prog.reference.get_submodule(module), positions, stats[module], tol)
            if f is not None:
                folds.append(f)
        gm = prog.gm
        if folds:
            gm = shared_copy(prog.gm)  # add_to_bias puts new biases in place
            for f in folds:
                fold(gm, prog.reference, prog.removal, f)
        record = Compensation(tuple(folds), skipped, source)
        summary = {"source": source, "folded": sum(len(f.positions) for f in folds),
                   "exact": sum(len(f.positions) for f in folds if f.exact),
                   "approximate": sum(len(f.positions) for f in folds if not f.exact),
                   "consumers": per_consumer, "skipped": dict(skipped)}
        log.info("compensate: %s", summary)
        out = prog.replace(gm=gm, compensation=record, info={**prog.info, "compensation": summary})
        return PassResult(out, changed=bool(folds))


compensate = Compensate
