"""Pruning to a measured latency (`--latency X`, targets/latency.py): what the search attains.

    python benchmarks/latency_target.py [--quick] [--models resnet50,mobilenet_v2] [--threads 2]

For each model (torchvision's resnet50, mobilenet_v2 and vit_b_16 at 224x224 with random
weights, latency depending on the widths only; the bundled digits ResNet and VGG), each batch
size (1 and 8) and each target X (1.5, 2 and 3): `compile_model` with `Settings(method="l1",
latency=X, latency_backend="onnxruntime-cpu", latency_batch=B, threads=T)`, the search's steps
(ratio, FLOPs reduction, measured speedup) from the Program, and then an independent
measurement of the same two models (`targets.bench.measure_latency`, a fresh alternate loop
of 3 s per model) to check the figure the report gives. A target the search cannot reach is a
row with the search's error (the best it measured).

Writes docs/bench_latency_target.{json,md}. Run it alone: the timings share the cores with
nothing else.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import torch
import torchvision

from pcompiler.errors import CompileError
from pcompiler.inputs import InputSpec
from pcompiler.loading import load_model
from pcompiler.pipeline import Settings, compile_model
from pcompiler.targets.backends import machine
from pcompiler.targets.bench import LatencySettings, measure_latency

MODELS = ("digits_resnet", "digits_vgg", "mobilenet_v2", "resnet50", "vit_b_16", "timm:efficientnet_b0")


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("digits_"):
        return load_model(_common.ROOT / "examples" / f"{name}.pt").eval(), torch.randn(1, 1, 8, 8)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    return getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 224, 224)


def run(name: str, batch: int, target: float, threads: int, independent_seconds: float) -> dict:
    model, x = build(name)
    settings = Settings(method="l1", latency=target, latency_batch=batch, threads=threads, compensate=False)
    t0 = time.perf_counter()
    row = {"model": name, "batch": batch, "target": target, "threads": threads}
    try:
        prog, _ = compile_model(model, settings, inputs=[InputSpec(tuple(x.shape))], formats=())
    except CompileError as e:
        return {**row, "error": str(e).splitlines()[0], "seconds": time.perf_counter() - t0}
    search = prog.info["budget_search"]
    row |= {"seconds": time.perf_counter() - t0, "ratio": search["ratio"], "steps": search["steps"],
            "predicted": search["predicted"], "measured": search["measured"],
            "within_tolerance": search["within_tolerance"]}
    check = LatencySettings(batch_sizes=(batch,), backends=("onnxruntime-cpu",), threads=threads,
                            min_seconds=independent_seconds)
    (again,) = measure_latency({"original": prog.reference, "slim": prog.gm}, (x,), check)
    row["independent"] = again.get("speedup")
    print(f"{name} b{batch} x{target}: ratio {row['ratio']:.3f}, {len(row['steps'])} steps, measured "
          f"{row['measured']:.2f}x, independent {row['independent']:.2f}x, {row['seconds']:.0f} s", flush=True)
    return row


def markdown(rows: list[dict], env: dict, threads: int) -> str:
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], r["batch"], f"{r['target']}x", "-", "-", "-", "-", "-", "-", r["error"]])
            continue
        steps = "; ".join(f"{s['ratio']:.2f}: {s['flops_reduction']:.2f} / {s['measured']:.2f}" for s in r["steps"])
        miss = r["independent"] / r["target"] - 1
        table.append([r["model"], r["batch"], f"{r['target']}x", f"{r['ratio']:.3f}", f"{r['predicted']:.2f}x",
                      f"{r['measured']:.2f}x", f"{r['independent']:.2f}x", f"{miss:+.0%}", f"{r['seconds']:.0f}", steps])
    return "\n".join([
        "# Pruning to a measured latency",
        "",
        f"`python benchmarks/latency_target.py`: onnxruntime {env.get('onnxruntime')} CPU provider, {threads} threads, "
        f"on {env.get('cpu')} ({env.get('cpu_count')} cores). Method l1, `--latency X` at the batch size shown; predicted: the FLOPs reduction of "
        "the chosen step (what `--speedup` assumes); measured: the search's own timing of that step; independent: "
        "a fresh alternate timing of the same two models afterwards; miss: independent / target - 1. Steps: "
        "ratio: FLOPs reduction / measured speedup, in the order the search took them.",
        "",
        _common.markdown_table(["model", "batch", "target", "ratio", "predicted", "measured", "independent", "miss",
                                "seconds", "steps"], table),
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the digits networks at batch 8, target 1.5 (writes to /tmp)")
    ap.add_argument("--out", type=Path, default=_common.DOCS)
    ap.add_argument("--append", action="store_true", help="add the rows to those already in the JSON (runs in parts)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.batches, args.targets, args.out = "digits_resnet,digits_vgg", "8", "1.5", Path("/tmp")
    env = {**_common.environment(), "cpu": machine()["cpu"]}
    rows = []
    if args.append and (args.out / "bench_latency_target.json").exists():
        import json

        rows = json.loads((args.out / "bench_latency_target.json").read_text())["rows"]
    rows += [run(m, int(b), float(t), args.threads, 1.0 if args.quick else 3.0)
             for m in args.models.split(",") for b in args.batches.split(",") for t in args.targets.split(",")]
    _common.write_json(args.out / "bench_latency_target.json", {"environment": env, "rows": rows})
    text = markdown(rows, env, args.threads)
    _common.write_text(args.out / "bench_latency_target.md", text)
    print(text)


if __name__ == "__main__":
    main()
