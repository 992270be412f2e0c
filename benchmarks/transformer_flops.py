"""What pruning at ratio 0.5 removes from transformers: FLOPs and parameters, with the residual
stream kept (exact) and pruned (`--prune-normalized`), and how far the latter is from exact.

    python benchmarks/transformer_flops.py [--models vit_b_16,llama] [--out DIR]

Models, random weights (FLOPs and widths do not depend on the values; all-zero classifier
weights, as torchvision's ViT starts, are drawn instead so that verify compares numbers):
torchvision's vit_b_16, convnext_tiny and swin_t at 224x224; timm's deit_small_patch16_224 and
mobilevit_xs at their input sizes; a LLaMA-shaped decoder (transformers' LlamaForCausalLM:
hidden 512, 4 layers, 8 query heads over 4 key/value heads, MLP 1408, vocabulary 8000) on 128
tokens. Each is pruned by l1 at ratio 0.5 (layer-wise, widths not rounded) through the
pipeline the CLI runs (trace, analyze, l1, slim, verify), once with the defaults and once with
`prune_normalized`. FLOPs by torch's counter on the traced model before and after (an eager
torchvision ViT runs a fused attention kernel the counter does not see, so the traced graph is
the fair "before"). Writes docs/bench_transformers.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import torch

from pcompiler.costs import count_flops, count_params
from pcompiler.inputs import InputSpec
from pcompiler.pipeline import Settings, compile_model
from pcompiler.train import TrainConfig

MODELS = ("vit_b_16", "convnext_tiny", "swin_t", "deit_small_patch16_224", "mobilevit_xs", "llama")


def build(name: str) -> tuple[torch.nn.Module, list[InputSpec]]:
    torch.manual_seed(0)
    if name == "llama":
        import transformers as T

        config = T.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                               use_cache=False)
        return T.LlamaForCausalLM(config).eval(), [InputSpec((1, 128), torch.int64, "input_ids")]
    if name in ("deit_small_patch16_224", "mobilevit_xs"):
        import timm

        model = timm.create_model(name, pretrained=False)
        return model.eval(), [InputSpec((1, *model.default_cfg["input_size"]))]
    import torchvision

    model = torchvision.models.get_model(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02)
    return model, [InputSpec((1, 3, 224, 224))]


def run(name: str, stream: bool) -> dict:
    model, inputs = build(name)
    settings = Settings(method="l1", ratio=0.5, round_to=1, compensate=False, recalibrate_batches=0,
                        finetune_epochs=0, prune_normalized=stream, train=TrainConfig(progress=False))
    t0 = time.perf_counter()
    prog, _ = compile_model(model, settings, inputs=inputs, formats=())
    seconds = time.perf_counter() - t0
    x = prog.example_inputs
    flops = (count_flops(prog.reference, x), count_flops(prog.gm, x))
    params = (count_params(prog.reference), count_params(prog.gm))
    groups, verify = prog.analysis.groups, prog.info["verify"]
    approx = verify.get("approximate") or {}
    return {"model": name, "stream": stream, "frontend": prog.frontend, "seconds": seconds,
            "flops_before": flops[0], "flops_after": flops[1], "flops_reduction": flops[0] / flops[1],
            "params_before": params[0], "params_after": params[1], "params_removed": 1 - params[1] / params[0],
            "groups": len(groups), "prunable": sum(g.prunable for g in groups),
            "approximate_groups": sum(bool(g.approximate) and g.prunable for g in groups),
            "verify_max_relative_error": verify["max_relative_error"],
            "deviation": approx.get("max_relative_error"), "approximate_at": len(approx.get("where", []))}


def markdown(rows: list[dict]) -> str:
    lines = ["# Transformers at ratio 0.5", "",
             "Measured by `benchmarks/transformer_flops.py` (l1, ratio 0.5, layer-wise, widths not rounded; random "
             "weights). \"stream\": `--prune-normalized` (channels under LayerNorms pruned, approximately). "
             "\"verify\": the slim model against the zeroed original (with pruned LayerNorms normalizing over their "
             "kept channels), max relative error; \"deviation\": against the plain zeroed original, where LayerNorms "
             "lost channels (before any fine-tuning).", ""]
    table = [[r["model"], "pruned" if r["stream"] else "kept", r["frontend"], f"{r['flops_reduction']:.2f}x",
              f"{100 * r['params_removed']:.0f}%", f"{r['prunable']}/{r['groups']}",
              f"{r['verify_max_relative_error']:.1e}",
              "" if r["deviation"] is None else f"{100 * r['deviation']:.1f}% ({r['approximate_at']} norms)",
              f"{r['seconds']:.1f}"] for r in rows]
    lines.append(_common.markdown_table(["model", "stream", "frontend", "FLOPs fewer", "params removed",
                                         "prunable groups", "verify", "deviation", "seconds"], table))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, help="folder for bench_transformers.{json,md} (default docs/)")
    args = ap.parse_args()
    _common.set_threads(args.threads)
    out = args.out or _common.DOCS
    rows = []
    for name in args.models.split(","):
        for stream in (False, True):
            rows.append(run(name, stream))
            r = rows[-1]
            print(f"{name} stream={'pruned' if stream else 'kept'}: {r['flops_reduction']:.2f}x FLOPs, "
                  f"{100 * r['params_removed']:.0f}% params, deviation {r['deviation']} ({r['seconds']:.0f}s)", flush=True)
            _common.write_json(out / "bench_transformers.json", {"environment": _common.environment(), "rows": rows})
    _common.write_text(out / "bench_transformers.md", markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
