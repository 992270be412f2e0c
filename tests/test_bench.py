"""Tests of the latency bench: alternation, percentiles, speedup and efficiency, backends, the
`pcompile bench` command and `--bench` in the pipeline. No test asserts a timing: measured
numbers are only checked for structure (positive, p50 <= p90), the arithmetic on fixed samples."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import pcompiler.targets.backends as backends_mod
import pcompiler.targets.bench as bench_mod
from pcompiler.cli import main
from pcompiler.errors import EXIT_USER, CompileError
from pcompiler.loading import load_model
from pcompiler.report_md import latency_rows
from pcompiler.targets.backends import on_device
from pcompiler.targets.bench import (
    LatencySettings,
    Timing,
    alternate,
    available_backends,
    bench,
    default_round_to,
    machine,
    make_inputs,
    measure_latency,
    unavailable_backends,
)

torch.set_num_threads(1)

QUICK = dict(warmup=1, min_reps=3, max_reps=3, min_seconds=0.0)


def convnet(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10))


def test_timing_percentiles_match_numpy():
    samples = [0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.7]
    t = Timing.of(samples)
    assert t.p50 == pytest.approx(np.percentile(samples, 50))
    assert t.p90 == pytest.approx(np.percentile(samples, 90))
    assert (t.min, t.reps) == (0.1, 7) and t.mean == pytest.approx(np.mean(samples))


def test_alternate_reverses_the_order_every_round_and_counts_reps():
    order: list[str] = []
    calls = {"original": lambda: order.append("o"), "slim": lambda: order.append("s")}
    samples = alternate(calls, LatencySettings(warmup=2, min_reps=4, max_reps=4, min_seconds=0.0))
    assert [len(v) for v in samples.values()] == [4, 4]
    # 2 warm-up calls each, one untimed round, then the rounds: o s, s o, o s, s o.
    assert "".join(order) == "oo" + "ss" + "os" + "ossoosso"
    # Calls that take no time and a time goal: capped at max_reps.
    many = alternate({"a": lambda: None}, LatencySettings(warmup=0, min_reps=2, max_reps=25, min_seconds=10.0))
    assert len(many["a"]) == 25


def test_speedup_is_the_median_paired_ratio_and_efficiency_divides_by_flops(monkeypatch):
    fixed = {"original": [2.0, 4.0, 6.0, 100.0], "slim": [1.0, 1.0, 3.0, 10.0]}  # ratios 2, 4, 2, 10
    monkeypatch.setattr(bench_mod, "alternate", lambda calls, settings: fixed)
    big, small = convnet(16), convnet(8)
    result = bench({"original": big, "slim": small}, (torch.randn(1, 3, 8, 8),),
                   LatencySettings(batch_sizes=(2,), backends=("torch-cpu",)))
    (row,) = result["latency"]
    assert row["speedup"] == pytest.approx(3.0)  # median of 2, 2, 4, 10
    assert row["original"]["p50"] == pytest.approx(5.0) and row["slim"]["p50"] == pytest.approx(2.0)
    costs = result["costs"]
    reduction = costs["original"]["flops"] / costs["slim"]["flops"]
    assert reduction > 2
    assert row["flops_reduction"] == pytest.approx(reduction)
    assert row["efficiency"] == pytest.approx(3.0 / reduction)
    assert result["settings"]["threads"] == torch.get_num_threads()
    assert set(result["machine"]) >= {"cpu", "cpu_count", "gpu", "torch", "onnxruntime", "cpu_channel_block"}
    assert result["machine"]["cpu_channel_block"] in (None, 8, 16)


def test_measure_latency_times_every_backend_and_batch():
    models = {"original": convnet(16), "slim": convnet(8)}
    models["original"].train()
    rows = measure_latency(models, (torch.randn(1, 3, 8, 8),),
                           LatencySettings(batch_sizes=(1, 3), backends=("torch-cpu", "onnxruntime-cpu"), **QUICK))
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch-cpu", 1), ("torch-cpu", 3),
                                                          ("onnxruntime-cpu", 1), ("onnxruntime-cpu", 3)]
    for r in rows:
        assert "error" not in r, r
        assert (r["device"], r["dtype"], r["threads"], r["reps"], r["warmup"]) == ("cpu", "float32", 1, 3, 1)
        for name in ("original", "slim"):
            assert 0 < r[name]["min"] <= r[name]["p50"] <= r[name]["p90"]
        assert r["speedup"] > 0
    assert models["original"].training  # the bench put it in eval mode only while timing


def test_a_failing_backend_is_a_row_with_the_reason(monkeypatch):
    def broken(model, inputs, threads, workdir, device):
        raise RuntimeError("exporter cannot handle this\nmore detail")

    monkeypatch.setitem(bench_mod.RUNNERS, "onnxruntime-cpu", ("cpu", "float32", broken))
    rows = measure_latency({"original": convnet()}, (torch.randn(1, 3, 8, 8),),
                           LatencySettings(batch_sizes=(2,), backends=("onnxruntime-cpu", "torch-cpu"), **QUICK))
    assert rows[0]["error"] == "RuntimeError: exporter cannot handle this"
    assert "original" not in rows[0] and "error" not in rows[1] and rows[1]["original"]["reps"] == 3
    with pytest.raises(ValueError, match="unknown backend"):
        measure_latency({"m": convnet()}, (torch.randn(1, 3, 8, 8),), LatencySettings(backends=("tpu",)))


def test_make_inputs_sets_the_batch_and_keeps_dtypes():
    x, ids = make_inputs((torch.randn(1, 3, 5), torch.ones(1, 7, dtype=torch.long)), batch=4)
    assert x.shape == (4, 3, 5) and x.dtype == torch.float32 and x.std() > 0.5
    assert ids.shape == (4, 7) and ids.dtype == torch.long and not ids.any()


def test_backends_and_round_to_defaults():
    have = available_backends()
    assert have[:2] == ("torch-cpu", "onnxruntime-cpu")
    assert any(b.startswith("torch-cuda") for b in have) == torch.cuda.is_available()
    assert default_round_to("cpu") == 8 and default_round_to("cuda:0") == 8 and default_round_to("meta") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backends_run():
    backends = tuple(b for b in available_backends() if "cuda" in b)
    rows = measure_latency({"original": convnet(16), "slim": convnet(8)}, (torch.randn(1, 3, 16, 16),),
                           LatencySettings(batch_sizes=(1, 8), backends=backends, **QUICK))
    assert len(rows) == 2 * len(backends)
    for r in rows:
        assert "error" not in r, r
        assert r["device"].startswith("cuda:") and r["threads"] is None and r["speedup"] > 0
        assert r.get("provider", "CUDAExecutionProvider") == "CUDAExecutionProvider"


# ---------------------------------------------------------------------------------------------
# The GPU path, checked without a GPU


class ViewsConv(nn.Module):
    """Flattens a conv's output with .view(), which fails on a channels_last tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_cuda_models_are_copied_and_cast_but_not_made_channels_last():
    model, x = ViewsConv().eval(), torch.randn(2, 3, 4, 4)
    model.scale = torch.tensor(2.0)  # a tensor constant kept as a plain attribute
    moved, (xs,) = on_device(model, (x,), "cpu", torch.bfloat16)
    assert xs.dtype == torch.bfloat16 and xs.is_contiguous()
    assert moved.conv.weight.dtype == torch.bfloat16 and moved.conv.weight.is_contiguous()
    assert moved.scale.dtype == torch.bfloat16 and not moved.training
    assert moved(xs).shape == (2, 2)  # runs as the user runs it
    # The user's model is untouched: its own tensors, in float32.
    assert model.conv.weight.dtype == torch.float32 and model.scale.dtype == torch.float32
    assert moved.conv.weight.data_ptr() != model.conv.weight.data_ptr()
    # What the runner did before: in channels_last this model cannot run.
    last = ViewsConv().to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        last(xs.contiguous(memory_format=torch.channels_last))


