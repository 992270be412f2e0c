"""Tests of the analyze pass: how the op rules make channels flow into groups (sizes, members,
roles, offsets, multiplicities, pin reasons), each checked again by slimming the same model and
checking the invariant (`helpers.prune`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import analyze, group_with, index_of, members, prune
from torch import nn

import pcompiler
from pcompiler.ir import Role
from pcompiler.passes.analyze import INPUT_REASON, OUTPUT_REASON
from pcompiler.passmanager import make_pass

P, C, T = Role.PRODUCE, Role.CONSUME, Role.TIED
IMG = torch.randn(2, 3, 6, 6)


@torch.fx.wrap
def wrapped_double(t):
    return t * 2


class Chain(nn.Module):
    """a -> mid -> h: the building block of most tests (mid may be any function or module)."""

    def __init__(self, a: nn.Module, mid, h: nn.Module):
        super().__init__()
        self.a, self.mid, self.h = a, mid, h

    def forward(self, x):
        return self.h(self.mid(self.a(x)))


def test_conv_bn_relu_conv():
    model = Chain(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), nn.Conv2d(8, 4, 3))
    prog = analyze(model, IMG)
    g = group_with(prog, "a.weight", 0)
    assert g.prunable and g.size == 8 and g.pinned == ()
    assert g.label() == "a,mid.0" and set(g.modules) == {"a", "mid.0", "h"}
    assert members(g) == {("a.weight", 0, P), ("a.bias", 0, P), ("mid.0.weight", 0, P), ("mid.0.bias", 0, P),
                          ("mid.0.running_mean", 0, T), ("mid.0.running_var", 0, T), ("h.weight", 1, C)}
    assert all(p.is_buffer == p.param.endswith(("running_mean", "running_var")) for p in g.params)
    assert all((p.index == np.arange(8)[:, None]).all() for p in g.params)
    assert [x.id for x in prog.analysis.prunable] == [g.id]  # h's channels reach the output
    assert group_with(prog, "h.weight", 0).pinned == (OUTPUT_REASON,)
    slim = prune(model, IMG, ratio=0.5).gm
    assert (slim.a.out_channels, slim.get_submodule("mid.0").num_features, slim.h.in_channels) == (4, 4, 4)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.h(self.b(y) + self.c(y))


def test_residual_add_couples_both_branches():
    prog = analyze(Residual(), IMG)
    g = group_with(prog, "b.weight", 0)
    assert g.prunable and g.size == 8
    assert members(g) == {("b.weight", 0, P), ("b.bias", 0, P), ("c.weight", 0, P), ("c.bias", 0, P),
                          ("h.weight", 1, C)}
    assert members(group_with(prog, "a.weight", 0)) == {("a.weight", 0, P), ("a.bias", 0, P),
                                                        ("b.weight", 1, C), ("c.weight", 1, C)}
    slim = prune(Residual(), IMG, ratio=0.5).gm
    assert slim.b.out_channels == slim.c.out_channels == slim.h.in_channels == 4


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.h(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_gives_groups_with_offsets():
    prog = analyze(Concat(), IMG)
    ga, gb = group_with(prog, "a.weight", 0), group_with(prog, "b.weight", 0)
    assert ga.id != gb.id and ga.prunable and gb.prunable and (ga.size, gb.size) == (4, 6)
    assert (index_of(ga, "h.weight", 1).ravel() == np.arange(4)).all()
    assert (index_of(gb, "h.weight", 1).ravel() == 4 + np.arange(6)).all()
    slim = prune(Concat(), IMG, ratio=0.5).gm
    assert (slim.a.out_channels, slim.b.out_channels, slim.h.in_channels) == (2, 3, 5)


def test_depthwise_conv_couples_input_and_output():
    model = Chain(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 2, 1))
    g = group_with(analyze(model, IMG), "a.weight", 0)
    assert g.prunable and g.size == 8
    assert members(g) == {("a.weight", 0, P), ("a.bias", 0, P), ("mid.weight", 0, P), ("mid.bias", 0, P),
                          ("h.weight", 1, C)}
    dw = prune(model, IMG, ratio=0.5).gm.mid
    assert dw.groups == dw.in_channels == dw.out_channels == 4 and dw.weight.shape == (4, 1, 3, 3)


def test_grouped_conv_couples_whole_conv_groups():
    model = Chain(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1))
    g = group_with(analyze(model, IMG), "a.weight", 0)
    assert g.prunable and g.size == 4  # one channel per conv group
    assert members(g) == {("a.weight", 0, P), ("a.bias", 0, P), ("mid.weight", 0, P), ("mid.bias", 0, P),
                          ("h.weight", 1, C)}
    assert (index_of(g, "a.weight", 0) == np.arange(16).reshape(4, 4)).all()  # input group width 4
    assert (index_of(g, "mid.weight", 0) == np.arange(8).reshape(4, 2)).all()  # output group width 2
    conv = prune(model, IMG, ratio=0.5).gm.mid
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 8, 4)


def test_flatten_into_linear_has_block_multiplicity():
    model = Chain(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    g = group_with(analyze(model, IMG), "a.weight", 0)
    assert g.prunable and g.size == 4
    assert members(g) == {("a.weight", 0, P), ("a.bias", 0, P), ("h.weight", 1, C)}
    assert (index_of(g, "h.weight", 1) == np.arange(64).reshape(4, 16)).all()
    assert prune(model, IMG, ratio=0.5).gm.h.in_features == 32


def test_group_norm_couples_whole_norm_groups():
    model = Chain(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1))
    g = group_with(analyze(model, IMG), "a.weight", 0)
    assert g.prunable and g.size == 4
    assert members(g) == {("a.weight", 0, P), ("a.bias", 0, P), ("mid.weight", 0, P), ("mid.bias", 0, P),
                          ("h.weight", 1, C)}
    assert (index_of(g, "mid.weight", 0) == np.arange(8).reshape(4, 2)).all()
    gn = prune(model, IMG, ratio=0.5).gm.mid
    assert (gn.num_groups, gn.num_channels) == (2, 4)


class MaskedInf(nn.Module):
    """y.masked_fill(a fixed mask, -inf): a removed channel would be -inf, not 0, where masked."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.arange(8) % 3 == 0)

    def forward(self, y):
        return y.masked_fill(self.mask, float("-inf"))


