"""Generation speed of a causal language model, original against slim: prefill latency and decode
tokens per second with the KV cache on, timed alternately (`bench.alternate`).

The models are Hugging Face causal LMs (`is_causal_lm`: a `generate` method and a config that
says it decodes): the user's model and the slim `hf/` folder, which keep the cache (graphs and
ONNX files take no cache: a decoder is served with one). Per backend that runs an nn.Module
(`torch-cpu`, the model in its own dtype; `torch-cuda-fp32` and `torch-cuda-bf16` where torch
sees a GPU, on a copy made there) and per batch size (`BATCHES`: 1 and 8), on a prompt of
`prompt` random tokens:

- prefill: one forward of the prompt with `use_cache=True`, seconds (p50 and the rest of `Timing`);
- decode: `generate` of `new` tokens, greedy and never stopping early, timed whole; its first
  token comes from the prefill forward, so one decode step takes (generate p50 - prefill p50) /
  (new - 1), and `decode_tokens_per_s` = batch / that. The speedup is the slim model's decode
  rate over the original's; `prefill_speedup` the ratio of the prefill medians.

Rows with `error` instead of timings where a backend or batch fails; the others still run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pcompiler.costs import eval_mode
from pcompiler.errors import one_line
from pcompiler.targets.backends import available_backends, cuda_device, on_device
from pcompiler.targets.bench import LatencySettings, Timing, alternate

log = logging.getLogger("pcompiler")

BATCHES = (1, 8)
# The latency backends that run the model itself: name -> (device kind, dtype; None: the model's own).
BACKENDS = {"torch-cpu": ("cpu", None), "torch-cuda-fp32": ("cuda", torch.float32), "torch-cuda-bf16": ("cuda", torch.bfloat16)}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates text with a KV cache."""
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return (callable(getattr(model, "generate", None)) and config is not None
            and any(a.endswith("ForCausalLM") for a in archs) and hasattr(config, "use_cache"))


def _calls(model: nn.Module, ids: torch.Tensor, new: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(prefill, generate) of `model` on the prompt `ids`, the cache on."""
    mask = torch.ones_like(ids)
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(model.config, "eos_token_id", None) or 0)
    sync = (lambda: torch.cuda.synchronize(ids.device)) if ids.device.type == "cuda" else (lambda: None)

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        sync()

    def generate() -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, use_cache=True, pad_token_id=pad)
        sync()

    return prefill, generate


def _placed(model: nn.Module, backend: str, device: torch.device | None) -> nn.Module:
    kind, dtype = BACKENDS[backend]
    if kind == "cpu":
        return model
    return on_device(model, (), device, dtype)[0]


def measure_generation(models: Mapping[str, nn.Module], settings: LatencySettings | None = None,
                       prompt: int = 32, new: int = 17, batches: Sequence[int] = BATCHES) -> dict[str, Any]:
    """Prefill and decode speed of each model ({"original": a, "slim": b}) on each torch backend
    this machine has (or those of `settings.backends`) and batch size (module docstring)."""
    settings = settings if settings is not None else LatencySettings()
    wanted = settings.backends if settings.backends is not None else available_backends(settings.device)
    backends = [b for b in wanted if b in BACKENDS]
    cuda = cuda_device(settings.device) if any(BACKENDS[b][0] == "cuda" for b in backends) else None
    vocab = min(int(getattr(m.config, "vocab_size", 2) or 2) for m in models.values())
    rows = []
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        for backend in backends:
            for batch in batches:
                row: dict[str, Any] = {"backend": backend, "batch": batch, "prompt": prompt, "new_tokens": new,
                                       "device": "cpu" if BACKENDS[backend][0] == "cpu" else str(cuda)}
                try:
                    _measure(row, models, backend, cuda, vocab, settings)
                except Exception as e:  # noqa: BLE001 - one backend failing is a result, not a crash
                    row["error"] = one_line(e)
                    log.warning("generation bench %s at batch %d failed: %s", backend, batch, row["error"])
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                rows.append(row)
    skipped = [b for b in wanted if b not in BACKENDS]
    return {"rows": rows, "skipped": {b: "runs graphs without a KV cache" for b in skipped}}


def _measure(row: dict[str, Any], models: Mapping[str, nn.Module], backend: str, cuda: torch.device | None,
             vocab: int, settings: LatencySettings) -> None:
    batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
    device = torch.device("cpu") if BACKENDS[backend][0] == "cpu" else cuda
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    prefills, generates = {}, {}
    for name, model in models.items():
        prefills[name], generates[name] = _calls(_placed(model, backend, cuda), ids, new)
    # Fewer repetitions than a forward's: a call is new forwards long.
    timing = dataclasses.replace(settings, min_reps=max(3, settings.min_reps // 3), max_reps=max(5, settings.max_reps // 10))
    first = alternate(prefills, timing)
    whole = alternate(generates, timing)
    for name in models:
        pre, gen = statistics.median(first[name]), statistics.median(whole[name])
        step = max(gen - pre, 1e-12) / (new - 1)
        row[name] = {"prefill": dataclasses.asdict(Timing.of(first[name])),
                     "generate": dataclasses.asdict(Timing.of(whole[name])),
                     "decode_tokens_per_s": batch / step}
    if "original" in models and "slim" in models:
        row["speedup"] = row["slim"]["decode_tokens_per_s"] / row["original"]["decode_tokens_per_s"]
        row["prefill_speedup"] = row["original"]["prefill"]["p50"] / row["slim"]["prefill"]["p50"]
    log.info("generation %s batch %d: %s", backend, batch,
             ", ".join(f"{n} {row[n]['decode_tokens_per_s']:.3g} tokens/s" for n in models))
