"""Rules for contractions: matmul/bmm/@, einsum and scaled_dot_product_attention.

A contracted dim is exact under removal (a zeroed channel adds nothing to a dot product), so
both operands' contracted dims are the same channels. Batch dims broadcast from the right.
sdpa scales by 1/sqrt(head width) unless told otherwise: when the q/k width shrinks, the rewrite
pins the old scale so the result stays the same. Attention keys are softmaxed over, so the
key/value sequence dim is pinned. The batch dim next to the two matrix dims of attention (q, k,
v of sdpa; 4-d matmuls) holds the heads: marked so that head splits carry whole heads. sdpa's
grouped-query form (`enable_gqa`) maps query head i to key/value head i // (Hq / Hkv).
`mha_mask` is nn.MultiheadAttention's masks as one sdpa mask (decompose.py lowers MHA with it);
a per-head mask from the caller fixes the head count.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

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


def _batch_dims(ctx: RuleContext, node: fx.Node, operands: list[fx.Node], k: int = 2) -> None:
    """Dims before the last k of each operand are broadcast batch dims of the output."""
    for t in operands:
        for d in range(1, ctx.info(t).ndim - k + 1):
            ctx.same(ctx.ref(t, -d - k), ctx.ref(node, -d - k))


@rule(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", *aten_ops("matmul", "bmm", "mm"))
def matmul(node: fx.Node, ctx: RuleContext) -> None:
    a, b = node.args[0], node.args[1]
    ta, tb = ctx.info(a), ctx.info(b)
    if ta is None or tb is None or ta.ndim < 2 or tb.ndim < 2:
        raise RuleError("matmul with a vector or a constant operand")
    _batch_dims(ctx, node, [a, b])
    if ta.ndim >= 4 and tb.ndim >= 4:  # (B, heads, T, D) @ (B, heads, D, T): attention
        for t in (a, b, node):
            ctx.head(ctx.ref(t, -3))
    ctx.same(ctx.ref(a, -1), ctx.ref(b, -2))
    ctx.same(ctx.ref(a, -2), ctx.ref(node, -2))
    ctx.same(ctx.ref(b, -1), ctx.ref(node, -1))


@rule(torch.einsum, *aten_ops("einsum"))
def einsum(node: fx.Node, ctx: RuleContext) -> None:
    equation = node.args[0].replace(" ", "")
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if "->" not in equation or "." in equation:
        raise RuleError(f"einsum '{node.args[0]}' without an explicit output or with an ellipsis")
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    seen: dict[str, object] = {}
    for t, labels in zip(operands, terms):
        for d, c in enumerate(labels):
            ref = ctx.ref(t, d)
            if c in seen:
                ctx.same(seen[c], ref)
            else:
                seen[c] = ref
    for d, c in enumerate(out):
        ctx.same(seen[c], ctx.ref(node, d))


@rule(F.scaled_dot_product_attention, *aten_ops("scaled_dot_product_attention"))
def sdpa(node: fx.Node, ctx: RuleContext) -> None:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if arg(node, 7, "enable_gqa", False):  # key/value head j serves query heads j*r .. j*r + r - 1
        hq, hkv = ctx.info(q).shape[-3], ctx.info(k).shape[-3]
        if hq % hkv:
            raise RuleError(f"grouped-query attention with {hq} query heads over {hkv} key/value heads")
        _batch_dims(ctx, node, [q, k, v], 3)
        ctx.same(ctx.ref(q, -3), ctx.ref(node, -3))
        for t in (k, v):
            ctx.link(ctx.ref(q, -3), np.arange(hq), ctx.ref(t, -3), np.arange(hq) // (hq // hkv))
    else:
        _batch_dims(ctx, node, [q, k, v])
    for t in (q, k, v, node):
        if ctx.info(t).ndim >= 3:
            ctx.head(ctx.ref(t, -3))
    ctx.same(ctx.ref(q, -1), ctx.ref(k, -1))
    ctx.same(ctx.ref(q, -2), ctx.ref(node, -2))
    ctx.same(ctx.ref(k, -2), ctx.ref(v, -2))
    ctx.same(ctx.ref(v, -1), ctx.ref(node, -1))
    ctx.pin(ctx.ref(k, -2), "attention softmax runs over the key positions")
    mask = arg(node, 3, "attn_mask")
    if ctx.info(mask) is not None:
        tm = ctx.info(mask)
        ctx.same(ctx.ref(mask, -2), ctx.ref(q, -2))
        ctx.same(ctx.ref(mask, -1), ctx.ref(k, -2))
        for d in range(3, tm.ndim + 1):
            ctx.same(ctx.ref(mask, -d), ctx.ref(node, -d))


def mha_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int,
             dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's masks as one additive mask for sdpa over (batch, heads, L, S), as
    MHA itself combines them: a boolean True means "not attended" (-inf), a float mask adds.
    attn_mask is (L, S) or (batch * heads, L, S); key_padding_mask (batch, S)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    out = torch.zeros((), dtype=dtype)
    if attn_mask is not None:
        m = additive(attn_mask)
        out = out + (m.view(batch, heads, *m.shape[-2:]) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        out = out + additive(key_padding_mask).view(batch, 1, 1, -1)
    return out


@rule(mha_mask)
def mha_mask_rule(node: fx.Node, ctx: RuleContext) -> None:
    if ctx.info(node).ndim == 4 and ctx.info(node).shape[1] > 1:
        ctx.pin(ctx.ref(node, 1), "a per-head attention mask (batch x heads, L, S) from the caller fixes the head "
                "count; a 2-d (L, S) mask lets heads go")


@rewriter(F.scaled_dot_product_attention, *aten_ops("scaled_dot_product_attention"))
def sdpa_rewrite(node: fx.Node, ctx: RewriteContext) -> None:
    q = arg(node, 0, "query")
    old = ctx.old_size(q, -1)
    if ctx.new_size(q, -1) != old and arg(node, 6, "scale") is None:
        set_arg(node, 6, "scale", 1.0 / math.sqrt(old))
