"""l1 (Li et al., 2017): one-shot selection by filter magnitude.

The L1 score of channel c (docs/methods.md, "The L1 score"): the mean over the group's conv/linear producers p of
mean(|W_p[c]|), the mean absolute value of the filter. Groups whose only producers are vectors
(norm scales, biases, embeddings added to a stream) fall back to those. A group of whole
attention heads also counts its consumers' slices, the output projection's columns of each head
(a head's q, k, v rows alone miss how much it adds downstream). `l1_scores` is shared with the
regularization methods, which rank by the same score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.fx as fx

from pcompiler.ir import ChannelGroup, ParamSlice, Program, Role, tensor_of
from pcompiler.passes.select import MethodPass
from pcompiler.passmanager import register_pass


def slice_magnitude(w: torch.Tensor, p: ParamSlice) -> np.ndarray:
    """mean |w| over each channel's slices: shape (channels,)."""
    per_pos = w.detach().float().abs().movedim(p.dim, 0).reshape(w.shape[p.dim], -1).mean(1).cpu().numpy()
    return per_pos[p.index].mean(1)


def group_l1(gm: fx.GraphModule, group: ChannelGroup) -> np.ndarray:
    producers = group.producers
    filters = [p for p in producers if tensor_of(gm, p.param).ndim >= 2]
    if group.heads:  # a head's q, k, v rows and its output projection's columns (what it adds downstream)
        filters += [p for p in group.params if p.role == Role.CONSUME and tensor_of(gm, p.param).ndim >= 2]
    use = filters or list(producers)
    return np.mean([slice_magnitude(tensor_of(gm, p.param), p) for p in use], axis=0)


def l1_scores(prog: Program) -> dict[int, np.ndarray]:
    analysis = prog.require_analysis("l1 scoring")
    return {g.id: group_l1(prog.gm, g) for g in analysis.prunable}


@register_pass
@dataclass(frozen=True)
class L1(MethodPass):
    """Remove the channels with the smallest L1 filter norm."""

    name: ClassVar[str] = "l1"

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        return l1_scores(prog)
