"""Tests of the export targets (.pt, .pt2, state dict, ONNX) and the static costs (bench)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest
import torch
from helpers import assert_same
from torch import nn

import pcompiler
from pcompiler.costs import count_flops, count_params
from pcompiler.ir import Program
from pcompiler.passmanager import make_pass
from pcompiler.targets import ExportCheckFailed, ExportResult, compare_outputs
from pcompiler.targets.onnx import export_onnx
from pcompiler.targets.pytorch import export_all, export_program, save_graph_module, save_state_dict


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        return self.fc((y + self.conv2(y)).mean((2, 3)))


class TwoInputMLP(nn.Module):  # two inputs, a tuple output
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x, z):
        h = torch.relu(self.a(x) + self.b(z))
        return self.head(h), h.sum(-1)


def user_scale(x):  # a function of this file that the graph calls: loading needs this code
    return x * 2


torch.fx.wrap("user_scale")


class UserLeaf(nn.Linear):  # kept as a leaf module: unpickling needs this class
    pass


class CallsUserCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.leaf = UserLeaf(4, 4)

    def forward(self, x):
        return self.leaf(user_scale(self.lin(x)))


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, UserLeaf) or super().is_leaf_module(m, qualname)


def program(model: nn.Module, *inputs: torch.Tensor) -> Program:
    torch.manual_seed(0)
    # Non-trivial batch-norm statistics, so that a train-mode export would give other outputs.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return Program(gm=torch.fx.symbolic_trace(model), example_inputs=inputs)


def cnn() -> Program:
    torch.manual_seed(0)
    return program(ResCNN(), torch.randn(2, 3, 8, 8))


def mlp() -> Program:
    torch.manual_seed(0)
    return program(TwoInputMLP(), torch.randn(3, 6), torch.randn(3, 4))


def expected(prog: Program) -> list[torch.Tensor]:
    with torch.no_grad():
        prog.gm.eval()
        out = prog.gm(*prog.example_inputs)
        prog.gm.train()
    return list(out) if isinstance(out, tuple) else [out]


def assert_ok(result: ExportResult, fmt: str) -> None:
    assert isinstance(result, ExportResult)
    assert result.format == fmt
    assert result.ok, result.error
    assert result.error is None


@pytest.mark.parametrize("make", [cnn, mlp])
def test_export_all_writes_every_file_and_records_it(tmp_path, make):
    prog = make()
    results = export_all(prog, tmp_path)
    assert [r.format for r in results] == ["pt", "state_dict", "pt2", "onnx"]
    for r in results:
        assert_ok(r, r.format)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt", "model.pt2", "state_dict.pt"]
    assert [d["format"] for d in prog.info["exports"]] == ["pt", "state_dict", "pt2", "onnx"]
    assert all(d["ok"] for d in prog.info["exports"])
    assert prog.gm.training  # exports run in eval mode and restore the mode


def test_graph_module_pickle_loads_without_user_code(tmp_path):
    progs = {"cnn": cnn(), "mlp": mlp()}
    for name, prog in progs.items():
        r = save_graph_module(prog, tmp_path / f"{name}.pt")
        assert_ok(r, "pt")
        assert r.max_error == 0.0 and r.note is None
        torch.save(prog.example_inputs, tmp_path / f"{name}.inputs.pt")
    # A fresh interpreter in which the model classes were never defined.
    script = textwrap.dedent(
        """
        import sys, torch
        for name in sys.argv[1:]:
            gm = torch.load(f"{name}.pt", weights_only=False)
            out = gm(*torch.load(f"{name}.inputs.pt"))
            torch.save(list(out) if isinstance(out, tuple) else [out], f"{name}.out.pt")
        """
    )
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", script, *progs], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name, prog in progs.items():
        got = torch.load(tmp_path / f"{name}.out.pt")
        for g, w in zip(got, expected(prog), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_graph_module_pickle_names_the_user_code_it_needs(tmp_path):
    model = CallsUserCode()
    gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    r = save_graph_module(Program(gm=gm, example_inputs=(torch.randn(2, 4),)), tmp_path / "model.pt")
    assert_ok(r, "pt")
    assert r.note is not None
    assert "test_targets.user_scale" in r.note and "test_targets.UserLeaf" in r.note


def test_state_dict_loads_weights_only(tmp_path):
    prog = cnn()
    assert_ok(save_state_dict(prog, tmp_path / "sd.pt"), "state_dict")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    want = prog.gm.state_dict()
    assert list(loaded) == list(want)
    for k in want:
        assert torch.equal(loaded[k], want[k])


@pytest.mark.parametrize("make", [cnn, mlp])
def test_pt2_reloads_with_plain_torch(tmp_path, make):
    prog = make()
    r = export_program(prog, tmp_path / "model.pt2")
    assert_ok(r, "pt2")
    assert r.max_error is not None and r.max_error <= 1e-6
    out = torch.export.load(tmp_path / "model.pt2").module()(*prog.example_inputs)
    got = list(out) if isinstance(out, tuple) else [out]
    for g, w in zip(got, expected(prog), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("make", [cnn, mlp])
def test_onnx_matches_torch(tmp_path, make):
    prog = make()
    r = export_onnx(prog, tmp_path / "model.onnx")
    assert_ok(r, "onnx")
    assert "dynamo" in r.note
    assert r.max_error is not None and r.max_error <= 1e-5
    assert not (tmp_path / "model.onnx.data").exists()  # weights inside the one file
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [n.name for n in prog.gm.graph.nodes if n.op == "placeholder"]
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), prog.example_inputs)})
    for g, w in zip(got, expected(prog), strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-5)


def test_onnx_legacy_exporter_and_fallback(tmp_path, monkeypatch):
    prog = mlp()
    r = export_onnx(prog, tmp_path / "legacy.onnx", exporter="legacy")
    assert_ok(r, "onnx")
    assert "legacy" in r.note

    real_export = torch.onnx.export

    def dynamo_broken(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    r = export_onnx(prog, tmp_path / "fallback.onnx")
    assert_ok(r, "onnx")
    assert "legacy" in r.note and "dynamo exporter unavailable" in r.note
    r = export_onnx(prog, tmp_path / "dynamo_only.onnx", exporter="dynamo")
    assert not r.ok and "dynamo exporter unavailable" in r.error


def test_onnx_mismatch_is_reported(tmp_path, monkeypatch):
    prog = mlp()
    import pcompiler.targets.onnx as onnx_target

    real = onnx_target.reference_outputs
    monkeypatch.setattr(onnx_target, "reference_outputs", lambda p: [t + 1.0 for t in real(p)])
    r = export_onnx(prog, tmp_path / "model.onnx")
    assert not r.ok
    assert "differs from torch" in r.error and "\n" not in r.error
    assert r.max_error == pytest.approx(1.0, abs=1e-5)


def test_onnx_without_onnxruntime_says_how_to_install_it(tmp_path, monkeypatch):
    from pcompiler.errors import EXIT_USER, CompileError
    from pcompiler.targets.onnx import session

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    r = export_onnx(mlp(), tmp_path / "model.onnx")
    assert not r.ok and r.error.startswith("onnxruntime, which runs ONNX files, is not installed")
    assert "pip install 'pcompiler[cpu]', or 'pcompiler[gpu]' for the CUDA provider" in r.error
    assert not (tmp_path / "model.onnx").exists()  # a file that cannot be checked is not written
    with pytest.raises(CompileError, match=r"pcompiler\[cpu\]") as e:
        session(tmp_path / "model.onnx")
    assert e.value.exit_code == EXIT_USER


def test_onnx_session_refuses_a_provider_it_did_not_get(tmp_path):
    from pcompiler.targets.onnx import ProviderFallback, session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    prog = mlp()
    assert_ok(export_onnx(prog, tmp_path / "model.onnx"), "onnx")
    assert session(tmp_path / "model.onnx").get_providers()[0] == "CPUExecutionProvider"
    with pytest.raises(ProviderFallback) as e:
        session(tmp_path / "model.onnx", provider="CUDAExecutionProvider")
    assert (e.value.asked, e.value.used) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert "has no CUDA provider" in str(e.value) or "both installed" in str(e.value)


def test_failed_export_does_not_stop_the_others(tmp_path, monkeypatch):
    prog = cnn()

    def rejected(*args, **kwargs):
        raise RuntimeError("torch.export rejected this graph\nsecond line of detail")

    monkeypatch.setattr(torch.export, "export", rejected)
    results = {r.format: r for r in export_all(prog, tmp_path, formats=("pt", "pt2"))}
    assert not results["pt2"].ok
    assert results["pt2"].error == "RuntimeError: torch.export rejected this graph"
    assert results["pt"].ok and results["state_dict"].ok
    assert (tmp_path / "model.pt").exists() and (tmp_path / "state_dict.pt").exists()
    assert [d["ok"] for d in prog.info["exports"]] == [True, True, False]


def test_meta_model_is_refused_with_a_reason(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    prog = Program(gm=torch.fx.symbolic_trace(model), example_inputs=(torch.empty(2, 4, device="meta"),))
    r = save_graph_module(prog, tmp_path / "m.pt")
    assert not r.ok and "meta device" in r.error
    with pytest.raises(ValueError, match="unknown export format"):
        export_all(prog, tmp_path, formats=("pt", "tflite"))


def test_flops_of_linear_and_conv():
    assert count_flops(nn.Linear(10, 20), (torch.randn(4, 10),)) == 2 * 4 * 10 * 20
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (torch.randn(2, 3, 16, 16),)) == 2 * 2 * 8 * 16 * 16 * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, 3, stride=2, groups=2)  # 17x17 -> 8x8 outputs, 2 inputs per group
    assert count_flops(grouped, (torch.randn(2, 4, 17, 17),)) == 2 * 2 * 8 * 8 * 8 * 2 * 3 * 3


def test_flops_on_meta_device_and_no_side_effects():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    real = count_flops(model, (torch.randn(2, 3, 8, 8),))
    assert real == 2 * 2 * 8 * 6 * 6 * 3 * 9 + 2 * 2 * 288 * 10
    assert model.training and int(model[1].num_batches_tracked) == 0
    assert count_flops(model.to("meta"), (torch.randn(2, 3, 8, 8),)) == real


def test_params_count():
    assert count_params(nn.Linear(10, 20)) == 10 * 20 + 20
    shared = nn.Linear(4, 4, bias=False)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 16
    assert count_params(cnn().gm) == (3 * 8 * 9 + 8) + 2 * 8 + (8 * 8 * 9 + 8) + (8 * 5 + 5)


def test_export_check_compares_nan_and_infinities_exactly():
    inf, nan = float("inf"), float("nan")
    want = [torch.tensor([1.0, -inf, nan]), torch.tensor([[2.0]])]
    assert compare_outputs([torch.tensor([1.00001, -inf, nan]), torch.tensor([[2.0]])], want, "x") == pytest.approx(
        1e-5, rel=1e-2)
    for got, what in [([1.0, -inf, 0.0], "1 position differs in NaN or infinity"),  # a number for NaN
                      ([1.0, inf, nan], "1 position differs in NaN or infinity"),  # the infinity's sign
                      ([nan, -inf, nan], "1 position differs in NaN or infinity")]:  # NaN for a number
        with pytest.raises(ExportCheckFailed, match=rf"x differs from torch \(output 0: {what}") as err:
            compare_outputs([torch.tensor(got), torch.tensor([[2.0]])], want, "x")
        assert err.value.max_error == float("inf")
    with pytest.raises(ExportCheckFailed, match=r"output 1: error 0.01 beyond 0.0021") as err:
        compare_outputs([torch.tensor([1.0, -inf, nan]), torch.tensor([[2.01]])], want, "x")
    assert err.value.max_error == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ExportCheckFailed, match=r"x output 1 has shape \(1,\) against \(1, 1\) \(torch's\)"):
        compare_outputs([want[0], torch.tensor([2.0])], want, "x")


class FixedWidth(nn.Module):  # its code holds a width: slimmed layers no longer fit it
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], 8 * 16))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_eager_model_is_slimmed_in_place_where_its_code_allows(tmp_path, frontend):
    torch.manual_seed(0)
    model = ResCNN().eval()
    prog = pcompiler.run(pcompiler.trace(model, (torch.randn(2, 3, 8, 8),), frontend=frontend),
                         [make_pass("analyze"), make_pass("l1", ratio=0.5), make_pass("slim")])
    (r,) = export_all(prog, tmp_path, formats=("eager",), model=model)
    assert_ok(r, "eager")
    assert r.note.endswith("test_targets.ResCNN: loading needs that code")
    loaded = torch.load(tmp_path / "model_eager.pt", weights_only=False)
    assert type(loaded) is ResCNN and loaded.conv1.out_channels == 4 and loaded.conv1.weight.shape[0] == 4
    assert model.conv1.out_channels == 8  # the user's model is untouched
    with torch.no_grad():
        assert_same(loaded(prog.example_inputs[0]), prog.gm(*prog.example_inputs))


def test_eager_model_whose_code_holds_a_width_is_not_written_and_says_why(tmp_path):
    model = FixedWidth().eval()
    prog = pcompiler.run(pcompiler.trace(model, (torch.randn(2, 3, 4, 4),)),
                         [make_pass("analyze"), make_pass("l1", ratio=0.5), make_pass("slim")])
    assert prog.selection  # the conv's channels flow through the reshape into fc's columns
    (r,) = export_all(prog, tmp_path, formats=("eager",), model=model)
    assert not r.ok and not r.skipped and r.error.startswith("FixedWidth's code holds sizes of its own")
    assert not (tmp_path / "model_eager.pt").exists()
    # Among the default formats (optional), the same is a skip, not a failure of the run.
    (r,) = export_all(prog, tmp_path, formats=("eager",), model=model, optional=("eager",))
    assert not r.ok and r.skipped and r.error.startswith("FixedWidth's code holds sizes of its own")
