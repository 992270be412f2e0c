"""The README's main command as Python: TPP at ratio 0.5 on the digits example, with the pass API.

    python examples/prune_api.py [--steps 2200] [--out out_api/]

Same pipeline as `pcompile examples/digits_resnet.pt --method tpp --ratio 0.5 --data digits -o out/`:
trace, analyze, evaluate, TPP (regularization training, then selection), slim, compensate,
verify, evaluate, recalibrate, evaluate, fine-tune, evaluate, then the ONNX export and report.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pcompiler
from pcompiler import make_pass
from pcompiler.data import load_data
from pcompiler.loading import load_model
from pcompiler.report import build_report, write_report
from pcompiler.targets.pytorch import export_all
from pcompiler.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2200, help="regularization step budget")
    ap.add_argument("--out", default="out_api")
    args = ap.parse_args()

    data = load_data("digits")
    model = load_model(Path(__file__).with_name("digits_resnet.pt"))
    prog = pcompiler.trace(model, (torch.randn(1, *data.input_shape),))
    prog = pcompiler.run(prog, [
        make_pass("analyze"),
        make_pass("evaluate", data=data, key="acc_before"),
        make_pass("tpp", ratio=0.5, data=data, steps=args.steps, train=TrainConfig(lr=1e-3)),
        make_pass("slim"),
        make_pass("compensate", data=data),
        make_pass("verify"),
        make_pass("evaluate", data=data, key="acc_before_recalibration"),
        make_pass("recalibrate", data=data),
        make_pass("evaluate", data=data, key="acc_pruned"),
        make_pass("finetune", data=data, epochs=10, train=TrainConfig(lr=1e-3, schedule="cosine")),
        make_pass("evaluate", data=data, key="acc_final"),
    ])
    export_all(prog, args.out, formats=("onnx",))
    report = build_report(prog, method="tpp", settings={"ratio": 0.5, "steps": args.steps})
    write_report(report, Path(args.out) / "report.json")
    info = prog.info
    print(f"accuracy {info['acc_before']:.4f} -> {info['acc_pruned']:.4f} (pruned) -> {info['acc_final']:.4f} "
          f"(fine-tuned); FLOPs x{1 / report['flops_ratio']:.2f} fewer; report in {args.out}/report.json")


if __name__ == "__main__":
    main()
