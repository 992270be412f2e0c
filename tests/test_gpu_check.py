"""benchmarks/gpu_check.{sh,py}, the one-shot GPU check: its pieces, and a whole dry run on this
machine (every CUDA step skipped with its reason, every command validated, one JSON written)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEP_NAMES = ["pytest-gpu", "main-tpp-amp", "distill-greg1-amp", "latency-cuda", "latency-model-cuda", "torchrun-ddp"]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load()


def test_steps_and_commands_are_the_ones_the_issue_asks_for():
    assert [s.name for s in gc.STEPS] == STEP_NAMES
    main = gc.MAIN_ARGS
    assert main[:3] == ["-m", "pcompiler.cli", "examples/digits_resnet.pt"]
    for flag in ("--amp", "--formats"):
        assert flag in main
    assert main[main.index("--device") + 1] == "cuda" and main[main.index("--method") + 1] == "tpp"
    assert {"--distill", "--distill-regularization"} <= set(gc.DISTILL_ARGS)
    assert gc.TORCHRUN_ARGS[:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert set(gc.LATENCY_SPEC["backends"]) == {"torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-compile",
                                                "onnxruntime-cuda"}
    assert gc.LATENCY_SPEC["backends"][-1] == "torch-cuda-compile"  # compiled last: the slowest
    assert sum(s.budget for s in gc.STEPS) < 8 * 60 * 2 and gc.DEFAULT_BUDGET < 8 * 60


def test_cpu_variant_and_out_substitution():
    args = gc.cpu_variant(gc.with_out(gc.DISTILL_ARGS, Path("/x/out")))
    assert "--amp" not in args and "OUT" not in args and "/x/out" in args
    assert args.count("--device") == 1 and args[args.index("--device") + 1] == "cpu"
    assert args.count("--reg-steps") == 1 and args[args.index("--reg-steps") + 1] == "20"
    assert args[args.index("--finetune-epochs") + 1] == "0.2"


def test_package_dirs_follow_pyproject():
    dirs = gc.package_dirs()
    assert dirs["pcompiler.passes"] == str(ROOT / "passes")
    assert dirs["pcompiler.targets"] == str(ROOT / "targets")
    assert dirs["pcompiler"] == str(ROOT / "pcompiler")


def test_gpu_test_files_hold_the_gpu_marked_tests():
    files = gc.gpu_test_files()
    assert "tests/test_bench.py" in files and "tests/test_train.py" in files
    assert "tests/test_gpu_check.py" not in files


def test_report_figures_and_problems(tmp_path):
    report = {"acc_before": 0.99, "acc_pruned": 0.5, "acc_final": 0.98, "flops_before": 8, "flops_after": 2,
              "regularization": {"steps": 300, "seconds": 4.5}, "finetune": {"steps": 10, "distill": None},
              "verify": {"ok": True, "max_error": 1e-7},
              "exports": [{"format": "pt2", "ok": True}, {"format": "onnx", "ok": False, "error": "no onnxscript"}],
              "runtime": {"device": "cuda:0", "amp": "bfloat16", "world_size": 1}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    fig = gc.report_figures(tmp_path / "report.json")
    assert fig["acc_after_slim"] == 0.5 and fig["flops_reduction"] == 4 and fig["regularization_seconds"] == 4.5
    assert gc.report_problems(fig, "cuda", amp=True) == ["onnx export failed: no onnxscript"]
    problems = gc.report_problems(fig, "cpu", amp=True, world_size=2)
    assert any("expected cpu" in p for p in problems) and any("world_size" in p for p in problems)


def test_pytest_counts_reads_junit_xml(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.0">'
                   '<testcase classname="tests.test_a" name="t1" time="1"/>'
                   '<testcase classname="tests.test_a" name="t2" time="0.5"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.test_b" name="t3" time="0"><skipped message="needs CUDA"/></testcase>'
                   '</testsuite></testsuites>')
    c = gc.pytest_counts(xml)
    assert (c["tests"], c["passed"], c["failures"], c["skipped"]) == (3, 1, 1, 1)
    assert [x["outcome"] for x in c["cases"]] == ["passed", "failure", "skipped"]


def test_the_latency_model_step_runs_the_fidelity_benchmark_and_reads_its_figures(tmp_path):
    """On the GPU: torch-cuda-fp32, resnet50 at batch 8; on the CPU rehearsal: torch-cpu, the
    digits ResNet, 3 prunings. Its figures are the JSON's rows, one summary line each."""
    args = gc.fidelity_args(tmp_path, cpu=False)
    assert args[0] == "benchmarks/latency_target.py" and str(tmp_path) in args and "OUT" not in args
    assert [args[args.index(k) + 1] for k in ("--part", "--backend", "--models", "--batches")] == [
        "fidelity", "torch-cuda-fp32", "resnet50", "8"]
    cpu = gc.fidelity_args(tmp_path, cpu=True)
    assert [cpu[cpu.index(k) + 1] for k in ("--backend", "--models", "--prunings")] == ["torch-cpu", "digits_resnet", "3"]
    assert gc.fidelity_figures(tmp_path) == {"rows": []}
    row = {"model": "resnet50", "backend": "torch-cuda-fp32", "batch": 8, "kernels": {"kernels": 175},
           "build_seconds": {"1t": 9.0}, "summary": {"model_1t": {"mape": 0.031, "spearman": 0.97},
                                                      "flops": {"mape": 0.42, "spearman": 0.91}},
           "samples": [{"measured": 1.23456, "model_1t": 1.2, "flops": 1.9}]}
    (tmp_path / "bench_latency_fidelity_torch_cuda_fp32.json").write_text(
        json.dumps({"environment": {"gpu": "NVIDIA H200"}, "rows": [row]}))
    figures = gc.fidelity_figures(tmp_path)
    assert figures["gpu"] == "NVIDIA H200" and figures["rows"][0]["samples"] == [{"measured": 1.2346, "model_1t": 1.2,
                                                                                  "flops": 1.9}]
    assert gc.fidelity_line(figures) == ("resnet50 torch-cuda-fp32 b8: model 3.1% error, rho 0.97; "
                                         "FLOPs 42.0% error, rho 0.91")


