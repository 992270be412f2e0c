"""The latency model (targets/latency_model.py): probes that tell the groups apart, kernels tied to
groups by how their tensor sizes follow the probes' widths, the non-negative fit, and a real
model measured with onnxruntime's profiler on a small network (its structure and its cache, not
its timings)."""

from __future__ import annotations

import pytest
import torch
from helpers import analyze
from torch import nn

from pcompiler.ir import Lattice
from pcompiler.passes.select import SelectOptions, _trial_slim, lattices, select_counts
from pcompiler.targets.latency_model import (
    Kernel,
    ModelUnavailable,
    Node,
    Profile,
    _tensor_shapes,
    identify,
    levels,
    measure_model,
    monotone,
    probe_codes,
    profile_torch,
    stable_names,
)


def test_probe_codes_tell_every_group_apart_and_stay_on_the_lattice():
    """Nine groups of 64 channels (unit 16) and two of 4 heads of 16 (they show as 64 channels
    too): every group's sequence of widths over the original and the probes is its own, at 1x and
    at its block, none is the all-full sequence, and every width is on the group's lattice."""
    lats = [Lattice(gid=i, size=64, block=1, unit=16, least=1) for i in range(9)]
    lats += [Lattice(gid=10 + i, size=4, block=16, unit=1, least=1) for i in range(2)]
    probes = probe_codes(lats)
    assert len(probes) >= 3
    seen = set()
    for lat in lats:
        seq = tuple(p[lat.gid] for p in probes)
        assert all(w in lat.widths() for w in seq) and seq != (lat.size,) * len(probes)
        shown = {tuple(m * w for w in (lat.size, *seq)) for m in {1, lat.block}}
        assert not shown & seen
        seen |= shown


def test_probes_measure_each_group_at_several_widths():
    """A group's code uses its levels 3/4, 1/2 and 1/4 (distinct ones first, never one head), so
    each kernel is seen at several widths and the fit has more than two points."""
    assert levels(Lattice(gid=0, size=64, block=1, unit=16, least=1)) == [64, 48, 32, 16]
    assert levels(Lattice(gid=0, size=4, block=16, unit=1, least=1)) == [4, 3, 2]  # never one head: see levels()
    probes = probe_codes([Lattice(gid=i, size=64, block=1, unit=16, least=1) for i in range(4)])
    for gid in range(4):
        assert len({p[gid] for p in probes}) >= 2


def test_a_group_with_one_width_is_left_out_of_the_probes():
    assert probe_codes([Lattice(gid=0, size=16, block=1, unit=16, least=1),
                        Lattice(gid=1, size=32, block=1, unit=16, least=1)])[0].keys() == {1}


def _run(call: float, **kernels) -> Profile:
    return Profile(call=call, kernels={k: ("Conv", t, shapes) for k, (t, shapes) in kernels.items()})


def test_identify_ties_each_dimension_to_the_group_it_follows():
    """Kernel `a` reads group 0 (32 -> 16 -> 24) and writes group 1 (64 -> 32 -> 64); `b` is
    elementwise in group 1 seen as 4 heads of 16 (block 16); `c` never changes; `d` flattens
    group 1 x 4 x 4 (constant factor 16... also the block: any constant multiple is accepted)."""
    lats = [Lattice(0, 32, 1, 8, 1), Lattice(1, 4, 16, 1, 1)]
    widths = [{}, {0: 16, 1: 2}, {0: 24, 1: 4}]
    runs = [_run(1.0, a=(0.1, ((8, 32, 7, 7), (8, 64, 7, 7))), b=(0.1, ((8, 4, 9, 16),)), c=(0.1, ((8, 3),)),
                 d=(0.1, ((8, 1024),))),
            _run(0.5, a=(0.1, ((8, 16, 7, 7), (8, 32, 7, 7))), b=(0.1, ((8, 2, 9, 16),)), c=(0.1, ((8, 3),)),
                 d=(0.1, ((8, 512),))),
            _run(0.7, a=(0.1, ((8, 24, 7, 7), (8, 64, 7, 7))), b=(0.1, ((8, 4, 9, 16),)), c=(0.1, ((8, 3),)),
                 d=(0.1, ((8, 1024),)))]
    assert identify(runs, widths, lats) == {"a": (0, 1), "b": (1,), "c": (), "d": (1,)}


def test_identify_refuses_what_it_cannot_tie_to_a_group():
    lats = [Lattice(0, 32, 1, 8, 1)]
    widths = [{}, {0: 16}]
    unexplained = [_run(1.0, a=(0.1, ((8, 32),))), _run(0.5, a=(0.1, ((8, 20),)))]
    with pytest.raises(ModelUnavailable, match=r"kernel a \(Conv\): a dimension of sizes \(32, 20\) follows no channel group"):
        identify(unexplained, widths, lats)
    refused = [_run(1.0, a=(0.1, ((8, 32),))), _run(0.5, b=(0.1, ((8, 16),)))]
    with pytest.raises(ModelUnavailable, match="kernels change with the widths"):
        identify(refused, widths, lats)


