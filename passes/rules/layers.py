"""Rules for layers with parameters: conv (grouped, depthwise, transposed), linear, norms,
embeddings, as modules and as torch.nn.functional calls on plain parameters.

Grouped convs: a channel cannot leave one conv group alone (every group must keep the same
width), so the rule couples whole conv groups: removing one removes its input and output
channels together and `groups` shrinks. Depthwise convs are the case of width one.
GroupNorm likewise couples whole norm groups (its statistics are per group). LayerNorm
normalises over its channels: zeroing a channel there changes the statistics of the others, so
those channels are pinned, unless the user asks to prune them (`--prune-normalized`): then the
slim LayerNorm normalizes over the kept channels with its weight rescaled as an RMSNorm's (below:
exact where the kept channels' mean is zero), which is exact against a reference whose LayerNorm
does the same (`normalize_over_kept`), and approximate against the zeroed one. RMSNorm with a weight is exact once rescaled: with the removed
channels zero, RMS over D = sqrt(D'/D) x RMS over the D' kept (eps x D/D'), so the rewrite scales
its weight by sqrt(D/D') and its eps by D/D'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompiler.ir import MHA_KEPT_KEY, DimRef, Role, node_value, op_name, owner_of
from pcompiler.passes.rules.base import (
    RewriteContext,
    RuleContext,
    RuleError,
    arg,
    aten_ops,
    rewriter,
    rule,
    set_arg,
)

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_TCONVS = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_aten = torch.ops.aten
# The functional forms: F.conv2d(input, weight, bias, stride, padding, dilation, groups), and the
# ATen overloads with the same arguments.
_FCONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, _aten.conv1d.default: 1, _aten.conv2d.default: 2,
           _aten.conv3d.default: 3, _aten.conv1d.padding: 1, _aten.conv2d.padding: 2, _aten.conv3d.padding: 3}
_FTCONVS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3, _aten.conv_transpose1d.default: 1,
            _aten.conv_transpose2d.input: 2, _aten.conv_transpose3d.input: 3}


def _conv(ctx: RuleContext, node: fx.Node, x: fx.Node, nd: int, w: DimRef, w_in: DimRef, bias: DimRef | None,
          groups: int, transposed: bool) -> None:
    """Map channels through a convolution. `w` is the weight dim indexed by output channels
    (dim 0, or dim 1 for transposed), `w_in` the one indexed by input channels."""
    tx = ctx.info(x)
    if tx is None:
        raise RuleError("conv input is not a tensor")
    cdim = tx.ndim - nd - 1
    if cdim == 1:
        ctx.same(ctx.ref(x, 0), ctx.ref(node, 0))
    cin, cout = ctx.ref(x, cdim), ctx.ref(node, cdim)
    for d in range(1, nd + 1):  # what pins a position of a spatial dim: a norm's scale over it
        for t in (x, node):
            ctx.pin(ctx.ref(t, -d), "a convolution slides over these positions: removing one changes its output size")
    if bias is not None:
        ctx.same(cout, bias)
        ctx.role(bias, Role.PRODUCE)
    if groups == 1:
        ctx.same(cout, w)
        ctx.same(cin, w_in)
        ctx.role(w, Role.PRODUCE)
        ctx.role(w_in, Role.CONSUME)
        return
    a, b = ctx.size(cin) // groups, ctx.size(cout) // groups
    # Whole conv groups: input channel i and output channel o belong to group i//a, o//b.
    ctx.link(cin, np.arange(groups * a), cout, (np.arange(groups * a) // a) * b)
    ctx.link(cout, np.arange(groups * b), cout, (np.arange(groups * b) // b) * b)
    full = w_in if transposed else w  # the weight dim that spans all channels of its side
    ctx.same(cin if transposed else cout, full)
    ctx.role(full, Role.CONSUME if transposed else Role.PRODUCE)


def _param(ctx: RuleContext, value: Any, dim: int) -> DimRef | None:
    return ctx.ref(value, dim) if isinstance(value, fx.Node) else None


@rule(*_CONVS, *_TCONVS)
def conv_module(node: fx.Node, ctx: RuleContext) -> None:
    m = ctx.module(node)
    transposed = type(m) in _TCONVS
    nd = len(m.kernel_size)
    w_out = ctx.param_ref(f"{node.target}.weight", 1 if transposed else 0)
    w_in = ctx.param_ref(f"{node.target}.weight", 0 if transposed else 1)
    bias = ctx.param_ref(f"{node.target}.bias", 0) if m.bias is not None else None
    _conv(ctx, node, node.args[0], nd, w_out, w_in, bias, m.groups, transposed)


@rewriter(*_CONVS, *_TCONVS)
def conv_module_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    m = ctx.module(node)
    x = node.args[0]
    cdim = -len(m.kernel_size) - 1
    new_in, new_out = ctx.new_size(x, cdim), ctx.new_size(node, cdim)
    if m.groups > 1:
        per_group = m.out_channels // m.groups
        m.groups = new_out // per_group
    m.in_channels, m.out_channels = new_in, new_out


@rule(*_FCONVS, *_FTCONVS)
def conv_functional(node: fx.Node, ctx: RuleContext) -> None:
    transposed = node.target in _FTCONVS
    nd = (_FTCONVS if transposed else _FCONVS)[node.target]
    x, w = arg(node, 0, "input"), arg(node, 1, "weight")
    groups = arg(node, 6 if transposed else 6, "groups", 1)
    if not isinstance(groups, int) or not isinstance(w, fx.Node):
        raise RuleError("groups or weight are computed at run time")
    bias = _param(ctx, arg(node, 2, "bias"), 0)
    _conv(ctx, node, x, nd, ctx.ref(w, 1 if transposed else 0), ctx.ref(w, 0 if transposed else 1), bias,
          groups, transposed)


@rewriter(*_FCONVS, *_FTCONVS)
def conv_functional_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    groups = arg(node, 6, "groups", 1)
    if groups > 1:
        nd = (_FTCONVS if node.target in _FTCONVS else _FCONVS)[node.target]
        per_group = ctx.old_size(node, -nd - 1) // groups
        set_arg(node, 6, "groups", ctx.new_size(node, -nd - 1) // per_group)


def _linear(ctx: RuleContext, node: fx.Node, x: fx.Node, w_out: DimRef, w_in: DimRef, bias: DimRef | None) -> None:
    tx = ctx.info(x)
    if tx is None:
        raise RuleError("linear input is not a tensor")
    for d in range(1, tx.ndim):
        ctx.same(ctx.ref(x, -d - 1), ctx.ref(node, -d - 1))
    ctx.same(ctx.ref(x, -1), w_in)
    ctx.same(ctx.ref(node, -1), w_out)
    ctx.role(w_in, Role.CONSUME)
    ctx.role(w_out, Role.PRODUCE)
    if bias is not None:
        ctx.same(ctx.ref(node, -1), bias)
        ctx.role(bias, Role.PRODUCE)


@rule(nn.Linear)
def linear_module(node: fx.Node, ctx: RuleContext) -> None:
    m = ctx.module(node)
    w = f"{node.target}.weight"
    bias = ctx.param_ref(f"{node.target}.bias", 0) if m.bias is not None else None
    _linear(ctx, node, node.args[0], ctx.param_ref(w, 0), ctx.param_ref(w, 1), bias)


@rewriter(nn.Linear)
def linear_module_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    m = ctx.module(node)
    m.in_features, m.out_features = ctx.new_size(node.args[0], -1), ctx.new_size(node, -1)


@rule(F.linear, *aten_ops("linear"))
def linear_functional(node: fx.Node, ctx: RuleContext) -> None:
    w = arg(node, 1, "weight")
    if not isinstance(w, fx.Node):
        raise RuleError("weight is not a graph value")
    _linear(ctx, node, arg(node, 0, "input"), ctx.ref(w, 0), ctx.ref(w, 1), _param(ctx, arg(node, 2, "bias"), 0))


@rule(*aten_ops("addmm"))
def addmm(node: fx.Node, ctx: RuleContext) -> None:
    """addmm(bias, x, w) = bias + x @ w, with w of shape (in, out): a linear layer stored
    transposed (Hugging Face's Conv1D in GPT-2)."""
    bias, x, w = (arg(node, i, n) for i, n in enumerate(("self", "mat1", "mat2")))
    if not isinstance(w, fx.Node) or ctx.info(x) is None:
        raise RuleError("weight is not a graph value")
    _linear(ctx, node, x, ctx.ref(w, 1), ctx.ref(w, 0), _param(ctx, bias, -1) if ctx.info(bias) else None)


# --- norms ---------------------------------------------------------------------------------------

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORMS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


def _channel_norm(ctx: RuleContext, node: fx.Node, x: fx.Node, cdim: int, affine: list, stats: list) -> None:
    ctx.same_shape(x, node)
    c = ctx.ref(node, cdim)
    for ref in affine:
        if ref is not None:
            ctx.same(c, ref)
            ctx.role(ref, Role.PRODUCE)
    for ref in stats:
        if ref is not None:
            ctx.same(c, ref)
            ctx.role(ref, Role.TIED)


def _module_vec(ctx: RuleContext, node: fx.Node, name: str):
    return ctx.param_ref(f"{node.target}.{name}", 0) if getattr(ctx.module(node), name, None) is not None else None


@rule(*_BATCHNORMS, *_INSTANCENORMS)
def channel_norm_module(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    nd = _INSTANCENORMS.get(type(ctx.module(node)))
    cdim = 1 if nd is None else ctx.info(x).ndim - nd - 1
    vec = [_module_vec(ctx, node, n) for n in ("weight", "bias", "running_mean", "running_var")]
    _channel_norm(ctx, node, x, cdim, vec[:2], vec[2:])


@rewriter(*_BATCHNORMS, *_INSTANCENORMS)
def channel_norm_module_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    nd = _INSTANCENORMS.get(type(ctx.module(node)))
    cdim = 1 if nd is None else -nd - 1
    ctx.module(node).num_features = ctx.new_size(node.args[0], cdim)


@rule(F.batch_norm, F.instance_norm)
def channel_norm_functional(node: fx.Node, ctx: RuleContext) -> None:
    x = arg(node, 0, "input")
    # Both take (input, running_mean, running_var, weight, bias, ...); channels on dim 1.
    stats = [arg(node, 1, "running_mean"), arg(node, 2, "running_var")]
    affine = [arg(node, 3, "weight"), arg(node, 4, "bias")]
    _channel_norm(ctx, node, x, 1, [_param(ctx, a, 0) for a in affine], [_param(ctx, s, 0) for s in stats])


@rule(*aten_ops("batch_norm"))
def batch_norm_aten(node: fx.Node, ctx: RuleContext) -> None:
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)."""
    affine = [_param(ctx, arg(node, i, n), 0) for i, n in ((1, "weight"), (2, "bias"))]
    stats = [_param(ctx, arg(node, i, n), 0) for i, n in ((3, "running_mean"), (4, "running_var"))]
    _channel_norm(ctx, node, arg(node, 0, "input"), 1, affine, stats)


def _group_norm(ctx: RuleContext, node: fx.Node, x: fx.Node, groups: int, affine: list) -> None:
    _channel_norm(ctx, node, x, 1, affine, [])
    c = ctx.ref(node, 1)
    n = ctx.size(c)
    per = n // groups
    ctx.link(c, np.arange(n), c, (np.arange(n) // per) * per)


@rule(nn.GroupNorm)
def group_norm_module(node: fx.Node, ctx: RuleContext) -> None:
    m = ctx.module(node)
    _group_norm(ctx, node, node.args[0], m.num_groups, [_module_vec(ctx, node, "weight"), _module_vec(ctx, node, "bias")])


@rewriter(nn.GroupNorm)
def group_norm_module_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    m = ctx.module(node)
    per = m.num_channels // m.num_groups
    m.num_channels = ctx.new_size(node, 1)
    m.num_groups = m.num_channels // per


@rule(F.group_norm, *aten_ops("group_norm"))
def group_norm_functional(node: fx.Node, ctx: RuleContext) -> None:
    groups = arg(node, 1, "num_groups")
    affine = [_param(ctx, arg(node, 2, "weight"), 0), _param(ctx, arg(node, 3, "bias"), 0)]
    _group_norm(ctx, node, arg(node, 0, "input"), groups, affine)


@rewriter(F.group_norm, *aten_ops("group_norm"))
def group_norm_functional_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    per = ctx.old_size(node, 1) // arg(node, 1, "num_groups")
    set_arg(node, 1, "num_groups", ctx.new_size(node, 1) // per)


def _last_dims_norm(ctx: RuleContext, node: fx.Node, x: fx.Node, k: int, affine: list[list[DimRef]], what: str,
                    exact: bool) -> None:
    """`affine[i]` lists the k dims of one affine tensor (weight/bias), outer to inner. `exact`:
    removal is exact once rescaled (an RMSNorm with a weight: `_norm_rescale`); a LayerNorm
    is approximate (`normalize_over_kept`); anything else is pinned."""
    ctx.same_shape(x, node)
    reason = f"{what} normalizes over these channels: removing some changes its statistics"
    for d in range(k):
        ref = ctx.ref(node, d - k)
        if what in ("LayerNorm", "layer_norm"):
            ctx.approximate(ref, reason, f"{what} '{_user_name(node)}'")
        elif not exact:
            ctx.pin(ref, reason)
        for dims in affine:
            ctx.same(ref, dims[d])
            ctx.role(dims[d], Role.PRODUCE)


def _user_name(node: fx.Node) -> str:
    """The module a norm node is (or is inside of), by the user's name; else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return (next(reversed(stack.values()))[0] if stack else "") or node.name


@rule(nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
def last_dims_norm_module(node: fx.Node, ctx: RuleContext) -> None:
    m = ctx.module(node)
    k = len(m.normalized_shape)
    affine = [[ctx.param_ref(f"{node.target}.{name}", d) for d in range(k)]
              for name in ("weight", "bias") if getattr(m, name, None) is not None]
    exact = type(m).__name__ == "RMSNorm" and bool(affine)
    _last_dims_norm(ctx, node, node.args[0], k, affine, type(m).__name__, exact=exact)


@rule(F.layer_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else []), *aten_ops("layer_norm", "rms_norm"))
def last_dims_norm_functional(node: fx.Node, ctx: RuleContext) -> None:
    shape = arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    name = op_name(node.target)
    names = ("weight", "bias") if name == "layer_norm" else ("weight",)
    tensors = [arg(node, 2 + i, n) for i, n in enumerate(names)]
    affine = [[ctx.ref(t, d) for d in range(k)] for t in tensors if isinstance(t, fx.Node)]
    exact = name == "rms_norm" and bool(affine) and tensors[0].op == "get_attr"
    _last_dims_norm(ctx, node, arg(node, 0, "input"), k, affine, name, exact=exact)


def _norm_rescale(node: fx.Node, ctx: RewriteContext, name: str, eps: float | None) -> float | None:
    """RMS over D channels of which D' are kept and the rest zero = sqrt(D'/D) x RMS over the D'
    (with eps x D/D'): scale the weight by sqrt(D/D') in place. Exact for an RMSNorm; for a
    LayerNorm exact where the kept channels' mean is zero, and closer than no rescale elsewhere
    (the variance over D is mostly D'/D times the variance over D'). The weight `name` of ctx.gm
    becomes a new tensor (the reference may share the old one). Returns the new eps (None:
    unchanged)."""
    owner, attr = owner_of(ctx.gm, name)
    weight = getattr(owner, attr)
    ratio = float(np.prod(_norm_shape(node, ctx, weight.ndim, old=True))) / float(np.prod(_norm_shape(node, ctx, weight.ndim)))
    if ratio == 1.0:
        return None
    with torch.no_grad():
        scaled = weight.detach() * ratio ** 0.5
    setattr(owner, attr, nn.Parameter(scaled, weight.requires_grad) if isinstance(weight, nn.Parameter) else scaled)
    base = eps if eps is not None else torch.finfo(weight.dtype).eps  # torch's default eps of rms_norm
    return base * ratio


def _norm_shape(node: fx.Node, ctx: RewriteContext, k: int, old: bool = False) -> list[int]:
    size = ctx.old_size if old else ctx.new_size
    return [size(node, d - k) for d in range(k)]


@rewriter(nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
def last_dims_norm_module_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    m = ctx.module(node)
    if m.weight is not None:
        eps = _norm_rescale(node, ctx, f"{node.target}.weight", m.eps)
        if eps is not None:
            m.eps = eps
    m.normalized_shape = tuple(_norm_shape(node, ctx, len(m.normalized_shape)))


@rewriter(F.layer_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else []), *aten_ops("layer_norm", "rms_norm"))
def last_dims_norm_functional_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    shape = arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = arg(node, 2, "weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        eps_at, default = (3, None) if op_name(node.target) == "rms_norm" else (4, 1e-5)
        eps = _norm_rescale(node, ctx, w.target, arg(node, eps_at, "eps", default))
        if eps is not None:
            set_arg(node, eps_at, "eps", eps)
    elif op_name(node.target) == "rms_norm":
        return  # pinned by the rule: nothing changed
    set_arg(node, 1, "normalized_shape", _norm_shape(node, ctx, k))


def kept_layer_norm(x: torch.Tensor, keep: tuple[int, ...], k: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, rescale: bool = True) -> torch.Tensor:
    """LayerNorm of x's last k dims over the flat positions `keep` only, rescaled as the slim one
    is where it is (`_norm_rescale`: weight x sqrt(D/D'), eps x D/D'); the other positions 0
    (the removed channels' scale and shift are zero in the reference)."""
    idx = torch.as_tensor(keep, device=x.device)
    flat = x.flatten(-k) if k > 1 else x
    w, b = (None if t is None else t.flatten().index_select(0, idx) for t in (weight, bias))
    ratio = flat.shape[-1] / len(keep)
    if w is not None and rescale:
        w, eps = w * ratio ** 0.5, eps * ratio
    y = F.layer_norm(flat.index_select(-1, idx), (len(keep),), w, b, eps)
    return torch.zeros_like(flat).index_copy(-1, idx, y).view(x.shape)


class _KeptLayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm, keep: tuple[int, ...]):
        super().__init__()
        self.norm, self.keep = norm, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.norm
        return kept_layer_norm(x, self.keep, len(m.normalized_shape), m.weight, m.bias, m.eps)


def normalize_over_kept(gm: fx.GraphModule, removed: Callable[[DimRef], np.ndarray]) -> list[str]:
    """The reference an approximate LayerNorm removal is exact against: each LayerNorm of `gm`
    (a pre-slim graph) that lost channels (`removed`, per graph dim) normalizes over its kept
    ones only, as the slim model's does. Returns those norms' names; recompiles `gm` if any."""
    changed = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.LayerNorm):
            k = len(gm.get_submodule(node.target).normalized_shape)
        elif node.op == "call_function" and op_name(node.target) == "layer_norm":
            shape = arg(node, 1, "normalized_shape")
            k = len(shape) if isinstance(shape, (list, tuple)) else 1
        else:
            continue
        shape = node_value(node).shape[-k:]
        kept = [np.setdiff1d(np.arange(n), removed(DimRef(node_value(node).ndim - k + d, node=node.name)))
                for d, n in enumerate(shape)]
        if all(len(kd) == n for kd, n in zip(kept, shape)):
            continue
        keep = tuple(int(i) for i in np.ravel_multi_index(np.ix_(*kept), tuple(shape)).ravel())
        if node.op == "call_module":
            parent, _, attr = str(node.target).rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, attr, _KeptLayerNorm(gm.get_submodule(node.target), keep))
        else:
            w = arg(node, 2, "weight")
            rescale = isinstance(w, fx.Node) and w.op == "get_attr"  # as the rewrite rescales
            args = (arg(node, 0, "input"), keep, k, w, arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5), rescale)
            node.target, node.args, node.kwargs = kept_layer_norm, args, {}
        changed.append(_user_name(node))
    if changed:
        gm.recompile()
    return changed


