"""Coverage: on how many torchvision classifiers does pruning work end to end, pcompiler against
Torch-Pruning used the plain way?

For every torchvision classification model (`torchvision.models.list_models`, 80 in 0.28),
random weights, each tool prunes half the channels of every group it may prune:

- pcompiler: trace -> analyze -> l1 (ratio 0.5) -> slim -> verify (the slim model equals the
  original with the removed channels zeroed) -> ONNX export, run with onnxruntime and compared
  with torch (`pcompiler.targets.onnx.export_onnx`).
- Torch-Pruning (1.6.1), as its README shows it: `tp.pruner.BasePruner` (`MagnitudePruner` is a
  deprecated alias of it) with `tp.importance.MagnitudeImportance(p=1)`, `pruning_ratio=0.5`,
  the final classifier in `ignored_layers`, the example input; `pruner.step()`; then the pruned
  model must run and give an output of the original's shape with finite values, and must export
  to ONNX (the same exporter policy as pcompiler: torch.export-based first, the TorchScript one
  if that fails) and give torch's outputs under onnxruntime (same tolerance as pcompiler). No
  per-model configuration (num_heads, unwrapped_parameters, customized pruners): that is what
  "the plain way" means here. Torch-Pruning has no equivalence check like `verify`, so a pass
  for it is weaker evidence than a pass for pcompiler.

A model counts as ok for a tool when every step above succeeds; "pruned" additionally means the
parameter count fell. Per model and tool: ok, the failing step and the first line of its error,
FLOPs and parameter ratios (pruned / original; FLOPs by torch's FlopCounterMode on the same
input, multiply-add = 2) and the seconds taken.

Inputs: 64x64 for most CNNs (enough for their strides), 96 for inception_v3 (its stem needs 75),
224 for MaxViT and the ViTs (built for a fixed image size; --vit-image-size builds the ViTs for a
smaller one instead). googlenet and inception_v3 are built with aux_logits=False,
init_weights=False. A tool that fails at a small input is tried once more at 224x224
(--recheck-size), so that failures caused only by the small input are marked as such; the
counts are those at the standard sizes.

Each model runs in its own child process (one crash or leak does not end the run) under a time
limit (--timeout). The child writes each tool's result as it finishes; if it dies before both
are written, the missing tool is tried again alone in a fresh child, so a crash is charged to
the tool that caused it.

    python benchmarks/coverage.py                           # all 80 models
    python benchmarks/coverage.py --quick                   # 5 small models
    python benchmarks/coverage.py --models resnet18,vit_b_16 --tools tp
    python benchmarks/coverage.py --jobs 4                  # 4 children at once (on a big machine)

Writes docs/coverage.json and docs/coverage.md (with --quick: a temporary folder, unless --out is
given): a summary ("pcompiler N/80, Torch-Pruning M/80"), Torch-Pruning's and pcompiler's
failures by model family, and a per-model table.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import gc
import io
import json
import logging
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import _common  # noqa: F401  (before torchvision: the CPU import workaround)
import torch
import torchvision
from _common import (
    DOCS,
    environment,
    markdown_table,
    set_threads,
    torchvision_classifier,
    write_json,
    write_text,
)
from torch import nn

from pcompiler.errors import one_line

TOOLS = ("pcompiler", "tp")
MARK = "@@ step:"
TOOL_NAMES = {"pcompiler": "pcompiler", "tp": "Torch-Pruning"}
RATIO = 0.5
DEFAULT_SIZE = 64
QUICK_MODELS = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_y_400mf")
KWARGS: dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
SIZE: dict[str, int] = {"inception_v3": 96, "maxvit_t": 224}
VIT = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


def all_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def family(name: str) -> str:
    """resnet50 -> resnet, wide_resnet50_2 -> wide_resnet, regnet_y_8gf -> regnet, vit_b_16 -> vit."""
    if name.startswith("wide_resnet"):
        return "wide_resnet"
    return re.sub(r"[\d_.]+$", "", name.split("_")[0]) or name


def model_spec(name: str, vit_image_size: int, size: int | None = None) -> tuple[dict, int]:
    """Constructor arguments and input size; `size` overrides the input size of the CNNs."""
    kwargs = dict(KWARGS.get(name, {}))
    size = max(size, SIZE.get(name, 0)) if size else SIZE.get(name, DEFAULT_SIZE)
    if name in VIT:
        size = vit_image_size
        if vit_image_size != 224:
            kwargs["image_size"] = vit_image_size
    return kwargs, size


def build(name: str, vit_image_size: int, size: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    kwargs, size = model_spec(name, vit_image_size, size)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, torch.randn(1, 3, size, size)


# ---------------------------------------------------------------------------------------------
# ONNX for a plain nn.Module (Torch-Pruning's output), with pcompiler's exporter policy


def export_module_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[float, str]:
    """Export, run with onnxruntime, compare with torch; returns (max abs error, exporter used).
    Raises with the reason when the export fails or the outputs differ."""
    from pcompiler.compare import EXPORT, compare
    from pcompiler.targets.onnx import session

    def export(dynamo: bool) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], verbose=False)

    try:
        export(dynamo=True)
        exporter = "dynamo"
    except Exception as e:  # noqa: BLE001 - fall back like pcompiler does
        try:
            export(dynamo=False)
        except Exception as legacy:
            raise RuntimeError(
                f"both ONNX exporters failed: dynamo: {one_line(e, 140)}; legacy: {one_line(legacy, 140)}"
            ) from legacy
        exporter = "legacy"
    with torch.no_grad():
        want = model(x)
    sess = session(path)
    feed = {i.name: x.numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feed)[0])
    result = compare(got, want, EXPORT)
    if not result.ok:
        raise RuntimeError(f"onnxruntime output differs from torch: {result.reason}")
    return result.max_error, exporter


# ---------------------------------------------------------------------------------------------
# The two tools (in the child process)


def run_pcompiler(name: str, vit_image_size: int, size: int | None, workdir: Path, base: dict) -> dict:
    import pcompiler
    from pcompiler.costs import count_flops, count_params
    from pcompiler.passmanager import make_pass
    from pcompiler.targets.onnx import export_onnx

    stage = mark("pcompiler", "build model")
    try:
        model, x = build(name, vit_image_size, size)
        stage = mark("pcompiler", "trace")
        prog = pcompiler.trace(model, (x,))
        stage = mark("pcompiler", "analyze")
        prog = pcompiler.run(prog, [make_pass("analyze")])
        prunable = len(prog.analysis.prunable)
        stage = mark("pcompiler", "l1+slim+verify")
        slim = pcompiler.run(prog, [make_pass("l1", ratio=RATIO), make_pass("slim"), make_pass("verify")])
        verify = slim.info["verify"]
        if verify.get("ok") is not True:
            raise RuntimeError(f"verify did not pass: {verify}")
        stage = mark("pcompiler", "count")
        flops, params = count_flops(slim.gm, slim.example_inputs), count_params(slim.gm)
        stage = mark("pcompiler", "onnx")
        path = workdir / f"{name}.pcompiler.onnx"
        exported = export_onnx(slim, path)
        _remove(path)
        if not exported.ok:
            raise RuntimeError(exported.error)
    except Exception as e:  # noqa: BLE001 - a failure is the result
        traceback.print_exc()
        return {"ok": False, "stage": stage, "error": one_line(e)}
    return {
        "ok": True,
        "prunable_groups": prunable,
        "verify_max_relative_error": verify.get("max_relative_error"),
        "onnx_max_error": exported.max_error,
        "onnx_note": exported.note,
        "flops_ratio": flops / base["flops"],
        "params_ratio": params / base["params"],
    }


def run_tp(name: str, vit_image_size: int, size: int | None, workdir: Path, base: dict) -> dict:
    import torch_pruning as tp

    from pcompiler.costs import count_flops, count_params

    stage = mark("tp", "build model")
    try:
        model, x = build(name, vit_image_size, size)
        stage = mark("tp", "build pruner")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unwrapped parameters detected" on every ViT/ConvNeXt/Swin
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs=x,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=RATIO,
                ignored_layers=[torchvision_classifier(model)],
            )
            stage = mark("tp", "step")
            pruner.step()
        stage = mark("tp", "forward")
        model.eval()
        with torch.no_grad():
            out = model(x)
        if tuple(out.shape) != tuple(base["output_shape"]):
            raise RuntimeError(
                f"output shape {tuple(out.shape)}, the original's {tuple(base['output_shape'])}"
            )
        if not torch.isfinite(out).all():
            raise RuntimeError("output has non-finite values")
        stage = mark("tp", "count")
        flops, params = count_flops(model, (x,)), count_params(model)
        stage = mark("tp", "onnx")
        path = workdir / f"{name}.tp.onnx"
        onnx_error, exporter = export_module_onnx(model, x, path)
        _remove(path)
    except Exception as e:  # noqa: BLE001 - a failure is the result
        traceback.print_exc()
        return {"ok": False, "stage": stage, "error": one_line(e)}
    return {
        "ok": True,
        "onnx_max_error": onnx_error,
        "onnx_note": f"exporter: {exporter}",
        "flops_ratio": flops / base["flops"],
        "params_ratio": params / base["params"],
    }


def mark(tool: str, stage: str) -> str:
    """Log the step about to run (the parent reads the last one when a child dies)."""
    print(f"{MARK} {tool} {stage}", flush=True)
    return stage


def last_mark(log_path: Path) -> str | None:
    try:
        marks = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith(MARK)]
    except OSError:
        return None
    return marks[-1][len(MARK) :].strip() if marks else None


def memory_limit_bytes(args: argparse.Namespace) -> int | None:
    """The address-space limit per child: --memory-limit-gb, or 75% of physical memory split
    among --jobs (so a runaway child fails with an allocation error instead of waking the
    system's OOM killer, which may pick another process)."""
    if args.memory_limit_gb is not None:
        return int(args.memory_limit_gb * 2**30) if args.memory_limit_gb > 0 else None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return int(0.75 * total / args.jobs)


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def child(name: str, tools: list[str], vit_image_size: int, size: int | None, result_path: Path) -> None:
    """Runs in the child process: the baseline, then each tool; the result file is rewritten
    after each step, so a crash keeps what was done."""
    from pcompiler.costs import count_flops, count_params

    logging.getLogger("pcompiler").setLevel(logging.ERROR)
    workdir = result_path.parent
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if "baseline" not in result:
        mark("baseline", "build and run the original")
        model, x = build(name, vit_image_size, size)
        with torch.no_grad():
            shape = list(model(x).shape)
        result["baseline"] = {
            "input": list(x.shape),
            "output_shape": shape,
            "flops": count_flops(model, (x,)),
            "params": count_params(model),
        }
        del model
        result_path.write_text(json.dumps(result))
    for tool in tools:
        t0 = time.perf_counter()
        run = run_pcompiler if tool == "pcompiler" else run_tp
        gc.collect()
        mark(tool, "start")
        result[tool] = run(name, vit_image_size, size, workdir, result["baseline"])
        result[tool]["seconds"] = time.perf_counter() - t0
        result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: one child per model


def run_children(
    name: str,
    tools: list[str],
    args: argparse.Namespace,
    workdir: Path,
    threads: int | None,
    size: int | None = None,
) -> dict:
    """Run `tools` on model `name` in child processes; returns the child's result dict."""
    tag = f"{name}@{size}" if size else name
    result_path = workdir / f"{tag}.json"
    log_path = workdir / f"{tag}.log"
    result_path.unlink(missing_ok=True)  # a reused --workdir: start afresh
    todo = list(tools)
    tries = 0
    failure = None
    while todo and tries < len(tools):
        tries += 1
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--tools",
            ",".join(todo),
            "--vit-image-size",
            str(args.vit_image_size),
            "--result",
            str(result_path),
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        if size:
            cmd += ["--size", str(size)]
        failure = None
        if limit := memory_limit_bytes(args):
            cmd += ["--as-limit", str(limit)]  # set by the child itself (preexec_fn is unsafe with threads)
        with open(log_path, "a") as log:
            try:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
                if done.returncode != 0:
                    failure = f"child process died (exit code {done.returncode})"
            except subprocess.TimeoutExpired:
                failure = f"did not finish in {args.timeout:.0f} s"
        if failure:
            where = last_mark(log_path)
            failure += f" during {where}" if where else ""
            log_tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            if log_tail and ("MemoryError" in log_tail[0] or "can't allocate memory" in log_tail[0]):
                failure += f" (out of memory: {one_line(RuntimeError(log_tail[0]), 120)})"
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        if "baseline" not in result:
            break
        missing = [t for t in todo if t not in result]
        if failure and missing:
            # Charge the failure to the tool that was running; retry the others alone.
            result[missing[0]] = {"ok": False, "stage": "process", "error": f"{failure}; log: {log_path}"}
            result_path.write_text(json.dumps(result))
            missing = missing[1:]
        todo = missing
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    for tool in tools:
        why = failure or "the original model did not build or run"
        result.setdefault(tool, {"ok": False, "stage": "baseline", "error": f"{why}; log: {log_path}"})
        r = result[tool]
        r["pruned"] = bool(r.get("ok") and r.get("params_ratio", 1.0) < 1.0)
    return result


def run_model(
    name: str, tools: list[str], args: argparse.Namespace, workdir: Path, threads: int | None
) -> dict:
    """Both tools on one model; a tool that fails at a small input is tried again at
    --recheck-size, so a failure caused only by the small input is told apart (recorded as
    `recheck`; the summary still counts the result at the standard size)."""
    t0 = time.perf_counter()
    result = run_children(name, tools, args, workdir, threads, args.size)
    size = result.get("baseline", {}).get("input", [0])[-1]
    failed = [t for t in tools if not result[t]["ok"] and result[t]["stage"] not in ("process", "baseline")]
    if args.recheck_size and failed and size < args.recheck_size:
        again = run_children(name, failed, args, workdir, threads, args.recheck_size)
        for tool in failed:
            r = again[tool]
            result[tool]["recheck"] = {
                "size": args.recheck_size,
                "ok": r["ok"],
                **({} if r["ok"] else {"stage": r["stage"], "error": r["error"]}),
            }
    result["model"] = name
    result["family"] = family(name)
    result["wall_s"] = time.perf_counter() - t0
    return result


def recheck_note(r: dict) -> str:
    if "recheck" not in r:
        return ""
    c = r["recheck"]
    return f" [at {c['size']}x{c['size']}: " + ("ok]" if c["ok"] else "fails too]")


def summarize(results: list[dict], tools: list[str], env: dict, args: argparse.Namespace) -> str:
    n = len(results)
    lines = [
        f"Torchvision classifiers, random weights, ratio {RATIO}; torch {env['torch']}, torchvision {env['torchvision']}, "
        f"Torch-Pruning {env['torch_pruning']}, onnxruntime {env['onnxruntime']}.",
        "",
    ]
    for tool in tools:
        ok = sum(r[tool]["ok"] for r in results)
        pruned = sum(r[tool]["pruned"] for r in results)
        lines.append(f"- **{TOOL_NAMES[tool]} {ok}/{n}** end to end ({pruned}/{n} with fewer parameters)")
    for tool in reversed(tools):
        by_family: dict[str, list[str]] = collections.defaultdict(list)
        for r in results:
            if not r[tool]["ok"]:
                by_family[r["family"]].append(
                    f"{r['model']} ({r[tool]['stage']}: {r[tool]['error']}{recheck_note(r[tool])})"
                )
        lines += ["", f"{TOOL_NAMES[tool]} failures by family:" + ("" if by_family else " none")]
        lines += [f"- {fam} ({len(ms)}): " + "; ".join(ms) for fam, ms in sorted(by_family.items())]

    def cell(r: dict, tool: str) -> list:
        t = r[tool]
        if not t["ok"]:
            return ["fail", f"{t['stage']}: {t['error']}{recheck_note(t)}", "", ""]
        return [
            "ok" if t["pruned"] else "ok (nothing pruned)",
            "",
            f"{t['flops_ratio']:.3f}",
            f"{t['params_ratio']:.3f}",
        ]

    headers = ["model", "input"]
    for tool in tools:
        name = TOOL_NAMES[tool]
        headers += [name, f"{name} reason", f"{name} FLOPs ratio", f"{name} params ratio"]
    rows = []
    for r in results:
        size = r.get("baseline", {}).get("input", ["?"])[-1]
        rows.append([r["model"], size, *[c for tool in tools for c in cell(r, tool)]])
    lines += ["", markdown_table(headers, rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated torchvision model names (default: all)")
    ap.add_argument("--tools", default="pcompiler,tp", help="comma-separated: pcompiler,tp (default both)")
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK_MODELS)} small models: a smoke test")
    ap.add_argument(
        "--timeout", type=float, default=1800, help="seconds per model and child process (default 1800)"
    )
    ap.add_argument(
        "--memory-limit-gb",
        type=float,
        help="address-space limit per child in GiB (default: 75%% of RAM / jobs; 0: none)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    ap.add_argument(
        "--threads", type=int, help="torch threads per child (default: torch's own, or cores / jobs)"
    )
    ap.add_argument(
        "--size",
        type=int,
        help="input size for the CNNs (default 64; at least 96 for inception_v3, 224 for maxvit_t)",
    )
    ap.add_argument(
        "--recheck-size",
        type=int,
        default=224,
        help="a tool that fails at the small input is tried again at this size (default 224; 0: never)",
    )
    ap.add_argument(
        "--vit-image-size", type=int, default=224, help="image size the ViTs are built for (default 224)"
    )
    ap.add_argument("--out", type=Path, help="output folder (default docs/; --quick: a temporary folder)")
    ap.add_argument(
        "--workdir", type=Path, help="per-model logs and results (default: a new temporary folder)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--as-limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    tools = [t for t in args.tools.split(",") if t]
    if unknown := set(tools) - set(TOOLS):
        ap.error(f"unknown tools {sorted(unknown)}; choose from {TOOLS}")
    if args.child:
        if args.as_limit:
            resource.setrlimit(resource.RLIMIT_AS, (args.as_limit, args.as_limit))
        set_threads(args.threads)
        child(args.child, tools, args.vit_image_size, args.size, args.result)
        return 0

    known = all_models()
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else known)
    if unknown := [m for m in models if m not in known]:
        ap.error(f"not torchvision classifiers: {unknown}")
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    if threads:
        set_threads(threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pcompiler_coverage_"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or (Path(tempfile.gettempdir()) / "pcompiler_bench" if args.quick else DOCS)
    env = environment()

    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_model, m, tools, args, workdir, threads): m for m in models}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            r = fut.result()
            results[r["model"]] = r
            status = "  ".join(
                f"{t}: {'ok' if r[t]['ok'] else 'FAIL (' + r[t]['stage'] + ')'}" for t in tools
            )
            print(f"[{i}/{len(models)}] {r['model']:<22} {status}  ({r['wall_s']:.0f} s)", flush=True)
    ordered = [results[m] for m in models]
    total = time.perf_counter() - t0

    text = summarize(ordered, tools, env, args)
    summary = {
        tool: {
            "ok": sum(r[tool]["ok"] for r in ordered),
            "pruned": sum(r[tool]["pruned"] for r in ordered),
            "of": len(ordered),
        }
        for tool in tools
    }
    write_json(
        out / "coverage.json",
        {
            "environment": env,
            "ratio": RATIO,
            "vit_image_size": args.vit_image_size,
            "threads_per_child": threads or env["torch_num_threads"],
            "jobs": args.jobs,
            "total_s": total,
            "summary": summary,
            "results": ordered,
        },
    )
    write_text(out / "coverage.md", text)
    print("\n" + text)
    print(
        f"\n{total:.0f} s in all; wrote {out / 'coverage.json'} and {out / 'coverage.md'}; logs in {workdir}"
    )
    return 0 if all(math.isfinite(r["wall_s"]) for r in ordered) else 1


if __name__ == "__main__":
    raise SystemExit(main())
