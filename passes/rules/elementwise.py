"""Rules for element-wise ops (with broadcasting), activations, reductions, softmax, pooling,
padding and the no-op bookkeeping ops (size, dim, asserts).

An activation passes channels only where f(0) = 0, which `at_zero` evaluates from the op itself
(the lists below say which ops are element-wise, not which are zero-preserving).
Broadcasting aligns dims from the right; a size-1 side couples nothing. Division pins the
divisor's channels (a zeroed divisor is not a removed one). Reductions keep the dims they do not
reduce; a sum over channels is exact under removal (zeros add nothing), and so is a mean once
the rewrite scales it by D'/D (it divides by the kept D' instead of D: RMSNorm written out as
x * rsqrt(mean(x^2) + eps), as Hugging Face models do); a max, a variance or a norm is not, so
those pin what they reduce.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompiler.ir import RESCALED_KEY, kept_by_zeroing, op_name, tensor_at, tensor_of
from pcompiler.passes.rules.at_zero import AtZero, at_zero, gates_only
from pcompiler.passes.rules.base import RewriteContext, RuleContext, RuleError, arg, aten_ops, rewriter, rule

_ACT_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_ACT_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.threshold,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, torch.clamp, torch.clip, torch.erf, torch.square, torch.sin, torch.cos, torch.reciprocal,
    torch.nan_to_num, torch.clone, torch.detach, torch.pow, operator.neg, operator.pos, operator.pow,
)
_ACT_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "clamp", "clamp_", "clip", "erf", "square", "sin", "cos", "reciprocal", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "requires_grad_",
    "nan_to_num", "masked_fill", "masked_fill_", "pow", "pow_", "zero_", "fill_",
)


_ACT_ATEN = aten_ops(
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "gelu_", "silu",
    "silu_", "mish", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "softplus",
    "log_sigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp",
    "clamp_", "clamp_min", "clamp_max", "clip", "erf", "square", "sin", "cos", "reciprocal", "nan_to_num", "clone",
    "detach", "alias", "lift_fresh_copy", "contiguous", "dropout", "feature_dropout", "alpha_dropout", "pow", "to",
    "_to_copy", "type_as", "masked_fill", "masked_fill_", "zeros_like", "ones_like", "full_like", "fill_", "zero_",
    "threshold", "sign", "floor", "ceil", "round", "logical_not", "bitwise_not",
)


# torchvision.ops.stochastic_depth: identity in eval, a per-sample 0/1 scale in training.
_BY_NAME = ("torchvision.ops.stochastic_depth.stochastic_depth",)


@rule(*_ACT_MODULES, *_ACT_FUNCTIONS, *_ACT_METHODS, *_BY_NAME, *_ACT_ATEN)
def unary(node: fx.Node, ctx: RuleContext) -> None:
    """Output channel c is a function of input channel c (and of scalars). The channels pass
    only if f(0) = 0 (evaluated from the op, `at_zero`), or if f(0) is a finite constant that
    only gates a zeroed tensor (x * sigmoid(...)); otherwise they are pinned with f(0)."""
    values = [*node.args, *node.kwargs.values()]
    # The channel input: the first tensor argument (2 ** x is aten.pow.Scalar(2, x)).
    x = next((a for a in values if ctx.info(a) is not None), None)
    if x is None:
        if ctx.info(node) is None:  # arithmetic on sizes, not tensors
            return
        raise RuleError("no tensor argument")
    ctx.same_shape(x, node)
    for other in values[values.index(x) + 1:]:  # e.g. masked_fill's mask, type_as
        if ctx.info(other) is not None and op_name(node.target) != "type_as":
            ctx.same_shape(other, node)
    f0 = at_zero(node, x, ctx.gm)
    if not f0.zero and not (f0.finite and gates_only(node, ctx.gm)):
        ctx.pin_tensor(node, f0.reason())


_BINARY = (
    operator.add, operator.sub, operator.mul, operator.iadd, operator.isub, operator.imul, torch.add,
    torch.sub, torch.mul, torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul,
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, operator.and_, operator.or_,
    "add", "add_", "sub", "sub_", "mul", "mul_", "maximum", "minimum", "where", "lerp", "addcmul",
    *aten_ops("add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "maximum", "minimum", "where", "lerp", "addcmul",
              "gt", "lt", "ge", "le", "eq", "ne", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
              "__and__", "__or__"),
)
_DIVISION = (operator.truediv, operator.itruediv, operator.floordiv, torch.div, torch.true_divide, "div", "div_",
             "true_divide", *aten_ops("div", "div_", "floor_divide", "true_divide"))


@rule(*_BINARY)
def binary(node: fx.Node, ctx: RuleContext) -> None:
    """Every tensor operand's dims are the output's dims (broadcasting from the right).

    A channel of output dim d passes only if f = 0 when the operands that hold dim d whole are
    zero and the ones broadcast along it (size 1, numbers) take any value (probed): x + y, x * m
    and x > 0 pass; x + 1, x + bias_map(1, 1, H, W) on dim 1, where(x > 0, x, 1) and x == y pin.
    A buffer read whole (x + self.shift_buffer) counts as broadcast: the zeroed reference keeps
    buffers (running statistics) as they are."""
    out = ctx.info(node)
    if out is None:  # arithmetic on sizes, not tensors
        return
    tensors = [a for a in list(node.args) + list(node.kwargs.values()) if ctx.info(a) is not None]
    for a in tensors:
        ctx.same_shape(a, node)
    checked: dict[frozenset, AtZero] = {}
    for d, size in enumerate(out.shape):
        if size == 1:
            continue
        whole = frozenset(a for a in tensors if isinstance(a, fx.Node) and not _buffer(a, ctx.gm)
                          and _aligned(ctx.info(a).shape, out.ndim, d) == size)
        if whole not in checked:
            checked[whole] = at_zero(node, whole, ctx.gm)
        f0 = checked[whole]
        if not f0.zero and not (f0.finite and gates_only(node, ctx.gm)):
            kept = [a.name for a in tensors if isinstance(a, fx.Node) and a not in whole]
            more = f" ({', '.join(kept)} not zeroed with it: probed with several values)" if kept else ""
            ctx.pin(ctx.ref(node, d), f0.reason() + more)


def _buffer(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "get_attr" and kept_by_zeroing(tensor_of(gm, node.target))


def _aligned(shape: tuple[int, ...], ndim: int, d: int) -> int:
    """The size of `shape` at the output's dim d, broadcasting from the right (1 where missing)."""
    i = d - (ndim - len(shape))
    return shape[i] if i >= 0 else 1


