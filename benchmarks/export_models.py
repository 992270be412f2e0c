"""Models only the torch.export frontend reads, through the `pcompile` command as a user runs it.

- Hugging Face transformers: a tiny config per architecture (2 layers, hidden 64, 4 heads, FFN
  128; random weights), saved with `save_pretrained`, then
  `pcompile FOLDER --method l1 --ratio 0.5 -o OUT --formats pt2,onnx,hf`: no input options (the
  config gives them), so OUT/hf (the slim model as a save_pretrained folder) prunes the
  feed-forward widths only.
- Ultralytics YOLO: the `DetectionModel` of each packaged yaml, saved with `torch.save`, then
  `pcompile MODEL.pt --trust --method l1 --ratio 0.5 --input-shape 1,3,320,320 -o OUT --formats pt2,onnx`.

Recorded per model: the exit code and the one `error:` line, the share of parameters removed,
verify, and each export's result and note (the hf export's says which config width changed).
Everything runs in this process, one model after another, on one thread.

    python benchmarks/export_models.py                   # all, writes docs/export_models.*
    python benchmarks/export_models.py --models llama,yolov8n --out /tmp/em
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (before transformers and ultralytics: the torchvision CPU import workaround)
import torch
from _common import DOCS, environment, markdown_table, write_json, write_text
from click.testing import CliRunner

from pcompiler.cli import main as pcompile

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def hf_models() -> dict:
    import transformers as T

    text = dict(vocab_size=128, max_position_embeddings=64)
    return {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**text, **SMALL)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **text, **SMALL)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **text, **SMALL)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, **SMALL)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **text, **SMALL)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **text, **SMALL)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=16, **text, **SMALL)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=16, **text, **SMALL)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                                                    word_embed_proj_dim=64)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**text, **SMALL)),
        "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=128,
                                                                              max_position_embeddings=66, **SMALL)),
        "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
        "deit": lambda: T.DeiTForImageClassification(T.DeiTConfig(image_size=32, patch_size=8, **SMALL)),
        "convnext_hf": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=32)),
    }


YOLO = ("yolov5n", "yolov8n", "yolov8s", "yolov9t", "yolov10n", "yolo11n", "yolo11s")


def run_one(name: str, work: Path) -> dict:
    torch.manual_seed(0)
    out = work / f"{name}_out"
    if name in YOLO:
        from ultralytics.nn.tasks import DetectionModel

        model_path = work / f"{name}.pt"
        torch.save(DetectionModel(f"{name}.yaml", verbose=False), model_path)
        args = [str(model_path), "--trust", "--input-shape", "1,3,320,320", "--formats", "pt2,onnx"]
    else:
        model_path = work / name
        hf_models()[name]().save_pretrained(model_path)
        args = [str(model_path), "--formats", "pt2,onnx,hf"]
    t0 = time.perf_counter()
    result = CliRunner().invoke(pcompile, [*args, "--method", "l1", "--ratio", "0.5", "-o", str(out)])
    row: dict = {"model": name, "exit": result.exit_code, "seconds": time.perf_counter() - t0}
    if result.exit_code != 0:
        lines = (result.stderr or result.output).strip().splitlines()
        row["error"] = lines[-1] if lines else repr(result.exception)
        return row
    report = json.loads((out / "report.json").read_text())
    row.update(params_before=report["params_before"], params_after=report["params_after"],
               removed=1 - report["params_after"] / report["params_before"], verify=report["verify"]["ok"],
               exports={e["format"]: {"ok": e["ok"], "error": e["error"], "note": e["note"]} for e in report["exports"]})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--out", type=Path, help="output folder (default docs/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.models.split(",") if args.models else [*hf_models(), *YOLO]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_one(name, Path(tmp)))
            r = rows[-1]
            print(f"# {name}: exit {r['exit']}, {r.get('removed', 0):.1%} removed, {r['seconds']:.1f} s", flush=True)
            shutil.rmtree(Path(tmp) / f"{name}_out", ignore_errors=True)
    table = markdown_table(
        ["model", "exit", "parameters", "removed", "verify", "pt2", "onnx", "hf", "s"],
        [[r["model"], r["exit"],
          f"{r['params_before']} -> {r['params_after']}" if "removed" in r else r.get("error", ""),
          f"{r['removed']:.1%}" if "removed" in r else "", r.get("verify", ""),
          *[_export(r, f) for f in ("pt2", "onnx", "hf")], f"{r['seconds']:.1f}"] for r in rows])
    passed = sum(r["exit"] == 0 and all(e["ok"] for e in r.get("exports", {}).values()) for r in rows)
    text = (f"{passed}/{len(rows)} models exit 0 with every export ok (pcompile, l1 at 0.5; Hugging Face folders "
            f"with --formats pt2,onnx,hf, YOLO at 1x3x320x320 with pt2,onnx).\n\n{table}")
    out = args.out or DOCS
    write_json(out / "export_models.json", {"environment": environment(), "results": rows})
    write_text(out / "export_models.md", text)
    print(text)
    return 0


def _export(row: dict, fmt: str) -> str:
    e = row.get("exports", {}).get(fmt)
    if e is None:
        return ""
    return ("ok" if e["ok"] else f"FAILED: {e['error']}") + (f" ({e['note']})" if e["note"] and fmt != "onnx" else "")


if __name__ == "__main__":
    raise SystemExit(main())