def _no_cuda_provider():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider: nothing falls back")
    return ort


def test_onnxruntime_rows_name_the_provider_and_a_fallback_is_an_error(monkeypatch):
    _no_cuda_provider()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no real CUDA call, GPU or not
    asked = []
    real_session = backends_mod.session
    monkeypatch.setattr(backends_mod, "session", lambda *a, **k: asked.append(k["device_id"]) or real_session(*a, **k))
    rows = measure_latency({"original": convnet(8)}, (torch.randn(1, 3, 8, 8),),
                           LatencySettings(batch_sizes=(1,), backends=("torch-cpu", "onnxruntime-cpu", "onnxruntime-cuda"),
                                           device="cuda:1", **QUICK))
    cpu, ort_cpu, ort_cuda = rows
    assert "provider" not in cpu and "error" not in ort_cpu
    assert (ort_cpu["provider"], ort_cpu["device"]) == ("CPUExecutionProvider", "cpu")
    # Asked on the second GPU, onnxruntime (CPU only here) ran its CPU provider: said, not timed.
    assert asked[-1] == 1 and ort_cuda["device"] == "cuda:1"
    assert ort_cuda["provider"] == "CPUExecutionProvider" and "original" not in ort_cuda
    assert ort_cuda["error"].startswith("asked for CUDAExecutionProvider, onnxruntime ran CPUExecutionProvider (")
    assert "pcompiler[gpu]" in ort_cuda["error"]
    table = {r[0]: r for r in latency_rows({"latency": rows})[1:]}
    assert table["onnxruntime-cuda"][2] == f"failed: {ort_cuda['error']}"