def test_latency_summary_lines():
    data = {"rows": [
        {"model": "resnet50", "backend": "torch-cuda-bf16", "batch": 64, "speedup": 1.8, "efficiency": 0.9,
         "original": {"p50": 0.004}, "slim": {"p50": 0.0022}},
        {"model": "resnet50", "backend": "onnxruntime-cuda", "unavailable": "no CUDAExecutionProvider"},
        {"model": "resnet50", "backend": "torch-cuda-compile", "batch": 64, "error": "RuntimeError: x"}]}
    lines = gc.latency_summary(data)
    assert lines[0] == "resnet50 torch-cuda-bf16 b64: 4 ms -> 2.2 ms, 1.80x, efficiency 0.90"
    assert "unavailable" in lines[1] and "error" in lines[2]


@pytest.mark.slow
def test_dry_run_skips_every_cuda_step_with_a_reason_and_validates_the_commands(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    run = subprocess.run(["bash", str(SCRIPT), "--dry", "--out", str(out), "--python", sys.executable],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry" and report["exit_code"] == 0
    assert [s["name"] for s in report["steps"]] == STEP_NAMES
    for step in report["steps"]:
        assert step["status"] == "skipped", step
        assert step["reason"] and ("no CUDA device" in step["reason"] or "--dry given" in step["reason"]), step
        assert step["dry_check"]["status"] == "ok", step["dry_check"]
    env_record = report["environment"]
    assert env_record["pcompiler"]["from_this_repo"] is True  # the package folders were mapped
    assert env_record["packages"]["torch"] and "packages_missing" in env_record
    assert env_record["setup"]["package_dirs"]["pcompiler.passes"] == str(ROOT / "passes")
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["pytest-gpu"]["dry_check"]["gpu_tests_collected"] >= 2
    assert steps["main-tpp-amp"]["dry_check"]["parse"]["params"]["device"] == "cuda"
    assert steps["torchrun-ddp"]["dry_check"]["parse"]["torchrun"]["standalone"] is True
    assert set(steps["latency-cuda"]["dry_check"]["check"]["models"]) >= {"resnet50"}
    assert "--backend torch-cuda-fp32" in steps["latency-model-cuda"]["dry_check"]["command"]
    assert "gpu_check: mode dry" in run.stdout and "torchrun-ddp" in run.stdout  # the summary table
