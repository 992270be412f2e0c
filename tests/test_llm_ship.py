"""Language models as they ship: bfloat16 and float16 checkpoints are pruned in their dtype, the
rewrite is proved in float32 on the same values (passes/verify.py, `proof_dtype`), and a wrong
rule still fails the proof in bfloat16."""

from __future__ import annotations

import pytest
import torch
from helpers import analyze
from torch import nn

import pcompiler
from pcompiler.errors import VerifyError
from pcompiler.passes.verify import verify_program
from pcompiler.passmanager import make_pass

T = pytest.importorskip("transformers")


def decoder(name: str, dtype: torch.dtype, hidden: int = 256) -> nn.Module:
    """A tiny random decoder of `name`'s architecture in `dtype`, 2 key/value heads."""
    torch.manual_seed(0)
    shape = dict(vocab_size=128, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    config, model = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[name]
    return model(config(**shape)).to(dtype).eval()


def tokens(batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 128, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoders_slim_and_verify_in_their_dtype(name, dtype):
    model = decoder(name, dtype)
    prog = pcompiler.trace(model, (), kwargs=tokens())
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass("l1", ratio=0.25), make_pass("slim"),
                                make_pass("verify")])
    result = prog.info["verify"]
    assert result["ok"] is True and result["max_relative_error"] < 1e-5
    short = str(dtype).removeprefix("torch.")
    assert result["precision"] == f"float32 (the model's {short} weights, read exactly as float32)"
    assert {p.dtype for p in prog.gm.parameters()} == {dtype}  # pruned in its dtype
    assert prog.info["slim"]["channels_removed"] > 0


def test_in_its_own_dtype_the_proof_would_fail():
    """Why the proof runs in float32: in bfloat16 a zeroed channel and a removed one round
    differently, beyond any tolerance that would still catch a wrong rule (hidden 512 here)."""
    from pcompiler.passes import verify as v

    prog = pcompiler.trace(decoder("llama", torch.bfloat16, hidden=512), (), kwargs=tokens(1, 32))
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass("l1", ratio=0.25), make_pass("slim")])
    assert verify_program(prog)["ok"] is True
    with pytest.raises(VerifyError, match="differs"):
        v._compare(prog, v.zeroed_reference(prog), "original in bfloat16", v.VERIFY, None)


class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


def test_a_wrong_rule_fails_verify_in_bfloat16(monkeypatch):
    """sigmoid wrongly taken as channel-preserving (sigmoid(0) = 0.5 reaches the next layer from
    the removed channels): in bfloat16, verify still fails, at the layer after."""
    from pcompiler.passes.rules import base

    def preserves_channels(node, ctx):
        ctx.same_shape(node.args[0], node)

    torch.manual_seed(0)
    model = Hidden().to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    right = pcompiler.run(analyze(model, x), [make_pass("l1", ratio=0.5, round_to=1), make_pass("slim")])
    assert right.selection == {}  # the sigmoid's channels are pinned: nothing to remove
    monkeypatch.setitem(base._RULES, torch.sigmoid, base.OpRule(preserves_channels))
    wrong = pcompiler.run(analyze(model, x), [make_pass("l1", ratio=0.5, round_to=1), make_pass("slim")])
    assert wrong.gm.a.out_features == 16 and wrong.gm.a.weight.dtype == torch.bfloat16
    with pytest.raises(VerifyError, match=r"first difference at node 'b'") as err:
        verify_program(wrong)
    assert err.value.exit_code == 3


# ---------------------------------------------------------------------------------------------
# Through the CLI: folders in their dtype, outputs that deploy


def word_tokenizer(folder) -> None:
    """A word-level tokenizer of the 128 token vocabulary, saved into `folder` as a user's is."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                              pad_token="</s>").save_pretrained(folder)


def shipped(tmp_path, name: str, dtype: torch.dtype, **shape) -> object:
    """`decoder` saved as a user's checkpoint folder: its dtype, the KV cache on, a tokenizer."""
    model = decoder(name, dtype, **shape)
    model.config.use_cache = True
    folder = tmp_path / f"{name}_{dtype}"
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(folder)
    return folder


