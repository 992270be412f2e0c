"""Perplexity of a pruned language model, by method, at equal budgets (issue 20, item 7).

Every configuration runs the CLI in a fresh process on the bundled model (examples/kjv_llama,
or --model FOLDER) with --data kjv (or --data SPEC), windows of 256 tokens:

    pcompile MODEL --method M --params-removed P --data kjv --finetune-epochs 0 ... -o OUT

and reads report.json: the validation perplexity before, right after slim and after recovery,
the parameters kept, the wall time and the peak resident memory of the process (VmHWM).

Methods, at each fraction of the parameters removed (--params-removed: the channel ratio, the same
for every group, is searched):
- magnitude, uniform: Torch-Pruning's LLM recipe (examples/LLMs/prune_llm.py: magnitude
  importance, one ratio for the stream, the heads and the MLP, no calibration, no compensation),
  as `--method l1 --no-compensate` (its norm is L1 where Torch-Pruning's is L2);
- l1: the same, with the default compensation (least squares on calibration data);
- calib: the calibration method (activation score, its default) with one ratio for every group,
  with compensation of near-constant channels only and by least squares (the default for text
  data); and with its default allocation, each group's share of the ratio measured
  (passes/select.py `measured_shares`), least squares;
- tpp, greg1: the seed methods, trained on next-token loss for the same token budget
  (--reg-steps x batch x 256 tokens), with the default compensation;
and each again with a distillation recovery (the unpruned model's logits as teacher) of the same
number of tokens for every method. Methods that vary with the seed run 3 seeds (--seeds).

    python benchmarks/lm_pruning.py                  # 20% and 50%, 3 seeds (about 2 hours on 2 cores)
    python benchmarks/lm_pruning.py --quick          # 20%, one seed, short budgets (about 10 minutes)
    python benchmarks/lm_pruning.py --model DIR --data tokens:DIR/train.npy,DIR/val.npy   # another model

Writes docs/bench_lm.json and docs/bench_lm.md (unless --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import DOCS, PEAK_CLI, ROOT, environment, markdown_table, write_json, write_text

BATCH = 8
SEQ = 256


def configs(reg_steps: int, recovery_steps: int) -> list[tuple[str, list[str], bool]]:
    """(name, CLI arguments, whether it varies with the seed)."""
    reg = ["--reg-steps", str(reg_steps), "--lr", "1e-3"]
    one_ratio = ["--method", "calib", "-p", "score=activation", "-p", "allocation=uniform"]
    return [
        ("magnitude, uniform (Torch-Pruning)", ["--method", "l1", "--no-compensate"], False),
        ("l1 + lstsq", ["--method", "l1"], True),
        ("calib, one ratio", [*one_ratio, "--compensate", "constant"], True),
        ("calib + lstsq, one ratio", [*one_ratio, "--compensate", "lstsq"], True),
        ("calib + lstsq, measured (default)", ["--method", "calib", "-p", "score=activation"], True),
        ("tpp + lstsq", ["--method", "tpp", *reg], True),
        ("greg1 + lstsq", ["--method", "greg1", *reg], True),
    ]


def run_one(model: str, data: str, params: float, args: list[str], seed: int, recovery: int,
            train_size: int, work: Path) -> dict:
    out = work / f"run{len(list(work.iterdir()))}"
    epochs = 0 if recovery == 0 else recovery * BATCH / train_size
    extra = ["--finetune-epochs", f"{epochs:.6f}"] + (["--distill", "--finetune-lr", "0.05"] if recovery else [])
    cmd = [sys.executable, "-c", PEAK_CLI, model, *args, "--params-removed", str(params), "--data", data, "--seq-len", str(SEQ),
           "--batch-size", str(BATCH), "--seed", str(seed), "--no-recalibrate", "--formats", "pt2", *extra, "-o", str(out)]
    peak = work / "peak"
    env = {**os.environ, "PCOMPILER_PEAK": str(peak), "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    row = {"seconds": time.perf_counter() - t0, "exit": proc.returncode,
           "peak_mib": int(peak.read_text()) / 1024 if peak.exists() else None}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr or proc.stdout)[-500:]}
    r = json.loads((out / "report.json").read_text())
    return {**row, "ppl_before": r["ppl_before"], "ppl_pruned": r["ppl_pruned"], "ppl_final": r.get("ppl_final"),
            "params_kept": r["param_ratio"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "kjv_llama"))
    ap.add_argument("--data", default="kjv")
    ap.add_argument("--params-removed", type=float, nargs="+", default=[0.2, 0.5],
                    help="fractions of the parameters to remove")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--reg-steps", type=int, default=300, help="training methods' steps (x 8 windows of 256 tokens)")
    ap.add_argument("--recovery-steps", type=int, default=300, help="distillation steps, the same for every method")
    ap.add_argument("--quick", action="store_true", help="0.2 only, one seed, 20 + 40 steps")
    ap.add_argument("--methods", nargs="+", help="only these rows (names as in the table)")
    ap.add_argument("--no-recovery", action="store_true", help="one-shot rows only")
    ap.add_argument("--out", type=Path, default=DOCS)
    ap.add_argument("--name", default="bench_lm", help="file names of the results: NAME.json, NAME.md")
    ap.add_argument("--append", action="store_true", help="add the rows to those already in NAME.json (runs in parts)")
    args = ap.parse_args()
    if args.quick:
        args.params_removed, args.seeds, args.reg_steps, args.recovery_steps = [0.2], 1, 20, 40
    from pcompiler.data import load_data

    train_size = len(load_data(args.data, seq_len=SEQ, tokenizer=args.model).train)
    rows = []
    if args.append and (args.out / f"{args.name}.json").exists():
        rows = json.loads((args.out / f"{args.name}.json").read_text())["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for ratio in args.params_removed:
            for name, cli, varies in configs(args.reg_steps, args.recovery_steps):
                if args.methods and name not in args.methods:
                    continue
                for recovery in (0,) if args.no_recovery else (0, args.recovery_steps):
                    runs = [run_one(args.model, args.data, ratio, cli, seed, recovery, train_size, work)
                            for seed in range(args.seeds if varies else 1)]
                    ok = [r for r in runs if r["exit"] == 0]
                    key = "ppl_final" if recovery else "ppl_pruned"
                    row = {"ratio": ratio, "method": name, "recovery_tokens": recovery * BATCH * SEQ,
                           "train_tokens": args.reg_steps * BATCH * SEQ if "--reg-steps" in cli else 0,
                           "runs": runs, "ppl": [r[key] for r in ok],
                           "ppl_median": statistics.median([r[key] for r in ok]) if ok else None,
                           "dense": ok[0]["ppl_before"] if ok else None, "params_kept": ok[0]["params_kept"] if ok else None,
                           "seconds": statistics.median([r["seconds"] for r in runs]),
                           "peak_mib": max((r["peak_mib"] or 0) for r in runs)}
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    table = markdown_table(
        ["params removed (target)", "params kept", "method", "training tokens", "recovery tokens", "perplexity (median)", "x dense",
         "all seeds", "seconds", "peak MiB"],
        [[f"{r['ratio']:.0%}", f"{r['params_kept']:.1%}" if r["params_kept"] else "-", r["method"], r["train_tokens"],
          r["recovery_tokens"], f"{r['ppl_median']:.2f}" if r["ppl_median"] else "failed",
          f"{r['ppl_median'] / r['dense']:.2f}" if r["ppl_median"] else "-", ", ".join(f"{p:.2f}" for p in r["ppl"]),
          f"{r['seconds']:.0f}", f"{r['peak_mib']:.0f}"] for r in rows])
    dense = next((r["dense"] for r in rows if r["dense"]), None)
    text = (f"# Language-model pruning on {Path(args.model).name}\n\n`python benchmarks/lm_pruning.py"
            f"{''.join(' ' + a for a in sys.argv[1:])}`: data {args.data}, windows of {SEQ} tokens, batch {BATCH}; dense "
            f"validation perplexity {dense:.2f}. One-shot rows train nothing; recovery rows distill from the "
            f"unpruned model for the same tokens.\n\n{table}\n")
    write_json(args.out / f"{args.name}.json", {"environment": environment(), "settings": vars(args) | {"out": str(args.out)},
                                            "rows": rows})
    write_text(args.out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
