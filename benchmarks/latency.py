"""Latency of pruned models against the originals: speedup, FLOPs reduction and their quotient.

    python benchmarks/latency.py [--quick] [--backends torch-cpu,onnxruntime-cpu] [--threads N]

Cases (torchvision models with random weights: latency depends on the widths, not the values):
- resnet50 at 224x224, pruned by pcompiler's l1 (`--speedup` 2 and 3, so the ratio is searched
  for that FLOPs reduction), once with widths rounded to multiples of 8 (the default) and once
  not rounded (`round_to=1`), to show what rounding buys;
- the same resnet50 pruned by Torch-Pruning (BasePruner, L1 magnitude, its default: no rounding)
  at the per-group ratio pcompiler's 2x search found, as the baseline;
- vit_b_16 at 224x224, pcompiler's l1 at 2x and 3x fewer FLOPs (widths rounded to 8), with the
  residual stream kept (the default) and pruned (`--prune-normalized`, "stream" in the table);
- a LLaMA-shaped decoder (transformers' LlamaForCausalLM: hidden 512, 4 layers, 8 query heads
  over 4 key/value heads, MLP 1408, vocabulary 8000) on 128 tokens, l1 at 2x fewer FLOPs.

Every case is timed with `pcompiler.targets.bench.bench`: original and slim alternately, at each
batch size, on every backend this machine has (`--backends` narrows it): p50/p90, the median
per-round speedup, and efficiency = speedup / FLOPs reduction. Writes docs/bench_latency.{json,md,png}.
Run it alone: the timings share the cores with nothing else. `--quick`: a small input and few
repetitions, to check the script (writes to /tmp). `--models vit_b_16,llama` re-runs those
models' cases and keeps the other models' results in the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import _common
import torch
import torchvision

from pcompiler.inputs import InputSpec
from pcompiler.pipeline import Settings, compile_model
from pcompiler.report_md import seconds_text
from pcompiler.targets.bench import LatencySettings, bench


def case_list(quick: bool) -> list[dict]:
    r50 = [{"model": "resnet50", "pruner": "pcompiler", "speedup": s, "round_to": r} for s in (2, 3) for r in (8, 1)]
    tp = [{"model": "resnet50", "pruner": "torch-pruning", "speedup": 2, "round_to": None}]
    vit = [{"model": "vit_b_16", "pruner": "pcompiler", "speedup": s, "round_to": 8, "stream": stream}
           for stream in (False, True) for s in (2, 3)]
    llama = [{"model": "llama", "pruner": "pcompiler", "speedup": 2, "round_to": 8}]
    return (r50[:2] + tp) if quick else (r50 + tp + vit + llama)


def build(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor, InputSpec]:
    torch.manual_seed(0)
    if name == "llama":
        import transformers as T

        config = T.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                               use_cache=False)
        x = torch.randint(0, config.vocab_size, (1, 128))
        return T.LlamaForCausalLM(config).eval(), x, InputSpec(tuple(x.shape), torch.int64, "input_ids")
    x = torch.randn(1, 3, size, size)
    if name == "vit_b_16":
        return torchvision.models.vit_b_16(image_size=size).eval(), x, InputSpec(tuple(x.shape))
    return getattr(torchvision.models, name)().eval(), x, InputSpec(tuple(x.shape))


def prune_ours(model, spec: InputSpec, speedup: float, round_to: int, stream: bool):
    settings = Settings(method="l1", speedup=speedup, round_to=round_to, compensate=False, prune_normalized=stream)
    prog, _ = compile_model(model, settings, inputs=[spec], formats=())
    return prog.reference, prog.gm, prog.info["method_settings"]["ratio_used"]


def prune_tp(model, x, ratio: float):
    import copy

    import torch_pruning as tp

    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[_common.torchvision_classifier(model)])
        pruner.step()
    return original, model.eval()


def run_case(case: dict, size: int, settings: LatencySettings, ratios: dict) -> dict:
    model, x, spec = build(case["model"], size)
    t0 = time.perf_counter()
    if case["pruner"] == "pcompiler":
        original, slim, ratio = prune_ours(model, spec, case["speedup"], case["round_to"], case.get("stream", False))
        ratios[(case["model"], case["speedup"])] = ratio
    else:  # Torch-Pruning at the ratio our search found for the same target
        ratio = ratios[(case["model"], case["speedup"])]
        original, slim = prune_tp(model, x, ratio)
    prune_s = time.perf_counter() - t0
    label = f"{case['model']} {case['pruner']} {case['speedup']}x round_to={case['round_to']}" + (
        " stream" if case.get("stream") else "")
    print(f"{label}: ratio {ratio:.3f}, pruned in {prune_s:.1f} s; timing", flush=True)
    result = bench({"original": original, "slim": slim}, (x,), settings)
    for row in result["latency"]:
        if "error" in row:
            print(f"  {row['backend']} b{row['batch']}: {row['error']}", flush=True)
            continue
        print(f"  {row['backend']} b{row['batch']}: {seconds_text(row['original']['p50'])} -> "
              f"{seconds_text(row['slim']['p50'])}, speedup {row['speedup']:.2f}, efficiency {row['efficiency']:.2f} "
              f"({row['reps']} reps)", flush=True)
    return {**case, "ratio": ratio, "prune_seconds": prune_s, "image_size": size, **result}


def markdown(results: list[dict], env: dict, settings: LatencySettings) -> str:
    m = results[0]["machine"] if results else {}
    lines = [
        "# Latency of pruned models",
        "",
        f"Measured by `benchmarks/latency.py` on {m.get('cpu')} ({m.get('cpu_count')} cores, "
        f"{results[0]['settings']['threads'] if results else '?'} threads)"
        + (f" and {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}, Torch-Pruning {env['torch_pruning']}. "
        f"Original and slim timed alternately: {settings.warmup} warm-up calls each, then at least "
        f"{settings.min_reps} rounds and {settings.min_seconds} s per model. Speedup: median of the per-round "
        "ratios original / slim. Efficiency: speedup / FLOPs reduction. Random weights (latency depends on the "
        "widths only).",
        "",
    ]
    rows = []
    for r in results:
        for row in r["latency"]:
            if "error" in row:
                rows.append([r["model"] + (" (stream)" if r.get("stream") else ""), r["pruner"], r["round_to"],
                         f"{r['ratio']:.3f}", "-", row["backend"],
                             row["batch"], "-", "-", "-", f"failed: {row['error']}"])
                continue
            rows.append([r["model"] + (" (stream)" if r.get("stream") else ""), r["pruner"], r["round_to"] or "-",
                         f"{r['ratio']:.3f}",
                         f"{row['flops_reduction']:.2f}x", row["backend"], row["batch"],
                         f"{seconds_text(row['original']['p50'])} / {seconds_text(row['original']['p90'])}",
                         f"{seconds_text(row['slim']['p50'])} / {seconds_text(row['slim']['p90'])}",
                         f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}"])
    lines.append(_common.markdown_table(
        ["model", "pruned by", "round_to", "ratio", "FLOPs reduction", "backend", "batch", "original p50 / p90",
         "slim p50 / p90", "speedup", "efficiency"], rows))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(row["backend"] for r in results for row in r["latency"] if "speedup" in row))
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        labels, effs = [], {}
        for r in results:
            rows = [row for row in r["latency"] if row["backend"] == backend and "efficiency" in row]
            if not rows:
                continue
            red = rows[0]["flops_reduction"]
            name = f"{r['model']}{' stream' if r.get('stream') else ''}\n{red:.1f}x, " \
                f"{'TP' if r['pruner'] == 'torch-pruning' else 'ours'}" + (
                f" r{r['round_to']}" if r["round_to"] else "")
            labels.append(name)
            for row in rows:
                effs.setdefault(row["batch"], []).append(row["efficiency"])
        width = 0.8 / max(1, len(effs))
        for k, (batch, values) in enumerate(sorted(effs.items())):
            ax.bar([i + k * width for i in range(len(values))], values, width=width, label=f"batch {batch}")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks([i + width * (len(effs) - 1) / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("efficiency (speedup / FLOPs reduction)")
        ax.set_title(backend)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", help="comma-separated (default: every backend this machine has)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--vit-batches", default="1,8",
                    help="batch sizes for vit_b_16 and the decoder (64 takes minutes per call on 2 cores)")
    ap.add_argument("--models", help="comma-separated: run only these models' cases, keep the others' results")
    ap.add_argument("--out", type=Path, help="folder for bench_latency.{json,md,png} (default: docs/)")
    args = ap.parse_args()
    _common.set_threads(args.threads)
    backends = tuple(args.backends.split(",")) if args.backends else None
    size = 64 if args.quick else 224
    out = args.out or (Path("/tmp/bench_latency_quick") if args.quick else _common.DOCS)
    base = dict(backends=backends, threads=args.threads, warmup=1 if args.quick else 2,
                min_reps=2 if args.quick else 5, min_seconds=0.0 if args.quick else 2.0)
    results, ratios = [], {}
    cases = case_list(args.quick)
    if args.models:
        chosen = args.models.split(",")
        cases = [c for c in cases if c["model"] in chosen]
        old = out / "bench_latency.json"
        results = [r for r in json.loads(old.read_text())["results"] if r["model"] not in chosen] if old.exists() else []
    env = _common.environment()
    for case in cases:
        batches = (1, 8) if args.quick else (
            tuple(int(b) for b in args.vit_batches.split(",")) if case["model"] in ("vit_b_16", "llama") else (1, 8, 64))
        results.append(run_case(case, size, LatencySettings(batch_sizes=batches, **base), ratios))
        _common.write_json(out / "bench_latency.json", {"environment": env, "results": results})
    settings = LatencySettings(**base)
    _common.write_text(out / "bench_latency.md", markdown(results, env, settings))
    plot(results, out / "bench_latency.png")
    print(f"wrote {out}/bench_latency.{{json,md,png}}")


if __name__ == "__main__":
    main()
