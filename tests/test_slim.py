"""Tests of the slim pass: module attributes follow the new weights, the result is made of
standard modules and reloads without the test's code, l1 removes exactly the weakest filters,
nothing selected changes nothing, and literal view/reshape sizes are rewritten."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import check_modules, group_with, outputs, prune
from torch import nn

X = torch.randn(2, 3, 8, 8)


class Mixed(nn.Module):
    """conv-bn, grouped conv, groupnorm, depthwise conv, pool, linear, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(2, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 5)

    def forward(self, x):
        y = self.dw(self.gn(self.gconv(torch.relu(self.bn(self.conv(x))))))
        return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))


def test_module_attributes_match_new_weights():
    prog = prune(Mixed(), X, ratio=0.5)
    gm = prog.gm
    assert (gm.conv.out_channels, gm.bn.num_features) == (8, 8)  # 4 conv groups of 4 inputs -> 2
    assert (gm.gconv.in_channels, gm.gconv.out_channels, gm.gconv.groups) == (8, 4, 2)
    assert (gm.gn.num_channels, gm.gn.num_groups) == (4, 1)  # 2 norm groups of 4 -> 1
    assert (gm.dw.in_channels, gm.dw.out_channels, gm.dw.groups) == (4, 4, 4)
    assert (gm.fc1.in_features, gm.fc1.out_features, gm.fc2.in_features, gm.fc2.out_features) == (4, 6, 6, 5)
    assert prog.info["slim"]["layers"]["fc1"] == {"in": [8, 4], "out": [12, 6]}
    assert prog.info["slim"]["layers"]["conv"] == {"out": [16, 8]}
    assert [r.changed for r in prog.history] == [False, False, True, False]


