"""Hugging Face models: `save_pretrained` folders in, and the widths their configs can hold.

A folder holding `config.json` and safetensors weights is read with transformers' own class for
the architecture the config names, with no pickle at all (`use_safetensors=True`, no remote
code). transformers is an optional dependency: `pip install pcompiler[hf]`.

The slim model goes out as a folder too (targets/hf.py), which needs every pruned width to be a
field of the config. Where a field's layers differ (calib's measured allocation, --global), the
config holds each block's value in `layer_widths` and the folder brings a modeling file that
builds each block from it (loaded with trust_remote_code=True). `width_fields` lists the fields that
hold a layer width independently of the others: the feed-forward widths, and the residual
stream's `hidden_size` with the head counts where the config can hold a pruned stream:
- RMSNorm'd streams (`rms_norm_eps`: LLaMA, Qwen2, Mistral). The analysis prunes such a stream
  exactly (a mean over the kept channels, scaled back); the folder holds that as RMSNorm weights
  scaled by sqrt(D/D'), `rms_norm_eps` by D/D' (so every RMSNorm must be over the stream and
  scale with its weight: not Qwen3, Gemma), and an explicit `head_dim`, which those models'
  attention reads instead of hidden_size / heads (targets/hf.py). Whole key/value heads go, each
  with its query heads, so num_key_value_heads and num_attention_heads shrink together and the
  grouped-query structure stays.
- LayerNorm'd streams (BERT, GPT-2, ViT), only with --prune-normalized (the analysis pins them
  otherwise): the slim LayerNorms normalize over the kept channels with their weights scaled by
  sqrt(D/D') and eps by D/D' (passes/rules/layers.py), which the config holds as `layer_norm_eps`
  (`layer_norm_epsilon`) x D/D' where every LayerNorm is over the stream with that eps. Their
  attention's head size is hidden_size / num_attention_heads, so the two must shrink together:
  the config is refused (`slim_config`) unless the kept heads times the head size are the kept
  stream, and the hf_config pass gives channels back until they are.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcompiler.errors import CompileError, first_line, one_line
from pcompiler.ir import ChannelGroup, Program

# Feed-forward widths, by the names configs give them.
FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
              "moe_intermediate_size", "hidden_dim")  # hidden_dim: DistilBERT's
# Attention head counts: held where the attention reads an explicit head_dim (as hidden_size).
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")
# Fields whose None means a multiple of another (GPT-2: n_inner = 4 * n_embd).
_DEFAULTS = {"n_inner": ("n_embd", 4)}
# The epsilon of the stream's norms: RMSNorm'd configs, LayerNorm'd ones (GPT-2's name last).
RMS_EPS = "rms_norm_eps"
LAYER_NORM_EPS = ("layer_norm_eps", "layer_norm_epsilon")
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
    return model.eval()


@contextlib.contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """A Hugging Face model's KV cache off for the block (export traces the forward without one:
    a cache object is no tensor output), then as it was, so the config written out keeps it."""
    config = getattr(model, "config", None)
    if not is_model(model) or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


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
        with torch.no_grad():  # the weight doubled in a call, not in place: the model is shared
            y = m(x.to(w.dtype))
            doubled = torch.func.functional_call(m, {"weight": w * 2.0}, (x.to(w.dtype),))
        if not torch.allclose(doubled, 2.0 * y, rtol=1e-3, atol=1e-6):
            return False
    return True


def _stream_layer_norms(model: nn.Module, hidden: int, eps: float) -> bool:
    """Whether every LayerNorm of the model normalizes the stream (weight of `hidden`) with the
    config's eps, so that one layer_norm_eps x D/D' holds the pruned stream."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return bool(norms) and all(tuple(m.normalized_shape) == (hidden,) and m.eps == eps and m.weight is not None
                               for m in norms)


def eps_field(config: Any) -> str | None:
    """The config field of the stream norms' epsilon (None: no such float field)."""
    return next((f for f in (RMS_EPS, *LAYER_NORM_EPS) if isinstance(getattr(config, f, None), float)), None)