def test_a_cuda_provider_that_does_not_load_is_named_and_not_available(monkeypatch):
    ort = _no_cuda_provider()
    # As onnxruntime-gpu whose CUDA libraries are missing: the provider is listed, the session falls back.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    missing = unavailable_backends()
    assert missing["onnxruntime-cuda"].startswith(
        "asked for CUDAExecutionProvider, onnxruntime ran CPUExecutionProvider (the CUDA provider did not load)")
    assert available_backends() == ("torch-cpu", "onnxruntime-cpu", "torch-cuda-fp32", "torch-cuda-bf16",
                                    "torch-cuda-compile")


def test_bench_device_is_a_cuda_device_and_names_its_gpu(monkeypatch):
    with pytest.raises(CompileError, match="must be a CUDA device") as e:
        LatencySettings(device="cpu")
    assert e.value.exit_code == EXIT_USER
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: f"GPU {d}")
    assert machine("cuda:1")["gpu"] == "GPU cuda:1"
    with pytest.raises(CompileError, match="this machine has 2 CUDA device"):
        machine("cuda:2")


def test_without_onnxruntime_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert "onnxruntime-cpu" not in available_backends()
    assert "pip install 'pcompiler[cpu]'" in unavailable_backends()["onnxruntime-cpu"]
    (row,) = measure_latency({"original": convnet(8)}, (torch.randn(1, 3, 8, 8),),
                             LatencySettings(batch_sizes=(1,), backends=("onnxruntime-cpu",), **QUICK))
    assert row["error"].startswith("onnxruntime, which runs ONNX files, is not installed")
    assert "pip install 'pcompiler[cpu]', or 'pcompiler[gpu]'" in row["error"] and row["provider"] is None
    assert machine()["onnxruntime"] is None


# ---------------------------------------------------------------------------------------------
# The command line


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def compiled(tmp_path):
    """A pipeline run with --bench (quick settings) on a small CNN."""
    torch.save(convnet(16), tmp_path / "cnn.pt")
    out = tmp_path / "out"
    result = invoke(tmp_path / "cnn.pt", "--method", "l1", "--ratio", "0.5", "-o", out, "--input-shape", "1,3,8,8",
                    "--bench", "--bench-batches", "1,4", "--formats", "pt2")
    assert result.exit_code == 0, result.output
    return tmp_path, out, result


