"""Running a model without training it: its task's metric (`evaluate`: top-1 accuracy, or a
language model's perplexity) and the re-estimation of norms' running statistics
(`recalibrate_norms`).

Both run on the device they are given without moving the model they are handed: `evaluate` runs
the model itself where it lives there, else a copy made there (`runtime.placed`);
`recalibrate_norms` changes buffers in place, so it needs the model on that device
(its caller, the recalibrate pass, places its own copy there).
"""

from __future__ import annotations

import torch
from torch import nn

from pcompiler.costs import eval_mode
from pcompiler.runtime import lives_on, placed
from pcompiler.tasks import CLASSIFICATION, Classification, totals

RUNNING_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, *, device: str | torch.device = "cpu",
             batch_size: int = 256, task: Classification = CLASSIFICATION) -> float:
    """`task`'s metric of `model` on `dataset` (top-1 accuracy; a language model's perplexity),
    in eval mode on `device`; `model` is left as it was."""
    device = torch.device(device)
    net = placed(model, device)
    if task is not CLASSIFICATION:
        batch_size = max(1, min(batch_size, 4))  # windows of hundreds of tokens, logits over a vocabulary each
    with eval_mode(net):
        return task.score(totals(task, net, torch.utils.data.DataLoader(dataset, batch_size=batch_size), device))


def norms_with_running_stats(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, RUNNING_STAT_NORMS) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def recalibrate_norms(model: nn.Module, dataset: torch.utils.data.Dataset, *, batches: int, batch_size: int = 64,
                      seed: int = 0, device: str | torch.device = "cpu", task: Classification = CLASSIFICATION) -> int:
    """Re-estimate the running statistics of every norm that keeps them, on `batches` batches of
    `dataset` (no augmentation, no gradients); returns the number of norms. `model` lives on `device`.

    The statistics are reset and then averaged over the batches with equal weight (momentum None),
    so the result does not depend on what they were. The batches are a seeded draw, the same in
    every process: under DDP every rank computes the same statistics without communicating.
    Parameters are untouched; the modes are restored after."""
    device = torch.device(device)
    norms = norms_with_running_stats(model)
    if not norms or batches <= 0:
        return len(norms)
    if not lives_on(model, device):
        raise ValueError(f"recalibrate_norms changes the model in place: place it on {device} first "
                         "(pcompiler.runtime.copy_to)")
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[:batches * batch_size].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size)
    try:
        with eval_mode(model):
            for m in norms:
                m.training = True
            for x, _ in loader:
                if len(x) > 1:  # a batch of one has no variance to estimate
                    task.call(model, x.to(device))
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
    return len(norms)
