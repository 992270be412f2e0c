"""Rules for ops that move channels between dims: reshape/view/flatten/unflatten/squeeze,
permute/transpose, cat/stack, split/chunk/unbind, indexing (slices, constants, one integer index
tensor), expand/repeat, roll/flip.

Reshapes are read from the recorded shapes, not the arguments: input and output dims are
grouped into the smallest blocks with equal products. A 1:1 block is the same channels; a 1:n
split or n:1 merge is a `choice` the analysis resolves (see analyze.py); an n:m regroup carries
channels through its outer dims where one's size divides the other's (`_regroup`), and pins the
rest.
An expand's broadcast dims (1 to n) are pinned: their n channels are copies of one value, which
zeroing a producer does not zero (multi-query attention's key/value head, copied to every query
head: a query head zeroed still averages the copied values).
After slim, literal sizes in the arguments (view sizes, split sizes, slice bounds, expand
sizes) are rewritten to the new channel counts, and so are sizes computed at run time from a
dim that lost channels (`x.size(-1) // heads`).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from pcompiler.ir import int_value, iter_tensors, node_value, op_name, tensor_at
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

_RESHAPES = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
             torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten,
             *aten_ops("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
                       "unsqueeze_", "view_as", "reshape_as"))


@rule(*_RESHAPES)
def reshape(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    si, so = ctx.info(x).shape, ctx.info(node).shape
    if int(np.prod(si)) != int(np.prod(so)):
        raise RuleError(f"reshape from {list(si)} to {list(so)} changes the number of elements")
    ins = [d for d, s in enumerate(si) if s != 1]
    outs = [d for d, s in enumerate(so) if s != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        a, b = [ins[i]], [outs[j]]
        pa, pb = si[ins[i]], so[outs[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                a.append(ins[i])
                pa *= si[ins[i]]
                i += 1
            else:
                b.append(outs[j])
                pb *= so[outs[j]]
                j += 1
        if len(a) == 1 and len(b) == 1:
            ctx.same(ctx.ref(x, a[0]), ctx.ref(node, b[0]))
        elif len(a) == 1:
            ctx.choice(node, ctx.ref(x, a[0]), [ctx.ref(node, d) for d in b])
        elif len(b) == 1:
            ctx.choice(node, ctx.ref(node, b[0]), [ctx.ref(x, d) for d in a])
        else:
            _regroup(ctx, node, x, a, b)


def _regroup(ctx: RuleContext, node: fx.Node, x: fx.Node, a: list[int], b: list[int]) -> None:
    """Input dims `a` become output dims `b`, neither one dim (MobileViT's unfold: C x H into
    (C x H/p) x p). Where one side's outermost size divides the other's, its channel c is the
    block c*r .. c*r + r - 1 of the other's outermost dim (row-major order); the inner dims are
    pinned, and so is everything where neither divides."""
    si, so = ctx.info(x).shape, ctx.info(node).shape
    what = f"reshape at '{node.name}' regroups {[si[d] for d in a]} into {[so[d] for d in b]}"
    outer_in, outer_out = ctx.ref(x, a[0]), ctx.ref(node, b[0])
    small, big = sorted((outer_in, outer_out), key=ctx.size)
    n, m = ctx.size(small), ctx.size(big)
    inner = [ctx.ref(x, d) for d in a[1:]] + [ctx.ref(node, d) for d in b[1:]]
    if m % n:
        inner += [outer_in, outer_out]
    else:
        ctx.link(small, np.arange(m) // (m // n), big, np.arange(m))
        what += f"; channels follow the outer dims only ({n} into {m} in blocks of {m // n})"
    for ref in inner:
        ctx.pin(ref, what)


def _rewrite_sizes(sizes: Any, node: fx.Node, ctx: RewriteContext, first_dim: int = 0) -> Any:
    """Set every output size that no longer holds to its new channel count: where the dim's
    channel count changed, and where a computed size reads a tensor dim that lost channels.

    A computed size may read another tensor's dim (maxvit merges heads with `reshape(B, G, P,
    D)`, D read from the attention's input; a ViT splits heads with `C // heads`, C the pruned
    residual stream's width), which no longer matches. Channel counts are static, so a literal
    is always right; -1 is left to be inferred."""
    out = list(sizes)
    for k, s in enumerate(out):
        d = first_dim + k
        if not (isinstance(s, int) and s == -1):
            new = ctx.new_size(node, d)
            if new != ctx.old_size(node, d) or (isinstance(s, fx.Node) and _reads_a_changed_dim(s, ctx)):
                out[k] = new
    return type(sizes)(out) if isinstance(sizes, (tuple, list)) else out


def _size_read(n: fx.Node) -> tuple[fx.Node, list[int] | None] | None:
    """(tensor, its dims read; None: all) when `n` reads a tensor's size: x.size(), x.size(d),
    x.shape, aten.sym_size(x, d), and an item of those."""
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int):
        inner = _size_read(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        if inner is not None and inner[1] is None:
            return inner[0], [n.args[1]]
        return None
    x = n.args[0] if n.args else None
    if not isinstance(x, fx.Node) or tensor_at(x) is None:
        return None
    if (n.op == "call_method" and n.target == "size") or op_name(n.target) == "sym_size":
        return x, [n.args[1]] if len(n.args) > 1 else None
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        return x, None
    return None


def _reads_a_changed_dim(size: fx.Node, ctx: RewriteContext) -> bool:
    """Whether the computed `size` reads a dim of a tensor that lost channels (through the
    arithmetic on sizes between, not through tensors)."""
    stack, seen = [size], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        read = _size_read(n)
        if read is not None:
            x, dims = read
            ndim = tensor_at(x).ndim
            if any(len(ctx.removed(x, d % ndim)) for d in (range(ndim) if dims is None else dims)):
                return True
        elif tensor_at(n) is None:
            stack.extend(n.all_input_nodes)
    return False


@rewriter(*_RESHAPES)
def reshape_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    t, name = node.target, op_name(node.target)
    if name in ("view", "reshape", "_unsafe_view") and t is not torch.reshape:
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            node.args = (node.args[0], _rewrite_sizes(node.args[1], node, ctx))
        else:
            node.args = (node.args[0], *_rewrite_sizes(node.args[1:], node, ctx))
    elif t is torch.reshape:
        set_arg(node, 1, "shape", _rewrite_sizes(arg(node, 1, "shape"), node, ctx))
    elif name == "unflatten" and node.op != "call_module":
        dim = arg(node, 1, "dim")
        x_ndim = len(node_value(node.args[0]).shape)
        set_arg(node, 2, "sizes", _rewrite_sizes(arg(node, 2, "sizes"), node, ctx, dim % x_ndim))
    elif node.op == "call_module" and isinstance(ctx.module(node), nn.Unflatten):
        m = ctx.module(node)
        x_ndim = len(node_value(node.args[0]).shape)
        m.unflattened_size = tuple(_rewrite_sizes(m.unflattened_size, node, ctx, m.dim % x_ndim))


def _permutation(node: fx.Node, ndim: int) -> list[int]:
    """perm[i] = the input dim that output dim i comes from."""
    t, rest = op_name(node.target), node.args[1:]
    perm = list(range(ndim))
    if t == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or arg(node, 1, "dims")
        perm = [d % ndim for d in dims]
    elif t in ("transpose", "transpose_", "swapaxes", "swapdims"):
        a, b = (arg(node, 1, "dim0") % ndim, arg(node, 2, "dim1") % ndim)
        perm[a], perm[b] = perm[b], perm[a]
    elif t == "t":
        perm = perm[::-1]
    elif t in ("movedim", "moveaxis"):
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
        src, dst = [s % ndim for s in src], [d % ndim for d in dst]
        rest_dims = [d for d in range(ndim) if d not in src]
        perm = [-1] * ndim
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest_dims)
        perm = [p if p >= 0 else next(it) for p in perm]
    if any(isinstance(p, fx.Node) for p in perm):
        raise RuleError("permutation computed at run time")
    return perm


@rule("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis", torch.permute, torch.transpose,
      torch.swapaxes, torch.swapdims, torch.t, torch.movedim, torch.moveaxis,
      *aten_ops("permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", "movedim", "moveaxis"))
def permute(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    for i, src in enumerate(_permutation(node, ctx.info(x).ndim)):
        ctx.same(ctx.ref(x, src), ctx.ref(node, i))


@rule(torch.cat, torch.concat, torch.concatenate, *aten_ops("cat", "concat", "concatenate"))
def cat(node: fx.Node, ctx: RuleContext) -> None:
    tensors, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    nd = ctx.info(node).ndim
    dim %= nd
    offset = 0
    for t in tensors:
        ti = ctx.info(t)
        if ti is None:
            raise RuleError("concatenates a value that is not a graph tensor")
        for d in range(nd):
            if d != dim:
                ctx.same(ctx.ref(t, d), ctx.ref(node, d))
        n = ti.shape[dim]
        ctx.link(ctx.ref(t, dim), np.arange(n), ctx.ref(node, dim), offset + np.arange(n))
        offset += n


@rule(torch.stack, *aten_ops("stack"))
def stack(node: fx.Node, ctx: RuleContext) -> None:
    tensors, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0) % ctx.info(node).ndim
    ctx.pin(ctx.ref(node, dim), "stacked dim (each position is a whole input)")
    for t in tensors:
        for d in range(ctx.info(t).ndim):
            ctx.same(ctx.ref(t, d), ctx.ref(node, d + (d >= dim)))


_SPLITS = ("split", "chunk", "unbind", torch.split, torch.chunk, torch.unbind,
           *aten_ops("split", "split_with_sizes", "chunk", "unbind"))


def _split_dim(node: fx.Node) -> int:
    return arg(node, 1 if op_name(node.target) == "unbind" else 2, "dim", 0)


@rule(*_SPLITS)
def split(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    tx = ctx.info(x)
    dim = _split_dim(node) % tx.ndim
    pieces = list(iter_tensors(node_value(node)))
    if op_name(node.target) == "unbind":
        ctx.pin(ctx.ref(x, dim), "unbound dim (each position is a whole output)")
        for path, _ in pieces:
            for d in range(tx.ndim):
                if d != dim:
                    ctx.same(ctx.ref(x, d), ctx.ref(node, d - (d > dim), path))
        return
    offset = 0
    for path, t in pieces:
        for d in range(tx.ndim):
            if d != dim:
                ctx.same(ctx.ref(x, d), ctx.ref(node, d, path))
        n = t.shape[dim]
        ctx.link(ctx.ref(x, dim), offset + np.arange(n), ctx.ref(node, dim, path), np.arange(n))
        offset += n


@rewriter(*_SPLITS)
def split_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    if op_name(node.target) == "unbind":
        return
    dim = _split_dim(node)
    paths = [p for p, _ in iter_tensors(node_value(node))]
    old = [ctx.old_size(node, dim, p) for p in paths]
    new = [ctx.new_size(node, dim, p) for p in paths]
    if new != old:
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = torch.ops.aten.split_with_sizes.default
        else:
            node.target = "split" if isinstance(node.target, str) else torch.split
        node.args, node.kwargs = (node.args[0], new, dim), {}


@rule(operator.getitem)
def getitem(node: fx.Node, ctx: RuleContext) -> None:
    x, idx = node.args
    if not isinstance(x, fx.Node) or (ctx.info(x) is None and ctx.info(node) is None and node_value(x) is None):
        return
    if ctx.info(x) is None:  # picking an item of a tuple output
        if not isinstance(idx, int):
            raise RuleError("tuple indexed by a non-constant")
        idx %= len(node_value(x))  # spx[-1] is the space of spx[n - 1], not a path of its own
        for path, t in iter_tensors(node_value(node)):
            for d in range(t.ndim):
                ctx.same(ctx.ref(x, d, (idx, *path)), ctx.ref(node, d, path))
        return
    tx = ctx.info(x)
    items = _index_items(idx, tx.ndim)
    tensors = [(d, it) for d, _, it in items if isinstance(it, fx.Node) and ctx.info(it) is not None]
    if len(tensors) == 1 and all(it == slice(None) for _, _, it in items if it is not tensors[0][1]):
        _gather(ctx, node, x, *tensors[0])
        return
    for in_d, out_d, item in items:
        if item is None:
            continue
        if isinstance(item, int):
            ctx.pin(ctx.ref(x, in_d), "indexed by a constant position")
        elif isinstance(item, slice):
            _link_slice(ctx, x, in_d, node, out_d, item)
        else:
            raise RuleError(f"index item {item!r} (a tensor or a computed index)")


def _gather(ctx: RuleContext, node: fx.Node, x: fx.Node, dim: int, index: fx.Node) -> None:
    """x[..., index, ...]: one integer index tensor at `dim` (Swin's relative position bias,
    `table[index]`). The other dims of x pass; the gathered dim, and the output dims the index
    puts in its place, are positions picked by value: pinned."""
    tx, ti = ctx.info(x), ctx.info(index)
    if ti.dtype in (torch.bool, torch.uint8):
        raise RuleError("indexed by a mask (the output size depends on the values)")
    why = "gathered by an index tensor (positions picked by value)"
    ctx.pin(ctx.ref(x, dim), why)
    for j in range(ti.ndim):
        ctx.pin(ctx.ref(node, dim + j), why)
    for d in range(tx.ndim):
        if d != dim:
            ctx.same(ctx.ref(x, d), ctx.ref(node, d if d < dim else d - 1 + ti.ndim))


@rule(torch.ops.aten.index.Tensor, torch.ops.aten.index.Tensor_hacked_twin)
def index_tensor(node: fx.Node, ctx: RuleContext) -> None:
    """aten.index.Tensor(x, [None, ..., index, None, ...]): one index tensor, the rest whole."""
    x, indices = node.args[0], node.args[1]
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(given) != 1:
        raise RuleError(f"indexed by {len(given)} tensors at once")
    _gather(ctx, node, x, *given[0])


def _link_slice(ctx: RuleContext, x: fx.Node, in_d: int, node: fx.Node, out_d: int, item: slice) -> None:
    """The positions a unit-step slice takes pass; any other slice pins both sides."""
    rng = _slice_range(item, ctx.info(x).shape[in_d])
    if rng is None or rng.step != 1:
        why = "strided slice" if rng is not None else "sliced with bounds that are not sizes"
        ctx.pin(ctx.ref(x, in_d), why)
        ctx.pin(ctx.ref(node, out_d), why)
        return
    ctx.link(ctx.ref(x, in_d), np.asarray(rng), ctx.ref(node, out_d), np.arange(len(rng)))


def _slice_range(item: slice, size: int) -> range | None:
    """The positions a slice takes; bounds computed in the graph (x.shape[-1] // 2, as in
    rotary embeddings) count with their traced value. None if a bound is not an int."""
    bounds = [None if v is None else int_value(v) for v in (item.start, item.stop, item.step)]
    if any(b is None and v is not None for b, v in zip(bounds, (item.start, item.stop, item.step))):
        return None
    return range(*slice(*bounds).indices(size))


def _shifted(rng: range, removed: np.ndarray) -> slice:
    """The bounds of a unit-step slice once `removed` positions are gone. Channel counts are
    static: the new bounds are literals, computed bounds included."""
    return slice(rng.start - int((removed < rng.start).sum()), rng.stop - int((removed < rng.stop).sum()))


def _index_items(idx: Any, ndim: int) -> list[tuple[int, int, Any]]:
    """(input dim, output dim, item) for each item of a basic index, Ellipsis expanded."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    used = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[Any] = []
    for it in items:
        expanded.extend([slice(None)] * (ndim - used) if it is Ellipsis else [it])
    expanded.extend([slice(None)] * (ndim - sum(1 for it in expanded if it is not None)))
    out, in_d, out_d = [], 0, 0
    for it in expanded:
        out.append((in_d, out_d, it))
        if it is None:
            out_d += 1
        elif isinstance(it, (int, fx.Node)) and not isinstance(it, bool):
            in_d += 1
        else:
            in_d, out_d = in_d + 1, out_d + 1
    return out