def run_cli(*args: str):
    from click.testing import CliRunner

    from pcompiler.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_folder_ships_in_its_dtype(tmp_path, name, dtype):
    import json

    import numpy as np

    from pcompiler.targets.onnx import session

    folder, out = shipped(tmp_path, name, dtype, hidden=64), tmp_path / "out"
    result = run_cli(folder, "--method", "l1", "--ratio", "0.25", "--formats", "hf,pt2,onnx", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    short = str(dtype).removeprefix("torch.")
    assert report["verify"]["precision"].startswith("float32 (the model's " + short)
    exports = {e["format"]: e for e in report["exports"]}
    assert {f: (e["ok"], e["dtype"]) for f, e in exports.items()} == {"hf": (True, short), "pt2": (True, short),
                                                                       "onnx": (True, "float32")}
    assert exports["pt2"]["note"] == "dynamic batch dimension and sequence length"
    assert "float32, cast from the model's " + short in exports["onnx"]["note"]
    # hf/: the input's dtype and settings, its tokenizer, and generate() with the cache on.
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == short and config["hidden_size"] < 64
    assert (out / "hf" / "tokenizer.json").is_file() and (out / "hf" / "generation_config.json").is_file()
    slim = getattr(T, config["architectures"][0]).from_pretrained(out / "hf").eval()
    assert {p.dtype for p in slim.parameters()} == {dtype}
    tokenizer = T.PreTrainedTokenizerFast.from_pretrained(out / "hf")  # (Auto picks Qwen2Tokenizer for qwen2)
    prompt = tokenizer(["w5 w9 w17 w33", "w4 w8 w15 w16"], return_tensors="pt")
    generated = slim.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :4], prompt["input_ids"])
    # model.pt2 (keywords) and model.onnx take any batch and length, and agree with hf/.
    program = torch.export.load(out / "model.pt2").module()
    onnx = session(out / "model.onnx")
    for batch, seq in ((1, 3), (3, 9), (2, 40)):
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = slim(input_ids=ids, attention_mask=mask).logits
            got = program(input_ids=ids, attention_mask=mask)[0]
        assert got.dtype == dtype and got.shape == (batch, seq, 128)
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
        (logits,) = onnx.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert logits.dtype == np.float32 and logits.shape == (batch, seq, 128)
        torch.testing.assert_close(torch.from_numpy(logits), want.float(), rtol=0.05, atol=0.05)


