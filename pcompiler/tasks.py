"""What a model computes on the data, and so how it is called, trained and scored: one place.

A `DataSource` (pcompiler.data) carries its task. Every place that runs a model on data (the
training loop, evaluation, recalibration, compensation's measurements, distillation) calls it,
takes its loss and scores it through the task, never by itself:

    Classification   (x, class) pairs; the model returns (batch, classes) logits; cross-entropy;
                     scored by top-1 accuracy (higher is better), reported as acc_*.
    CausalLM         (window, next tokens) pairs of token ids (batch, T); the model returns
                     (batch, T, vocabulary) logits, alone, first in a tuple or as `.logits` (a
                     Hugging Face output); next-token cross-entropy averaged over tokens; scored
                     by perplexity, exp of the mean token loss (lower is better), reported as
                     ppl_*. A traced Hugging Face model takes `attention_mask` after the ids:
                     it gets ones (every window is full), any other extra input is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from pcompiler.errors import CompileError


def _graph_of(model: nn.Module) -> fx.GraphModule | None:
    inner = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner if isinstance(inner, fx.GraphModule) else None


@dataclass(frozen=True)
class Classification:
    name: ClassVar[str] = "classification"
    prefix: ClassVar[str] = "acc"  # report keys: acc_before, acc_pruned, acc_final
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def inputs(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,)

    def call(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The fraction predicted right (a tensor on the device: no host sync)."""
        return (out.detach().argmax(-1) == y).float().mean()

    def per_sample(self, out: torch.Tensor) -> torch.Tensor:
        """Logits with one row per scored prediction (for distillation's KL)."""
        return out

    def score(self, totals: tuple[float, int, int]) -> float:
        """The metric from summed (loss, right, count) over a dataset."""
        return totals[1] / max(totals[2], 1)


@dataclass(frozen=True)
class CausalLM(Classification):
    name: ClassVar[str] = "causal-lm"
    prefix: ClassVar[str] = "ppl"
    metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False

    def inputs(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ids, and ones for a traced Hugging Face model's attention_mask."""
        gm = _graph_of(model)
        if gm is None:
            return (x,)
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
        other = [n for n in names[1:] if "mask" not in str(n)]
        if other:
            raise CompileError(f"text data gives token ids (and an attention mask), but the model also takes {other}",
                               hint="trace the model with token ids (and attention_mask) only")
        return (x, *[torch.ones_like(x)] * (len(names) - 1))

    def call(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return logits_of(model(*self.inputs(model, x)))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten())

    def per_sample(self, out: torch.Tensor) -> torch.Tensor:
        return out.flatten(0, -2)

    def score(self, totals: tuple[float, int, int]) -> float:
        return math.exp(totals[0] / max(totals[2], 1))


CLASSIFICATION = Classification()
CAUSAL_LM = CausalLM()


def logits_of(out: Any) -> torch.Tensor:
    """A model's logits: the output itself, its `logits` (a Hugging Face output or a dict), or
    the first tensor of a tuple (a traced Hugging Face model returns `(logits,)`)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CompileError(f"the model returns {type(out).__name__}, not logits",
                       hint="a language model must return (batch, tokens, vocabulary) logits, first or as .logits")


@torch.no_grad()
def totals(task: Classification, model: nn.Module, loader: Any, device: torch.device) -> tuple[float, int, int]:
    """Summed loss (per prediction), right predictions and predictions of `model` over `loader`."""
    loss, right, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = task.call(model, x)
        n = y.numel()
        loss += float(task.loss(out, y)) * n
        right += int((out.argmax(-1) == y).sum())
        count += n
    return loss, right, count
