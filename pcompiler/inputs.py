"""Example inputs: what the user says (`--input-shape 1,128:int64`, `--input NAME=1,3,32,32`),
what a model implies when the user says nothing, and the values drawn for them.

An `InputSpec` is one tensor input: shape, dtype, and a name when it is passed by keyword.
Float inputs are drawn from a normal distribution. Integer inputs must be valid where they go:
they are traced as zeros, then drawn from the graph (`draw_integers`) below the vocabulary of
the embedding they feed; an integer input that feeds no embedding (an attention mask) is 0 or 1,
with the first position 1 so no row is wholly masked. Booleans are True.

A Hugging Face model (a `config` with `vocab_size`, or `image_size` and `num_channels`) gives
its default: `input_ids` and `attention_mask` of 1 x min(64, max positions / 2), or `pixel_values`
of 1 x channels x image size x image size. Any other model: a float input that fits its first
layer (`default_input_shape`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from pcompiler.errors import CompileError
from pcompiler.input_checks import check_input_memory
from pcompiler.ir import Program, op_name, tensor_of

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64, "int64": torch.int64,
    "long": torch.int64, "int32": torch.int32, "int": torch.int32, "bool": torch.bool,
}
# Ops an integer input passes through unchanged on its way to an embedding.
_CARRIERS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "to", "_to_copy", "clone",
             "contiguous", "expand", "slice", "alias", "detach", "long", "int"}


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    name: str | None = None  # set: passed by keyword

    @property
    def text(self) -> str:
        dims = ",".join(map(str, self.shape))
        kind = "" if self.dtype == torch.float32 else f":{str(self.dtype).removeprefix('torch.')}"
        return f"{self.name}={dims}{kind}" if self.name else f"{dims}{kind}"

    @property
    def is_integer(self) -> bool:
        return not self.dtype.is_floating_point and self.dtype != torch.bool


def parse_inputs(shapes: Iterable[str] = (), named: Iterable[str] = ()) -> list[InputSpec]:
    """`--input-shape` texts ('1,3,32,32', '1,128:int64': positional, in order) and `--input`
    texts ('attention_mask=1,128:int64': by keyword) as InputSpecs; refused when they would not
    fit in memory (`input_checks.check_input_memory`)."""
    specs = [_parse(text, "--input-shape") for text in shapes]
    for text in named:
        name, eq, rest = text.partition("=")
        if not eq or not name.strip().isidentifier():
            raise CompileError(f"--input '{text}' is not NAME=SHAPE[:DTYPE] (e.g. attention_mask=1,128:int64)")
        specs.append(_parse(rest, "--input", name.strip()))
    names = [s.name for s in specs if s.name]
    if len(set(names)) != len(names):
        raise CompileError(f"--input names an input twice: {', '.join(names)}")
    check_input_memory([s.shape for s in specs], element_bytes=[s.dtype.itemsize for s in specs])
    return specs


def _parse(text: str, option: str, name: str | None = None) -> InputSpec:
    dims_text, _, dtype_text = text.strip().partition(":")
    try:
        dims = tuple(int(p) for p in dims_text.strip("()[] ").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise CompileError(f"{option} '{text}' is not a comma-separated list of positive integers (e.g. 1,3,32,32 "
                           "or 1,128:int64)")
    dtype = DTYPES.get(dtype_text.strip().lower() or "float32")
    if dtype is None:
        raise CompileError(f"{option} '{text}': unknown dtype '{dtype_text}'", hint=f"choose one of {', '.join(DTYPES)}")
    return InputSpec(dims, dtype, name)


def default_inputs(model: nn.Module) -> list[InputSpec]:
    """What the model implies (module docstring)."""
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        # Half the positions at most: RoBERTa's start after the padding index.
        seq = min(64, (getattr(config, "max_position_embeddings", None) or 128) // 2)
        return [InputSpec((1, seq), torch.int64, "input_ids"), InputSpec((1, seq), torch.int64, "attention_mask")]
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        return [InputSpec((1, channels, size, size), torch.float32, "pixel_values")]
    return [InputSpec(default_input_shape(model))]


def default_seq_len(model: nn.Module, cap: int = 512) -> int:
    """Tokens per window of text data: the model's maximum (a config's max_position_embeddings or
    n_positions), at most `cap`."""
    config = getattr(model, "config", None)
    most = next((v for k in ("max_position_embeddings", "n_positions")
                 if isinstance(v := getattr(config, k, None), int) and v > 0), cap)
    return min(cap, most)


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The model's own `example_input_shape` if it has one, else a shape that fits its first
    layer (1,3,32,32 when nothing says otherwise)."""
    own = getattr(model, "example_input_shape", None)
    if isinstance(own, tuple) and all(isinstance(d, int) and d > 0 for d in own):
        return own
    for m in model.modules():
        if isinstance(m, nn.Conv1d) and m.in_channels:
            return (1, m.in_channels, 64)
        if isinstance(m, nn.Conv2d) and m.in_channels:
            return (1, m.in_channels, 32, 32)
        if isinstance(m, nn.Conv3d) and m.in_channels:
            return (1, m.in_channels, 8, 32, 32)
        if isinstance(m, nn.Linear) and m.in_features:
            return (1, m.in_features)
        if next(m.parameters(recurse=False), None) is not None:
            break  # the first layer with weights is something else: keep the default
    return (1, 3, 32, 32)


