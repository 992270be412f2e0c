"""Peak memory of pruning LLaMA-shaped bfloat16 checkpoints through the CLI, against their size.

For each shape a `save_pretrained`-style folder of random bfloat16 weights is written into a
temporary folder (never the repository): config.json from `LlamaConfig`, the weights one
decoder layer per safetensors shard with an index, made a shard at a time so that writing a 7B
folder needs one layer in memory, not the model. Then, in a fresh process,

    pcompile FOLDER --method l1 --ratio 0.2 --formats hf -o OUT

and what is recorded: the exit status, the wall time, the checkpoint's size on disk, the peak
resident memory of that process (VmHWM, read as it exits: Linux carries ru_maxrss across fork
and exec, VmHWM belongs to the process's own address space), its ratio to the checkpoint, and
the bound the run must keep, 1.5 x checkpoint + 1 GiB; the parameters before and after and the
hf/ folder's size from report.json.

    python benchmarks/llm_memory.py                    # 1b and 7b (7b: about 14 GB on disk, ~25 min)
    python benchmarks/llm_memory.py --shapes 200m 1b   # smaller
    python benchmarks/llm_memory.py --keep DIR          # write the folders into DIR and keep them
    python benchmarks/llm_memory.py --quick             # 200m only, about 1 min, into a temporary folder
    python benchmarks/llm_memory.py --params-removed 0.2  # the ratio searched for that fraction of the parameters

Writes docs/bench_llm_memory.json and docs/bench_llm_memory.md (unless --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import DOCS, PEAK_CLI, environment, markdown_table, write_json, write_text

# name -> LlamaConfig fields. 7b: LLaMA-2-7B / Mistral-7B's grouped-query shape (8 key/value heads,
# MLP 14336); 1b: TinyLlama-1.1B's; 200m: a small one for a quick look.
SHAPES = {
    "200m": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=32000),
}
GIB = 2**30



def write_folder(folder: Path, shape: dict, seed: int = 0) -> int:
    """A LLaMA folder of random bfloat16 weights (std 0.02, norms 1), one shard per layer; its size
    in bytes. Runs in this process with one layer's tensors in memory at a time."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                                      dtype="bfloat16", use_cache=True)
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(layer, []).append(name)
    index, total = {}, 0
    for i, names in enumerate(shards.values()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
            index[n] = file
            total += tensors[n].numel() * 2
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}, indent=1))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def prune(folder: Path, out: Path, budget: list[str], timeout: float) -> dict:
    """The CLI on `folder` in a fresh process: exit status, wall time, peak RSS. `budget`: its
    budget options (`--ratio 0.2`)."""
    peak_file = out.with_suffix(".peak")
    env = {**os.environ, "PCOMPILER_PEAK": str(peak_file)}
    cmd = [sys.executable, "-c", PEAK_CLI, str(folder), "--method", "l1", *budget, "--formats", "hf",
           "-o", str(out), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    except subprocess.TimeoutExpired:
        code, tail = None, [f"timed out after {timeout:.0f} s"]
    wall = time.perf_counter() - t0
    peak = int(peak_file.read_text()) * 1024 if peak_file.is_file() else None
    return {"exit": code, "seconds": round(wall, 1), "peak_rss_bytes": peak, "tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1b", "7b"], choices=list(SHAPES))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--params-removed", type=float, help="search the ratio that removes this fraction of the "
                        "parameters instead (trial slims: what a search adds to the memory)")
    parser.add_argument("--keep", type=Path, help="write the folders here and keep them (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (default: the issue's 30 min)")
    parser.add_argument("--out", type=Path, help="folder for the JSON and markdown (default: docs/)")
    parser.add_argument("--quick", action="store_true", help="the 200m shape only, results in a temporary folder")
    args = parser.parse_args()
    budget = ["--ratio", str(args.ratio)] if args.params_removed is None else ["--params-removed", str(args.params_removed)]
    if args.quick:
        args.shapes, args.out = ["200m"], args.out or Path(tempfile.mkdtemp(prefix="pcompiler_llm_memory_out_"))
    root = args.keep or Path(tempfile.mkdtemp(prefix="pcompiler_llm_memory_"))
    rows = []
    try:
        for name in args.shapes:
            folder, out = root / f"llama_{name}", root / f"out_{name}"
            t0 = time.perf_counter()
            size = write_folder(folder, SHAPES[name]) if not (folder / "config.json").is_file() else \
                sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            made = time.perf_counter() - t0
            run = prune(folder, out, budget, args.timeout)
            report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
            hf = out / "hf"
            row = {"shape": name, **SHAPES[name], "checkpoint_bytes": size, "write_seconds": round(made, 1), **run,
                   "bound_bytes": int(1.5 * size + GIB),
                   "peak_ratio": None if run["peak_rss_bytes"] is None else round(run["peak_rss_bytes"] / size, 3),
                   "params_before": report.get("params_before"), "params_after": report.get("params_after"),
                   "hf_bytes": sum(f.stat().st_size for f in hf.glob("*.safetensors")) if hf.is_dir() else None,
                   "exports": [{k: e.get(k) for k in ("format", "ok", "dtype", "error")} for e in report.get("exports", [])]}
            row["within_bound"] = run["peak_rss_bytes"] is not None and run["peak_rss_bytes"] <= row["bound_bytes"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    result = {"environment": environment(), "budget": " ".join(budget), "runs": rows}
    table = markdown_table(
        ["shape", "checkpoint", "peak RSS", "peak / checkpoint", "bound (1.5x + 1 GiB)", "within", "exit", "wall",
         "params before -> after", "hf/ on disk"],
        [[r["shape"], f"{r['checkpoint_bytes'] / GIB:.2f} GiB",
          "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / GIB:.2f} GiB",
          r["peak_ratio"], f"{r['bound_bytes'] / GIB:.2f} GiB", r["within_bound"], r["exit"], f"{r['seconds']:.0f} s",
          f"{r['params_before']} -> {r['params_after']}",
          "-" if r["hf_bytes"] is None else f"{r['hf_bytes'] / GIB:.2f} GiB"] for r in rows])
    text = (f"# Peak memory of pruning bfloat16 LLaMA-shaped checkpoints\n\n`python benchmarks/llm_memory.py "
            f"--shapes {' '.join(args.shapes)}`: `pcompile FOLDER --method l1 {' '.join(budget)} --formats hf`, "
            f"one fresh process per shape, random weights.\n\n{table}\n")
    out_dir = args.out or DOCS
    write_json(out_dir / "bench_llm_memory.json", result)
    write_text(out_dir / "bench_llm_memory.md", text)
    print(text)


if __name__ == "__main__":
    main()