def field_value(config: Any, name: str) -> int | None:
    """A width field's value, its default where None (GPT-2's n_inner: 4 x n_embd)."""
    value = getattr(config, name, None)
    if value is None and name in _DEFAULTS:
        base, times = _DEFAULTS[name]
        value = getattr(config, base, None) and getattr(config, base) * times
    return value if isinstance(value, int) and value > 0 else None


def width_fields(model: nn.Module, normalized: bool = False) -> dict[str, int]:
    """The widths the model's config holds independently: field -> value (its default where
    None): the feed-forward widths, and where the config can hold a pruned stream (see the
    module docstring; a LayerNorm'd one with `normalized`, --prune-normalized) hidden_size and
    the head counts (`HEAD_FIELDS`)."""
    config = model.config
    out = {}
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    eps = eps_field(config)
    if isinstance(hidden, int) and eps == RMS_EPS and _rescalable_norms(model, hidden):
        out["hidden_size"] = hidden
        if isinstance(heads, int):
            out["num_attention_heads"] = heads
            out["num_key_value_heads"] = getattr(config, "num_key_value_heads", None) or heads
    elif normalized and isinstance(hidden, int) and isinstance(heads, int) and eps in LAYER_NORM_EPS \
            and getattr(config, "head_dim", None) is None and _stream_layer_norms(model, hidden, getattr(config, eps)):
        out["hidden_size"] = hidden
        out["num_attention_heads"] = heads
    for name in FFN_FIELDS:
        value = field_value(config, name)
        if value is not None:
            out[name] = value
    return out


def field_of(group_size: int, block: int, widths: dict[str, int]) -> str | None:
    """The config field a channel group's width is: a group of attention heads (channels of
    `block` > 1 positions, one per key/value head with its query heads) is num_key_value_heads
    (num_attention_heads where the config has no key/value heads: BERT, GPT-2, ViT); any other
    group (Phi-3's fused gate/up rows have blocks of 2 too) the width field of its size (None:
    no field holds it)."""
    heads = "num_key_value_heads" if "num_key_value_heads" in widths else "num_attention_heads"
    if block > 1 and widths.get(heads) == group_size:
        return heads
    return next((f for f, v in widths.items() if v == group_size and f not in HEAD_FIELDS), None)


@dataclass(frozen=True)
class SlimWidths:
    """The config widths of a slim model: each changed field -> its value (`fields`); where a
    field's layers differ (a measured or global allocation), also its value in each layer of the
    ModuleList named `layers` (`per_layer`; `fields` then holds the widest)."""

    fields: dict[str, int]
    per_layer: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    layers: str | None = None

    def shown(self, field: str) -> str:
        """The field's new value as text: its value, or its values per layer as a list."""
        return str(list(self.per_layer[field]) if field in self.per_layer else self.fields[field])