@rewriter(operator.getitem)
def getitem_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    x, idx = node.args
    if not isinstance(x, fx.Node) or tensor_at(x) is None:
        return
    ndim = len(node_value(x).shape)
    new_items, changed = [], False
    for in_d, _, item in _index_items(idx, ndim):
        removed = ctx.removed(x, in_d) if isinstance(item, slice) else ()
        if len(removed) and item != slice(None):
            item = _shifted(_slice_range(item, ctx.old_size(x, in_d)), removed)
            changed = True
        new_items.append(item)
    if changed:
        node.args = (x, tuple(new_items))


def _slice_args(node: fx.Node) -> tuple[fx.Node, int, slice]:
    """aten.slice.Tensor(x, dim=0, start=None, end=None, step=1) as (x, dim, slice)."""
    x = node.args[0]
    dim = arg(node, 1, "dim", 0) % ctx_ndim(x)
    return x, dim, slice(arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1))


def ctx_ndim(x: fx.Node) -> int:
    t = tensor_at(x)
    if t is None:
        raise RuleError("sliced value is not a tensor")
    return t.ndim


@rule(*aten_ops("slice"))
def slice_dim(node: fx.Node, ctx: RuleContext) -> None:
    """x[..., a:b:s, ...] on one dim: the positions taken pass; a strided slice pins."""
    x, dim, item = _slice_args(node)
    tx = ctx.info(x)
    for d in range(tx.ndim):
        if d != dim:
            ctx.same(ctx.ref(x, d), ctx.ref(node, d))
    _link_slice(ctx, x, dim, node, dim, item)


