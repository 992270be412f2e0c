"""Accuracy after slim and after a short fine-tune, per method and ratio, on the example model.

    python benchmarks/methods_digits.py [--steps 800] [--finetune-epochs 3] [--seeds 0 1 2]

The bundled DigitsResNet (99.4% on scikit-learn's digits) is pruned at ratios 0.5, 0.7 and 0.9 by
l1 and random (one-shot), slimming, greg1, greg2, tpp and receding (`--steps` regularization
steps each), and by Torch-Pruning's GroupNormPruner, BNScalePruner and GrowingRegPruner trained
with the same step budget in the same loop (their `regularize` after backward; GrowingReg's
`update_reg` every 10 steps, as GReg's K_u), with their own default coefficients. Every model
then gets the same fine-tune (`--finetune-epochs`, lr 1e-3, cosine). Mean and spread over seeds
(the seed sets data order, augmentation and dropout). Writes docs/bench_methods.{json,md,png}.
Run it alone: it uses both cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401  (torchvision workaround, paths)
import torch

import pcompiler
from pcompiler.data import load_data
from pcompiler.loading import load_model
from pcompiler.passmanager import make_pass
from pcompiler.train import Hooks, TrainConfig, evaluate, train

OURS = ("l1", "random", "slimming", "greg1", "greg2", "tpp", "receding")
TP = ("tp_groupnorm", "tp_bnscale", "tp_growingreg")
RATIOS = (0.5, 0.7, 0.9)


def ours(method: str, ratio: float, seed: int, data, steps: int, ft_epochs: float) -> dict:
    model = load_model(_common.ROOT / "examples" / "digits_resnet.pt")
    prog = pcompiler.trace(model, (torch.randn(1, 1, 8, 8),))
    cfg = TrainConfig(seed=seed, progress=False)
    opts = {} if method in ("l1", "random") else {"data": data, "steps": steps, "train": cfg}
    if method == "random":
        opts["seed"] = seed
    if method == "receding":
        opts["global_ranking"] = False  # layer-wise like every other row of the table
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass(method, ratio=ratio, **opts), make_pass("slim"),
                                make_pass("verify")])
    return finetune_and_score(prog.gm, data, seed, ft_epochs)


def finetune_and_score(model: torch.nn.Module, data, seed: int, epochs: float) -> dict:
    """Accuracy right after pruning, then after the same fine-tune for every method."""
    pruned = evaluate(model, data.val)
    steps = int(round(epochs * (len(data.train) // TrainConfig.batch_size)))
    train(model, data, TrainConfig(steps=steps, lr=1e-3, schedule="cosine", seed=seed, progress=False))
    return {"acc_pruned": pruned, "acc_final": evaluate(model, data.val),
            "params": sum(p.numel() for p in model.parameters())}


class TPHooks(Hooks):
    def __init__(self, pruner, grow_every: int | None):
        self.pruner, self.grow_every = pruner, grow_every

    def after_backward(self, model, step):
        self.pruner.regularize(model)

    def after_step(self, model, step):
        if self.grow_every and step % self.grow_every == 0:
            self.pruner.update_reg()
        return {}


def torch_pruning(method: str, ratio: float, seed: int, data, steps: int, ft_epochs: float) -> dict:
    import torch_pruning as tp

    model = load_model(_common.ROOT / "examples" / "digits_resnet.pt")
    example = torch.randn(1, 1, 8, 8)
    kinds = {
        "tp_groupnorm": (tp.pruner.GroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2), None),
        "tp_bnscale": (tp.pruner.BNScalePruner, tp.importance.BNScaleImportance(), None),
        "tp_growingreg": (tp.pruner.GrowingRegPruner, tp.importance.GroupMagnitudeImportance(p=2), 10),
    }
    cls, imp, grow = kinds[method]
    pruner = cls(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[model.fc])
    cfg = TrainConfig(seed=seed, progress=False, steps=steps)
    train(model, data, cfg, TPHooks(pruner, grow))
    model.eval()
    pruner.step()
    return finetune_and_score(model, data, seed, ft_epochs)


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(str(r["ratio"]), []).append(r)
    table = {}
    for m, by_ratio in out.items():
        for ratio, rs in by_ratio.items():
            cell = {}
            for key in ("acc_pruned", "acc_final"):
                vals = [r[key] for r in rs]
                cell[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}
            cell["params"] = rs[0]["params"]
            table.setdefault(m, {})[ratio] = cell
    return table


def markdown(table: dict, args) -> str:
    lines = [f"Accuracy on the digits validation split (360 images) of the example model (99.4% before), "
             f"mean ± std over seeds {args.seeds}; {args.steps} regularization steps, "
             f"{args.finetune_epochs} fine-tune epochs.", ""]
    head = "| method | " + " | ".join(f"{r} pruned | {r} fine-tuned" for r in RATIOS) + " |"
    lines += [head, "|---" * (1 + 2 * len(RATIOS)) + "|"]
    for m in (*OURS, *TP):
        if m not in table:
            continue
        cells = []
        for r in RATIOS:
            c = table[m].get(str(r))
            if c is None:
                cells += ["", ""]
                continue
            for key in ("acc_pruned", "acc_final"):
                cells.append(f"{100 * c[key]['mean']:.1f} ± {100 * c[key]['std']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in zip(axes, ("acc_pruned", "acc_final"), ("right after slim", "after fine-tuning")):
        for m in (*OURS, *TP):
            if m not in table:
                continue
            rs = [r for r in RATIOS if str(r) in table[m]]
            mean = [100 * table[m][str(r)][key]["mean"] for r in rs]
            std = [100 * table[m][str(r)][key]["std"] for r in rs]
            ax.errorbar(rs, mean, yerr=std, marker="o", capsize=3, label=m, linestyle="--" if m in TP else "-")
        ax.set_title(title)
        ax.set_xlabel("pruning ratio")
        ax.set_xticks(RATIOS)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--finetune-epochs", type=float, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=[*OURS, *TP])
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--quick", action="store_true", help="smoke test: 30 steps, seed 0, ratio 0.9, to a temp folder")
    ap.add_argument("--out", help="folder for the results (default docs/, or a temp folder with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.finetune_epochs, args.seeds, args.ratios = 30, 0.5, [0], [0.9]
    import tempfile
    from pathlib import Path

    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else _common.DOCS)
    data = load_data("digits")
    rows = []
    for seed in args.seeds:
        for ratio in args.ratios:
            for m in args.methods:
                t0 = time.perf_counter()
                run = torch_pruning if m in TP else ours
                r = run(m, ratio, seed, data, args.steps, args.finetune_epochs)
                rows.append({"method": m, "ratio": ratio, "seed": seed, **r, "seconds": time.perf_counter() - t0})
                print(f"seed {seed} ratio {ratio} {m:14s} pruned {r['acc_pruned']:.3f} final {r['acc_final']:.3f} "
                      f"({rows[-1]['seconds']:.0f}s)", flush=True)
                table = summarize(rows)
                _common.write_json(out / "bench_methods.json",
                                   {"settings": vars(args), "rows": rows, "table": table,
                                    "environment": _common.environment()})
    (out / "bench_methods.md").write_text(markdown(table, args))
    plot(table, out / "bench_methods.png")
    print(markdown(table, args))


if __name__ == "__main__":
    main()