def test_pipeline_bench_goes_into_the_report_and_the_summary(compiled):
    _, out, result = compiled
    report = json.loads((out / "report.json").read_text())
    rows = report["bench"]["latency"]
    assert [(r["backend"], r["batch"]) for r in rows] == [(b, n) for b in available_backends() for n in (1, 4)]
    assert all(r["speedup"] > 0 and r["efficiency"] > 0 for r in rows)
    assert report["bench"]["costs"]["slim"]["flops"] == report["flops_after"]
    assert report["settings"]["round_to"] == 8  # the CPU default
    md = (out / "report.md").read_text()
    assert "## Latency" in md and "![latency](plots/latency.png)" in md
    assert "| torch-cpu | 4 |" in md and "x faster on torch-cpu at batch 4" in md
    width, height = _png_size(out / "plots" / "latency.png")
    assert width > 300 and height > 200
    # The closing table: the numbers before and after, latency at the largest batch.
    assert "parameters" in result.stderr and "latency p50, torch-cpu, batch 4" in result.stderr


def test_bench_command_compares_a_model_with_the_slim_folder(compiled):
    tmp_path, out, _ = compiled
    result = invoke("bench", tmp_path / "cnn.pt", out, "--input-shape", "1,3,8,8", "--batches", "2",
                    "--backends", "torch-cpu", "--min-reps", "3", "--min-time", "0", "--warmup", "1",
                    "--json", tmp_path / "bench.json")
    assert result.exit_code == 0, result.output
    assert "torch-cpu" in result.stdout and "speedup" in result.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    (row,) = data["latency"]
    assert (row["backend"], row["batch"], row["reps"]) == ("torch-cpu", 2, 3)
    assert data["costs"]["original"]["params"] > data["costs"]["slim"]["params"]


def test_bench_command_alone_and_its_errors(tmp_path):
    torch.save(convnet(), tmp_path / "cnn.pt")
    result = invoke("bench", tmp_path / "cnn.pt", "--backends", "torch-cpu", "--batches", "1",
                    "--min-reps", "2", "--min-time", "0")
    assert result.exit_code == 0, result.output
    assert "original p50 / p90" in result.stdout and "speedup" not in result.stdout
    for args, fragment in [(("--batches", "1,x"), "positive integers"),
                           (("--backends", "tpu"), "unknown tpu"),
                           (("--input-shape", "1,5,8,8"), "does not run on example inputs 1,5,8,8"),
                           (("--device", "cpu"), "must be a CUDA device")]:
        result = invoke("bench", tmp_path / "cnn.pt", *args)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and fragment in result.stderr, result.output
    if not torch.cuda.is_available():
        result = invoke("bench", tmp_path / "cnn.pt", "--backends", "torch-cuda-fp32")
        assert result.exit_code == 2, result.output
        assert "torch-cuda-fp32 is not available on this machine: torch sees no CUDA device" in result.stderr
        assert "this machine has torch-cpu,onnxruntime-cpu" in result.stderr


def test_pt2_export_has_a_dynamic_batch_and_loads(tmp_path, compiled):
    _, out, _ = compiled
    report = json.loads((out / "report.json").read_text())
    assert report["exports"][0]["note"] == "dynamic batch dimension"
    slim = load_model(out / "model.pt2")
    assert slim(torch.randn(5, 3, 8, 8)).shape == (5, 10)


def test_pt2_export_of_a_batch_fixed_model_stays_static(tmp_path):
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).view(1, 8 * 6 * 6)  # only batch 1 fits

    import pcompiler
    from pcompiler.targets.pytorch import export_program

    prog = pcompiler.trace(FixedBatch(), (torch.randn(1, 3, 8, 8),))
    r = export_program(prog, tmp_path / "m.pt2")
    assert r.ok, r.error
    assert r.note.startswith("static batch")


def test_round_to_default_keeps_multiples_of_8(tmp_path):
    torch.save(convnet(24), tmp_path / "cnn.pt")
    widths = {}
    for extra in ((), ("--round-to", "1")):
        out = tmp_path / f"out{len(extra)}"
        result = invoke(tmp_path / "cnn.pt", "--method", "l1", "--ratio", "0.4", "-o", out, "--input-shape", "1,3,8,8",
                        "--formats", "pt2", *extra)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        changed = {v["out"][1] for v in report["layers"].values() if "out" in v and v["out"][0] != v["out"][1]}
        widths[extra] = (report["settings"]["round_to"], sorted(changed))
    # 24 channels at ratio 0.4: remove 10 and keep 14, which rounds up to 16 by default.
    assert widths[()] == (8, [16])
    assert widths[("--round-to", "1")] == (1, [14])