@rule(*_DIVISION)
def division(node: fx.Node, ctx: RuleContext) -> None:
    if ctx.info(node) is None:
        return
    num, den = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if ctx.info(num) is not None:
        ctx.same_shape(num, node)
    if ctx.info(den) is not None:
        ctx.same_shape(den, node)
        ctx.pin_tensor(den, "divides by these channels (a zeroed divisor is not a removed one)")


# How removal acts on a reduction over channels: "exact" (zeros add nothing), "scaled" (a mean:
# zeros add nothing to the sum, and the rewrite keeps the old divisor), or None (pinned).
_REDUCTIONS = {
    "sum": "exact", "nansum": "exact", "mean": "scaled", "amax": None, "amin": None, "max": None, "min": None,
    "std": None, "var": None, "norm": None, "logsumexp": None, "prod": None, "nanmean": None,
}
_REDUCTION_FUNCTIONS = {getattr(torch, n): kind for n, kind in _REDUCTIONS.items()}
_REDUCTION_ATEN = aten_ops(*(n for n in _REDUCTIONS if n != "norm"))


def _reduced_dims(node: fx.Node, ndim: int) -> set[int] | None:
    """The dims `node` reduces (every dim when it names none); None when computed at run time."""
    dims = arg(node, 2, "dim", None) if op_name(node.target) == "norm" else arg(node, 1, "dim", None)
    if dims is None:
        return set(range(ndim))
    if isinstance(dims, fx.Node):
        return None
    return {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}


