"""Example inputs (pcompiler/inputs.py): the --input-shape and --input texts, typed and named;
the defaults a model implies; integers drawn where they go (below the vocabulary of the
embedding they feed, 0/1 for a mask); and the CLI on models whose inputs are token ids."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import pcompiler
from pcompiler.cli import main
from pcompiler.errors import CompileError
from pcompiler.inputs import InputSpec, default_inputs, draw_integers, example_values, parse_inputs


def test_parse_shapes_dtypes_and_names():
    assert parse_inputs(["1,3,32,32", " 2, 8 ", "(1,16)"]) == [
        InputSpec((1, 3, 32, 32)), InputSpec((2, 8)), InputSpec((1, 16))]
    assert parse_inputs(["1,128:int64"], ["attention_mask=1,128:int64", "pixel_values=1,3,8,8:float16"]) == [
        InputSpec((1, 128), torch.int64),
        InputSpec((1, 128), torch.int64, "attention_mask"),
        InputSpec((1, 3, 8, 8), torch.float16, "pixel_values"),
    ]
    assert parse_inputs([]) == []
    assert InputSpec((1, 128), torch.int64, "input_ids").text == "input_ids=1,128:int64"


@pytest.mark.parametrize("bad", ["1,3,x", "", "1,0,4", "1,-3", "1;3", "1.5,2"])
def test_parse_rejects_shapes(bad):
    with pytest.raises(CompileError) as info:
        parse_inputs([bad])
    assert str(info.value) == (f"--input-shape '{bad}' is not a comma-separated list of positive integers "
                               "(e.g. 1,3,32,32 or 1,128:int64)")


def test_parse_rejects_dtypes_and_names():
    with pytest.raises(CompileError, match="--input-shape '1,4:int8': unknown dtype 'int8'"):
        parse_inputs(["1,4:int8"])
    with pytest.raises(CompileError, match="--input '1,4' is not NAME=SHAPE"):
        parse_inputs([], ["1,4"])
    with pytest.raises(CompileError, match="names an input twice"):
        parse_inputs([], ["a=1,4", "a=1,5"])


class Tagger(nn.Module):
    """Token ids through a reshape into an embedding of 37 rows; a mask that no embedding reads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(37, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, ids, mask):
        h = self.fc(self.emb(ids.view(ids.shape[0], -1)))
        return self.out(torch.relu(h) * mask.unsqueeze(-1).to(h.dtype))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_integers_are_drawn_below_the_vocabulary_and_masks_are_0_or_1(frontend):
    specs = [InputSpec((4, 64), torch.int64), InputSpec((4, 64), torch.int64)]
    args, kwargs = example_values(specs)
    assert all(not t.any() for t in args) and kwargs == {}  # traced as zeros
    prog = draw_integers(pcompiler.trace(Tagger(), args, frontend=frontend), seed=1)
    ids, mask = prog.example_inputs
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() <= 36 and len(ids.unique()) > 30
    assert set(mask.unique().tolist()) == {0, 1} and mask[:, 0].eq(1).all()


def _llama():
    T = pytest.importorskip("transformers")
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24, use_cache=False)
    return T.LlamaForCausalLM(cfg)


def test_hugging_face_config_gives_the_default_inputs():
    assert default_inputs(_llama()) == [InputSpec((1, 12), torch.int64, "input_ids"),
                                        InputSpec((1, 12), torch.int64, "attention_mask")]
    T = pytest.importorskip("transformers")
    vit = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                  intermediate_size=64, image_size=16, patch_size=8))
    assert default_inputs(vit) == [InputSpec((1, 3, 16, 16), torch.float32, "pixel_values")]
    assert default_inputs(nn.Conv2d(5, 8, 3)) == [InputSpec((1, 5, 32, 32))]


def test_cli_prunes_a_pickled_causal_lm_with_its_default_inputs(tmp_path):
    torch.manual_seed(0)
    torch.save(_llama(), tmp_path / "llama.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tmp_path / "llama.pt"), "--trust", "--method", "l1", "--ratio", "0.5",
                                       "-o", str(out), "--formats", "pt2,onnx"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["ok"] is True
    assert report["params_after"] < 0.8 * report["params_before"]
    assert {e["format"]: e["ok"] for e in report["exports"]} == {"pt2": True, "onnx": True}
    loaded = torch.export.load(out / "model.pt2").module()
    for batch, seq in ((1, 12), (3, 5), (2, 40)):  # any batch and length; by keyword, as the model took them
        ids = torch.randint(0, 50, (batch, seq))
        assert loaded(input_ids=ids, attention_mask=torch.ones_like(ids))[0].shape == (batch, seq, 50)


def test_cli_types_positional_token_ids(tmp_path):
    torch.save(Tagger(), tmp_path / "tagger.pt")
    result = CliRunner().invoke(main, [str(tmp_path / "tagger.pt"), "--trust", "--analyze", "--input-shape",
                                       "2,8:int64", "--input-shape", "2,8:int64"])
    assert result.exit_code == 0, result.output
    assert "fc" in result.output
