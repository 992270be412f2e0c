"""Lower nn.MultiheadAttention into standard pieces the op rules can prune.

nn.MultiheadAttention ties its inner (projected) width to `embed_dim`, its input width, so in
place its heads cannot shrink. Each call whose attention weights are unused is rewritten into

    q = q_proj(query); k = k_proj(key); v = v_proj(value)          # nn.Linear, weights copied
    q = q.view(B, L, heads, head_dim).transpose(1, 2)   (k, v likewise)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mha_mask(...), is_causal=...)
    out = out_proj(o.transpose(1, 2).reshape(B, L, heads * head_dim))

held by a plain nn.Module at the same name (children q_proj, k_proj, v_proj, out_proj), so
the graph stays made of standard modules. Masks (attn_mask, key_padding_mask) become one
additive mask as MHA combines them (`rules.attention.mha_mask`). Calls that need what this does
not model are left as they are and pinned with the reason (`rules.layers.multihead_attention`):
returned attention weights (an average over heads, which removing a head changes), bias_k/bias_v,
add_zero_attn. The trace pass runs this before it checks that the graph reproduces the model,
so the lowering is checked too.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompiler.ir import MHA_KEPT_KEY
from pcompiler.passes.rules.attention import mha_mask

log = logging.getLogger("pcompiler")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # Built on meta (no random init to throw away), then given copies of the weights.
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin


def _split_projections(m: nn.MultiheadAttention) -> nn.Module:
    e = m.embed_dim
    holder = nn.Module()
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        weights = (w[:e], w[e : 2 * e], w[2 * e :])
    else:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    b = m.in_proj_bias
    biases = (b[:e], b[e : 2 * e], b[2 * e :]) if b is not None else (None, None, None)
    for name, w_, b_ in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
        setattr(holder, name, _linear(w_.detach(), None if b_ is None else b_.detach()))
    holder.out_proj = _linear(m.out_proj.weight.detach(), None if m.out_proj.bias is None else m.out_proj.bias.detach())
    return holder


def _call_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _why_not(m: nn.MultiheadAttention, node: fx.Node, args: dict) -> str | None:
    if m.bias_k is not None or m.add_zero_attn:
        return "it has bias_k/bias_v or add_zero_attn, which the lowering to projections and sdpa does not model"
    if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
        return "its output tuple is used as a whole; take [0] (with need_weights=False) to let its heads go"
    if any(u.args[1] != 0 and u.users for u in node.users):
        return ("its attention weights are used (averaged over heads, which removing a head changes); "
                "need_weights=False lets its heads go")
    return None


def _mask_kwargs(g: fx.Graph, m: nn.MultiheadAttention, args: dict, q: fx.Node) -> dict:
    """sdpa's attn_mask / is_causal for MHA's masks: is_causal alone when MHA would use it so
    (a causal hint and no key padding mask), else the masks combined (`mha_mask`)."""
    attn_mask, padding, causal = args.get("attn_mask"), args.get("key_padding_mask"), bool(args.get("is_causal", False))
    if (attn_mask is None and padding is None) or (causal and padding is None):
        return {"is_causal": causal}
    batch = g.call_method("size", (q, 0))
    return {"attn_mask": g.call_function(mha_mask, (attn_mask, padding, batch, m.num_heads, m.out_proj.weight.dtype))}


def decompose_multihead_attention(gm: fx.GraphModule) -> list[str]:
    """Rewrite every lowerable nn.MultiheadAttention call in place; return the names lowered."""
    lowered: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.MultiheadAttention:
            continue
        m = gm.get_submodule(node.target)
        args = _call_args(node)
        why = _why_not(m, node, args)
        if why is not None:
            log.info("keeping %s as nn.MultiheadAttention: %s", node.target, why)
            node.meta[MHA_KEPT_KEY] = why
            continue
        holder = _split_projections(m)
        gm.add_submodule(node.target, holder)
        g, t = gm.graph, node.target
        with g.inserting_before(node):
            heads, head_dim = m.num_heads, m.head_dim
            proj = []
            for name, x in (("q_proj", args["query"]), ("k_proj", args["key"]), ("v_proj", args["value"])):
                y = g.call_module(f"{t}.{name}", (x,))
                if not m.batch_first:
                    y = g.call_method("transpose", (y, 0, 1))
                b, n = g.call_method("size", (y, 0)), g.call_method("size", (y, 1))
                y = g.call_method("view", (y, b, n, heads, head_dim))
                proj.append(g.call_method("transpose", (y, 1, 2)))
            o = g.call_function(F.scaled_dot_product_attention, tuple(proj), _mask_kwargs(g, m, args, proj[0]))
            o = g.call_method("transpose", (o, 1, 2))
            b, n = g.call_method("size", (o, 0)), g.call_method("size", (o, 1))
            o = g.call_method("reshape", (o, b, n, heads * head_dim))
            if not m.batch_first:
                o = g.call_method("transpose", (o, 0, 1))
            out = g.call_module(f"{t}.out_proj", (o,))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            g.erase_node(user)
        g.erase_node(node)
        lowered.append(t)
    if lowered:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return lowered
