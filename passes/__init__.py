"""The passes. Importing this package registers every pass by name (see pcompiler.passmanager).

One file per pass: trace (builds the Program; `pcompiler.trace` is its entry point), analyze, the methods (l1, random, calib (calibrated.py), slimming, greg1, greg2, tpp, receding), slim, compensate, verify, recalibrate, evaluate, finetune, hf_widths (the widths a Hugging Face config holds), hf_config
(widths its config class accepts).
`regularize` holds what the training methods share;
`select` holds the selection rules the methods share; `rules/` the op rules of analyze/slim.
"""

from pcompiler.passes import (  # noqa: F401
    analyze,
    calibrated,
    compensate,
    evaluate,
    finetune,
    greg1,
    greg2,
    hf_config,
    hf_widths,
    l1,
    random,
    recalibrate,
    receding,
    slim,
    slimming,
    tpp,
    trace,
    verify,
)