@rule(*_REDUCTIONS, *_REDUCTION_FUNCTIONS, *_REDUCTION_ATEN)
def reduction(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    tx = ctx.info(x)
    name = op_name(node.target)
    kind = _REDUCTIONS[name]
    dims = _reduced_dims(node, tx.ndim)
    if dims is None:
        raise RuleError("reduced dims are computed at run time")
    if ctx.info(node) is not None and ctx.info(node).ndim == 0:  # over every dim: one number
        if kind is None:
            ctx.pin_tensor(x, f"{name} over every dim (zeroing channels is not removing them)")
        return
    keepdim = bool(arg(node, 2 if name != "norm" else 3, "keepdim", False))
    outputs = [()] if ctx.info(node) is not None else [(0,), (1,)]  # max/min with dim give (values, indices)
    for path in outputs:
        j = 0
        for d in range(tx.ndim):
            if d in dims:
                if kind is None:
                    ctx.pin(ctx.ref(x, d), f"{name} over these channels (zeroing them is not removing them)")
                j += keepdim
                continue
            ctx.same(ctx.ref(x, d), ctx.ref(node, j, path))
            j += 1


_MEANS = [k for k, kind in {**_REDUCTIONS, **_REDUCTION_FUNCTIONS}.items() if kind == "scaled"]


@rewriter(*_MEANS, *(op for op in _REDUCTION_ATEN if op_name(op) == "mean"))
def mean_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    """mean over D channels of which D' are kept = (D'/D) * mean over the D': multiply by it."""
    x = node.args[0]
    dims = _reduced_dims(node, tensor_at(x).ndim)
    old = new = 1
    for d in dims:
        old, new = old * ctx.old_size(x, d), new * ctx.new_size(x, d)
    if old == new:
        return
    mul = torch.ops.aten.mul.Tensor if isinstance(node.target, torch._ops.OpOverload) else operator.mul
    ctx.insert_after(node, mul, (node, new / old))
    node.meta[RESCALED_KEY] = True


@rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin, torch.softmax,
      torch.log_softmax, "softmax", "log_softmax", *aten_ops("softmax", "_softmax", "log_softmax", "_log_softmax"))
def softmax(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    ctx.same_shape(x, node)
    dim = ctx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if dim is None:
        raise RuleError("softmax without an explicit dim")
    ctx.pin(ctx.ref(node, dim), "softmax normalizes over these channels")


_POOL_MODULES = {}
for _cls in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d):
    _POOL_MODULES[_cls] = 1
for _cls in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
             nn.FractionalMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    _POOL_MODULES[_cls] = 2
for _cls in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d):
    _POOL_MODULES[_cls] = 3
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.lp_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
    torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}


_POOL_ATEN = aten_ops(
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
    "upsample_linear1d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
)


@rule(*_POOL_MODULES, *_POOL_FUNCTIONS, F.interpolate, *_POOL_ATEN)
def pooling(node: fx.Node, ctx: RuleContext) -> None:
    """Spatial dims change size; the leading (batch, channel) dims pass through."""
    x = node.args[0] if node.args else node.kwargs["input"]
    tx, to = ctx.info(x), ctx.info(node)
    if to is None:
        raise RuleError("pooling that returns indices")
    if node.op == "call_module":
        k = _POOL_MODULES[type(ctx.module(node))]
    else:
        k = _POOL_FUNCTIONS.get(node.target, tx.ndim - 2)
    for d in range(tx.ndim - k):
        ctx.same(ctx.ref(x, d), ctx.ref(node, d))


@rule(F.pad, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
      nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
      *aten_ops("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
                "replication_pad2d", "replication_pad3d"))
def pad(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    pads = ctx.module(node).padding if node.op == "call_module" else arg(node, 1, "pad")
    if any(isinstance(p, fx.Node) for p in pads):
        ctx.pin_tensor(x, "padding computed at run time")
        return
    tx = ctx.info(x)
    padded = {tx.ndim - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
    for d in range(tx.ndim):
        if d in padded:
            ctx.pin(ctx.ref(x, d), "padded dim")
        else:
            ctx.same(ctx.ref(x, d), ctx.ref(node, d))


@rule("size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous", torch.numel,
      builtins.len, torch._assert, builtins.isinstance, *aten_ops("sym_size", "sym_numel", "sym_stride"))
def no_channels(node: fx.Node, ctx: RuleContext) -> None:
    """Ops that read sizes or check things; their results carry no channels."""


@rule(*aten_ops("arange", "zeros", "ones", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty",
                "scalar_tensor", "tensor", "randn", "rand"))
def constant(node: fx.Node, ctx: RuleContext) -> None:
    """A tensor made from sizes given as numbers: its dims cannot shrink with the channels."""
    ctx.pin_tensor(node, f"made by {op_name(node.target)} with sizes fixed in the graph")


@rule(builtins.getattr)
def attribute(node: fx.Node, ctx: RuleContext) -> None:
    """x.shape / x.dtype / x.device carry no channels; x.T / x.mT do but are rare: pinned."""
    if ctx.info(node) is not None:
        raise RuleError(f"tensor attribute '{node.args[1]}'")