def test_identify_reads_channels_padded_to_the_block_and_leaves_out_kernels_that_come_and_go():
    """onnxruntime's NCHWc convolutions pad channels up to the CPU's block: a group of 28 kept at
    16 shows as 32 then 16, tied to it with pad 16 and not without. A kernel in some runs only
    (a reorder the optimizer inserts at some widths) is left out while such kernels take at most
    ODD_SHARE of each call, and refuses the model above it."""
    lats = [Lattice(0, 28, 1, 16, 1)]
    widths = [{}, {0: 16}]
    runs = [_run(1.0, a=(0.5, ((1, 32, 7, 7),)), r=(0.01, ((1, 28),))), _run(0.6, a=(0.3, ((1, 16, 7, 7),)))]
    assert identify(runs, widths, lats, pad=16) == {"a": (0,)}
    with pytest.raises(ModelUnavailable, match=r"sizes \(32, 16\) follows no channel group"):
        identify(runs, widths, lats)
    runs[0] = _run(1.0, a=(0.5, ((1, 32, 7, 7),)), r=(0.05, ((1, 28),)))
    with pytest.raises(ModelUnavailable, match=r"change with the widths \(the original: r \.\.\. take more than 2%"):
        identify(runs, widths, lats, pad=16)


def test_probes_keep_padded_sizes_apart():
    """With pad 16 a group of 28 kept at 16 would show as (32, 16), the sequence of a group of 32
    kept at 16: the probes give them different codes."""
    lats = [Lattice(0, 32, 1, 16, 1), Lattice(1, 28, 1, 16, 1)]
    probes = probe_codes(lats, pad=16)
    pad = lambda w: -(-w // 16) * 16  # noqa: E731
    assert tuple(p[0] for p in probes) != tuple(pad(p[1]) for p in probes)
    # a head (here a convolution group of 8 channels) pads as its 8 channels: 13 groups show as
    # 112, 10 as 80; padding the head count instead (13 -> 16) would make every such group look alike
    convs = [Lattice(gid=i, size=13, block=8, unit=2, least=1) for i in range(6)]
    probes = probe_codes(convs, pad=16)
    assert len({tuple(pad(8 * p[lat.gid]) for p in probes) for lat in convs}) == len(convs)


def test_kernels_onnxruntime_inserted_are_named_by_the_tensor_they_write_or_read():
    """onnxruntime numbers the nodes (and tensors) its optimizer inserts by a global counter, and
    inserts them in an order that can differ between the original and a probe; such a node is
    named by its kind and the exported graph's tensor it writes, or else reads, the same in both,
    as is one onnxruntime names by its kind alone; a node's own name is kept."""
    def graph(tokens: list[int]) -> list[Node]:
        t = iter(tokens)
        return [Node("conv1", "Conv", ("x",), ("a",)),
                Node(f"ReorderOutput_token_{next(t)}", "ReorderOutput", (f"reorder_token_{next(t)}",), ("b",)),
                Node(f"ReorderInput_token_{next(t)}", "ReorderInput", ("a",), (f"reorder_token_{next(t)}",)),
                Node(f"ReorderOutput_token_{next(t)}", "ReorderOutput", (f"reorder_token_{next(t)}",), ("c",)),
                Node("Add_1", "Add", ("b", "c"), ("y",)),
                Node("ReorderInput", "ReorderInput", ("y",), (f"reorder_token_{next(t)}",))]  # named by its kind alone

    original = graph([310, 4, 7, 9, 12, 11, 1])
    probe = graph([5, 300, 311, 2, 2, 90, 8])
    probe[1], probe[3] = probe[3], probe[1]  # inserted in another order: the reorders trade places
    names = stable_names(original)
    assert names == {"conv1": "conv1", "ReorderOutput_token_310": "ReorderOutput>b", "ReorderInput_token_7":
                     "ReorderInput<a", "ReorderOutput_token_12": "ReorderOutput>c", "Add_1": "Add_1",
                     "ReorderInput": "ReorderInput<y"}
    assert stable_names(probe) == {"conv1": "conv1", "ReorderOutput_token_2": "ReorderOutput>c", "ReorderInput_token_311":
                                   "ReorderInput<a", "ReorderOutput_token_5": "ReorderOutput>b", "Add_1": "Add_1",
                                   "ReorderInput": "ReorderInput<y"}


@pytest.mark.parametrize("xs, ts, expected", [
    ([1.0, 0.5, 0.25], [2.0, 1.5, 1.25], ((0.25, 1.25), (0.5, 1.5), (1.0, 2.0))),  # sorted
    ([1.0, 0.5], [1.0, 1.2], ((0.5, 1.1), (1.0, 1.1))),  # slower when narrower: pooled, flat
    ([1.0, 0.5, 0.5], [3.0, 1.0, 2.0], ((0.5, 1.5), (1.0, 3.0))),  # equal x averaged
    ([1.0, 0.75, 0.5, 0.25], [4.0, 2.0, 2.5, 1.0], ((0.25, 1.0), (0.5, 2.25), (0.75, 2.25), (1.0, 4.0))),
])
def test_kernel_points_are_made_non_decreasing_by_least_squares(xs, ts, expected):
    points = monotone(xs, ts)
    assert len(points) == len(expected)
    assert [v for p in points for v in p] == pytest.approx([v for p in expected for v in p])


def test_a_kernel_interpolates_between_its_points_and_is_proportional_below_them():
    k = Kernel(name="k", op="Conv", groups=(0,), points=((0.25, 1.0), (0.5, 3.0), (1.0, 4.0)))
    assert [k.seconds(x) for x in (0.125, 0.25, 0.375, 0.75, 1.0, 1.5)] == pytest.approx([0.5, 1.0, 2.0, 3.5, 4.0, 4.0])


def _wide_stack() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 10, 1))


