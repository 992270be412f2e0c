"""Checkpoints of a training phase: written atomically, refused on resume when the settings that
shape the run differ, with every rank's RNG states so that a resumed run ends with the weights an
uninterrupted one ends with (`pcompiler.train` writes and reads them)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pcompiler.errors import CompileError
from pcompiler.outdir import atomic_write

if TYPE_CHECKING:
    from pcompiler.train import TrainConfig

# What must be equal between the interrupted run and its resume (besides the world size).
RESUME_KEYS = ("steps", "lr", "batch_size", "seed", "schedule", "momentum", "weight_decay", "distill")


def save(path: str, state: dict[str, Any]) -> None:
    """Write atomically: a kill while writing leaves the previous checkpoint intact."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load(cfg: TrainConfig, world_size: int) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: none, or not resuming); refused when it was written
    with other settings."""
    if not (cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists()):
        return None
    state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=False)
    saved, now = state.get("config", {}), asdict(cfg)
    differ = [k for k in RESUME_KEYS if saved.get(k) != now[k]]
    if differ or state.get("world_size") != world_size:
        what = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in differ) or "world size"
        raise CompileError(f"cannot resume from {cfg.checkpoint}: it was written with other settings ({what})",
                           hint="resume with the options of the interrupted run, or delete the checkpoint")
    return state


def gather_rng(world_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (dropout draws from them), indexed by rank; every rank takes part."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world_size == 1:
        return [mine]
    states: list = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def set_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
