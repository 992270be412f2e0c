"""Accuracy right after slim and after fine-tuning, per method, ratio, architecture and budget, at
equal optimizer steps.

    python benchmarks/methods_digits.py [--archs resnet vgg] [--budgets 600 3000] [--seeds 0 1 2]

Two networks trained on scikit-learn's digits: the bundled DigitsResNet (residual adds) and
DigitsVGG (a plain conv-BN-ReLU stack), both 99.4%. Each is pruned at ratios 0.5, 0.7 and 0.9 by
l1 and random (one-shot), slimming, greg1, greg2, tpp and receding (a regularization budget of
B steps, with their defaults), and by Torch-Pruning's GroupNormPruner, BNScalePruner and
GrowingRegPruner trained in the same loop for the same B steps (their `regularize` after
backward; GrowingReg's `update_reg` every 10 steps, as GReg's K_u), with their own defaults.

Fair by construction:
- every model is recalibrated after slim (the norms' running statistics re-estimated on 50
  training batches), Torch-Pruning's included, before "pruned" is measured;
- every method spends the same number of optimizer steps: a training method B regularization
  steps then F fine-tuning steps, a one-shot method B + F fine-tuning steps, and a method that
  stops early (GReg, once every group has stopped growing and stabilized) fine-tunes for the steps
  it left (`--finetune-steps` F; lr 1e-3, cosine).
Mean and spread over seeds (the seed sets data order, augmentation and dropout). Writes
docs/bench_methods.{json,md,png}. Run it alone: it uses both cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401  (torchvision workaround, paths)
import torch
from _common import finetune_and_score, prune_only, tp_hooks

from pcompiler.data import load_data
from pcompiler.loading import load_model
from pcompiler.pipeline import compile_model
from pcompiler.train import TrainConfig, train

OURS = ("l1", "random", "slimming", "greg1", "greg2", "tpp", "receding")
ONE_SHOT = ("l1", "random")
TP = ("tp_groupnorm", "tp_bnscale", "tp_growingreg")
RATIOS = (0.5, 0.7, 0.9)
ARCHS = {"resnet": "digits_resnet.pt", "vgg": "digits_vgg.pt"}


def model_of(arch: str) -> torch.nn.Module:
    return load_model(_common.ROOT / "examples" / ARCHS[arch])


def ours(arch: str, method: str, ratio: float, seed: int, data, steps: int, ft_steps: int) -> dict:
    prog, _ = compile_model(model_of(arch), prune_only(method, ratio, seed, steps), data=data)
    # A method that stops early (GReg once every group is done) fine-tunes for the steps it left.
    used = (prog.info.get("regularization") or {}).get("steps", 0)
    return finetune_and_score(prog.gm, data, seed, ft_steps + steps - used)


def torch_pruning(arch: str, method: str, ratio: float, seed: int, data, steps: int, ft_steps: int) -> dict:
    import torch_pruning as tp

    model = model_of(arch)
    example = torch.randn(1, 1, 8, 8)
    kinds = {
        "tp_groupnorm": (tp.pruner.GroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2), None),
        "tp_bnscale": (tp.pruner.BNScalePruner, tp.importance.BNScaleImportance(), None),
        "tp_growingreg": (tp.pruner.GrowingRegPruner, tp.importance.GroupMagnitudeImportance(p=2), 10),
    }
    cls, imp, grow = kinds[method]
    pruner = cls(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[model.fc])
    cfg = TrainConfig(seed=seed, progress=False, steps=steps)
    train(model, data, cfg, tp_hooks(pruner, grow))
    model.eval()
    pruner.step()
    return finetune_and_score(model, data, seed, ft_steps)


def summarize(rows: list[dict]) -> dict:
    """{arch: {budget: {method: {ratio: {key: {mean, std, n}}}}}}."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], str(r["budget"]), r["method"], str(r["ratio"])), []).append(r)
    table: dict = {}
    for (arch, budget, m, ratio), rs in groups.items():
        cell = {}
        for key in ("acc_uncalibrated", "acc_pruned", "acc_final"):
            vals = [r[key] for r in rs]
            cell[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}
        cell["params"] = rs[0]["params"]
        table.setdefault(arch, {}).setdefault(budget, {}).setdefault(m, {})[ratio] = cell
    return table


