"""A LLaMA-7B-shaped decoder on the meta device: how long pcompiler's trace + analyze takes,
how much memory it needs, and which channel groups it finds. Optionally Torch-Pruning's
dependency graph on the same model.

The model (written here, no transformers dependency) has LLaMA-7B's shapes: vocabulary 32000,
hidden 4096, 32 layers, 32 heads of 128, SwiGLU MLP of 11008 (gate/up/down Linear, no bias),
RMSNorm as a plain module (x * rsqrt(mean(x^2) + eps) * weight), rotary embeddings (cos/sin
buffers of (tokens, head_dim), rotate_half by slicing and cat), causal `F.scaled_dot_product_attention`, an untied lm_head. It is built under
`with torch.device("meta")`, so its 6.7B parameters take no memory, and the input is a (1, 16)
int64 tensor of token ids on meta.

What is measured, once (a single run: the point is the order of magnitude, seconds against
minutes or hours, and whether it works at all): model construction, `pcompiler.trace`, the
`analyze` pass, and the process's peak RSS after each (`resource.getrusage`, or VmHWM from
/proc/self/status where there is one: Linux carries ru_maxrss across fork + exec, so the child
below would otherwise report the parent's peak). The groups found
are summarized by kind (what produces them: MLP intermediate = gate_proj+up_proj; attention
heads = q/k/v_proj, whole heads by default; the hidden stream, prunable since a mean over
channels is rescaled exactly by D'/D, which RMSNorm's mean of squares is),
with the pin reasons of the pinned ones. rotate_half splits at `x.shape[-1] // 2` as Hugging
Face's LLaMA does; --static-rotary splits at the constant head_dim // 2 instead (the analysis
pins a slice whose bounds are computed at run time, so this decides whether the q/k head dims
are prunable). The cos/sin tables are shared by all layers, so q/k head dims couple across layers.

With --tp, Torch-Pruning's `DependencyGraph().build_dependency` runs on the same meta model in
a child process under a time limit (--tp-timeout, default 300 s); the report says whether it
finished, failed (with the first line of the error) or ran out of time, and its group count.

    python benchmarks/llm_meta.py                 # 32 layers, pcompiler only
    python benchmarks/llm_meta.py --tp            # and Torch-Pruning in a child process
    python benchmarks/llm_meta.py --quick         # 2 layers, with --tp, 120 s limit
    python benchmarks/llm_meta.py --layers 4
    python benchmarks/llm_meta.py --transformers  # transformers' LlamaForCausalLM, through torch.export

Writes docs/bench_llm_meta.json and docs/bench_llm_meta.md (with --quick: a temporary folder,
unless --out is given) and prints the summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common  # noqa: F401
import torch
import torch.nn.functional as F
from _common import (
    DOCS,
    environment,
    markdown_table,
    peak_rss_mib,
    set_threads,
    write_json,
    write_text,
)
from torch import nn

from pcompiler.errors import one_line

# ---------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor, half: int | None = None) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim. `half` None: computed from the shape at run time,
    as Hugging Face's LLaMA does; an int: a constant of the graph (--static-rotary)."""
    half = x.shape[-1] // 2 if half is None else half
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, static_rotary: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.half = self.head_dim // 2 if static_rotary else None
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q, self.half) * sin
        k = k * cos + rotate_half(k, self.half) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, static_rotary: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads, static_rotary)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(
        self,
        vocab: int = 32000,
        hidden: int = 4096,
        layers: int = 32,
        heads: int = 32,
        intermediate: int = 11008,
        positions: int = 16,
        theta: float = 10000.0,
        static_rotary: bool = False,
    ):
        super().__init__()
        head_dim = hidden // heads
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, heads, intermediate, static_rotary) for _ in range(layers)
        )
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (positions, head_dim)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The tables are as long as the input: slicing a buffer by `input_ids.shape[1]` in the
        # root's forward does not trace (torch.fx does not proxy buffers; see docs/benchmarks.md).
        cos, sin = self.cos_cached, self.sin_cached
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build_meta(layers: int, tokens: int, static_rotary: bool = False) -> Llama:
    with torch.device("meta"):
        return Llama(layers=layers, positions=tokens, static_rotary=static_rotary)


def build_transformers_meta(layers: int) -> nn.Module:
    """transformers' own LlamaForCausalLM with LlamaConfig()'s shapes (LLaMA-7B), on meta."""
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, use_cache=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).eval()


def meta_input(tokens: int) -> torch.Tensor:
    return torch.zeros(1, tokens, dtype=torch.int64, device="meta")


# ---------------------------------------------------------------------------------------------
# pcompiler


