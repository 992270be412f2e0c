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


def _layer_normed(tmp_path, name):
    """A LayerNorm'd model of hidden 64 (4 heads of 16) as a folder."""
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = {"bert": lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=64, max_position_embeddings=16, **small)),
             "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=16)),
             "vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)),
             }[name]()
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return tmp_path / name


@pytest.mark.parametrize("name, eps, ffn", [("bert", "layer_norm_eps", "intermediate_size"),
                                            ("gpt2", "layer_norm_epsilon", "n_inner"),  # n_inner None: 4 x n_embd
                                            ("vit", "layer_norm_eps", "intermediate_size")])
def test_layer_normed_stream_goes_into_the_folder_with_prune_normalized(tmp_path, name, eps, ffn):
    """--prune-normalized: hf/ carries hidden_size with the heads (head size kept), the eps x D/D'
    (the slim LayerNorms' weights are already scaled), and equals model.pt2; GPT-2's tied LM head
    and embedding are cut as one tensor."""
    folder, out = _layer_normed(tmp_path, name), tmp_path / "out"
    result = CliRunner().invoke(main, [str(folder), "--method", "l1", "--ratio", "0.5", "--prune-normalized",
                                       "-o", str(out), "--formats", "pt2,hf"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    exports = {e["format"]: e for e in report["exports"]}
    ffn_before = 256 if name == "gpt2" else 128
    assert exports["hf"]["note"] == (f"config: hidden_size 64 -> 32, num_attention_heads 4 -> 2, {ffn} {ffn_before} -> "
                                     f"{ffn_before // 2}; {eps} x 2")
    before = json.loads((folder / "config.json").read_text())
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config[eps] == pytest.approx(2 * before[eps]) and "head_dim" not in config
    slim = getattr(T, config["architectures"][0]).from_pretrained(out / "hf").eval()
    assert sum(p.numel() for p in slim.parameters()) == report["params_after"]  # no stale tied copy
    program = torch.export.load(out / "model.pt2").module()
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)} if name == "vit" else \
        {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(slim(**inputs)[0], program(**inputs)[0], rtol=1e-4, atol=1e-5)


def test_layer_normed_stream_and_heads_are_kept_to_whole_heads(tmp_path):
    """l1 keeps the stream and the heads in proportion only roughly (at 0.35: 48 channels, 2
    heads of 16; at 0.2: 56, 3 heads): hf_config gives back the fewest channels that make the
    stream whole heads (a head; the stream's 8 and a head)."""
    folder = _layer_normed(tmp_path, "bert")
    for ratio, refused, kept in (("0.35", "2 heads of 16 are not hidden_size 48", (48, 3)),
                                 ("0.2", "3 heads of 16 are not hidden_size 56", (64, 4))):
        out = tmp_path / f"out{ratio}"
        result = CliRunner().invoke(main, [str(folder), "--method", "l1", "--ratio", ratio, "--prune-normalized",
                                           "-o", str(out), "--formats", "hf"])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "hf" / "config.json").read_text())
        assert (config["hidden_size"], config["num_attention_heads"]) == kept
        report = json.loads((out / "report.json").read_text())
        assert refused in report["hf_config"]["refused"], report["hf_config"]


@pytest.mark.parametrize("name", ["Llama", "Qwen2"])
def test_layers_of_different_widths_go_into_a_folder_with_its_own_modeling_file(tmp_path, name):
    """--global cuts each layer's MLP and heads by its own count: the config holds each block's
    widths (layer_widths), and the folder's modeling_pcompiler.py builds every block at its own,
    registered for AutoModelForCausalLM: loaded with trust_remote_code=True it gives model.pt2's
    logits, and generates with its KV cache what it generates without."""
    torch.manual_seed(0)
    config = getattr(T, f"{name}Config")(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)
    folder, out = tmp_path / name, tmp_path / "out"
    getattr(T, f"{name}ForCausalLM")(config).save_pretrained(folder, safe_serialization=True)
    result = CliRunner().invoke(main, [str(folder), "--method", "l1", "--global", "--ratio", "0.5", "-o", str(out),
                                       "--formats", "pt2,hf"])
    assert result.exit_code == 0, result.output
    assert "its layers differ in width: load with trust_remote_code=True" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    exports = {e["format"]: e for e in report["exports"]}
    assert exports["hf"]["ok"] and "modeling_pcompiler.py builds each layer at its width (load with trust_remote_code=True; one " \
        "width per layer, a plain folder: calib's -p allocation=uniform, no --global)" in exports["hf"]["note"], exports["hf"]
    written = json.loads((out / "hf" / "config.json").read_text())
    per_layer = written["layer_widths"]["fields"]
    assert written["layer_widths"]["layers"] == "model.layers" and len(set(per_layer["intermediate_size"])) > 1
    assert written["intermediate_size"] == max(per_layer["intermediate_size"])
    assert written["auto_map"] == {"AutoModelForCausalLM": f"modeling_pcompiler.Pcompiler{name}ForCausalLM"}
    slim = T.AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()
    assert [b.mlp.up_proj.out_features for b in slim.model.layers] == per_layer["intermediate_size"]
    if "num_key_value_heads" in per_layer:
        assert [b.self_attn.k_proj.out_features // 8 for b in slim.model.layers] == per_layer["num_key_value_heads"]
    assert sum(p.numel() for p in slim.parameters()) == report["params_after"]
    program = torch.export.load(out / "model.pt2").module()
    ids, mask = torch.randint(0, 64, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(slim(input_ids=ids, attention_mask=mask)[0],
                                   program(input_ids=ids, attention_mask=mask)[0], rtol=1e-4, atol=1e-5)
    cached = slim.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    uncached = slim.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_layer_left_whole_keeps_its_width_in_the_folder(tmp_path):
    """--skip keeps layer 0's MLP at 64 while one ratio cuts the others to 32: the config holds
    the widths per layer (a single intermediate_size of 32 would not fit layer 0's weights)."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)
    folder, out = tmp_path / "llama", tmp_path / "out"
    T.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    result = CliRunner().invoke(main, [str(folder), "--method", "l1", "--ratio", "0.5", "--skip", "model.layers.0.mlp.*",
                                       "-o", str(out), "--formats", "pt2,hf"])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "hf" / "config.json").read_text())
    assert written["layer_widths"]["fields"] == {"intermediate_size": [64, 32, 32]} and written["intermediate_size"] == 64
    slim = T.AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()
    program = torch.export.load(out / "model.pt2").module()
    ids, mask = torch.randint(0, 64, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(slim(input_ids=ids, attention_mask=mask)[0],
                                   program(input_ids=ids, attention_mask=mask)[0], rtol=1e-4, atol=1e-5)