def markdown(table: dict, args) -> str:
    lines = [f"Accuracy (%) on the digits validation split (360 images), both networks 99.4% before; mean ± std "
             f"over seeds. \"pruned\": right after slim and recalibration; \"tuned\": after fine-tuning, "
             f"every method at the same total of optimizer steps (budget + {args.finetune_steps}).", ""]
    for arch, by_budget in table.items():
        for budget, by_method in by_budget.items():
            ratios = [r for r in RATIOS if any(str(r) in c for c in by_method.values())]
            seeds = max(c["acc_final"]["n"] for cells in by_method.values() for c in cells.values())
            lines += [f"### {arch}, budget {budget} steps ({seeds} seed{'s' if seeds > 1 else ''})", ""]
            lines.append("| method | " + " | ".join(f"{r} pruned | {r} tuned" for r in ratios) + " |")
            lines.append("|---" * (1 + 2 * len(ratios)) + "|")
            for m in (*OURS, *TP):
                if m not in by_method:
                    continue
                cells = []
                for r in ratios:
                    c = by_method[m].get(str(r))
                    for key in ("acc_pruned", "acc_final"):
                        cells.append("" if c is None else f"{100 * c[key]['mean']:.1f} ± {100 * c[key]['std']:.1f}")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(table: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(arch, budget) for arch, bb in table.items() for budget in bb]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7), sharey=True, squeeze=False)
    for col, (arch, budget) in enumerate(panels):
        by_method = table[arch][budget]
        for row, (key, what) in enumerate((("acc_pruned", "right after slim"), ("acc_final", "after fine-tuning"))):
            ax = axes[row][col]
            for m in (*OURS, *TP):
                if m not in by_method:
                    continue
                rs = [r for r in RATIOS if str(r) in by_method[m]]
                mean = [100 * by_method[m][str(r)][key]["mean"] for r in rs]
                std = [100 * by_method[m][str(r)][key]["std"] for r in rs]
                ax.errorbar(rs, mean, yerr=std, marker="o", capsize=3, label=m, linestyle="--" if m in TP else "-")
            ax.set_title(f"{arch}, {budget} steps: {what}", fontsize=9)
            ax.set_xticks(RATIOS)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("pruning ratio")
        axes[0][0].set_ylabel("validation accuracy (%)")
        axes[1][0].set_ylabel("validation accuracy (%)")
    axes[1][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--budgets", type=int, nargs="+", default=[600, 3000])
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=[*OURS, *TP])
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--resume", action="store_true", help="keep the rows of an earlier run in --out and add to them")
    ap.add_argument("--quick", action="store_true", help="smoke test: 30 steps, seed 0, ratio 0.9, to a temp folder")
    ap.add_argument("--out", help="folder for the results (default docs/, or a temp folder with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.budgets, args.finetune_steps, args.seeds, args.ratios = [30], 10, [0], [0.9]
    import json
    import tempfile
    from pathlib import Path

    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else _common.DOCS)
    data = load_data("digits")
    rows = json.loads((out / "bench_methods.json").read_text())["rows"] if args.resume else []
    done = {(r["arch"], r["budget"], r["method"], r["ratio"], r["seed"]) for r in rows}
    for budget in args.budgets:
        for seed in args.seeds:
            for arch in args.archs:
                for ratio in args.ratios:
                    for m in args.methods:
                        if (arch, budget, m, ratio, seed) in done:
                            continue
                        t0 = time.perf_counter()
                        run = torch_pruning if m in TP else ours
                        r = run(arch, m, ratio, seed, data, budget, args.finetune_steps)
                        rows.append({"arch": arch, "budget": budget, "method": m, "ratio": ratio, "seed": seed, **r,
                                     "seconds": time.perf_counter() - t0})
                        print(f"{arch} budget {budget} seed {seed} ratio {ratio} {m:14s} raw {r['acc_uncalibrated']:.3f} "
                              f"pruned {r['acc_pruned']:.3f} final {r['acc_final']:.3f} ({rows[-1]['seconds']:.0f}s)",
                              flush=True)
                        table = summarize(rows)
                        _common.write_json(out / "bench_methods.json",
                                           {"settings": vars(args), "rows": rows, "table": table,
                                            "environment": _common.environment()})
    table = summarize(rows)
    (out / "bench_methods.md").write_text(markdown(table, args))
    plot(table, out / "bench_methods.png")
    print(markdown(table, args))


if __name__ == "__main__":
    main()