def group_kind(producers: list[str]) -> str:
    """A short name for what produces a group (parameter names with the layer index dropped)."""
    names = sorted(
        {".".join(p for p in name.split(".") if not p.isdigit() and p != "layers") for name in producers}
    )
    return "+".join(names) or "(no producer)"


def run_pcompiler(layers: int, tokens: int, static_rotary: bool = False, hf: bool = False) -> dict:
    import pcompiler
    from pcompiler.passmanager import make_pass

    t0 = time.perf_counter()
    model = build_transformers_meta(layers) if hf else build_meta(layers, tokens, static_rotary)
    x = meta_input(tokens)
    t1 = time.perf_counter()
    rss_built = peak_rss_mib()
    if hf:  # keyword inputs: the torch.export frontend
        prog = pcompiler.trace(model, (), kwargs={"input_ids": x, "attention_mask": torch.ones_like(x)})
    else:
        prog = pcompiler.trace(model, (x,))
    t2 = time.perf_counter()
    rss_traced = peak_rss_mib()
    prog = pcompiler.run(prog, [make_pass("analyze")])
    t3 = time.perf_counter()
    rss_analyzed = peak_rss_mib()

    analysis = prog.analysis
    kinds: dict[str, dict] = collections.defaultdict(
        lambda: {"groups": 0, "prunable": 0, "sizes": set(), "pinned_by": collections.Counter()}
    )
    for g in analysis.groups:
        kind = kinds[group_kind([p.param.rpartition(".")[0] for p in g.producers])]
        kind["groups"] += 1
        kind["prunable"] += int(g.prunable)
        kind["sizes"].add(g.size)
        for reason in g.pinned:
            kind["pinned_by"][reason] += 1
    summary = [
        {
            "producers": name,
            "groups": k["groups"],
            "prunable": k["prunable"],
            "channel_counts": sorted(k["sizes"]),
            "pinned_by": [f"{n}x {r}" for r, n in k["pinned_by"].most_common(3)],
        }
        for name, k in sorted(kinds.items(), key=lambda kv: -kv[1]["groups"])
    ]
    return {
        "build_s": t1 - t0,
        "trace_s": t2 - t1,
        "analyze_s": t3 - t2,
        "trace_analyze_s": t3 - t1,
        "peak_rss_mib": {"after_build": rss_built, "after_trace": rss_traced, "after_analyze": rss_analyzed},
        "graph_nodes": len(prog.gm.graph.nodes),
        "frontend": prog.frontend,
        "opaque": prog.opaque,
        "groups": len(analysis.groups),
        "prunable": len(analysis.prunable),
        "by_kind": summary,
        "notes": [f"{node}: {why}" for node, why in analysis.notes[:10]],
        "notes_total": len(analysis.notes),
    }


# ---------------------------------------------------------------------------------------------
# Torch-Pruning, in a child process (it may not work on meta, or take very long)


def tp_child(layers: int, tokens: int, static_rotary: bool = False) -> dict:
    """Runs in the child: build the DependencyGraph and count its groups."""
    import torch_pruning as tp

    warnings.filterwarnings("ignore")
    model = build_meta(layers, tokens, static_rotary)
    x = meta_input(tokens)
    t0 = time.perf_counter()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    except Exception as e:  # noqa: BLE001 - a failure is the result
        return {
            "status": "failed",
            "stage": "build_dependency",
            "error": one_line(e),
            "seconds": time.perf_counter() - t0,
        }
    t1 = time.perf_counter()
    try:
        groups = list(dg.get_all_groups(ignored_layers=[model.lm_head], root_module_types=[nn.Linear]))
    except Exception as e:  # noqa: BLE001
        return {
            "status": "failed",
            "stage": "get_all_groups",
            "error": one_line(e),
            "build_s": t1 - t0,
            "seconds": time.perf_counter() - t0,
        }
    t2 = time.perf_counter()
    sizes = collections.Counter(len(g[0].idxs) for g in groups)
    return {
        "status": "ok",
        "build_s": t1 - t0,
        "groups_s": t2 - t1,
        "seconds": t2 - t0,
        "groups": len(groups),
        "group_channel_counts": {str(k): v for k, v in sorted(sizes.items())},
        "peak_rss_mib": peak_rss_mib(),
    }


def run_tp(layers: int, tokens: int, timeout: float, static_rotary: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--tp-child", "--layers", str(layers), "--tokens", str(tokens)]
    cmd += ["--static-rotary"] if static_rotary else []
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "status": "timeout",
            "error": f"did not finish in {timeout:.0f} s",
            "seconds": time.perf_counter() - t0,
        }
    wall = time.perf_counter() - t0
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["process_wall_s"] = wall
            return result
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "crashed", "error": f"exit code {done.returncode}: {tail}", "seconds": wall}


# ---------------------------------------------------------------------------------------------


