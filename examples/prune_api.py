"""The README's main command as Python: TPP at ratio 0.5 on the digits example, with the pass API.

    python examples/prune_api.py [--steps 2200] [--out out_api/]

Same pipeline as `pcompile examples/digits_resnet.pt --method tpp --ratio 0.5 --data digits -o out/`,
built by the same builder from the same settings: trace, analyze, evaluate, TPP (regularization
training, then selection), slim, compensate, verify, evaluate, recalibrate, evaluate, fine-tune,
evaluate; then the ONNX export and report.json. The passes are listed first, then run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pcompiler
from pcompiler.data import load_data
from pcompiler.loading import load_model
from pcompiler.pipeline import Settings, build, compile_model
from pcompiler.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2200, help="regularization step budget")
    ap.add_argument("--out", default="out_api")
    args = ap.parse_args()

    data = load_data("digits")
    model = load_model(Path(__file__).with_name("digits_resnet.pt"))
    settings = Settings(method="tpp", ratio=0.5, reg_steps=args.steps, train=TrainConfig(lr=1e-3))
    print("passes:", ", ".join(p.name for p in build(settings, data)))
    prog, report = compile_model(model, settings, data=data, out_dir=args.out, formats=("onnx",))
    assert isinstance(prog, pcompiler.Program) and report is not None
    info = prog.info
    print(f"accuracy {info['acc_before']:.4f} -> {info['acc_pruned']:.4f} (pruned) -> {info['acc_final']:.4f} "
          f"(fine-tuned); FLOPs x{1 / report['flops_ratio']:.2f} fewer; report in {args.out}/report.json")


if __name__ == "__main__":
    main()
