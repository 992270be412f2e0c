"""Hugging Face folders (pcompiler/hf.py, targets/hf.py, passes/hf_widths.py): a
`save_pretrained` folder in, read with no pickle; the slim model out as OUT/hf/, whose config
carries the new feed-forward width (and hidden size, for RMSNorm'd streams), loaded with
`from_pretrained` and equal to model.pt2."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pcompiler.cli import main
from pcompiler.errors import CompileError
from pcompiler.loading import load_model

T = pytest.importorskip("transformers")


def _folder(tmp_path, name):
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if name == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=64, num_key_value_heads=2, max_position_embeddings=16,
                                                 use_cache=False, **small))
    elif name == "phi3":  # gate and up fused in one Linear of 2 x intermediate_size rows
        model = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=64, num_key_value_heads=2, max_position_embeddings=16,
                                               pad_token_id=0, use_cache=False, **small))
    elif name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    else:
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=64, max_position_embeddings=16, **small))
    folder = tmp_path / name
    model.save_pretrained(folder, safe_serialization=True)
    return folder


STREAM = "; rms_norm_eps x 2 and 5 RMSNorm weights x sqrt(2)"  # 2 layers x 2 norms and the final one
# RMSNorm'd models: the stream, whole key/value heads with their query heads, the MLP.
RMS = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}


@pytest.mark.parametrize("name, widths, note", [
    ("qwen2", RMS, STREAM),
    ("phi3", RMS, STREAM),  # q, k, v in one Linear, gate and up in another
    ("gpt2", {"n_inner": 128}, ""),  # LayerNorm'd streams stay, and so do heads of hidden_size / heads
    ("bert", {"intermediate_size": 64}, ""),
])
def test_folder_in_folder_out(tmp_path, name, widths, note):
    folder = _folder(tmp_path, name)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(folder), "--method", "l1", "--ratio", "0.5", "-o", str(out),
                                       "--formats", "pt2,onnx,hf"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    exports = {e["format"]: e for e in report["exports"]}
    assert all(e["ok"] for e in exports.values()), exports
    changed = ", ".join(f"{f} {v} -> {v // 2}" for f, v in widths.items())
    assert exports["hf"]["note"] == f"config: {changed}{note}"
    assert report["params_after"] < 0.85 * report["params_before"]  # tiny: the embeddings weigh most
    config = json.loads((out / "hf" / "config.json").read_text())
    assert all(config[f] == v // 2 for f, v in widths.items())
    if "hidden_size" in widths:  # the head size stays; still 2 query heads per key/value head
        assert config["head_dim"] == 8
    # The folder loads with transformers alone and gives model.pt2's outputs.
    slim = getattr(T, config["architectures"][0]).from_pretrained(out / "hf").eval()
    program = torch.export.load(out / "model.pt2").module()
    ids = torch.randint(0, 64, (1, 8))  # the default: half the 16 positions
    mask = torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        want = program(input_ids=ids, attention_mask=mask)[0]
        got = slim(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Where no field holds them, widths stay (BERT's and GPT-2's heads are hidden_size / heads wide).
    reasons = report["groups"]["pinned_reasons"]
    assert any(r.startswith("the hf/ folder keeps this width") for r in reasons) == ("hidden_size" not in widths), reasons


def test_folder_without_safetensors_is_refused(tmp_path):
    folder = _folder(tmp_path, "bert")
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(CompileError, match="holds no safetensors weights"):
        load_model(folder)


def test_hidden_size_is_held_only_where_the_rmsnorm_weights_can_hold_it():
    """One rms_norm_eps and weights x sqrt(D/D') hold a pruned stream only where every RMSNorm is
    over the stream and scales with its weight: not Qwen3 (per-head q/k norms share the eps),
    not Gemma ((1 + weight) x ...)."""
    from pcompiler.hf import width_fields

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    held = {name: "hidden_size" in width_fields(getattr(T, f"{name}ForCausalLM")(getattr(T, f"{name}Config")(
        **small, **({"head_dim": 8} if name in ("Qwen3", "Gemma") else {}))))
        for name in ("Llama", "Qwen2", "Mistral", "Qwen3", "Gemma")}
    assert held == {"Llama": True, "Qwen2": True, "Mistral": True, "Qwen3": False, "Gemma": False}
