"""A small ViT on digits, its heads, MLPs and residual stream pruned: pcompiler against
Torch-Pruning, accuracy after the same fine-tuning, FLOPs beside it.

    python benchmarks/vit_digits.py [--ratios 0.5 0.7] [--seeds 0 1 2] [--budget 300] [--finetune-steps 900]

The bundled DigitsViT (examples/digits_vit.pt: 2x2 patches, a 64-wide stream under 9
LayerNorms, 4 blocks of 4 heads and 128-wide MLPs; 97.5% on the 360 validation digits) is
pruned at each ratio by:

- pcompiler: l1 (one-shot) and tpp (B regularization steps), each with the stream kept (the
  default: every removal exact) and pruned (`--prune-normalized`: the LayerNorms over it lose
  channels, rescaled; approximate, the deviation reported by verify);
- Torch-Pruning (1.6.1) as its ViT example prunes timm's ViTs: `num_heads` of every qkv
  projection, `prune_num_heads=True` with `head_pruning_ratio` = the ratio, the classifier in
  `ignored_layers`, the stream pruned; after `step()` each attention's `num_heads` and `head_dim`
  set from the pruner. One-shot with `MagnitudeImportance(p=1)` (tp_l1) and
  `GroupMagnitudeImportance(p=2)` (tp_group), and `GroupNormPruner` trained for the same B steps
  with its regularizer after every backward (tp_groupnorm).

Equal optimizer steps for everyone: a training method spends B regularization steps then F
fine-tuning steps, a one-shot method B + F fine-tuning steps (SGD, momentum 0.9, cosine from
--finetune-lr; the regularization phases at pcompiler's default lr 1e-3). Mean and spread over
seeds (the seed sets data order). FLOPs are counted on the pruned model by torch's counter.
Writes docs/bench_vit_digits.{json,md}. Run it alone: it uses both cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import _common
import torch
from _common import finetune_and_score, prune_only, tp_hooks

from pcompiler.costs import count_flops
from pcompiler.data import load_data
from pcompiler.example_models import Attention
from pcompiler.inference import evaluate
from pcompiler.loading import load_model
from pcompiler.pipeline import compile_model
from pcompiler.train import TrainConfig, train

MODEL = _common.ROOT / "examples" / "digits_vit.pt"
EXAMPLE = (torch.zeros(1, 1, 8, 8),)
OURS = {"l1": ("l1", False), "l1 +stream": ("l1", True), "tpp": ("tpp", False), "tpp +stream": ("tpp", True)}
TP = ("tp_l1", "tp_group", "tp_groupnorm")
TRAINED = ("tpp", "tp_groupnorm")  # spend the budget on regularization; the others fine-tune it


def ours(name: str, ratio: float, seed: int, data, budget: int, ft_steps: int, lr: float) -> dict:
    method, stream = OURS[name]
    settings = dataclasses.replace(prune_only(method, ratio, seed, budget), prune_normalized=stream)
    model = load_model(MODEL)
    flops = count_flops(model, EXAMPLE)
    prog, _ = compile_model(model, settings, data=data)
    approx = prog.info["verify"].get("approximate") or {}
    used = (prog.info.get("regularization") or {}).get("steps", 0)
    return {"flops_ratio": flops / count_flops(prog.gm, EXAMPLE), "deviation": approx.get("max_relative_error"),
            **finetune_and_score(prog.gm, data, seed, ft_steps + budget - used, lr)}


def torch_pruning(name: str, ratio: float, seed: int, data, budget: int, ft_steps: int, lr: float) -> dict:
    import torch_pruning as tp

    model = load_model(MODEL)
    flops = count_flops(model, EXAMPLE)
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    cls, importance = {
        "tp_l1": (tp.pruner.BasePruner, tp.importance.MagnitudeImportance(p=1)),
        "tp_group": (tp.pruner.BasePruner, tp.importance.GroupMagnitudeImportance(p=2)),
        "tp_groupnorm": (tp.pruner.GroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2)),
    }[name]
    pruner = cls(model, EXAMPLE, importance=importance, pruning_ratio=ratio, ignored_layers=[model.head],
                 num_heads={a.qkv: a.num_heads for a in attention}, prune_num_heads=True, prune_head_dims=False,
                 head_pruning_ratio=ratio)
    if name in TRAINED:
        train(model, data, TrainConfig(seed=seed, progress=False, steps=budget), tp_hooks(pruner, None))
    model.eval()
    pruner.step()
    for a in attention:  # what Torch-Pruning's timm ViT example does after step()
        a.num_heads = pruner.num_heads[a.qkv]
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
    steps = ft_steps if name in TRAINED else ft_steps + budget
    return {"flops_ratio": flops / count_flops(model, EXAMPLE), "deviation": None,
            **finetune_and_score(model, data, seed, steps, lr)}


def summarize(rows: list[dict]) -> dict:
    """{method: {ratio: {key: {mean, std, n}}}}."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["ratio"])), []).append(r)
    table: dict = {}
    for (m, ratio), rs in groups.items():
        cell = {}
        for key in ("acc_pruned", "acc_final", "flops_ratio"):
            vals = [r[key] for r in rs]
            cell[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}
        devs = [r["deviation"] for r in rs if r["deviation"] is not None]
        cell["deviation"] = statistics.fmean(devs) if devs else None
        cell["params"] = rs[0]["params"]
        table.setdefault(m, {})[ratio] = cell
    return table