@rewriter(*aten_ops("slice"))
def slice_dim_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    x, dim, item = _slice_args(node)
    removed = ctx.removed(x, dim)
    if len(removed):
        new = _shifted(_slice_range(item, ctx.old_size(x, dim)), removed)
        node.args, node.kwargs = (x, dim, new.start, new.stop, 1), {}


@rule(*aten_ops("select"))
def select(node: fx.Node, ctx: RuleContext) -> None:
    """x.select(dim, i): dim is indexed by a constant position (pinned), the others pass."""
    x = node.args[0]
    tx = ctx.info(x)
    dim = arg(node, 1, "dim") % tx.ndim
    ctx.pin(ctx.ref(x, dim), "indexed by a constant position")
    for d in range(tx.ndim):
        if d != dim:
            ctx.same(ctx.ref(x, d), ctx.ref(node, d - (d > dim)))


@rule("expand", torch.broadcast_to, *aten_ops("expand"))
def expand(node: fx.Node, ctx: RuleContext) -> None:
    x = node.args[0]
    tx, to = ctx.info(x), ctx.info(node)
    lead = to.ndim - tx.ndim
    for d in range(tx.ndim):
        if tx.shape[d] == to.shape[d + lead]:
            ctx.same(ctx.ref(x, d), ctx.ref(node, d + lead))
        else:
            ctx.pin(ctx.ref(node, d + lead), "copies of one value (an expanded dim): zeroing a producer zeroes none of them")