def _six_heads(tmp_path, hidden: int):
    """A 2-layer LLaMA folder, `hidden` wide, 6 query heads over 2 key/value heads, MLP 256."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=2,
                                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=256))
    model.save_pretrained(tmp_path / "llama", safe_serialization=True)
    return tmp_path / "llama"


def test_hf_widths_are_ones_the_config_class_accepts(tmp_path):
    """hidden 192, 6 heads of 32 over 2 key/value heads at 0.2 would keep hidden 160 and 3 heads,
    which LlamaConfig refuses (160 is no multiple of 3): channels of the stream are kept back."""
    import json

    out = tmp_path / "out"
    result = run_cli(_six_heads(tmp_path, 192), "--method", "l1", "--ratio", "0.2", "--formats", "hf", "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["num_attention_heads"] == 3 and config["num_key_value_heads"] == 1
    assert config["hidden_size"] == 168 and config["head_dim"] == 32  # 160 refused: one unit of 8 kept back
    report = json.loads((out / "report.json").read_text())
    assert report["hf_config"]["field"] == "hidden_size" and report["hf_config"]["kept_back"] == 8
    assert "multiple of the number of attention heads" in report["hf_config"]["refused"]


def test_a_budget_with_formats_hf_counts_what_the_config_keeps_back(tmp_path, monkeypatch):
    """hidden 96, 6 heads of 16 over 2 key/value heads, --formats hf: LlamaConfig refuses a
    stream of 88 or 80 with 3 heads, and hf_config keeps those stream channels back. The search
    applies that give-back to each of its trials (SelectOptions.legal), so the budget counts it:
    --params-removed 0.2 removes 21.5% (15.2% when the give-back came after the search). At 0.3
    the lowest ratio that meets it cuts the stream to 72 (its next accepted width), 44.2%, which
    report.json says; a search blind to the give-back removed 21.5% there, which it warns of too,
    naming the field and the way out."""
    import json

    import pcompiler.passes.select as select

    folder = _six_heads(tmp_path, 96)

    def run(ratio: str, out: str) -> tuple[dict, dict]:
        result = run_cli(folder, "--method", "l1", "--params-removed", ratio, "--formats", "hf", "-o", tmp_path / out)
        assert result.exit_code == 0, result.output
        return (json.loads((tmp_path / out / "report.json").read_text()),
                json.loads((tmp_path / out / "hf" / "config.json").read_text()))

    report, config = run("0.2", "met")
    assert 1 - report["param_ratio"] == pytest.approx(0.2148, abs=1e-3) and report["warnings"] == []
    assert (config["hidden_size"], config["num_attention_heads"]) == (96, 3)
    report, config = run("0.3", "over")
    assert 1 - report["param_ratio"] == pytest.approx(0.4423, abs=1e-3) and config["hidden_size"] == 72
    (warning,) = report["warnings"]
    assert "more than the 30% asked" in warning and "widths the config accepts" in warning

    monkeypatch.setattr(select, "legal_selection", lambda prog, scores, selection, opts: selection)
    report, config = run("0.3", "short")
    assert report["hf_config"]["field"] == "hidden_size" and 1 - report["param_ratio"] == pytest.approx(0.2148, abs=1e-3)
    (warning,) = report["warnings"]
    assert "not the 30% asked" in warning and "16 channels of hidden_size" in warning and "without --formats hf" in warning


def test_with_the_default_formats_the_folds_keep_to_the_folder_only_where_it_is_written(tmp_path):
    """The default formats write hf/ only where its config accepts the widths. hidden 96 with 6
    heads over 2: at ratio 0.5 the stream of 48 with 3 heads is accepted, so least squares leaves
    lm_head (no LLaMA config holds its bias) and hf/ is written; at 0.2 the stream of 80 is
    refused, hf/ is skipped, and lm_head gets its fold like any consumer."""
    import json

    import numpy as np

    folder = _six_heads(tmp_path, 96)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 128, 20000))
    for ratio, written in (("0.5", True), ("0.2", False)):
        out = tmp_path / f"out{ratio}"
        result = run_cli(folder, "--method", "l1", "--ratio", ratio, "--data", f"tokens:{tmp_path / 'ids.npy'}",
                         "--seq-len", "32", "--finetune-epochs", "0", "-o", out)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        skipped = report["compensation"]["skipped"]
        assert ("lm_head.weight" in skipped) == written, skipped
        assert (report["compensation"]["consumers"].get("lm_head", {}).get("fitted", 0) > 0) != written
        hf = {e["format"]: e for e in report["exports"]}["hf"]
        assert hf["ok"] == written and hf.get("skipped", False) != written, hf


def test_a_format_asked_for_that_fails_exits_4_and_says_which(tmp_path):
    import json

    folder, out = shipped(tmp_path, "llama", torch.bfloat16, hidden=64), tmp_path / "out"
    result = run_cli(folder, "--method", "l1", "--ratio", "0.25", "--formats", "pt2,eager", "-o", out)
    assert result.exit_code == 4, result.output
    assert "the eager export asked for failed" in result.output
    report = json.loads((out / "report.json").read_text())
    eager = {e["format"]: e for e in report["exports"]}["eager"]
    assert eager["ok"] is False and eager["skipped"] is False and "holds sizes of its own" in eager["error"]
    assert (out / "model.pt2").is_file()  # what was written stays


def test_hugging_face_vision_models_lose_widths_with_the_default_formats(tmp_path):
    """ConvNeXt's MLP widths are no field of its config: the default formats prune them and skip
    hf/ with the reason; --formats hf keeps to the config (and prunes nothing here)."""
    import json

    torch.manual_seed(0)
    T.ConvNextForImageClassification(T.ConvNextConfig(image_size=32, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 2, 1],
                                                      num_labels=10)).save_pretrained(tmp_path / "convnext")
    result = run_cli(tmp_path / "convnext", "--method", "l1", "--ratio", "0.5", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["params_after"] < 0.8 * report["params_before"]
    hf = {e["format"]: e for e in report["exports"]}["hf"]
    assert hf["skipped"] is True and "--formats hf prunes only the widths it holds" in hf["error"]
    assert "skipped" in result.output
    exact = run_cli(tmp_path / "convnext", "--method", "l1", "--ratio", "0.5", "--formats", "hf", "-o", tmp_path / "o2")
    assert exact.exit_code == 0, exact.output
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["params_after"] == report["params_before"]


def test_bench_reports_decode_and_prefill_speed_of_a_causal_lm(tmp_path):
    """--bench on a causal LM: decode tokens/s with the cache on (batch 1 and 8) and prefill
    latency, original against the hf/ folder; `pcompile bench MODEL OUT` the same. Structure and
    sane numbers only: timings are never asserted."""
    import json
    import math

    folder, out = shipped(tmp_path, "llama", torch.bfloat16, hidden=64), tmp_path / "out"
    result = run_cli(folder, "--method", "l1", "--ratio", "0.5", "--formats", "hf,pt2", "-o", out, "--bench",
                     "--bench-batches", "1", "--bench-backends", "torch-cpu")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["bench"]["generation"]["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch-cpu", 1), ("torch-cpu", 8)]
    for r in rows:
        for name in ("original", "slim"):
            assert r[name]["decode_tokens_per_s"] > 0 and r[name]["prefill"]["p50"] > 0
            assert r[name]["generate"]["p50"] > r[name]["prefill"]["p50"]  # new tokens after the prompt
        assert math.isfinite(r["speedup"]) and math.isfinite(r["prefill_speedup"])
    assert "| decode, torch-cpu, batch 8 |" in (out / "report.md").read_text()  # and the closing table
    again = run_cli("bench", folder, out, "--batches", "1", "--backends", "torch-cpu,onnxruntime-cpu", "--min-time", "0.1",
                    "--json", tmp_path / "bench.json")
    assert again.exit_code == 0, again.output
    generation = json.loads((tmp_path / "bench.json").read_text())["generation"]
    assert {(r["backend"], r["batch"]) for r in generation["rows"]} == {("torch-cpu", 1), ("torch-cpu", 8)}
    assert generation["skipped"] == {"onnxruntime-cpu": "runs graphs without a KV cache"}
    assert "generation, KV cache on" in again.output