def test_slim_model_reloads_without_the_test_code(tmp_path):
    prog = prune(Mixed(), X, ratio=0.5)
    check_modules(prog.gm)
    torch.save({"model": prog.gm, "x": X, "y": prog.gm(X)}, tmp_path / "slim.pt")
    needs = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "slim.pt")
    assert not [g for g in needs if not g.startswith(("torch.", "collections."))], needs
    script = textwrap.dedent("""
        import importlib.util, sys, torch
        assert importlib.util.find_spec("test_slim") is None and importlib.util.find_spec("helpers") is None
        saved = torch.load(sys.argv[1], weights_only=False)
        mods = {type(m).__module__ for m in saved["model"].modules()} - {type(saved["model"]).__module__}
        assert all(m.startswith("torch.nn.") for m in mods), mods
        torch.testing.assert_close(saved["model"](saved["x"]), saved["y"], rtol=0, atol=0)
        print("ok", saved["model"].conv.out_channels)
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "slim.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "8"]


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.h(torch.relu(self.a(x)))


def test_l1_removes_the_lowest_l1_filters():
    model = ConvHead()
    magnitude = torch.tensor([0.5, 0.05, 0.3, 0.01, 0.2, 0.4])  # weakest: 3, 1, 4
    with torch.no_grad():
        model.a.weight.copy_(torch.randn(6, 3, 3, 3).sign() * magnitude[:, None, None, None])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prog = prune(model, X, ratio=0.5)
    assert prog.selection == {group_with(prog, "a.weight", 0).id: (1, 3, 4)}
    np.testing.assert_allclose(prog.scores[0], magnitude.numpy(), rtol=1e-6)
    kept = [0, 2, 5]
    assert torch.equal(prog.gm.a.weight, before["a.weight"][kept])
    assert torch.equal(prog.gm.a.bias, before["a.bias"][kept])
    assert torch.equal(prog.gm.h.weight, before["h.weight"][:, kept])
    assert torch.equal(prog.gm.h.bias, before["h.bias"])


def test_l1_score_of_a_head_counts_its_output_projection():
    """A head is scored over its q, k, v rows and its columns of the output projection: a head
    with the largest q, k, v but no output weight is the least important."""
    from test_analyze import Attention

    model, x = Attention(dim=16, heads=4), torch.randn(2, 5, 16)
    with torch.no_grad():
        model.qkv.weight.fill_(0.1)
        model.qkv.weight[[*range(0, 4), *range(16, 20), *range(32, 36)]] = 0.15  # head 0's q, k, v rows
        model.o.weight.fill_(0.1)
        model.o.weight[:, 0:4] = 0.0  # ... and nothing of it reaches the output
    prog = prune(model, x, ratio=0.25)
    assert prog.analysis.groups[next(iter(prog.selection))].heads
    assert list(prog.selection.values()) == [(0,)]  # q, k, v alone would keep head 0 and drop head 2


def test_l1_score_averages_the_producers_of_a_group():
    class TwoProducers(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.c, self.h = nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.h(self.b(x) + self.c(x))

    model = TwoProducers()
    b, c = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([8.0, 3.0, 0.5, 1.5])  # means 4.5 2.5 1.75 2.75
    with torch.no_grad():
        model.b.weight.copy_(b[:, None, None, None].expand(4, 3, 1, 1))
        model.c.weight.copy_(-c[:, None, None, None].expand(4, 3, 3, 3))
    prog = prune(model, X, ratio=0.5)
    assert list(prog.selection.values()) == [(1, 2)]  # b alone would pick (0, 1), c alone (2, 3)
    assert torch.equal(prog.gm.b.weight[:, 0, 0, 0], b[[0, 3]])
    assert (prog.gm.b.out_channels, prog.gm.c.out_channels, prog.gm.h.in_channels) == (2, 2, 2)


def test_nothing_selected_changes_nothing():
    model = Mixed().eval()
    want = outputs(model, (X,))
    prog = prune(model, X, ratio=0.0)
    assert prog.selection == {} and prog.info["slim"]["channels_removed"] == 0
    assert [(r.name, r.changed) for r in prog.history][-2] == ("slim", False)
    slim_shapes = {k: v.shape for k, v in prog.gm.state_dict().items()}
    assert slim_shapes == {k: v.shape for k, v in model.state_dict().items()}
    assert all(w["in" if "in" in w else "out"][0] == w["in" if "in" in w else "out"][1]
               for w in prog.info["slim"]["layers"].values())
    torch.testing.assert_close(outputs(prog.gm, (X,)), want, rtol=0, atol=0)


def _node_args(gm, target):
    return [n.args for n in gm.graph.nodes if n.target == target]


def test_literal_view_sizes_are_rewritten():
    class LiteralFlatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Linear(16 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(-1, 16 * 4 * 4))

    prog = prune(LiteralFlatten(), X, ratio=0.5)
    assert (prog.gm.conv.out_channels, prog.gm.fc.in_features) == (8, 8 * 16)
    assert [a[1:] for a in _node_args(prog.gm, "view")] == [(-1, 8 * 16)]


def test_literal_reshape_into_channels_is_rewritten():
    class Unflatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(5, 16 * 2 * 2), nn.Conv2d(16, 3, 1)

        def forward(self, z):
            return self.conv(torch.relu(self.fc(z)).reshape(z.shape[0], 16, 2, 2))

    z = torch.randn(3, 5)
    prog = prune(Unflatten(), z, ratio=0.25)
    assert (prog.gm.fc.out_features, prog.gm.conv.in_channels) == (12 * 4, 12)
    ((_, batch, *sizes),) = _node_args(prog.gm, "reshape")
    assert sizes == [12, 2, 2] and prog.gm(z).shape == (3, 3, 2, 2)


def test_a_slimmed_graph_that_does_not_run_is_an_internal_error(monkeypatch):
    """A rule that forgets a size constant is pcompiler's bug (exit 1), not the user's."""
    from helpers import analyze

    import pcompiler
    from pcompiler.errors import InternalError
    from pcompiler.passes import slim as slim_module

    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.h(self.a(x).view(-1, 8))

    prog = analyze(Viewed(), torch.randn(3, 4))
    monkeypatch.setattr(slim_module, "lookup", lambda node, gm: (None, None))  # no rule rewrites the view
    with pytest.raises(InternalError, match="the slimmed graph does not run at node 'view'") as err:
        pcompiler.run(prog, [pcompiler.make_pass("l1", ratio=0.5), pcompiler.make_pass("slim")])
    assert err.value.exit_code == 1 and err.value.pass_name == "slim"