@rewriter("expand", torch.broadcast_to, *aten_ops("expand"))
def expand_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    if node.target is not torch.broadcast_to:
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            node.args = (node.args[0], _rewrite_sizes(node.args[1], node, ctx))
        else:
            node.args = (node.args[0], *_rewrite_sizes(node.args[1:], node, ctx))
    else:
        set_arg(node, 1, "size", _rewrite_sizes(arg(node, 1, "size"), node, ctx))


@rule("expand_as", "broadcast_as")
def expand_as(node: fx.Node, ctx: RuleContext) -> None:
    ctx.same_shape(node.args[0], node)
    ctx.same_shape(node.args[1], node)


@rule("repeat", torch.roll, "roll", torch.flip, "flip", *aten_ops("repeat", "roll", "flip"))
def repeat_roll_flip(node: fx.Node, ctx: RuleContext) -> None:
    """Dims that are repeated, rolled or flipped are pinned; the others pass through."""
    x = node.args[0]
    tx, to = ctx.info(x), ctx.info(node)
    name = op_name(node.target)
    if name == "repeat":
        reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        lead = len(reps) - tx.ndim
        moved = {d for d in range(tx.ndim) if reps[d + lead] != 1}
    else:
        dims = arg(node, 2 if name == "roll" else 1, "dims")
        if dims is None:
            raise RuleError("rolls or flips the flattened tensor")
        moved = {d % tx.ndim for d in ([dims] if isinstance(dims, int) else dims)}
        lead = 0
    for d in range(tx.ndim):
        if d in moved:
            ctx.pin(ctx.ref(x, d), f"{name} along these channels")
        elif to.shape[d + lead] == tx.shape[d]:
            ctx.same(ctx.ref(x, d), ctx.ref(node, d + lead))