@pytest.mark.parametrize("backend, conv, source", [("onnxruntime-cpu", "Conv", "onnxruntime profile"),
                                                   ("torch-cpu", "aten::conv2d", "torch profile")])
def test_a_model_measured_with_the_backends_profiler_ties_its_kernels_to_the_groups_and_is_cached(
        tmp_path, monkeypatch, backend, conv, source):
    """The real thing on a 3-group conv stack (widths on a lattice of 16), with onnxruntime's
    profiler and with torch.profiler: every convolution's kernel scales with a group, the model
    predicts the original's whole call within its fit error and a smaller call for a narrower
    model, savings agree with predictions, and a second build comes from the cache with the same
    kernels."""
    if backend.startswith("onnxruntime"):
        pytest.importorskip("onnxruntime")
    monkeypatch.setenv("PCOMPILER_CACHE", str(tmp_path))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    prog = analyze(_wide_stack().eval(), x)
    scores = {g.id: torch.rand(g.size).numpy() for g in prog.analysis.prunable}
    lats = lattices(prog.analysis, scores, SelectOptions(round_to=16))
    assert sorted(lat.size for lat in lats) == [32, 32, 64]
    built = []

    def slim(widths):
        built.append(dict(widths))
        return _trial_slim(prog, select_counts(scores, {g: next(lat.size for lat in lats if lat.gid == g) - w
                                                        for g, w in widths.items()})).gm

    model = measure_model(prog.gm, (x,), lats, slim, backend, batch=2, threads=1)
    assert len(built) == model.probes >= 3 and not model.cached and model.describe()["kind"] == source
    convs = [k for k in model.kernels if k.op == conv]
    assert len(convs) == 4 and all(k.groups for k in convs)
    assert {g for k in model.kernels for g in k.groups} == {lat.gid for lat in lats}
    assert model.fit_error < 0.5
    narrow = {lat.gid: lat.widths()[-1] for lat in lats}
    assert model.predict(narrow) < model.predict({})
    gid = lats[0].gid
    assert model.saving({}, gid, 16) == pytest.approx(model.predict({}) - model.predict({gid: 16}))
    again = measure_model(prog.gm, (x,), lats, slim, backend, batch=2, threads=1)
    assert again.cached and len(built) == model.probes and again.source == source
    assert [(k.name, k.groups) for k in again.kernels] == [(k.name, k.groups) for k in model.kernels]
    assert list(tmp_path.glob("latency/*.json"))


def test_a_backend_whose_kernels_carry_no_shapes_has_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PCOMPILER_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="torch-cuda-compile has none"):
        measure_model(nn.Linear(2, 2), (torch.zeros(1, 2),), [], lambda w: None, "torch-cuda-compile", 1, 1)


def test_torch_profiler_shapes_are_the_tensors_in_order_with_tensor_lists_flattened():
    """As torch.profiler records an op's inputs: a tensor's shape, [] for a scalar or a
    non-tensor, a list of shapes for a tensor list (aten::cat)."""
    assert _tensor_shapes([[[1, 2], [1, 3]], [], [4, 5], None]) == [(1, 2), (1, 3), (4, 5)]


def test_torch_profiler_names_each_op_by_its_place_among_its_kind_and_times_it(tmp_path):
    """profile_torch on a two-linear model: the model's own ops (not their nested ones), named
    aten::linear#0 and #1, with their input shapes and times that fit inside the call."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    run = profile_torch(model, (torch.randn(4, 16),), 1, "torch-cpu", "cuda", tmp_path, min_seconds=0.01)
    assert {"aten::linear#0", "aten::linear#1", "aten::relu#0"} <= set(run.kernels)
    assert not any(name.startswith(("aten::addmm", "aten::t#")) for name in run.kernels)  # nested in linear
    assert run.kernels["aten::linear#1"][2] == ((4, 32), (8, 32), (8,))
    assert 0 < sum(t for _, t, _ in run.kernels.values()) <= run.call
