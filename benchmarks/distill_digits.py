"""Accuracy after fine-tuning with and without distillation from the input model, at one ratio.

    python benchmarks/distill_digits.py [--ratio 0.9] [--steps 300] [--epochs 5] [--seeds 0 1 2]
                                        [--lrs 1e-3 1e-2] [--variants none 4:0.9 4:0.5 1:0.9 ...]

The bundled DigitsResNet is pruned by l1 (one-shot) and by tpp (`--steps` regularization steps,
no distillation), then each slim model gets the same fine-tune (`--epochs`, cosine from each of
`--lrs`, the `finetune` pass) once per variant: `none` (cross-entropy only) or `T:alpha` (the
input model as teacher, temperature T, weight alpha). The seed sets data order, augmentation and
dropout of both phases. Mean and spread over seeds; writes docs/NAME.{json,md} (`--name`,
default bench_distill). docs/bench_distill_20ep.* is the longer fine-tune:
`--epochs 20 --variants none 4:0.9 --name bench_distill_20ep`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (torchvision workaround, paths)
import torch
from _common import prune_only

import pcompiler
from pcompiler.data import DataSource, load_data
from pcompiler.distill import Distillation
from pcompiler.inference import evaluate
from pcompiler.ir import Program
from pcompiler.loading import load_model
from pcompiler.passmanager import make_pass
from pcompiler.pipeline import compile_model
from pcompiler.train import TrainConfig

METHODS = ("l1", "tpp")


def parse_variant(text: str) -> Distillation | None:
    if text == "none":
        return None
    t, _, a = text.partition(":")
    return Distillation(temperature=float(t), alpha=float(a))


def prune(method: str, ratio: float, seed: int, data: DataSource, steps: int) -> tuple[torch.nn.Module, Program]:
    """The input model and its slim Program (tpp: regularized without a teacher)."""
    model = load_model(_common.ROOT / "examples" / "digits_resnet.pt")
    prog, _ = compile_model(model, prune_only(method, ratio, seed, steps), data=data)
    return model, prog


def finetune(model: torch.nn.Module, prog: Program, data: DataSource, seed: int, epochs: float, lr: float,
             distill: Distillation | None) -> float:
    """Validation accuracy after fine-tuning a copy of `prog` (distilling from `model` when asked)."""
    cfg = TrainConfig(lr=lr, schedule="cosine", seed=seed, progress=False, distill=distill)
    ft = make_pass("finetune", data=data, epochs=epochs, train=cfg, teacher=None if distill is None else model)
    out = pcompiler.run(prog.replace(gm=copy.deepcopy(prog.gm)), [ft])
    return evaluate(out.gm, data.val)


def summarize(rows: list[dict]) -> dict:
    """"method, lr" -> variant -> mean/std of acc_final (and acc_pruned), and the gain over `none`."""
    table: dict = {}
    for r in rows:
        table.setdefault(f"{r['method']}, lr {r['lr']:g}", {}).setdefault(r["variant"], []).append(r)
    out: dict = {}
    for method, by_variant in table.items():
        for variant, rs in by_variant.items():
            final = [r["acc_final"] for r in rs]
            out.setdefault(method, {})[variant] = {
                "mean": statistics.fmean(final), "std": statistics.pstdev(final), "n": len(final),
                "acc_pruned": statistics.fmean(r["acc_pruned"] for r in rs)}
        base = out[method].get("none")
        for cell in out[method].values():
            cell["gain"] = None if base is None else cell["mean"] - base["mean"]
    return out


def markdown(table: dict, args: argparse.Namespace) -> str:
    variants = list(args.variants)
    lines = [f"Validation accuracy (digits, 360 images; the example model: 99.4%) at ratio {args.ratio}, after "
             f"{args.epochs} fine-tune epochs (cosine from lr), mean ± std over seeds {args.seeds}; tpp with "
             f"{args.steps} regularization steps. `T:alpha`: distilled from the input model; `none`: "
             "cross-entropy only. In brackets: the gain over `none`, in points.", ""]
    head = ["method, fine-tune lr", "after slim", *variants]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, cells in table.items():
        row = [method, f"{100 * next(iter(cells.values()))['acc_pruned']:.1f}"]
        for v in variants:
            c = cells.get(v)
            gain = "" if c is None or v == "none" or c["gain"] is None else f" ({100 * c['gain']:+.1f})"
            row.append("" if c is None else f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}{gain}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=300, help="tpp's regularization steps")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="fine-tuning lrs (1e-3: the CLI's default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--variants", nargs="+", default=["none", "1:0.9", "2:0.9", "4:0.5", "4:0.9", "4:1", "8:0.9"],
                    help="none, or T:alpha")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: 20 steps, 0.5 epochs, seed 0, to a temp folder")
    ap.add_argument("--name", default="bench_distill", help="file name of the results, without suffix")
    ap.add_argument("--out", help="folder for the results (default docs/, or a temp folder with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.epochs, args.seeds, args.lrs, args.variants = 20, 0.5, [0], [1e-3], ["none", "4:0.9"]
    _common.set_threads(args.threads)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else _common.DOCS)
    variants = {v: parse_variant(v) for v in args.variants}
    data = load_data("digits")
    rows: list[dict] = []
    for seed in args.seeds:
        for method in args.methods:
            model, prog = prune(method, args.ratio, seed, data, args.steps)
            pruned = evaluate(prog.gm, data.val)
            for lr in args.lrs:
                for name, distill in variants.items():
                    t0 = time.perf_counter()
                    acc = finetune(model, prog, data, seed, args.epochs, lr, distill)
                    rows.append({"method": method, "seed": seed, "lr": lr, "variant": name, "acc_pruned": pruned,
                                 "acc_final": acc, "seconds": time.perf_counter() - t0})
                    print(f"seed {seed} {method:4s} lr {lr:g} {name:6s} pruned {pruned:.3f} final {acc:.3f} "
                          f"({rows[-1]['seconds']:.0f}s)", flush=True)
    table = summarize(rows)
    _common.write_json(out / f"{args.name}.json", {"settings": vars(args), "rows": rows, "table": table,
                                                    "environment": _common.environment()})
    _common.write_text(out / f"{args.name}.md", markdown(table, args))
    print(markdown(table, args))


if __name__ == "__main__":
    main()