@rule(nn.LocalResponseNorm)
def local_response_norm(node: fx.Node, ctx: RuleContext) -> None:
    ctx.same_shape(node.args[0], node)
    ctx.pin(ctx.ref(node, 1), "LocalResponseNorm mixes neighbouring channels")


# --- embeddings and attention modules ------------------------------------------------------------


def _embedding(ctx: RuleContext, node: fx.Node, idx: fx.Node, w_dim: DimRef) -> None:
    ti = ctx.info(idx)
    for d in range(ti.ndim):
        ctx.same(ctx.ref(idx, d), ctx.ref(node, d))
    ctx.same(ctx.ref(node, -1), w_dim)
    ctx.role(w_dim, Role.PRODUCE)


@rule(nn.Embedding)
def embedding_module(node: fx.Node, ctx: RuleContext) -> None:
    _embedding(ctx, node, node.args[0], ctx.param_ref(f"{node.target}.weight", 1))


@rewriter(nn.Embedding)
def embedding_module_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    ctx.module(node).embedding_dim = ctx.new_size(node, -1)


@rule(F.embedding)
def embedding_functional(node: fx.Node, ctx: RuleContext) -> None:
    _embedding(ctx, node, arg(node, 0, "input"), ctx.ref(arg(node, 1, "weight"), 1))


@rule(*aten_ops("embedding"))
def embedding_aten(node: fx.Node, ctx: RuleContext) -> None:
    """aten.embedding(weight, indices, ...): the arguments of F.embedding, swapped."""
    _embedding(ctx, node, arg(node, 1, "indices"), ctx.ref(arg(node, 0, "weight"), 1))


@rule(nn.MultiheadAttention)
def multihead_attention(node: fx.Node, ctx: RuleContext) -> None:
    why = node.meta.get(MHA_KEPT_KEY, "it was not lowered to projections and sdpa")
    ctx.pin_node(node, f"nn.MultiheadAttention ties its inner width to embed_dim and stays whole: {why}")


@rule(nn.PReLU)
def prelu(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    ctx.same_shape(x, node)
    m = ctx.module(node)
    if m.weight.numel() > 1:
        ref = ctx.param_ref(f"{node.target}.weight", 0)
        ctx.same(ctx.ref(node, 1), ref)
        ctx.role(ref, Role.TIED)


@rewriter(nn.PReLU)
def prelu_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    m = ctx.module(node)
    m.num_parameters = m.weight.numel()
