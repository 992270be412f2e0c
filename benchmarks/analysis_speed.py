"""Analysis speed: pcompiler's trace + analyze against Torch-Pruning's dependency graph.

What is timed, per model (torchvision, weights=None, one 1x3x224x224 input):

- ours: `pcompiler.trace(model, (x,))` (torch.fx trace, shape propagation, and the check that
  the traced graph reproduces the model's output: three forward passes in all), then the
  `analyze` pass alone (channel groups), and the two together;
- theirs: `tp.DependencyGraph().build_dependency(model, example_inputs=x)` (one forward pass
  with hooks, then a walk of the autograd graph), and separately the enumeration of its groups,
  `DG.get_all_groups(ignored_layers=[classifier], root_module_types=[Conv2d, Linear])`, which
  is lazy in Torch-Pruning (the groups are built when enumerated) but done eagerly by `analyze`.

How: both tools run side by side in one process on separate but identical model instances
(same seed), alternating: each repeat runs ours then theirs, the next theirs then ours, so
drift in machine load (the box may be shared) hits both alike. The first repeat is a warm-up
and is discarded; the table gives medians of the rest and the ratio of the medians
ours / theirs (below 1: pcompiler is faster). No timing is asserted.

For scale, each repeat also times one plain forward pass of the model (no_grad), the last
column: pcompiler's trace runs the model three times (shape propagation, the traced graph and
the model itself for the equivalence check), Torch-Pruning once with autograd on.

Also recorded: torch's thread count, torch / Torch-Pruning / torchvision versions, and the
number of channel groups each tool finds (ours: all groups and the prunable ones; theirs: the
groups `get_all_groups` yields with the classifier ignored).

    python benchmarks/analysis_speed.py                     # resnet50, vit_b_16, convnext_tiny; 5 repeats
    python benchmarks/analysis_speed.py --quick             # resnet18, mobilenet_v3_small; 3 repeats
    python benchmarks/analysis_speed.py --models resnet18 --repeats 7 --threads 1
    python benchmarks/analysis_speed.py --frontend export   # torch.export's graph instead

Writes docs/bench_analysis.json and docs/bench_analysis.md (with --quick: a temporary folder,
unless --out is given) and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
import warnings
from pathlib import Path

import _common  # noqa: F401  (before torchvision: the CPU import workaround)
import torch
import torch_pruning as tp
import torchvision
from _common import (
    DOCS,
    environment,
    markdown_table,
    median,
    set_threads,
    torchvision_classifier,
    write_json,
    write_text,
)
from torch import nn

import pcompiler
from pcompiler.passmanager import make_pass

DEFAULT_MODELS = ("resnet50", "vit_b_16", "convnext_tiny")
QUICK_MODELS = ("resnet18", "mobilenet_v3_small")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None)


def time_ours(model: nn.Module, x: torch.Tensor, frontend: str = "auto") -> dict:
    t0 = time.perf_counter()
    prog = pcompiler.trace(model, (x,), frontend=frontend)
    t1 = time.perf_counter()
    prog = pcompiler.run(prog, [make_pass("analyze")])
    t2 = time.perf_counter()
    groups = prog.analysis.groups
    return {
        "trace_s": t1 - t0,
        "analyze_s": t2 - t1,
        "total_s": t2 - t0,
        "groups": len(groups),
        "prunable": len(prog.analysis.prunable),
    }


def time_theirs(model: nn.Module, x: torch.Tensor) -> dict:
    classifier = torchvision_classifier(model)
    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    t1 = time.perf_counter()
    groups = list(dg.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]))
    t2 = time.perf_counter()
    return {"build_s": t1 - t0, "groups_s": t2 - t1, "total_s": t2 - t0, "groups": len(groups)}


def bench_model(name: str, repeats: int, size: int, frontend: str = "auto") -> dict:
    ours_model, their_model = build(name), build(name)
    x = torch.randn(1, 3, size, size)
    ours: list[dict] = []
    theirs: list[dict] = []
    forward: list[float] = []
    for r in range(repeats):
        gc.collect()
        with torch.no_grad():
            t0 = time.perf_counter()
            ours_model(x)
            forward.append(time.perf_counter() - t0)
        order = (("ours", ours_model), ("theirs", their_model))
        for who, model in order if r % 2 == 0 else order[::-1]:
            gc.collect()
            if who == "ours":
                ours.append(time_ours(model, x, frontend))
            else:
                theirs.append(time_theirs(model, x))
    kept_ours, kept_theirs = ours[1:] or ours, theirs[1:] or theirs  # first repeat: warm-up

    def med(rows: list[dict], key: str) -> float | None:
        return median([row[key] for row in rows])

    result = {
        "model": name,
        "input": [1, 3, size, size],
        "repeats_kept": len(kept_ours),
        "ours": {k: med(kept_ours, k) for k in ("trace_s", "analyze_s", "total_s")},
        "theirs": {k: med(kept_theirs, k) for k in ("build_s", "groups_s", "total_s")},
        "forward_s": median(forward[1:] or forward),
        "ours_groups": ours[-1]["groups"],
        "ours_prunable_groups": ours[-1]["prunable"],
        "theirs_groups": theirs[-1]["groups"],
        "raw": {"ours": ours, "theirs": theirs},
    }
    o, t = result["ours"], result["theirs"]
    result["ratio_total_vs_build"] = o["total_s"] / t["build_s"]
    result["ratio_total_vs_build_and_groups"] = o["total_s"] / t["total_s"]
    return result


def table(results: list[dict]) -> str:
    headers = [
        "model",
        "ours trace+analyze (s)",
        "ours analyze only (s)",
        "TP build_dependency (s)",
        "TP + get_all_groups (s)",
        "ratio ours/TP build",
        "ratio ours/TP build+groups",
        "ours groups (prunable)",
        "TP groups",
        "1 forward (s)",
    ]
    rows = [
        [
            r["model"],
            r["ours"]["total_s"],
            r["ours"]["analyze_s"],
            r["theirs"]["build_s"],
            r["theirs"]["total_s"],
            f"{r['ratio_total_vs_build']:.2f}",
            f"{r['ratio_total_vs_build_and_groups']:.2f}",
            f"{r['ours_groups']} ({r['ours_prunable_groups']})",
            r["theirs_groups"],
            r["forward_s"],
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated torchvision model names")
    ap.add_argument(
        "--repeats", type=int, help="runs per tool and model, the first discarded (default 5; --quick 3)"
    )
    ap.add_argument("--size", type=int, default=224, help="input image size (default 224)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="small models, 3 repeats: a smoke test")
    ap.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                    help="pcompiler's trace frontend (default auto); other than auto writes bench_analysis_FRONTEND.*")
    ap.add_argument("--out", type=Path, help="output folder (default docs/; --quick: a temporary folder)")
    args = ap.parse_args(argv)

    logging.getLogger("pcompiler").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # TP warns about unwrapped parameters on every build
    set_threads(args.threads)
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    repeats = args.repeats or (3 if args.quick else 5)
    out = args.out or (Path(tempfile.gettempdir()) / "pcompiler_bench" if args.quick else DOCS)

    env = environment()
    results = []
    for name in models:
        t0 = time.perf_counter()
        results.append(bench_model(name, repeats, args.size, args.frontend))
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    md = table(results)
    header = (
        f"Trace + analyze, medians of {repeats - 1} runs after 1 warm-up, alternating tools; "
        f"torch {env['torch']} ({env['torch_num_threads']} threads, {env['cpu_count']} cores, "
        f"load {env['loadavg_at_start'][0]:.1f}), Torch-Pruning {env['torch_pruning']}, "
        f"input 1x3x{args.size}x{args.size}; pcompiler's frontend: {args.frontend}."
    )
    stem = "bench_analysis" if args.frontend == "auto" else f"bench_analysis_{args.frontend}"
    write_json(out / f"{stem}.json", {"environment": env, "repeats": repeats, "frontend": args.frontend,
                                       "results": results})
    write_text(out / f"{stem}.md", header + "\n\n" + md)
    print(header + "\n\n" + md)
    print(f"\nwrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
