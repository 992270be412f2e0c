"""Train the bundled example model on scikit-learn's handwritten digits; write the checkpoint.

    python examples/train_digits.py              # writes examples/digits_resnet.pt
    python examples/train_digits.py --arch vgg   # writes examples/digits_vgg.pt (no residual adds)
    python examples/train_digits.py --arch vit   # writes examples/digits_vit.pt (a small ViT, AdamW)

Digits: 1797 real 8x8 grey images (bundled with scikit-learn, no download), scaled to [0, 1],
split 80/20 with seed 0 (the same split `--data digits` uses). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcompiler.data import load_data
from pcompiler.example_models import DigitsResNet, DigitsVGG, DigitsViT

ARCHS = {"resnet": DigitsResNet, "vgg": DigitsVGG, "vit": DigitsViT}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet")
    ap.add_argument("-o", "--out", help="default: examples/digits_<arch>.pt")
    ap.add_argument("--epochs", type=int, help="default: 30, 100 for the ViT")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out = args.out or str(Path(__file__).with_name(f"digits_{args.arch}.pt"))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = load_data("digits")
    (xtr, ytr), (xva, yva) = data.train.tensors, data.val.tensors
    model = ARCHS[args.arch]()
    vit = args.arch == "vit"
    args.epochs = args.epochs or (100 if vit else 30)
    # A transformer from scratch wants AdamW; the CNNs train with SGD.
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05) if vit
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
    steps = args.epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3 if vit else 0.1, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            # small random shifts: the digits are tiny, a pixel of jitter helps generalization
            xb = torch.roll(xtr[idx], shifts=tuple(int(s) for s in rng.integers(-1, 2, size=2)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xva).argmax(1) == yva).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  val acc {acc:.4f}")
    torch.save(model, args.out)
    print(f"wrote {args.out} (val acc {acc:.4f})")


if __name__ == "__main__":
    main()
