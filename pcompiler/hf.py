"""Hugging Face models: `save_pretrained` folders in, and the widths their configs can hold.

A folder holding `config.json` and safetensors weights is read with transformers' own class for
the architecture the config names, with no pickle at all (`use_safetensors=True`, no remote
code). transformers is an optional dependency: `pip install pcompiler[hf]`.

The slim model goes out as a folder too (targets/hf.py), which needs every pruned width to be a
field of the config, with the same value in every layer. `width_fields` lists the fields that
hold a layer width independently of the others: the feed-forward widths, and the residual
stream's `hidden_size` where the stream is RMSNorm'd (`rms_norm_eps`: LLaMA, Qwen2, Mistral).
The analysis prunes such a stream exactly (a mean over the kept channels, scaled back); the
folder holds that as RMSNorm weights scaled by sqrt(D/D'), `rms_norm_eps` by D/D' (so every
RMSNorm must be over the stream and scale with its weight: not Qwen3, Gemma), and an explicit
`head_dim`, which those models' attention reads instead of hidden_size / heads
(targets/hf.py). The same models hold their head counts: whole key/value heads go, each with
its query heads, so num_key_value_heads and num_attention_heads shrink together and the
grouped-query structure stays. LayerNorm'd streams (BERT, GPT-2, ViT) stay in the folder, and so
do their heads (their head size is hidden_size / heads): the analysis pins such a stream, and
with --prune-normalized the hf_widths pass does, since no field here holds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcompiler.errors import CompileError, one_line

# Feed-forward widths, by the names configs give them.
FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
              "moe_intermediate_size", "hidden_dim")  # hidden_dim: DistilBERT's
# Attention head counts: held where the attention reads an explicit head_dim (as hidden_size).
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")
# Fields whose None means a multiple of another (GPT-2: n_inner = 4 * n_embd).
_DEFAULTS = {"n_inner": ("n_embd", 4)}
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def is_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def is_model(model: nn.Module) -> bool:
    """A transformers model: one that a folder can hold."""
    return callable(getattr(model, "save_pretrained", None)) and getattr(model, "config", None) is not None


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise CompileError("reading or writing a Hugging Face folder needs transformers",
                           hint="pip install 'pcompiler[hf]'") from e
    return transformers


def load_folder(path: Path) -> nn.Module:
    """The model of a `save_pretrained` folder, from its config and safetensors (module docstring)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CompileError(f"'{path / 'config.json'}' is not a readable JSON config: {one_line(e)}") from e
    archs = config.get("architectures") or []
    if not archs:
        raise CompileError(f"'{path / 'config.json'}' names no architecture ('architectures' is empty)",
                           hint="save the model with model.save_pretrained(folder), which records it")
    if not any((path / f).is_file() for f in _SAFETENSORS):
        raise CompileError(f"'{path}' holds no safetensors weights (model.safetensors)",
                           hint="save with model.save_pretrained(folder, safe_serialization=True); "
                           "pytorch_model.bin is a pickle and is not read")
    transformers = transformers_module()
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise CompileError(f"transformers {transformers.__version__} has no class {archs[0]} (the config's "
                           "architecture)", hint="a model with remote code is not loaded: export it to .pt2 instead")
    try:
        model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers' message says what is wrong with the folder
        raise CompileError(f"cannot load the Hugging Face folder '{path}' as {archs[0]}: {one_line(e)}") from e
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # export traces the forward without a cache
    return model.eval()


def _rescalable_norms(model: nn.Module, hidden: int) -> bool:
    """Whether every RMSNorm of the model normalizes the stream (weight of `hidden`) with an
    output proportional to its weight, so that weights x sqrt(D/D') and one rms_norm_eps x D/D'
    hold the pruned stream. Not: Qwen3's per-head q/k norms (the config's one eps serves them
    too), Gemma's (1 + weight) scale; probed on a random input."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    if not norms or any(p.is_meta for p in model.parameters()):
        return False
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    for m in norms:
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (hidden,):
            return False
        with torch.no_grad():
            y = m(x.to(w.dtype))
            w.mul_(2.0)
            doubled = m(x.to(w.dtype))
            w.div_(2.0)
        if not torch.allclose(doubled, 2.0 * y, rtol=1e-3, atol=1e-6):
            return False
    return True


def width_fields(model: nn.Module) -> dict[str, int]:
    """The widths the model's config holds independently: field -> value (its default where
    None): the feed-forward widths, and where the stream is RMSNorm'd (see the module
    docstring) hidden_size and the head counts (`HEAD_FIELDS`)."""
    config = model.config
    out = {}
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(getattr(config, "rms_norm_eps", None), float) \
            and _rescalable_norms(model, hidden):
        out["hidden_size"] = hidden
        if isinstance(heads, int):
            out["num_attention_heads"] = heads
            out["num_key_value_heads"] = getattr(config, "num_key_value_heads", None) or heads
    for name in FFN_FIELDS:
        value = getattr(config, name, None)
        if value is None and name in _DEFAULTS:
            base, times = _DEFAULTS[name]
            value = getattr(config, base, None) and getattr(config, base) * times
        if isinstance(value, int) and value > 0:
            out[name] = value
    return out


def field_of(group_size: int, block: int, widths: dict[str, int]) -> str | None:
    """The config field a channel group's width is: a group of attention heads (channels of
    `block` > 1 positions, one per key/value head with its query heads) is num_key_value_heads;
    any other group (Phi-3's fused gate/up rows have blocks of 2 too) the width field of its size
    (None: no field holds it)."""
    if block > 1 and widths.get("num_key_value_heads") == group_size:
        return "num_key_value_heads"
    return next((f for f, v in widths.items() if v == group_size and f not in HEAD_FIELDS), None)
