"""The IR every pass reads and writes: a `Program` around a torch.fx GraphModule.

What rides on the graph: each node's value (shape and dtype of every tensor it makes) sits in
`node.meta` under one key, read with `node_value`. Everything else a pass computes is a typed
field of the Program: the channel groups (`analysis`), the channels chosen for removal
(`selection`), the model as it was before `slim` (`reference`, what `verify` compares with), the
constants `compensate` folded into biases (`compensation`), and a record of the passes that ran.

A *value path* names one tensor inside a node's value: `()` for a plain tensor, `(i,)` for the
i-th item of a tuple output (split, chunk, a module returning a tuple).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.fx as fx

from pcompiler.errors import CompileError

META_KEY = "pcompiler.value"
INT_KEY = "pcompiler.int"  # the value of nodes that compute a Python int (sizes)
# Set by a slim rewrite on a node whose value it changes on purpose (a mean over kept channels,
# which the next node scales back): verify compares the node that restores it instead.
RESCALED_KEY = "pcompiler.rescaled"
MHA_KEPT_KEY = "pcompiler.mha_kept"  # node.meta: why an nn.MultiheadAttention call stays whole (decompose)

ValuePath = tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


# A node's value: one tensor, a (nested) tuple of them, or None for non-tensor values.
NodeValue = Union[TensorInfo, tuple["NodeValue", ...], None]  # noqa: UP007 (recursive alias)


def node_value(node: fx.Node) -> NodeValue:
    """The recorded value of `node` (set by the trace pass's shape propagation)."""
    return node.meta.get(META_KEY)


def set_node_value(node: fx.Node, value: NodeValue) -> None:
    node.meta[META_KEY] = value


def tensor_of(gm: torch.nn.Module, qualname: str) -> torch.Tensor:
    """The parameter, buffer or plain tensor attribute at a qualified name ('layer1.0.conv1.weight')."""
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def kept_by_zeroing(t: torch.Tensor) -> bool:
    """A tensor that is not an nn.Parameter (a buffer, a plain tensor attribute): `verify`'s
    zeroed reference leaves it as it is (running statistics are not producers)."""
    return not isinstance(t, torch.nn.Parameter)


def owner_of(gm: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str]:
    """The module holding a qualified name, and the attribute: 'layer1.0.conv1.weight' -> (conv1, 'weight')."""
    prefix, _, name = qualname.rpartition(".")
    return (gm.get_submodule(prefix) if prefix else gm), name


def shared_copy(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of `gm` (graph, modules) that shares its parameters and buffers, so a model and its
    rewritten copy hold the weights once. Whoever changes the copy puts new tensors in place of
    the ones it changes, never writes into one (slim, compensate's folds, verify's reference);
    passes that train or recalibrate a model train their own copy (`runtime.copy_to`)."""
    memo = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return copy.deepcopy(gm, memo)


def meta_copy(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of `gm` (graph, modules) whose parameters and buffers are empty tensors of the same
    shapes on the meta device: what a slim trial needs to count parameters, without the memory
    of a second model."""
    memo = {}
    for t in (*gm.parameters(), *gm.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
    return copy.deepcopy(gm, memo)


def call_with(model: torch.nn.Module, inputs: tuple, keywords: tuple[str, ...] = ()) -> Any:
    """`model` called on a Program's inputs: the last len(keywords) of them by keyword."""
    n = len(inputs) - len(keywords)
    return model(*inputs[:n], **dict(zip(keywords, inputs[n:])))


def op_name(target: Any) -> str:
    """An op's name whatever its form: 'view' for the method name, aten.view.default and
    torch.Tensor.view alike; a function's __name__ ('cat'); a module class's name."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", None) or str(target)


def int_value(value: Any) -> int | None:
    """A constant int, or the recorded value of a node that computes one (None otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value.meta.get(INT_KEY) if isinstance(value, fx.Node) else None


def tensor_at(node: fx.Node, path: ValuePath = ()) -> TensorInfo | None:
    """The TensorInfo at `path` inside `node`'s value, or None if there is no tensor there."""
    v = node_value(node)
    for i in path:
        if not isinstance(v, tuple) or i >= len(v):
            return None
        v = v[i]
    return v if isinstance(v, TensorInfo) else None


def iter_tensors(value: NodeValue, path: ValuePath = ()) -> Iterator[tuple[ValuePath, TensorInfo]]:
    """Every (path, TensorInfo) inside a node value."""
    if isinstance(value, TensorInfo):
        yield path, value
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from iter_tensors(v, path + (i,))


def describe(value: Any) -> NodeValue:
    """Turn a runtime value into a NodeValue (tensors become TensorInfo, lists/tuples recurse)."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    return None


# ---------------------------------------------------------------------------------------------
# Analysis results


@dataclass(frozen=True)
class DimRef:
    """One dimension of one tensor: of a node's value (`node` set) or of a parameter/buffer
    (`param` set, the qualified name in the GraphModule)."""

    dim: int
    node: str | None = None
    path: ValuePath = ()
    param: str | None = None

    def __str__(self) -> str:
        if self.param is not None:
            return f"{self.param}[dim {self.dim}]"
        p = "".join(f"[{i}]" for i in self.path)
        return f"{self.node}{p}[dim {self.dim}]"


class Role:
    """How a parameter slice relates to the channel it belongs to."""

    PRODUCE = "produce"  # creates the channel: conv/linear output rows, their bias, norm affine
    CONSUME = "consume"  # reads the channel and contracts it away: conv/linear input columns
    TIED = "tied"  # rides along: running stats, added position embeddings, layer scales


@dataclass(frozen=True)
class ParamSlice:
    """The slices of one parameter (or buffer) that belong to a group.

    `index[c]` are the positions along `dim` that channel c of the group occupies (several when
    one channel maps onto a block, e.g. a conv channel flattened into H*W linear inputs)."""

    param: str
    dim: int
    role: str
    index: np.ndarray  # shape (n_channels, multiplicity), int64
    is_buffer: bool = False
    extent: int = 0  # length of `dim` in the parameter (the group may hold only part of it)


@dataclass(frozen=True)
class SpaceSlice:
    """The positions a group's channels occupy in one tensor dimension of the graph."""

    ref: DimRef
    index: np.ndarray  # shape (n_channels, multiplicity)


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled channels that must be removed together.

    `size` channels; removing channel c removes `index[c]` from every member. `pinned` holds the
    reasons the group may not be pruned (empty: prunable); `approximate`, the reasons removing
    its channels is not exactly zeroing them (a LayerNorm's statistics, pruned on request)."""

    id: int
    size: int
    params: tuple[ParamSlice, ...]
    spaces: tuple[SpaceSlice, ...]
    pinned: tuple[str, ...] = ()
    approximate: tuple[str, ...] = ()
    heads: bool = False  # its channels are whole attention heads (`block` positions wide)

    @property
    def prunable(self) -> bool:
        return not self.pinned and any(p.role == Role.PRODUCE for p in self.params)

    @property
    def producers(self) -> tuple[ParamSlice, ...]:
        return tuple(p for p in self.params if p.role == Role.PRODUCE)

    @property
    def block(self) -> int:
        """Positions per channel in the narrowest layer the group produces: 1 for plain
        channels, the head width for a group of attention heads."""
        return min((p.index.shape[1] for p in self.producers), default=1)

    @property
    def modules(self) -> tuple[str, ...]:
        """Owner names of the member parameters (e.g. 'layer1.0.conv1'), in order, unique."""
        seen: dict[str, None] = {}
        for p in self.params:
            seen.setdefault(p.param.rpartition(".")[0] or p.param, None)
        return tuple(seen)

    def label(self) -> str:
        """The producing modules, e.g. 'layer1.0.conv1,layer1.0.bn1'; when the group holds only
        some rows of its first producer (a split, a concat input), their range: 'qkv[0:64]'."""
        prod = [p.param.rpartition(".")[0] or p.param for p in self.producers]
        text = ",".join(dict.fromkeys(prod)) or (self.modules[0] if self.modules else f"group{self.id}")
        if self.producers:
            idx = self.producers[0].index
            lo, hi = int(idx.min()), int(idx.max()) + 1
            if lo > 0 or hi < self.producers[0].extent or idx.size != hi - lo:
                text += f"[{lo}:{hi}]"
        return text


@dataclass(frozen=True)
class Analysis:
    groups: tuple[ChannelGroup, ...]
    # Nodes whose op had no rule or was opaque: node name -> reason (what the user should see).
    notes: tuple[tuple[str, str], ...] = ()

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]


# Selection: group id -> sorted channel indices (within the group) to remove.
Selection = dict[int, tuple[int, ...]]


def round_unit(round_to: int, block: int = 1) -> int:
    """Channels of one rounding step: kept widths are multiples of `round_to` positions, and a
    channel of `block` positions (an attention head of that width) counts as `block` wide."""
    return max(1, round_to // math.gcd(round_to, block))


@dataclass(frozen=True)
class Lattice:
    """The kept widths a group may take under the selection's rounding: `size` channels (heads,
    for an attention group of `block` positions each), kept a multiple of `unit` (or all), at
    least `least`."""

    gid: int
    size: int
    block: int
    unit: int
    least: int

    def widths(self) -> list[int]:
        """The kept widths, the full size first, then from the widest down."""
        top = self.size // self.unit * self.unit
        return [self.size] + [w for w in range(top, 0, -self.unit) if w >= self.least and w != self.size]


@dataclass(frozen=True)
class Removal:
    """What `slim` removed, in the original numbering: per parameter dim and per graph dim."""

    params: dict[tuple[str, int], np.ndarray]
    spaces: dict[DimRef, np.ndarray]

    def removed(self, ref: DimRef) -> np.ndarray:
        if ref.param is not None:
            return self.params.get((ref.param, ref.dim), _EMPTY)
        return self.spaces.get(ref, _EMPTY)


_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Fold:
    """Constants of removed channels folded into one consumer's bias (by `compensate`).

    `module`: the consumer (a Linear, or a Conv with groups 1). `positions`: its input positions
    (weight dim 1: linear input features, conv input channels) in the numbering before `slim`;
    `constants`: the value each held there. `exact`: the fold reproduces the consumer's output
    everywhere (linear; conv without zero padding); otherwise only where the kernel does not
    reach into the zero padding, or (a mean fold) only in expectation. `rel_std`: each position's
    spread on the data it was measured on, std / (|mean| + RMS of the whole consumer input); zero
    for an exact constant. `node`: the graph node that reads the consumer's weight (a module call
    or a functional linear / convolution; slim keeps node names); `conv`: its input's channel
    dim is 1 (else the last).

    A least-squares fold (`predict` set) stands for more than a constant: each removed position
    r reads as constants[r] + sum_k predict[r, k] * x[sources[k]], its linear prediction from the
    positions the slim consumer keeps (`sources`, numbering before slim). It changes the kept
    weight columns (W[:, sources] += W[:, positions] @ predict) as well as the bias (by the
    intercepts `constants`). Never exact: the prediction fits the calibration data, not every input."""

    module: str
    positions: np.ndarray  # (n,) int64
    constants: np.ndarray  # (n,) float64
    exact: bool
    rel_std: np.ndarray  # (n,) float64
    node: str
    conv: bool
    sources: np.ndarray | None = None  # (m,) int64: the kept positions a least-squares fold predicts from
    predict: np.ndarray | None = None  # (n, m) float32: the fit's coefficients


@dataclass(frozen=True)
class Compensation:
    """What `compensate` folded (`folds`), what it could not fold and why (`skipped`: consumer
    parameter -> reason), and how the constants were found (`source`)."""

    folds: tuple[Fold, ...]
    skipped: tuple[tuple[str, str], ...]
    source: str


# ---------------------------------------------------------------------------------------------
# The program


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool


@dataclass
class Program:
    """What flows through the pipeline.

    gm: the traced model. example_inputs: inputs shapes were propagated with (meta tensors if
    the model lives on the meta device), gm's positional inputs. source: the user's model
    (verify checks that the trace reproduces it). opaque: submodules kept as leaves because they could
    not be traced, with the reason. reference: a copy of `gm` taken by `slim` before it changed
    anything; removal: what slim removed from it. compensation: the removed channels' constants
    that `compensate` folded into consumer biases (verify injects them into the reference). info: per-pass results for the report (verify, exports, flops, ...)."""

    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    source: torch.nn.Module | None = None
    keywords: tuple[str, ...] = ()  # the last len(keywords) inputs go to `source` by these names
    frontend: str = "fx"  # "export": gm returns the tensors of source's output as one flat tuple
    opaque: dict[str, str] = field(default_factory=dict)
    analysis: Analysis | None = None
    scores: dict[int, np.ndarray] | None = None  # group id -> per-channel importance (higher = keep)
    selection: Selection | None = None
    reference: fx.GraphModule | None = None
    removal: Removal | None = None
    compensation: Compensation | None = None
    info: dict[str, Any] = field(default_factory=dict)
    history: list[PassRecord] = field(default_factory=list)

    def replace(self, **changes: Any) -> Program:
        return dataclasses.replace(self, **changes)

    @property
    def on_meta(self) -> bool:
        return any(t.is_meta for t in self.example_inputs)

    def require_analysis(self, who: str) -> Analysis:
        if self.analysis is None:
            raise CompileError(f"{who} needs channel groups: run the 'analyze' pass before it")
        return self.analysis

    def require_selection(self, who: str) -> Selection:
        if self.selection is None:
            raise CompileError(
                f"{who} needs a selection of channels: run a method (l1, random, ...) before it"
            )
        return self.selection