@pytest.mark.parametrize("mid, reason", [
    (nn.LayerNorm(8), "LayerNorm normalizes over these channels"),
    (lambda y: torch.softmax(y, -1), "softmax normalizes over these channels"),
    (lambda y: y - y.mean(-1, keepdim=True), "sub(0) = -1, not 0"),  # a mean is exact; x - mean is not
    (lambda y: 2.0 / y, "divides by these channels"),
    (lambda y: torch.cumsum(y, 1), "no rule for torch._VariableFunctionsClass.cumsum at node 'cumsum'"),
    (nn.Sigmoid(), "Sigmoid(0) = 0.5, not 0: removing a channel here is not zeroing it"),
    (torch.reciprocal, "reciprocal(0) = inf, not 0"),
    (MaskedInf(), "masked_fill(0) = -inf, not 0"),
], ids=["layernorm", "softmax", "mean", "division", "cumsum", "sigmoid", "reciprocal", "masked_inf"])
def test_ops_where_zeroing_is_not_removal_pin(mid, reason):
    model = Chain(nn.Linear(3, 8), mid, nn.Linear(8, 2))
    x = torch.randn(4, 3)
    g = group_with(analyze(model, x), "a.weight", 0)
    assert not g.prunable and g.pinned[0].startswith(reason), g.pinned
    assert len(g.pinned) == 1, g.pinned
    prog = prune(model, x, ratio=0.5)
    assert prog.selection == {} and prog.gm.a.out_features == 8


