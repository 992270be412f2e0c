"""Tests of the element-wise rule's f(0) check (passes/rules/at_zero.py): every op registered
with the `unary` rule passes its channels exactly when f(0) = 0, evaluated here independently on
a zeros tensor; where f(0) != 0 the group is pinned with the op and the value, unless the value
is a finite gate on a zeroed tensor (x * sigmoid(...)), which the invariant then checks."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import analyze, group_with, prune
from torch import nn

from pcompiler.passes.rules.base import target_name, targets_of
from pcompiler.passes.rules.elementwise import unary

UNARY = targets_of(unary)
STOCHASTIC_DEPTH = "torchvision.ops.stochastic_depth.stochastic_depth"
MODULES = {nn.Threshold: lambda: nn.Threshold(0.1, 20.0)}
# How each op is called where its defaults do not make a call (or to exercise f(0) != 0).
CALLS = {
    F.threshold: lambda m, t: F.threshold(t, 0.1, 20.0),
    torch.clamp: lambda m, t: torch.clamp(t, -1.0, 1.0),
    torch.clip: lambda m, t: torch.clip(t, min=0.2),
    torch.pow: lambda m, t: torch.pow(t, 2),
    operator.pow: lambda m, t: operator.pow(t, -1),
    "clamp": lambda m, t: t.clamp(-1, 1),
    "clamp_": lambda m, t: t.clamp_(min=0.1),
    "clip": lambda m, t: t.clip(0.5, 1.0),
    "to": lambda m, t: t.to(torch.float64),
    "type": lambda m, t: t.type(torch.float64),
    "type_as": lambda m, t: t.type_as(m.other),
    "masked_fill": lambda m, t: t.masked_fill(m.mask, float("-inf")),
    "masked_fill_": lambda m, t: t.masked_fill_(m.mask, 0.0),
    "pow": lambda m, t: t.pow(2),
    "pow_": lambda m, t: t.pow_(0),
    "fill_": lambda m, t: t.fill_(0.25),
}
# ATen overloads that need arguments. Tensor arguments other than the channel input are probed
# by at_zero (0, 1, -1, 0.5): these are chosen so that the first nonzero probe gives the value
# computed here.
aten = torch.ops.aten
CALLS.update({
    aten.clamp.default: lambda m, t: aten.clamp.default(t, -1.0, 1.0),
    aten.clamp.Tensor: lambda m, t: aten.clamp.Tensor(t, m.other.float()),
    aten.clamp_.default: lambda m, t: aten.clamp_.default(t, 0.1),
    aten.clamp_.Tensor: lambda m, t: aten.clamp_.Tensor(t, None, -m.other.float()),
    aten.clamp_min.default: lambda m, t: aten.clamp_min.default(t, 0.0),
    aten.clamp_min.Tensor: lambda m, t: aten.clamp_min.Tensor(t, m.other.float()),
    aten.clamp_max.default: lambda m, t: aten.clamp_max.default(t, 1.0),
    aten.clamp_max.Tensor: lambda m, t: aten.clamp_max.Tensor(t, -m.other.float()),
    aten.clip.default: lambda m, t: aten.clip.default(t, 0.5, 1.0),
    aten.clip.Tensor: lambda m, t: aten.clip.Tensor(t, None, -m.other.float()),
    aten.dropout.default: lambda m, t: aten.dropout.default(t, 0.5, False),
    aten.feature_dropout.default: lambda m, t: aten.feature_dropout.default(t, 0.5, False),
    aten.alpha_dropout.default: lambda m, t: aten.alpha_dropout.default(t, 0.5, False),
    aten.pow.Tensor_Tensor: lambda m, t: aten.pow.Tensor_Tensor(t, m.other.float() * 0),
    aten.pow.Tensor_Scalar: lambda m, t: aten.pow.Tensor_Scalar(t, 2),
    aten.pow.Scalar: lambda m, t: aten.pow.Scalar(2.0, t),  # 2 ** t: the channel input comes second
    aten.to.device: lambda m, t: aten.to.device(t, t.device, torch.float64),
    aten.to.dtype: lambda m, t: aten.to.dtype(t, torch.float64),
    aten.to.other: lambda m, t: aten.to.other(t, m.other),
    aten.to.prim_Device: lambda m, t: aten.to.prim_Device(t, t.device),
    aten.type_as.default: lambda m, t: aten.type_as.default(t, m.other),
    aten.masked_fill.Scalar: lambda m, t: aten.masked_fill.Scalar(t, m.mask, float("-inf")),
    aten.masked_fill.Tensor: lambda m, t: aten.masked_fill.Tensor(t, m.mask, torch.tensor(1.0)),
    aten.masked_fill_.Scalar: lambda m, t: aten.masked_fill_.Scalar(t, m.mask, 0.0),
    aten.masked_fill_.Tensor: lambda m, t: aten.masked_fill_.Tensor(t, m.mask, torch.tensor(1.0)),
    aten.full_like.default: lambda m, t: aten.full_like.default(t, 0.0),
    aten.fill_.Scalar: lambda m, t: aten.fill_.Scalar(t, 0.25),
    aten.fill_.Tensor: lambda m, t: aten.fill_.Tensor(t, torch.tensor(1.0)),
    aten.threshold.default: lambda m, t: aten.threshold.default(t, 0.1, 20.0),
    aten.round.decimals: lambda m, t: aten.round.decimals(t, decimals=1),
    aten.bitwise_not.default: lambda m, t: aten.bitwise_not.default(t > 0).float(),
})


def call_of(key):
    if key in CALLS:
        return CALLS[key]
    if isinstance(key, type):
        return lambda m, t: m.op(t)
    if key == STOCHASTIC_DEPTH:
        ops = pytest.importorskip("torchvision.ops")
        return lambda m, t: ops.stochastic_depth(t, 0.2, "row", training=False)
    if isinstance(key, str):
        return lambda m, t: getattr(t, key)()
    return lambda m, t: key(t)


class OneOp(nn.Module):
    """a -> the op -> float -> h: the op's channels are a's output channels."""

    def __init__(self, key):
        super().__init__()
        self.a, self.h = nn.Linear(4, 6), nn.Linear(6, 3)
        self.op = MODULES.get(key, key)() if isinstance(key, type) else None
        self.call = call_of(key)
        self.register_buffer("mask", torch.arange(6) % 2 == 0)
        self.register_buffer("other", torch.ones(6, dtype=torch.float64))

    def forward(self, x):
        return self.h(self.call(self, self.a(x)).float())


@pytest.mark.filterwarnings("ignore:dropout.d")
@pytest.mark.parametrize("key", UNARY, ids=[target_name(k) for k in UNARY])
def test_every_elementwise_op_passes_channels_exactly_when_f0_is_zero(key):
    if key == "cuda" and not torch.cuda.is_available():
        pytest.skip("Tensor.cuda needs CUDA")
    model = OneOp(key).eval()
    with torch.no_grad():
        f0 = model.call(model, torch.zeros(2, 5, 6))
    nonzero = f0[f0 != 0]
    g = group_with(analyze(model, torch.randn(2, 5, 4)), "a.weight", 0)
    if nonzero.numel() == 0:
        assert g.prunable and g.pinned == (), g.pinned
    else:
        assert len(g.pinned) == 1 and g.pinned[0].endswith(
            f"(0) = {float(nonzero[0]):.6g}, not 0: removing a channel here is not zeroing it"), g.pinned


def test_the_registry_holds_zero_and_nonzero_ops():
    """The parametrization above covers both decisions (guards it against a registry drift)."""
    keys = set(map(target_name, UNARY))
    assert {"torch.nn.modules.activation.ReLU", "torch.nn.modules.activation.Sigmoid", "Tensor.masked_fill"} <= keys
    assert len(UNARY) >= 100


class Gate(nn.Module):
    """y * gate(g(y)): squeeze-excite's gate, or a swish written out."""

    def __init__(self, gate):
        super().__init__()
        self.a, self.g, self.h, self.gate = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3), gate

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.h(self.gate(self, y))


