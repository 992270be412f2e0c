"""The Hugging Face target: the slim model as a `save_pretrained` folder (`OUT/hf/`).

The user's transformers model is rebuilt from a copy of its config in which each pruned width
is set to its new value (pcompiler/hf.py, `width_fields`), the slim program's weights are
loaded into it by name (the export frontend keeps the model's parameter names), and it is saved
with `save_pretrained` (safetensors). The folder is then loaded back with `from_pretrained`
and its outputs compared with the slim program's on the example inputs.

Where hidden_size changed, the stream's RMSNorms are rewritten for Hugging Face's own code,
which divides by the kept D' channels: the analysis made removal exact by scaling each mean of
squares by D'/D, which is the same as RMSNorm weights times sqrt(D/D') and eps times D/D'
(`rms_norm_eps` in the config); `head_dim` is written out, as hidden_size / heads no longer is
the head size. A LayerNorm'd stream (--prune-normalized) needs only `layer_norm_eps` x D/D':
the slim program's LayerNorm weights are already scaled. The comparison with the slim program
checks both.

The new widths come from the selection: each group the method shrank holds the config field
the hf_widths pass found for it (`hf.field_of`); a group of key/value heads also sets
num_attention_heads (its query heads go with it).

Where a field's layers differ (calib's measured allocation, --global ranking), the config holds
each block's width in `layer_widths` and the folder gets a modeling file, modeling_pcompiler.py
(`_TEMPLATE`): the model's own class with each block rebuilt from a config holding its widths,
registered in `auto_map`, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
(the Auto class that loads the model's class) reads it, KV cache and `generate` included. Other
tools that read only the config (vLLM, llama.cpp converters) cannot: one ratio for every layer
(the default selection) keeps the folder plain.

Fails, with the reason, where a width changed that no config field holds (run with the
`hf_widths` pass, as the pipeline does for Hugging Face models, so the method leaves those
alone), where one field's widths differ other than block by block, or where a weight's shape does
not fit the rebuilt model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcompiler.compare import export_tolerance, flatten_tensors
from pcompiler.costs import eval_mode
from pcompiler.dtypes import HALF, PromotedInterpreter, dtype_name, dtype_of, promoted_modules
from pcompiler.errors import one_line
from pcompiler.hf import (
    RMS_EPS,
    bias_fields,
    biased,
    eps_field,
    field_value,
    slim_config,
    slim_widths,
    stream_ratio,
    transformers_module,
)
from pcompiler.ir import Program, call_with
from pcompiler.memory import streamed
from pcompiler.targets import ExportResult, NotApplicable, compare_outputs, guarded, require_weights

# Files of the input folder that a slim folder needs as they are: the tokenizer's and processor's.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json", "processor_config.json")


def save_hf(prog: Program, model: nn.Module, path: str | Path) -> ExportResult:
    """Write the slim model as a `save_pretrained` folder at `path` in the model's dtype, with its
    generation config and the input folder's tokenizer files, reload it and compare."""
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"a Hugging Face folder to {path}")
        try:
            widths = slim_widths(model, prog)
            config = slim_config(model, widths)
        except ValueError as e:
            raise NotApplicable(str(e)) from e
        stream = stream_ratio(model.config, widths)
        state = prog.gm.state_dict()
        flags = _bias_flags(model, state)
        for flag in flags:
            setattr(config, flag, True)
        cls, code = (type(model), None) if not widths.per_layer else _per_layer_class(model, config)
        with torch.device("meta"):  # no memory: the slim program's tensors are put in place
            try:
                slim = cls._from_config(config, dtype=dtype_of(prog.gm))
            except Exception as e:  # noqa: BLE001 - a block class that cannot be built from its config alone
                if code is None:
                    raise
                raise NotApplicable(f"{type(model).__name__}'s blocks cannot be built one by one from a config, "
                                    f"which widths that differ by layer need: {one_line(e)}") from e
        missing, unexpected = slim.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not _zero_bias(slim, k, flags)]
        tied = {k for k in missing if k in _tied_keys(slim)}
        if set(missing) - tied or unexpected:
            raise ValueError(f"the slim weights do not fit {type(model).__name__}: missing {sorted(set(missing) - tied)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        slim.tie_weights()
        eps = eps_field(model.config)
        norms = _rescale_stream_norms(slim, widths.fields.get("hidden_size"), stream) if eps == RMS_EPS else 0
        if getattr(model, "generation_config", None) is not None:
            slim.generation_config = copy.deepcopy(model.generation_config)
        # Written beside, then renamed: a run killed halfway leaves the old folder (or none).
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        slim.save_pretrained(tmp, safe_serialization=True)
        if code is not None:
            (tmp / f"{CODE}.py").write_text(code)
        copied = _copy_side_files(model, tmp)
        del slim
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        loaded = load_hf(model, path)
        err = _check(prog, loaded, f"the reloaded {path.name}/ folder")
        changed = ", ".join(f"{f} {field_value(model.config, f)} -> {widths.shown(f)}" for f in widths.fields) \
            or "no width changed"
        if code is not None:
            changed += (f"; {CODE}.py builds each layer at its width (load with trust_remote_code=True; one width "
                        f"per layer, a plain folder: calib's -p allocation=uniform, no --global)")
        if stream != 1.0:
            changed += f"; {eps} x {stream:g}" + (f" and {norms} RMSNorm weights x sqrt({stream:g})" if norms else "")
        if flags:
            changed += f"; {', '.join(flags)} on (compensate's folds; the other biases zero)"
        if copied:
            changed += f"; {', '.join(copied)} copied"
        return err, f"config: {changed}"

    return guarded("hf", path, body, dtype=dtype_name(dtype_of(prog.gm)))


def load_hf(model: nn.Module, path: str | Path) -> nn.Module:
    """The slim folder at `path` as `model`'s class (safetensors, no remote code), in eval mode;
    one whose layers differ in width as its users load it: through its Auto class with its own
    modeling file (trust_remote_code)."""
    config = json.loads((Path(path) / "config.json").read_text())
    if "layer_widths" not in config:
        return type(model).from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    auto = getattr(transformers_module(), next(iter(config["auto_map"])))
    return auto.from_pretrained(path, local_files_only=True, use_safetensors=True, trust_remote_code=True).eval()


# The modeling file of a folder whose layers differ in width (`layer_widths` in its config).
CODE = "modeling_pcompiler"
_TEMPLATE = '''"""Written by pcompiler: transformers' {base} with blocks of different widths.

config.layer_widths holds, for the ModuleList of blocks it names, each width field's value per
block; every block is built from a copy of the config holding its own values. Load the folder
with {auto}.from_pretrained(folder, trust_remote_code=True).
"""

import copy

import transformers


class {name}(transformers.{base}):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        blocks = self.get_submodule(config.layer_widths["layers"])
        for index, block in enumerate(blocks):
            block_config = copy.copy(config)
            for field, values in config.layer_widths["fields"].items():
                setattr(block_config, field, values[index])
            blocks[index] = type(block)(block_config, index)
        self.post_init()
'''
# The Auto classes a folder's modeling file is registered under, the first that maps the model's config to its class.
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForMaskedLM", "AutoModelForImageClassification", "AutoModel")


def _per_layer_class(model: nn.Module, config: Any) -> tuple[type, str]:
    """The class of `model` whose blocks are built at their own widths (`_TEMPLATE`), and its
    source for the folder; `config` gains the `auto_map` that names it. NotApplicable where no
    Auto class loads the model's class."""
    transformers = transformers_module()
    base = type(model).__name__
    auto = next((a for a in AUTO_CLASSES if _maps(getattr(transformers, a, None), type(model.config), type(model))), None)
    if auto is None:
        raise NotApplicable(f"its layers differ in width, which needs a modeling file loaded through an Auto class, and "
                            f"no Auto class of transformers loads {base} (use one ratio for every layer, the default)")
    name = f"Pcompiler{base}"
    code = _TEMPLATE.format(base=base, auto=auto, name=name)
    namespace: dict[str, Any] = {}
    exec(compile(code, f"{CODE}.py", "exec"), namespace)  # noqa: S102 - our own template
    config.auto_map = {auto: f"{CODE}.{name}"}
    return namespace[name], code


def _maps(auto: Any, config_class: type, model_class: type) -> bool:
    try:
        return auto is not None and auto._model_mapping[config_class] is model_class
    except (KeyError, AttributeError):
        return False


def _check(prog: Program, loaded: nn.Module, what: str) -> float:
    """Max error of the reloaded folder's outputs against the slim program's. A half-precision
    model is compared in float32 on both sides (`dtypes`: the same weights, read exactly): the
    folder's RMSNorm weights x sqrt(D/D') are rounded to the half dtype where the program
    rescales exactly, which is the one difference left, held to the half dtype's tolerance; in
    the half dtype itself every op would round differently on top."""
    half = dtype_of(prog.gm)
    proof = torch.float32 if half in HALF else None
    with torch.no_grad(), eval_mode(prog.gm):
        want = flatten_tensors(PromotedInterpreter(prog.gm, proof).run(*prog.example_inputs))
    promote = promoted_modules(loaded, proof) if proof is not None else contextlib.nullcontext()
    with torch.no_grad(), eval_mode(loaded), streamed(loaded), promote:  # the folder's pages: memory-mapped
        got = flatten_tensors(call_with(loaded, prog.example_inputs, prog.keywords))
    return compare_outputs(got, want, what, tolerance=export_tolerance(half))


def _copy_side_files(model: nn.Module, folder: Path) -> list[str]:
    """Copy the tokenizer's and processor's files of the folder the model was read from (its
    config's name_or_path, where that is a local folder) into `folder`; their names."""
    source = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if not str(source) or not source.is_dir():
        return []
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return copied


def _rescale_stream_norms(slim: nn.Module, hidden: int | None, ratio: float) -> int:
    """Multiply the weight of each RMSNorm over the stream by sqrt(ratio); how many there were."""
    if ratio == 1.0:
        return 0
    norms = [m for m in slim.modules() if type(m).__name__.endswith("RMSNorm")
             and isinstance(getattr(m, "weight", None), torch.Tensor) and tuple(m.weight.shape) == (hidden,)]
    with torch.no_grad():  # new tensors: the weights are the slim program's own
        for m in norms:
            m.weight = nn.Parameter(m.weight.detach() * ratio ** 0.5, requires_grad=False)
    return len(norms)


def _bias_flags(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, frozenset[str]]:
    """The *_bias config fields to turn on for the biases the slim model gained (compensate's
    folds into a LLaMA's o_proj or down_proj), each with the modules it adds a bias to."""
    gained = {k.removesuffix(".bias") for k in state if k.endswith(".bias")} - biased(model)
    if not gained:
        return {}
    return {f: mods for f, mods in bias_fields(model).items() if mods & gained}


def _zero_bias(slim: nn.Module, key: str, flags: dict[str, frozenset[str]]) -> bool:
    """Put zeros in place of bias `key` where a flag turned on added it and no fold filled it."""
    owner = key.removesuffix(".bias")
    if not key.endswith(".bias") or not any(owner in mods for mods in flags.values()):
        return False
    module = slim.get_submodule(owner)
    module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype), requires_grad=False)
    return True


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another (tied embeddings): a state dict may hold one."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update({name, seen[id(p)]})
        seen.setdefault(id(p), name)
    return tied