def markdown(table: dict, args, before: float) -> str:
    ratios = [str(r) for r in args.ratios]
    seeds = max(c["acc_final"]["n"] for cells in table.values() for c in cells.values())
    lines = [f"DigitsViT, {100 * before:.1f}% before; accuracy (%) on the 360 validation digits, mean ± std over "
             f"{seeds} seed{'s' if seeds > 1 else ''}. \"pruned\": right after pruning; \"tuned\": after fine-tuning, "
             f"every method at {args.budget} + {args.finetune_steps} optimizer steps (lr {args.finetune_lr}, cosine). "
             "\"FLOPs\": fewer by this factor; \"dev\": verify's deviation from the zeroed original (relative, "
             "before fine-tuning), where the stream was pruned.", ""]
    lines.append("| method | " + " | ".join(f"{r} FLOPs | {r} pruned | {r} tuned | {r} dev" for r in ratios) + " |")
    lines.append("|---" * (1 + 4 * len(ratios)) + "|")
    for m in (*OURS, *TP):
        if m not in table:
            continue
        cells = []
        for r in ratios:
            c = table[m].get(r)
            if c is None:
                cells += [""] * 4
                continue
            cells.append(f"{c['flops_ratio']['mean']:.2f}x")
            cells += [f"{100 * c[k]['mean']:.1f} ± {100 * c[k]['std']:.1f}" for k in ("acc_pruned", "acc_final")]
            cells.append("" if c["deviation"] is None else f"{100 * c['deviation']:.0f}%")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=300, help="regularization steps B")
    ap.add_argument("--finetune-steps", type=int, default=900, help="fine-tuning steps F after B")
    ap.add_argument("--finetune-lr", type=float, default=1e-2)
    ap.add_argument("--methods", nargs="+", default=[*OURS, *TP], choices=[*OURS, *TP])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test: 20 + 20 steps, seed 0, ratio 0.5, to a temp folder")
    ap.add_argument("--out", help="folder for the results (default docs/, or a temp folder with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.finetune_steps, args.seeds, args.ratios = 20, 20, [0], [0.5]
    _common.set_threads(args.threads)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else _common.DOCS)
    data = load_data("digits")
    before = evaluate(load_model(MODEL), data.val)
    rows = []
    for seed in args.seeds:
        for ratio in args.ratios:
            for m in args.methods:
                t0 = time.perf_counter()
                r = (torch_pruning if m in TP else ours)(m, ratio, seed, data, args.budget, args.finetune_steps,
                                                         args.finetune_lr)
                rows.append({"method": m, "ratio": ratio, "seed": seed, **r, "seconds": time.perf_counter() - t0})
                print(f"seed {seed} ratio {ratio} {m:13s} FLOPs {r['flops_ratio']:.2f}x pruned {r['acc_pruned']:.3f} "
                      f"final {r['acc_final']:.3f} ({rows[-1]['seconds']:.0f}s)", flush=True)
                _common.write_json(out / "bench_vit_digits.json", {"settings": vars(args), "acc_before": before,
                                                                    "rows": rows, "table": summarize(rows),
                                                                    "environment": _common.environment()})
    text = markdown(summarize(rows), args, before)
    (out / "bench_vit_digits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