X = torch.randn(6, 4)


@pytest.mark.parametrize("gate", [lambda m, y: y * torch.sigmoid(m.g(y)), lambda m, y: F.hardsigmoid(m.g(y)) * y,
                                  lambda m, y: y.mul(y.sigmoid())], ids=["se", "hardsigmoid", "swish"])
def test_finite_gate_on_a_zeroed_tensor_stays_prunable(gate):
    model = Gate(gate)
    g = group_with(analyze(model, X), "a.weight", 0)
    assert g.prunable and g.size == 8
    prog = prune(model, X, ratio=0.5)  # verify and the independent invariant check
    assert prog.gm.a.out_features == 4


@pytest.mark.parametrize("gate, reason", [
    (lambda m, y: torch.sigmoid(y) * torch.sigmoid(m.g(y)), "sigmoid(0) = 0.5, not 0"),
    (lambda m, y: 2.0 * torch.sigmoid(y), "sigmoid(0) = 0.5, not 0"),
    (lambda m, y: y * torch.reciprocal(m.g(y)), "reciprocal(0) = inf, not 0"),
], ids=["two_gates", "scalar", "infinite"])
def test_gate_that_does_not_multiply_a_zero_pins(gate, reason):
    model = Gate(gate)
    g = group_with(analyze(model, X), "a.weight", 0)
    assert not g.prunable and any(r.startswith(reason) for r in g.pinned), g.pinned
    assert prune(model, X, ratio=0.5).gm.a.out_features == 8


