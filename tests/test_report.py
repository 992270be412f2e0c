"""Tests of the report: its fields and numbers for a hand-made Program, and its JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pcompiler.ir import Analysis, ChannelGroup, ParamSlice, PassRecord, Program, Role
from pcompiler.report import build_report, to_jsonable, write_report


def conv_net(width: int) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1)))


def produced_by(param: str, size: int) -> tuple[ParamSlice, ...]:
    return (ParamSlice(param, 0, Role.PRODUCE, np.arange(size)[:, None]),)


def slim_program() -> Program:
    """8 -> 4 channels in the first conv, as if analyze, a method and slim had run."""
    groups = (
        ChannelGroup(0, 8, produced_by("0.weight", 8), ()),
        ChannelGroup(1, 2, produced_by("2.weight", 2), (), pinned=("reaches a graph output",)),
        ChannelGroup(2, 3, (), (), pinned=("reaches a graph output",)),
    )
    return Program(
        gm=conv_net(4),
        example_inputs=(torch.randn(1, 3, 8, 8),),
        analysis=Analysis(groups),
        selection={0: (0, 2, 4, 6)},
        reference=conv_net(8),
        info={
            "slim": {"layers": {"0": {"before": 8, "after": 4}, "2": {"before": 8, "after": 4}}, "groups": 1},
            "verify": {"ok": True, "max_error": np.float32(2.5e-7)},
            "exports": [{"format": "onnx", "path": "out/model.onnx", "ok": True, "error": None}],
            "custom": {"count": np.int64(3), "where": Path("a/b")},
        },
        history=[PassRecord("analyze", 0.25, False), PassRecord("slim", 0.5, True)],
    )


def test_report_numbers_and_fields():
    report = build_report(slim_program(), model_path=Path("model.pt"), method="l1", settings={"ratio": 0.5})
    assert report["model"] == "model.pt" and report["method"] == "l1" and report["settings"] == {"ratio": 0.5}
    # conv(3->8, 3x3) + conv(8->2, 1x1) against the same with 4 channels
    assert report["params_before"] == (3 * 8 * 9 + 8) + (8 * 2 + 2) == 242
    assert report["params_after"] == (3 * 4 * 9 + 4) + (4 * 2 + 2) == 122
    assert report["param_ratio"] == 122 / 242
    assert report["flops_before"] == 2 * 8 * 64 * 27 + 2 * 2 * 64 * 8
    assert report["flops_after"] == 2 * 4 * 64 * 27 + 2 * 2 * 64 * 4
    assert report["flops_ratio"] == 0.5
    groups = report["groups"]
    assert {k: groups[k] for k in ("total", "prunable", "pruned", "pinned")} == {
        "total": 3, "prunable": 1, "pruned": 1, "pinned": 2
    }
    assert groups["pinned_reasons"] == {"reaches a graph output": 2}
    assert groups["channels_removed"] == 4 and groups["channels_prunable"] == 8
    assert groups["items"][0] == {"id": 0, "label": "0", "size": 8, "removed": 4, "prunable": True, "pinned": []}
    assert report["layers"] == {"0": {"before": 8, "after": 4}, "2": {"before": 8, "after": 4}}
    assert report["slim"] == {"groups": 1}  # slim's other results, without the layers twice
    assert report["verify"]["ok"] is True and report["verify"]["max_error"] == float(np.float32(2.5e-7))
    assert report["exports"][0]["format"] == "onnx"
    assert report["passes"] == [
        {"name": "analyze", "seconds": 0.25, "changed": False},
        {"name": "slim", "seconds": 0.5, "changed": True},
    ]
    assert report["custom"] == {"count": 3, "where": str(Path("a/b"))}
    assert report["inputs"] == [{"shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert report["warnings"] == []
    assert json.loads(json.dumps(report)) == report  # plain JSON already


def test_write_report_round_trips(tmp_path):
    report = build_report(slim_program())
    path = write_report(report, tmp_path / "out" / "report.json")
    text = path.read_text()
    assert text.startswith('{\n  "model": null,')  # indent 2
    assert json.loads(text) == report


def test_report_before_anything_changed():
    prog = Program(gm=conv_net(8), example_inputs=(torch.randn(1, 3, 8, 8),))
    report = build_report(prog)
    assert report["params_before"] == report["params_after"] == 242
    assert report["param_ratio"] == report["flops_ratio"] == 1.0
    assert report["groups"] is None and report["layers"] == {} and report["verify"] is None
    assert report["exports"] == [] and report["passes"] == []


def test_uncountable_flops_leave_a_warning_not_a_crash():
    prog = Program(gm=conv_net(8), example_inputs=(torch.randn(1, 5, 8, 8),))  # wrong channel count
    report = build_report(prog)
    assert report["flops_before"] is None and report["flops_ratio"] is None
    assert report["params_after"] == 242
    assert len(report["warnings"]) == 1 and "FLOPs of the model after" in report["warnings"][0]


def test_to_jsonable_converts_what_passes_store():
    @dataclass(frozen=True)
    class Point:
        x: int
        y: tuple[float, ...]

    value = {
        "nan": float("nan"), "inf": np.float64("inf"), "arr": np.arange(3), "t": torch.tensor([1.5]),
        "dt": torch.float16, "pt": Point(1, (2.0,)), 3: {1, 2}, "b": np.bool_(True),
    }
    assert to_jsonable(value) == {
        "nan": "nan", "inf": "inf", "arr": [0, 1, 2], "t": [1.5], "dt": "torch.float16",
        "pt": {"x": 1, "y": [2.0]}, "3": [1, 2], "b": True,
    }


SLIM_LAYERS = {"0": {"out": [8, 4]}, "2": {"in": [8, 4]}}  # what slim records (see layer_widths)


def test_markdown_report_says_what_was_removed_and_draws_the_plots(tmp_path):
    from pcompiler.report_md import write_markdown

    prog = slim_program()
    prog.info["slim"]["layers"] = SLIM_LAYERS
    prog.scores = {0: np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.05, 0.6])}
    prog.info.update(acc_before=0.99, acc_pruned=0.95, acc_final=0.98,
                     regularization={"steps": 20, "seconds": 1.5, "curve": [
                         {"step": s, "loss": 1.0 / s, "acc": 0.9, "penalty": 0.1 * s} for s in (10, 20)]})
    report = build_report(prog, method="l1", settings={"ratio": 0.5})
    assert report["importance"]["0"]["removed"] == [0, 2, 4, 6] and len(report["importance"]["0"]["scores"]) == 8
    text = write_markdown(report, tmp_path).read_text()
    first = text.splitlines()[2]
    assert first.startswith("`l1` at ratio 0.5 removed 4 channels in 1 of 3 channel groups")
    assert "accuracy 99.00% before, 95.00% right after slim, 98.00% after fine-tuning" in first
    assert "| accuracy, fine-tuned | 99.00% | 98.00% | -1.00 points |" in text
    assert "| accuracy, right after slim | 99.00% | 95.00% | -4.00 points |" in text
    assert "| `0` | 8 -> 4 | = |" in text and "| `2` | = | 8 -> 4 |" in text and "reaches a graph output" in text
    for png in ("widths", "importance", "curve"):
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_report_without_data_leaves_those_sections_out(tmp_path):
    from pcompiler.report_md import write_markdown

    prog = slim_program()
    prog.info["slim"]["layers"] = SLIM_LAYERS
    text = write_markdown(build_report(prog, method="l1"), tmp_path).read_text()
    assert "accuracy" not in text and "## Regularization" not in text and "## Importance" not in text
    assert not (tmp_path / "plots" / "curve.png").exists() and (tmp_path / "plots" / "widths.png").exists()


def test_latency_text_and_rows():
    from pcompiler.report_md import latency_rows, seconds_text

    assert [seconds_text(t) for t in (1.5, 0.0123, 4.2e-5, None)] == ["1.5 s", "12.3 ms", "42 µs", "-"]
    timing = {"p50": 0.002, "p90": 0.003}
    bench = {"latency": [
        {"backend": "torch-cpu", "batch": 8, "original": timing, "slim": {"p50": 0.001, "p90": 0.0015},
         "speedup": 2.0, "efficiency": 0.5},
        {"backend": "onnxruntime-cpu", "batch": 8, "error": "RuntimeError: no"},
    ]}
    header, ok, failed = latency_rows(bench)
    assert header == ["backend", "batch", "original p50 / p90", "slim p50 / p90", "speedup", "efficiency"]
    assert ok == ["torch-cpu", "8", "2 ms / 3 ms", "1 ms / 1.5 ms", "2.00x", "0.50"]
    assert failed[:3] == ["onnxruntime-cpu", "8", "failed: RuntimeError: no"] and len(failed) == len(header)