def report(layers: int, tokens: int, ours: dict, tp: dict | None, env: dict, static_rotary: bool) -> str:
    rotary = "constant" if static_rotary else "x.shape[-1] // 2"
    lines = [
        f"LLaMA-7B-shaped decoder, {layers} layers, on meta; input (1, {tokens}) int64; rotate_half split at "
        f"{rotary}. torch {env['torch']}, "
        f"{env['torch_num_threads']} threads, Torch-Pruning {env['torch_pruning']}. Single run.",
        "",
        markdown_table(
            ["step", "seconds", "peak RSS after (MiB)"],
            [
                ["build on meta", ours["build_s"], f"{ours['peak_rss_mib']['after_build']:.0f}"],
                ["pcompiler trace", ours["trace_s"], f"{ours['peak_rss_mib']['after_trace']:.0f}"],
                ["pcompiler analyze", ours["analyze_s"], f"{ours['peak_rss_mib']['after_analyze']:.0f}"],
                ["pcompiler trace + analyze", ours["trace_analyze_s"], ""],
            ],
        ),
        "",
        f"pcompiler: {ours['graph_nodes']} graph nodes, {len(ours['opaque'])} opaque modules, "
        f"{ours['groups']} groups, {ours['prunable']} prunable, {ours['notes_total']} notes.",
        "",
        markdown_table(
            ["producers", "groups", "prunable", "channels", "pinned by (most common)"],
            [
                [
                    k["producers"],
                    k["groups"],
                    k["prunable"],
                    ",".join(map(str, k["channel_counts"])),
                    "; ".join(k["pinned_by"]),
                ]
                for k in ours["by_kind"]
            ],
        ),
    ]
    if ours["notes"]:
        lines += ["", "First notes: " + "; ".join(ours["notes"][:5])]
    if tp is not None:
        lines += ["", f"Torch-Pruning DependencyGraph on the same meta model: {tp['status']}"]
        if tp["status"] == "ok":
            lines[-1] += (
                f", build_dependency {tp['build_s']:.2f} s, get_all_groups {tp['groups_s']:.2f} s, "
                f"{tp['groups']} groups (channel counts: {tp['group_channel_counts']}), child peak RSS {tp['peak_rss_mib']:.0f} MiB."
            )
        else:
            lines[-1] += (
                f" ({tp.get('stage', '')}{': ' if tp.get('stage') else ''}{tp['error']}) after {tp['seconds']:.1f} s."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, help="decoder layers (default 32; --quick 2)")
    ap.add_argument("--tokens", type=int, default=16, help="sequence length of the input (default 16)")
    ap.add_argument(
        "--tp", action="store_true", help="also run Torch-Pruning's DependencyGraph in a child process"
    )
    ap.add_argument(
        "--tp-timeout", type=float, help="time limit for Torch-Pruning, seconds (default 300; --quick 120)"
    )
    ap.add_argument(
        "--static-rotary",
        action="store_true",
        help="rotate_half splits at the constant head_dim // 2 instead of x.shape[-1] // 2",
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="2 layers and --tp: a smoke test")
    ap.add_argument("--out", type=Path, help="output folder (default docs/; --quick: a temporary folder)")
    ap.add_argument("--transformers", action="store_true",
                    help="transformers' LlamaForCausalLM (LlamaConfig's 7B shapes) instead of the model written here; "
                    "writes bench_llm_meta_hf.*")
    ap.add_argument("--tp-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    layers = args.layers or (2 if args.quick else 32)
    if args.tp_child:
        print(json.dumps(tp_child(layers, args.tokens, args.static_rotary)), flush=True)
        return 0

    logging.getLogger("pcompiler").setLevel(logging.ERROR)
    env = environment()
    ours = run_pcompiler(layers, args.tokens, args.static_rotary, hf=args.transformers)
    tp = None
    if (args.tp or args.quick) and not args.transformers:
        tp = run_tp(layers, args.tokens, args.tp_timeout or (120 if args.quick else 300), args.static_rotary)

    text = report(layers, args.tokens, ours, tp, env, args.static_rotary)
    out = args.out or (Path(tempfile.gettempdir()) / "pcompiler_bench" if args.quick else DOCS)
    stem = "bench_llm_meta_hf" if args.transformers else "bench_llm_meta"
    write_json(
        out / f"{stem}.json",
        {
            "environment": env,
            "layers": layers,
            "tokens": args.tokens,
            "static_rotary": args.static_rotary,
            "pcompiler": ours,
            "torch_pruning": tp,
            "model": "transformers.LlamaForCausalLM" if args.transformers else "written here",
        },
    )
    write_text(out / f"{stem}.md", text)
    print(text)
    print(f"\nwrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
