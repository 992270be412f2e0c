"""A measured target (`--latency`): the search in passes/select.py on budgets whose measurement is
a known function of the slim model (so the tests assert the search, not a machine's timings),
the LatencyBudget that times both models on a backend, and the CLI's checks of the options."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from helpers import conv_bn_stack, prune
from test_cli import EXAMPLE, assert_one_line_error, invoke

from pcompiler.costs import count_flops
from pcompiler.errors import CompileError
from pcompiler.targets.latency import LatencyBudget

X = torch.randn(1, 3, 16, 16)

pytestmark = pytest.mark.usefixtures("moves_allocate")  # every move allocates, as on a GPU: no pass may move the model it was given


@dataclass(frozen=True)
class Modelled:
    """A 'latency' that falls as `efficiency` x the FLOPs reduction, plus a fixed overhead per call
    (the shape of a real backend's: a part that does not shrink with the channels)."""

    what: ClassVar[str] = "latency"
    target: float
    tolerance: float = 0.05
    overhead: float = 0.5  # in units of the original's compute
    calls: list = None  # each call's measured value, for the test to read

    def reduction(self, original: Any, slim: Any, example_inputs: tuple) -> float:
        f_orig, f_slim = count_flops(original, example_inputs), count_flops(slim, example_inputs)
        value = (1 + self.overhead) / (f_slim / f_orig + self.overhead)
        self.calls.append(value)
        return value

    def describe(self) -> dict[str, Any]:
        return {"what": self.what, "target": self.target}


def test_the_search_meets_a_measured_target_that_flops_overestimate():
    """With an overhead that does not shrink, a 1.5x FLOPs cut is not 1.5x faster: the first step
    (FLOPs predict) falls short, the correction by the measured efficiency lands within the
    tolerance, and every step is recorded with what FLOPs predicted and what was measured."""
    budget = Modelled(target=1.5, calls=[])
    prog = prune(conv_bn_stack(), X, target=budget)
    search = prog.info["budget_search"]
    steps = search["steps"]
    assert 2 <= len(steps) <= 6 and len(budget.calls) == len(steps)
    assert steps[0]["measured"] < 1.5 * (1 - budget.tolerance) < steps[0]["flops_reduction"]
    assert abs(search["measured"] / 1.5 - 1) <= budget.tolerance and search["met"]
    assert search["predicted"] > search["measured"] and search["ratio"] == prog.info["method_settings"]["ratio_used"]
    assert prog.info["method_settings"]["target"] == {"what": "latency", "target": 1.5}


def test_an_unreachable_measured_target_says_how_far_it_got():
    """An overhead of 1.0 caps the reduction at 2x: a 3x target fails with the best measured."""
    with pytest.raises(CompileError, match=r"a 3.0x latency reduction was not reached: the best of \d measured steps gave 1\.\d\dx"):
        prune(conv_bn_stack(), X, target=Modelled(target=3.0, overhead=1.0, calls=[]))


def test_latency_budget_times_both_models_on_the_backend():
    """LatencyBudget.reduction runs the original and the slim model alternately on onnxruntime's
    CPU provider and returns the paired median ratio: a finite positive number (its value is
    the machine's; benchmarks/latency_target.py measures what the search attains)."""
    model = conv_bn_stack().eval()
    budget = LatencyBudget(2.0, "onnxruntime-cpu", batch=2, threads=1, min_seconds=0.05)
    value = budget.reduction(model, model, (X,))
    assert math.isfinite(value) and value > 0
    assert budget.describe()["backend"] == "onnxruntime-cpu" and budget.describe()["threads"] == 1


@pytest.mark.parametrize("args, fragments", [
    (("--method", "l1", "--latency", "2", "--ratio", "0.5"), ("--ratio and --latency each set how much is removed",)),
    (("--method", "l1", "--latency", "2", "--backend", "tensorrt"), ("--backend tensorrt: unknown backend",)),
    (("--method", "l1", "--latency", "2", "--backend", "torch-cuda-fp32"), ("does not run on this machine",)),
    (("--method", "l1", "--ratio", "0.5", "--latency-batch", "8"), ("--latency-batch does nothing without --latency",)),
    (("--method", "l1", "--latency", "0.5"), ("latency target 0.5 is not above 1",)),
])
def test_latency_option_errors(tmp_path, args, fragments):
    if "torch-cuda-fp32" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(invoke(EXAMPLE, *args, "-o", tmp_path / "o"), 2, *fragments)


def test_latency_target_through_the_cli_records_its_search(tmp_path):
    """The mechanics end to end on the bundled digits network: the report records the target,
    the backend, batch and threads, and each step's ratio, FLOPs reduction and measured
    speedup. (Whether the target is met is the machine's: a too-small model may not reach it,
    which is exit 2 with the best measured, also a correct answer.)"""
    result = invoke(EXAMPLE, "--method", "l1", "--latency", "1.3", "--latency-batch", "16", "--threads", "1",
                    "--formats", "pt", "-o", tmp_path / "out")
    if result.exit_code == 2:
        assert "latency reduction was not reached: the best of" in result.output
        return
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    search = report["budget_search"]
    assert search["backend"] == "onnxruntime-cpu" and search["batch"] == 16 and search["threads"] == 1
    assert search["steps"] and all(s["measured"] > 0 and s["flops_reduction"] >= 1 for s in search["steps"])
    assert report["method_settings"]["ratio_used"] == search["ratio"]