def specs_text(specs: Iterable[InputSpec]) -> str:
    return "; ".join(s.text for s in specs)


def example_values(specs: Sequence[InputSpec], device: torch.device | str = "cpu",
                   seed: int = 0) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Positional and keyword tensors for `specs`: floats random, integers zero (valid indices
    for tracing; `draw_integers` replaces them), booleans True."""
    g = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for s in specs:
        if s.dtype.is_floating_point:
            t = torch.randn(s.shape, generator=g).to(device=device, dtype=s.dtype)
        elif s.dtype == torch.bool:
            t = torch.ones(s.shape, dtype=torch.bool, device=device)
        else:
            t = torch.zeros(s.shape, dtype=s.dtype, device=device)
        if s.name:
            kwargs[s.name] = t
        else:
            args.append(t)
    return tuple(args), kwargs


def draw_integers(prog: Program, seed: int = 0) -> Program:
    """`prog` with its integer example inputs drawn where they go (module docstring)."""
    placeholders = [n for n in prog.gm.graph.nodes if n.op == "placeholder"]
    g = torch.Generator().manual_seed(seed)
    values = list(prog.example_inputs)
    for i, (node, t) in enumerate(zip(placeholders, values)):
        if not isinstance(t, torch.Tensor) or t.is_meta or t.dtype.is_floating_point or t.dtype == torch.bool:
            continue
        rows = _embedding_rows(prog.gm, node)
        if rows is None:  # a mask: 0 or 1, never a wholly masked row
            drawn = torch.randint(0, 2, t.shape, generator=g)
            if drawn.ndim:
                drawn[..., 0] = 1
        else:
            drawn = torch.randint(0, rows, t.shape, generator=g)
        values[i] = drawn.to(device=t.device, dtype=t.dtype)
    return prog.replace(example_inputs=tuple(values))


def _embedding_rows(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The fewest rows of the embeddings `node` feeds as indices (through reshapes and casts)."""
    rows, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.Embedding):
                rows.append(gm.get_submodule(user.target).num_embeddings)
            elif user.op == "call_function" and op_name(user.target) == "embedding":
                weight = user.args[0] if isinstance(user.target, torch._ops.OpOverload) else user.args[1]
                rows.append(tensor_of(gm, weight.target).shape[0])
            elif op_name(user.target) in _CARRIERS or user.target is getattr:
                todo.append(user)
    return min(rows) if rows else None


__all__ = ["DTYPES", "InputSpec", "default_input_shape", "default_inputs", "draw_integers", "example_values",
           "parse_inputs", "specs_text"]


def dynamic_dims(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The dimensions an export may make dynamic for these inputs: none where they do not share
    a first (batch) dimension; the batch; and for token ids (integer (batch, sequence) inputs of
    one shape, the sequence longer than 1, as export specializes size-1 dimensions) the sequence."""
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() for t in tensors):
        return ()
    if len({t.shape[0] for t in tensors}) != 1:
        return ()
    tokens = (all(t.dim() == 2 and not t.is_floating_point() for t in tensors)
              and len({tuple(t.shape) for t in tensors}) == 1 and tensors[0].shape[1] > 1)
    return (0, 1) if tokens else (0,)


def widened(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The inputs on a batch of 2 where theirs is 1: export specializes size-1 dimensions, so a
    dynamic batch is exported on 2."""
    return tuple(t if t.shape[0] > 1 else t.expand(2, *t.shape[1:]).clone() for t in tensors)