def slim_widths(model: nn.Module, prog: Program) -> SlimWidths:
    """The config widths of the slim program, from the groups the selection shrank and the
    field the hf_widths pass found for each; raises ValueError where a group shrank that no field
    holds, or where one field's widths differ and not layer by layer (one group per layer of one
    ModuleList of the model's blocks)."""
    held = (prog.info.get("hf_widths") or {}).get("groups")
    if held is None:
        raise ValueError("no record of which groups the config's fields hold (prune with the hf_widths pass, as the "
                         "pipeline does for --formats hf, or leave out --formats hf)")
    selection = prog.selection or {}
    shrunk, unheld = set(), []
    for gid, removed in selection.items():
        if removed and held.get(gid) is None:
            unheld.append(prog.analysis.groups[gid].label())
        elif removed:
            shrunk.add(held[gid])
    found = {f: {g.id: g.size - len(selection.get(g.id, ())) for g in prog.analysis.groups if held.get(g.id) == f}
             for f in shrunk}  # field -> each of its groups (a layer left whole too) -> kept width
    if unheld:
        raise ValueError(f"the config holds none of the {len(unheld)} widths pruned in {', '.join(unheld[:2])}"
                         f"{' ...' if len(unheld) > 2 else ''}; --formats hf prunes only the widths it holds")
    uneven = [f for f, kept in found.items() if len(set(kept.values())) > 1]
    layers, per_layer = (_per_layer(model, prog.analysis.groups, {f: found[f] for f in uneven}) if uneven else (None, {}))
    widths = {f: max(kept.values()) for f, kept in found.items()}
    if "num_key_value_heads" in widths:  # whole key/value heads went, each with its query heads
        config = model.config
        per_group = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
        widths["num_attention_heads"] = widths["num_key_value_heads"] * per_group
        if "num_key_value_heads" in per_layer:
            per_layer["num_attention_heads"] = tuple(n * per_group for n in per_layer["num_key_value_heads"])
    order = ("hidden_size", *HEAD_FIELDS, *FFN_FIELDS)
    by_order = lambda kv: order.index(kv[0])  # noqa: E731
    return SlimWidths(dict(sorted(widths.items(), key=by_order)), dict(sorted(per_layer.items(), key=by_order)), layers)