@pytest.mark.parametrize("op, reason", [
    (lambda m, y: y + 1.0, "add(0) = 1, not 0"),
    (lambda m, y: 1.0 - y, "sub(0) = 1, not 0"),
    (lambda m, y: (y == 0).float(), "eq(0) = 1, not 0"),
    (lambda m, y: y + m.shift, "add(0) = 1, not 0"),  # a one-element tensor, probed
    (lambda m, y: y * 2.0, None),
    (lambda m, y: (y > 0).float(), None),
    (lambda m, y: y * m.shift, None),
], ids=["add", "rsub", "eq", "add_tensor", "mul", "gt", "mul_tensor"])
def test_binary_op_with_a_number_passes_channels_only_if_f0_is_zero(op, reason):
    """y + 1 on a removed channel is 1, not 0: pinned, not left for verify to fail (exit 3)."""

    class WithNumber(Gate):
        def __init__(self):
            super().__init__(op)
            self.register_buffer("shift", torch.ones(()))

    g = group_with(analyze(WithNumber(), X), "a.weight", 0)
    if reason is None:
        assert g.prunable and prune(WithNumber(), X, ratio=0.5).gm.a.out_features == 4
    else:
        assert not g.prunable and any(r.startswith(reason) for r in g.pinned), g.pinned
        assert prune(WithNumber(), X, ratio=0.5).gm.a.out_features == 8


class TwoOperands(nn.Module):
    """a (conv) -> op(y, ...) -> h: the op's channels are a's output channels."""

    def __init__(self, op):
        super().__init__()
        self.a, self.h, self.op = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1), op
        self.register_buffer("spatial", torch.randn(1, 1, 5, 5))  # broadcast along the channels
        self.register_buffer("shift", torch.randn(1, 16, 1, 1))  # whole, but a buffer: not zeroed

    def forward(self, x):
        return self.h(self.op(self, self.a(x)))


@pytest.mark.parametrize("op, reason", [
    (lambda m, y: torch.where(y > 0, y, 1.0), "where(0) = 1, not 0"),
    (lambda m, y: y + m.spatial, "add(0) = 1, not 0: removing a channel here is not zeroing it (spatial not zeroed"),
    (lambda m, y: y + m.shift, "add(0) = 1, not 0: removing a channel here is not zeroing it (shift not zeroed"),
    (lambda m, y: (y == torch.relu(y)).float(), "eq(0) = 1, not 0"),
    (lambda m, y: torch.where(y > 0, y, 0.0), None),
    (lambda m, y: y * m.spatial, None),
    (lambda m, y: y + torch.relu(y), None),
    (lambda m, y: torch.maximum(y, torch.relu(y)), None),
], ids=["where1", "add_map", "add_buffer", "eq", "where0", "mul_map", "residual", "maximum"])
def test_binary_op_of_tensors_passes_channels_only_if_f_of_the_zeroed_operands_is_zero(op, reason):
    x = torch.randn(2, 3, 5, 5)
    g = group_with(analyze(TwoOperands(op), x), "a.weight", 0)
    if reason is None:
        assert g.prunable and prune(TwoOperands(op), x, ratio=0.5).gm.a.out_channels == 8
    else:
        assert not g.prunable and any(r.startswith(reason) for r in g.pinned), g.pinned
        assert prune(TwoOperands(op), x, ratio=0.5).gm.a.out_channels == 16