class RMSNorm(nn.Module):
    """RMSNorm as Hugging Face models write it: no norm op, a mean of squares."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Stream(nn.Module):
    """A residual stream under RMSNorm, and a channel mean used as a gate (CBAM-like)."""

    def __init__(self):
        super().__init__()
        self.inp, self.n1, self.n2 = nn.Linear(3, 8), RMSNorm(8), RMSNorm(8)
        self.up, self.down, self.gate, self.head = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(1, 1), nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        u = torch.relu(self.up(self.n1(h)))
        h = h + self.down(u * torch.sigmoid(self.gate(u.mean(-1, keepdim=True))))
        return self.head(self.n2(h))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_mean_over_channels_is_exact_once_rescaled(frontend):
    """mean over D channels with the removed ones zero = (D'/D) * mean over the D' kept: the
    rewrite multiplies by D'/D, so an RMSNorm'd stream and a mean-gated width are prunable."""
    model, x = Stream(), torch.randn(4, 5, 3)
    prog = pcompiler.run(pcompiler.trace(model, (x,), frontend=frontend), [make_pass("analyze")])
    stream, hidden = group_with(prog, "inp.weight", 0), group_with(prog, "up.weight", 0)
    assert stream.prunable and hidden.prunable
    assert {("n1.weight", 0), ("n2.weight", 0), ("down.weight", 0), ("head.weight", 1)} <= \
        {(p.param, p.dim) for p in stream.params}
    prog = pcompiler.run(prog, [make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.gm.get_parameter("n1.weight").shape == (4,) and prog.gm.get_parameter("up.weight").shape == (6, 4)
    factors = sorted(n.args[1] for n in prog.gm.graph.nodes if n.op == "call_function" and n.args
                     and isinstance(n.args[0], torch.fx.Node) and n.args[0].meta.get("pcompiler.rescaled"))
    assert factors == [0.5, 0.5, 0.5]  # two RMSNorms over 4 of 8, the gate's mean over 6 of 12
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_error"] < 1e-5


class FunctionalRMS(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(4, 6) + 0.5), eps

    def forward(self, x):
        return F.rms_norm(x, (4, 6), self.weight, self.eps)


@pytest.mark.parametrize("norm, frontend", [
    (nn.RMSNorm(8, eps=1e-3), "fx"), (nn.RMSNorm(8), "fx"), (nn.RMSNorm(8, eps=1e-3), "export"),
    (FunctionalRMS(1e-3), "fx"), (FunctionalRMS(None), "export"),
], ids=["module", "module-default-eps", "module-export", "functional-2d", "functional-export"])
def test_rmsnorm_with_a_weight_is_exact_once_rescaled(norm, frontend):
    """RMS over D channels with the removed ones zero = sqrt(D'/D) RMS over the D' kept, with eps
    x D/D': the rewrite scales the weight by sqrt(D/D') and eps by D/D'."""
    width = norm.weight.numel()
    shape = tuple(norm.weight.shape)
    model = Chain(nn.Sequential(nn.Linear(3, width), nn.Unflatten(-1, shape)), norm,
                  nn.Sequential(nn.Flatten(-len(shape)), nn.Linear(width, 2)))
    x = torch.randn(5, 3)
    prog = pcompiler.run(pcompiler.trace(model, (x,), frontend=frontend), [make_pass("analyze")])
    assert group_with(prog, "a.0.weight", 0).prunable
    prog = pcompiler.run(prog, [make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_error"] < 1e-5
    ratio = width / prog.gm.get_parameter("mid.weight").numel()
    assert ratio == 2.0
    if isinstance(norm, nn.RMSNorm):
        assert prog.gm.mid.normalized_shape == (4,)
        assert prog.gm.mid.eps == pytest.approx((norm.eps or torch.finfo(torch.float32).eps) * ratio)


def test_layernorm_channels_are_approximate_when_asked():
    """Pinned by default (the reason names the option); with prune_normalized the group is
    prunable and names the norm that makes its removal approximate."""
    model, x = Chain(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)), torch.randn(5, 3)
    g = group_with(analyze(model, x), "a.weight", 0)
    assert g.pinned == ("LayerNorm normalizes over these channels: removing some changes its statistics "
                        "(--prune-normalized removes them approximately)",) and not g.approximate
    prog = pcompiler.run(pcompiler.trace(model, (x,)), [make_pass("analyze", prune_normalized=True)])
    g = group_with(prog, "a.weight", 0)
    assert g.prunable and g.approximate == ("LayerNorm 'mid'",)
    assert members(g) == {("a.weight", 0, P), ("a.bias", 0, P), ("mid.weight", 0, P), ("mid.bias", 0, P),
                          ("h.weight", 1, C)}
    # Other pins stay pins: a softmax after the norm still holds the channels.
    model = Chain(nn.Linear(3, 8), nn.Sequential(nn.LayerNorm(8), nn.Softmax(-1)), nn.Linear(8, 2))
    g = group_with(pcompiler.run(pcompiler.trace(model, (x,)), [make_pass("analyze", prune_normalized=True)]),
                   "a.weight", 0)
    assert g.pinned == ("softmax normalizes over these channels",) and g.approximate == ("LayerNorm 'mid.0'",)


def test_rmsnorm_without_a_weight_pins():
    model, x = Chain(nn.Linear(3, 8), nn.RMSNorm(8, elementwise_affine=False), nn.Linear(8, 2)), torch.randn(5, 3)
    g = group_with(analyze(model, x), "a.weight", 0)
    assert not g.prunable and g.pinned[0].startswith("RMSNorm normalizes over these channels"), g.pinned


def test_model_input_and_output_pin():
    class AddInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.h(self.a(x) + x)

    x = torch.randn(4, 8)
    prog = analyze(AddInput(), x)
    assert group_with(prog, "a.weight", 0).pinned == (INPUT_REASON,)
    assert group_with(prog, "h.weight", 0).pinned == (OUTPUT_REASON,)
    assert prog.analysis.prunable == ()
    assert prune(AddInput(), x, ratio=0.5).selection == {}


def test_ops_without_rules_pin_and_are_noted():
    """Symbolic tracing keeps the fx-wrapped function whole (the auto frontend would export
    through it: test_export.py)."""
    model = Chain(nn.Conv2d(3, 8, 1), lambda y: wrapped_double(y), nn.Conv2d(8, 2, 1))
    prog = pcompiler.run(pcompiler.trace(model, (IMG,), frontend="fx"), [make_pass("analyze")])
    (reason,) = group_with(prog, "a.weight", 0).pinned
    assert reason.startswith("no rule for") and "wrapped_double" in reason and "at node 'wrapped_double'" in reason
    assert prog.analysis.notes == (("wrapped_double", reason),)
    assert pcompiler.run(prog, [make_pass("l1", ratio=0.5)]).selection == {}


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_opaque_submodule_pins():
    model = Chain(nn.Conv2d(3, 8, 1), DataDependent(), nn.Conv2d(8, 2, 1))
    prog = analyze(model, IMG)
    assert set(prog.opaque) == {"mid"}
    (reason,) = group_with(prog, "a.weight", 0).pinned
    assert reason.startswith("passes opaque module 'mid'")
    assert prog.analysis.notes == (("mid", reason),)
    assert prune(model, IMG, ratio=0.5).selection == {}


def test_channel_shuffle_stays_prunable():
    def shuffle(y):
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    model = Chain(nn.Conv2d(3, 8, 1), shuffle, nn.Conv2d(8, 2, 1))
    g = group_with(analyze(model, IMG), "a.weight", 0)
    assert g.prunable and g.size == 4  # the channel follows the 4-wide sub-dim through both halves
    assert (index_of(g, "a.weight", 0) == np.stack([np.arange(4), 4 + np.arange(4)], 1)).all()
    assert (index_of(g, "h.weight", 1) == np.arange(8).reshape(4, 2)).all()
    slim = prune(model, IMG, ratio=0.5).gm
    assert (slim.a.out_channels, slim.h.in_channels) == (4, 4)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unfold_into_patches_carries_channels_through_the_outer_dims(frontend):
    """MobileViT's unfold: (C, H) regrouped into (C x H/2, 2), and folded back. Channel c is the
    block 2c, 2c + 1 of the outer output dim; the inner dims (positions) are pinned."""
    def unfold_fold(y):
        b, c, h, w = y.shape
        patches = y.reshape(b * c * h // 2, 2, w // 2, 2).transpose(1, 2) * 2.0
        return patches.transpose(1, 2).reshape(b, c, h, w)

    model, x = Chain(nn.Conv2d(3, 8, 1), unfold_fold, nn.Conv2d(8, 2, 1)), torch.randn(1, 3, 4, 4)
    g = group_with(pcompiler.run(pcompiler.trace(model, (x,), frontend=frontend), [make_pass("analyze")]),
                   "a.weight", 0)
    assert g.prunable and g.size == 8 and (index_of(g, "h.weight", 1) == np.arange(8)[:, None]).all()
    slim = prune(model, x, ratio=0.5).gm
    assert (slim.a.out_channels, slim.h.in_channels) == (4, 4)
    # Neither outer size divides the other: pinned, with the shapes.
    model = Chain(nn.Linear(4, 6), lambda y: y.reshape(6, 4).relu().reshape(4, 6), nn.Linear(6, 2))
    g = group_with(analyze(model, torch.randn(4, 4)), "a.weight", 0)
    assert "reshape at 'reshape' regroups [4, 6] into [6, 4]" in g.pinned, g.pinned


class BiasedAttention(nn.Module):
    """Swin's window attention: a per-head relative position bias gathered from a table by an
    index buffer, and a mask broadcast over the heads, added to the logits before the softmax."""

    def __init__(self, dim=16, heads=4, n=5, leak=False):
        super().__init__()
        self.heads, self.qkv, self.o, self.leak = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), leak
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        self.register_buffer("index", (torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1).flatten())
        self.register_buffer("mask", torch.triu(torch.full((n, n), -100.0), 1))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1)
        p = (q @ k.transpose(-2, -1) + bias + self.mask).softmax(-1)
        out = p @ v + (p.amax(-1, keepdim=True) if self.leak else 0.0)  # leak: p reaches past v
        return self.o(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_heads_go_with_their_gathered_bias_under_a_mask(frontend):
    """A removed head's logits are its bias plus the mask, not zero; its softmax multiplies its
    zero values, so the head still goes (the bias table's column with it)."""
    model, x = BiasedAttention(), torch.randn(2, 5, 16)
    prog = pcompiler.run(pcompiler.trace(model, (x,), frontend=frontend), [make_pass("analyze")])
    g = group_with(prog, "qkv.weight", 0)
    assert g.prunable and g.size == 4 and ("table", 1, T) in members(g)
    prog = pcompiler.run(prog, [make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_relative_error"] < 1e-5
    assert prog.gm.get_parameter("table").shape == (9, 2) and prog.gm.get_submodule("qkv").out_features == 24
    # Where the probabilities also reach something other than the values, the heads stay.
    g = group_with(pcompiler.run(pcompiler.trace(BiasedAttention(leak=True), (x,), frontend=frontend),
                                 [make_pass("analyze")]), "qkv.weight", 0)
    assert not g.prunable and any("not zeroed with it" in r for r in g.pinned), g.pinned


class MaskedMHA(nn.Module):
    """nn.MultiheadAttention with a causal (L, S) or per-head mask and a key padding mask."""

    def __init__(self, per_head: bool = False, weights: bool = False):
        super().__init__()
        self.inp, self.attn = nn.Linear(16, 16), nn.MultiheadAttention(16, 4, batch_first=True)
        self.o, self.weights = nn.Linear(16, 2), weights
        causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
        self.register_buffer("mask", causal.repeat(2 * 4, 1, 1) if per_head else causal)

    def forward(self, x, pad):
        x = self.inp(x)
        out, w = self.attn(x, x, x, key_padding_mask=pad, attn_mask=self.mask)
        return (self.o(out), w) if self.weights else self.o(out)


def test_multihead_attention_with_masks_loses_whole_heads():
    x, pad = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True  # the second sequence's last two keys are padding
    prog = analyze(MaskedMHA(), x, pad)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in prog.gm.modules())  # lowered, masks and all
    g = group_with(prog, "attn.q_proj.weight", 0)
    assert g.prunable and g.size == 4 and index_of(g, "attn.q_proj.weight", 0).shape == (4, 4)
    prog = pcompiler.run(prog, [make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_relative_error"] < 1e-5
    assert (prog.gm.attn.q_proj.out_features, prog.gm.attn.out_proj.in_features) == (8, 8)


@pytest.mark.parametrize("kind, reason", [
    ("per_head", "a per-head attention mask (batch x heads, L, S) from the caller fixes the head count"),
    ("weights", "nn.MultiheadAttention ties its inner width to embed_dim and stays whole: its attention weights "
                "are used (averaged over heads, which removing a head changes); need_weights=False lets its heads go"),
])
def test_multihead_attention_that_cannot_lose_heads_says_why(kind, reason):
    x, pad = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    prog = analyze(MaskedMHA(per_head=kind == "per_head", weights=kind == "weights"), x, pad)
    g = group_with(prog, "attn.q_proj.weight" if kind == "per_head" else "inp.weight", 0)
    assert not g.prunable and any(r.startswith(reason) for r in g.pinned), g.pinned


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.o = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_attention_shrinks_by_whole_heads():
    """The default: a channel is a head, spanning its width in q, k, v and the output projection."""
    x = torch.randn(2, 5, 16)
    g = group_with(analyze(Attention(heads=4), x), "qkv.weight", 0)
    assert g.prunable and g.size == 4 and g.heads
    assert members(g) == {("qkv.weight", 0, P), ("qkv.bias", 0, P), ("o.weight", 1, C)}
    assert index_of(g, "qkv.weight", 0).shape == (4, 12) and index_of(g, "o.weight", 1).shape == (4, 4)
    # Head 1 is rows 4-7 of q, 20-23 of k, 36-39 of v; columns 4-7 of o.
    assert index_of(g, "qkv.weight", 0)[1].tolist() == [*range(4, 8), *range(20, 24), *range(36, 40)]
    assert index_of(g, "o.weight", 1)[1].tolist() == [4, 5, 6, 7]
    prog = prune(Attention(heads=4), x, ratio=0.5, round_to=8)  # 2 heads of 4: 8 wide, kept
    assert (prog.gm.qkv.out_features, prog.gm.o.in_features) == (24, 8)
    assert [n.args[3:5] for n in prog.gm.graph.nodes if n.target == "view"] == [(3, 2)]  # q, k, v of 2 heads
    (sdpa,) = [n for n in prog.gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert "scale" not in sdpa.kwargs  # the head width, and so the scale, are as they were


class GQA(nn.Module):
    """6 query heads over 2 key/value heads, by sdpa's own grouped-query form."""

    def __init__(self, dim=16, heads=6, kv=2, width=4):
        super().__init__()
        self.shape = (heads, kv, width)
        self.q, self.k, self.v = nn.Linear(dim, heads * width), nn.Linear(dim, kv * width), nn.Linear(dim, kv * width)
        self.o = nn.Linear(heads * width, dim)

    def forward(self, x):
        b, n, _ = x.shape
        h, kv, w = self.shape
        q = self.q(x).view(b, n, h, w).transpose(1, 2)
        k, v = (p(x).view(b, n, kv, w).transpose(1, 2) for p in (self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, h * w))


def test_grouped_query_sdpa_loses_key_value_heads_with_their_query_heads():
    x = torch.randn(2, 5, 16)
    g = group_with(analyze(GQA(), x), "k.weight", 0)
    assert g.prunable and g.size == 2 and g.block == 4
    assert index_of(g, "q.weight", 0)[1].tolist() == list(range(12, 24))  # query heads 3-5 read kv head 1
    prog = prune(GQA(), x, ratio=0.5)
    assert (prog.gm.q.out_features, prog.gm.k.out_features, prog.gm.o.in_features) == (12, 4, 12)
    views = sorted(n.args[3] for n in prog.gm.graph.nodes if n.target == "view")
    assert views == [1, 1, 3]  # 3 query heads over 1 key/value head: a valid grouped-query layer


def test_attention_head_dim_is_prunable():
    x = torch.randn(2, 5, 16)
    prog = pcompiler.run(pcompiler.trace(Attention(), x), [make_pass("analyze", attention="head_dim")])
    g = group_with(prog, "qkv.weight", 0)
    assert g.prunable and g.size == 8  # the head width; q, k, v and both heads lose it together
    assert members(g) == {("qkv.weight", 0, P), ("qkv.bias", 0, P), ("o.weight", 1, C)}
    assert index_of(g, "qkv.weight", 0).shape == (8, 6) and index_of(g, "o.weight", 1).shape == (8, 2)
    prog = prune(Attention(), x, ratio=0.5, attention="head_dim")
    assert (prog.gm.qkv.out_features, prog.gm.o.in_features) == (24, 8)
    (sdpa,) = [n for n in prog.gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert sdpa.kwargs["scale"] == pytest.approx(1 / np.sqrt(8))


@pytest.mark.parametrize("kind", ["split", "chunk"])
def test_split_pieces_map_to_offsets(kind):
    sizes = [4, 8] if kind == "split" else [4, 4]

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h1, self.h2 = nn.Conv2d(3, sum(sizes), 1), nn.Conv2d(sizes[0], 2, 1), nn.Conv2d(sizes[1], 2, 1)

        def forward(self, x):
            p, q = torch.split(self.a(x), sizes, dim=1) if kind == "split" else self.a(x).chunk(2, dim=1)
            return self.h1(p) + self.h2(q)

    prog = analyze(Split(), IMG)
    g1, g2 = group_with(prog, "h1.weight", 1), group_with(prog, "h2.weight", 1)
    assert g1.prunable and g2.prunable and (g1.size, g2.size) == tuple(sizes)
    assert (index_of(g1, "a.weight", 0).ravel() == np.arange(sizes[0])).all()
    assert (index_of(g2, "a.weight", 0).ravel() == sizes[0] + np.arange(sizes[1])).all()
    slim = prune(Split(), IMG, ratio=0.5).gm
    (node,) = [n for n in slim.graph.nodes if n.target in (torch.split, "split")]
    assert list(node.args[1]) == [s // 2 for s in sizes] and node.args[2] == 1


def test_split_piece_taken_by_a_negative_index():
    """Res2Net: `spx = torch.split(x, w, 1)`, a branch per piece, `spx[-1]` through a pool, all
    concatenated. spx[-1] is the last piece's channels, not a space of its own."""

    class Res2(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(3, 12, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 2, 1)
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            spx = torch.split(self.a(x), 4, 1)
            return self.out(torch.cat([self.b(spx[0]), spx[1], self.pool(spx[-1])], 1))

    prog = analyze(Res2(), IMG)
    (last,) = [g for g in prog.analysis.groups if any(p.param == "a.weight" and 8 in p.index for p in g.params)]
    assert last.prunable and members(last) == {("a.weight", 0, P), ("a.bias", 0, P), ("out.weight", 1, C)}
    assert (index_of(last, "out.weight", 1).ravel() == 8 + np.arange(4)).all()
    slim = prune(Res2(), IMG, ratio=0.5).gm
    (node,) = [n for n in slim.graph.nodes if n.target in (torch.split, "split")]
    assert list(node.args[1]) == [2, 2, 2] and slim.out.in_channels == 6


def test_functional_conv_and_linear_on_parameters():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8))
            self.w2 = nn.Parameter(torch.randn(2, 8))

        def forward(self, x):
            return F.linear(F.conv2d(x, self.w1, self.b1, padding=1).sum((2, 3)), self.w2)

    g = group_with(analyze(Functional(), IMG), "w1", 0)
    assert g.prunable and g.size == 8 and members(g) == {("w1", 0, P), ("b1", 0, P), ("w2", 1, C)}
    slim = prune(Functional(), IMG, ratio=0.5).gm
    assert (slim.w1.shape, slim.b1.shape, slim.w2.shape) == ((4, 3, 3, 3), (4,), (2, 4))


def test_embedding_weight_produces():
    model = Chain(nn.Embedding(10, 8), nn.ReLU(), nn.Linear(8, 2))
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    g = group_with(analyze(model, ids), "a.weight", 1)
    assert g.prunable and g.size == 8 and members(g) == {("a.weight", 1, P), ("h.weight", 1, C)}
    slim = prune(model, ids, ratio=0.5).gm
    assert slim.a.embedding_dim == 4 and slim.a.weight.shape == (10, 4)


def test_stochastic_depth_passes_channels_through():
    # torchvision's stochastic_depth is an fx-wrapped function (a leaf call); it scales whole
    # samples, so the residual stream it sits on stays prunable.
    torchvision = pytest.importorskip("torchvision")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
            self.sd = torchvision.ops.StochasticDepth(0.2, "row")
            self.h = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.h(y + self.sd(self.b(y)))

    prog = analyze(Block(), torch.randn(1, 3, 6, 6))
    g = group_with(prog, "a.weight", 0)
    assert g.prunable and g.size == 8
    assert {("b.weight", 0), ("h.weight", 1)} <= {(p.param, p.dim) for p in g.params}
    assert not any("stochastic_depth" in r for _, r in prog.analysis.notes)