def _per_layer(model: nn.Module, groups: Sequence[ChannelGroup], kept: dict[str, dict[int, int]]
               ) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The ModuleList of the model's blocks and each field's width in every block, from `kept`
    (field -> its groups' ids -> kept width, a group the selection left whole at its size); a
    ValueError where the groups of a field are not one per block."""
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    out: dict[str, tuple[int, ...]] = {}
    where = None
    for field, widths in kept.items():
        for name, n in lists:
            blocks = {_block_of(groups[gid], name): width for gid, width in widths.items()}
            if None not in blocks and len(blocks) == len(widths) and sorted(blocks) == list(range(n)):
                break
        else:
            raise ValueError(f"the config holds one {field} for all layers, and the layers differ where they are not "
                             "one per block of the model (use one ratio for every layer, the default)")
        if where not in (None, name):
            raise ValueError(f"the widths differ by layer in two lists of blocks ({where}, {name}): no config holds that")
        where = name
        out[field] = tuple(blocks[i] for i in range(n))
    return where, out


def _block_of(group: ChannelGroup, layers: str) -> int | None:
    """The index of the block of ModuleList `layers` that holds all of the group's modules (None:
    not one block)."""
    found = {m[len(layers) + 1:].split(".")[0] for m in group.modules if m.startswith(layers + ".")}
    if len(found) != 1 or len(group.modules) != sum(m.startswith(layers + ".") for m in group.modules):
        return None
    index = found.pop()
    return int(index) if index.isdigit() else None


def stream_ratio(config: Any, widths: SlimWidths) -> float:
    """D/D' of the residual stream (1.0 where hidden_size kept); a ValueError where it changed
    and the config has no norm epsilon to rescale (a stream normalized some other way cannot be
    held)."""
    new = widths.fields.get("hidden_size")
    if new is None or new == config.hidden_size:
        return 1.0
    if eps_field(config) is None:
        raise ValueError(f"hidden_size changed ({config.hidden_size} -> {new}) but the config has no rms_norm_eps or "
                         "layer_norm_eps to rescale (prune with the hf_widths pass, or leave out --formats hf)")
    return config.hidden_size / new


def slim_config(model: nn.Module, widths: SlimWidths) -> Any:
    """A copy of the model's config holding `widths` (`slim_widths`): each field set (where its
    layers differ, the widest, and `layer_widths` {"layers": the blocks' ModuleList, "fields":
    field -> its value per block}, which the folder's own modeling file reads), where the
    stream shrank its norms' eps x D/D', and where hidden_size or the heads of an RMSNorm'd model
    changed an explicit head_dim (hidden_size / heads no longer is the head size); a field whose
    None meant a multiple of hidden_size holds its value. Every other setting stays (use_cache,
    rope, dtype). A ValueError with the reason where the config class refuses the widths
    (LLaMA's hidden_size must divide by the head count; a LayerNorm'd model's kept heads times
    the head size must be the kept stream), in any of its blocks."""
    old = model.config
    ratio = stream_ratio(old, widths)
    eps = eps_field(old)
    config = copy.deepcopy(old)
    try:
        for field in _DEFAULTS:
            if getattr(old, field, 0) is None and field not in widths.fields:
                setattr(config, field, field_value(old, field))
        for field, value in widths.fields.items():
            setattr(config, field, value)
        if ratio != 1.0:
            setattr(config, eps, getattr(old, eps) * ratio)
        if {"hidden_size", "num_attention_heads"} & set(widths.fields):
            head = old.hidden_size // old.num_attention_heads
            if eps == RMS_EPS:
                config.head_dim = getattr(old, "head_dim", None) or head
            elif config.hidden_size != config.num_attention_heads * head:
                raise ValueError(f"its attention's head size is hidden_size / num_attention_heads ({head}), and "
                                 f"{config.num_attention_heads} heads of {head} are not hidden_size {config.hidden_size}")
        for layer in _layer_configs(config, widths):
            validate = getattr(layer, "validate", None)  # transformers' strict configs check their architecture
            if callable(validate):
                validate()
        if widths.per_layer:
            config.layer_widths = {"layers": widths.layers, "fields": {f: list(v) for f, v in widths.per_layer.items()}}
    except Exception as e:  # noqa: BLE001 - the config class's own validation error
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:  # the validator's own words
            cause = cause.__cause__ or cause.__context__
        shown = ", ".join(f"{k} {widths.shown(k)}" for k in widths.fields)
        raise ValueError(f"{type(old).__name__} refuses the widths {shown}: {first_line(str(cause))}") from e
    return config


def _layer_configs(config: Any, widths: SlimWidths) -> list[Any]:
    """The config as each distinct block sees it (the config alone where no field differs)."""
    if not widths.per_layer:
        return [config]
    out = []
    for values in sorted(set(zip(*widths.per_layer.values()))):
        layer = copy.deepcopy(config)
        for field, value in zip(widths.per_layer, values):
            setattr(layer, field, value)
        out.append(layer)
    return out


def biased(model: nn.Module) -> frozenset[str]:
    """The modules of `model` that have a bias parameter (by name)."""
    return frozenset(n.removesuffix(".bias") for n, _ in model.named_parameters() if n.endswith(".bias"))


def bias_fields(model: nn.Module) -> dict[str, frozenset[str]]:
    """Each boolean config field named *_bias that is off (LLaMA's attention_bias, mlp_bias) ->
    the modules that gain a bias with it on (the class built on meta to see)."""
    config = model.config
    fields = [k for k, v in config.to_dict().items() if k.endswith("_bias") and v is False]
    out = {}
    have = biased(model)
    for field in fields:
        trial = copy.deepcopy(config)
        setattr(trial, field, True)
        try:
            with torch.device("meta"):
                built = type(model)._from_config(trial)
        except Exception:  # noqa: BLE001 - a flag this class cannot build with holds nothing
            continue
        out[field] = biased(built) - have
    return out


def bias_holders(model: nn.Module) -> frozenset[str]:
    """The modules whose bias a folder of this model can hold: those that have one, and those
    a *_bias config field adds (`bias_fields`; the others' biases are then written as zeros)."""
    return biased(model).union(*bias_fields(model).values())


def folder_fits(model: nn.Module, prog: Program) -> bool:
    """Whether the slim program's widths are ones a folder of `model` can hold (the hf target
    may still fail on what it finds writing it)."""
    try:
        return config_problem(model, slim_widths(model, prog)) is None
    except ValueError:
        return False


def config_problem(model: nn.Module, widths: SlimWidths) -> str | None:
    """Why the model's config cannot hold `widths` (None: it can)."""
    try:
        slim_config(model, widths)
    except ValueError as e:
        return first_line(str(e))
    return None

