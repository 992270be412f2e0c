"""A timm sample: one small model from each of 30 timm families through the `pcompile` command,
as a user runs it.

Per model, random weights (`timm.create_model(name, pretrained=False)`): the model is saved with
`torch.save` in a child process, then

    pcompile MODEL.pt --method l1 --ratio 0.5 --input-shape 1,3,S,S --trust -o OUT --formats pt2

runs in another child process under a time limit (--timeout). Recorded per model: the exit code
(0 ok, 1 a pcompiler bug, 2 an error the user can act on, 3 verify failed), the one `error:` line,
and from OUT/report.json: verify ok and its max error, parameters before and after, groups
pruned and in all, and the seconds taken.

The command runs through this file (`--cli`), which imports `_common` first: on CPU-only torch
builds `import torchvision` (timm imports it) fails without that workaround; the arguments are
the command's own.

timm initializes some classifiers to zero (MLP-Mixer, ResMLP): every output would then be the
bias and verify would compare constants, so such a head gets random weights before saving.

Inputs are small (64x64 for most CNNs); the transformers and MLP mixers that fix their image
size are built for a small one (`img_size`), the others keep the size they need (see SAMPLE).

    python benchmarks/timm_sample.py                        # all 30, writes docs/timm_sample.*
    python benchmarks/timm_sample.py --models resnet18,levit_128s --out /tmp/sample
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (before timm and torchvision: the CPU import workaround)
from _common import DOCS, environment, markdown_table, write_json, write_text

RATIO = 0.5
# family -> (model, constructor arguments, input size)
SAMPLE: dict[str, tuple[str, dict, int]] = {
    "resnet": ("resnet18", {}, 64),
    "resnet-d": ("resnet18d", {}, 64),
    "res2net": ("res2net50_14w_8s", {}, 64),
    "resnext": ("resnext26ts", {}, 64),
    "seresnet": ("seresnet18", {}, 64),
    "regnet": ("regnetx_002", {}, 64),
    "efficientnet": ("efficientnet_b0", {}, 64),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "convnext": ("convnext_atto", {}, 64),
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    "deit (distilled)": ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 128, "window_size": 4}, 128),
    "cait": ("cait_xxs24_224", {"img_size": 64}, 64),
    "levit": ("levit_128s", {}, 224),
    "mlp-mixer": ("mixer_s32_224", {"img_size": 64}, 64),
    "resmlp": ("resmlp_12_224", {"img_size": 64}, 64),
    "ghostnet": ("ghostnet_050", {}, 64),
    "dla": ("dla46_c", {}, 64),
    "dpn": ("dpn48b", {}, 64),
    "densenet": ("densenet121", {}, 64),
    "inception": ("inception_v3", {}, 96),
    "xception": ("xception41", {}, 64),
    "hrnet": ("hrnet_w18_small", {}, 64),
    "rexnet": ("rexnet_100", {}, 64),
    "cspnet": ("cs3darknet_s", {}, 64),
    "nfnet": ("nf_regnet_b0", {}, 64),
    "poolformer": ("poolformer_s12", {}, 64),
    "edgenext": ("edgenext_xx_small", {}, 64),
    "fastvit": ("fastvit_t8", {}, 64),
}


def save_model(name: str, kwargs: dict, path: Path) -> None:
    """In the child: build the model with random weights and torch.save it whole."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    head = model.get_classifier()
    if isinstance(getattr(head, "weight", None), torch.Tensor) and not head.weight.any():
        torch.nn.init.normal_(head.weight, std=0.02)  # a zero head makes every output equal
    torch.save(model, path)


def error_line(text: str) -> str | None:
    """The command's one `error:` line; else the last line (a crash's traceback ends there)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [None])[-1]


def run_child(args: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run this file with `args` in a child process; (exit code or None on timeout, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
        out, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", None
    with log.open("a") as f:
        f.write(out if isinstance(out, str) else out.decode(errors="replace"))
    return code, out if isinstance(out, str) else out.decode(errors="replace")


def from_report(path: Path) -> dict:
    """What the sample records from the command's report.json (nothing when it wrote none)."""
    if not path.exists():
        return {}
    r = json.loads(path.read_text())
    verify, groups = r.get("verify") or {}, r.get("groups") or {}
    exports = {e["format"]: e.get("ok") for e in r.get("exports") or []}
    return {
        "verify_ok": verify.get("ok"),
        "verify_max_error": verify.get("max_error"),
        "params_before": r.get("params_before"),
        "params_after": r.get("params_after"),
        "groups_pruned": groups.get("pruned"),
        "groups_total": groups.get("total"),
        "groups_pinned_reasons": groups.get("pinned_reasons"),
        "pt2_ok": exports.get("pt2"),
    }


def run_model(family: str, workdir: Path, timeout: float) -> dict:
    name, kwargs, size = SAMPLE[family]
    model, out, log = workdir / f"{name}.pt", workdir / name, workdir / f"{name}.log"
    t0 = time.perf_counter()
    result: dict = {"family": family, "model": name, "kwargs": kwargs, "input": size}
    code, text = run_child(["--save", name, json.dumps(kwargs), str(model)], timeout, log)
    if code != 0:
        return {**result, "exit_code": None, "error": f"building the model failed: {error_line(text)}"}
    cmd = [str(model), "--method", "l1", "--ratio", str(RATIO), "--input-shape", f"1,3,{size},{size}",
           "--trust", "-o", str(out), "--formats", "pt2"]
    code, text = run_child(["--cli", *cmd], timeout, log)
    model.unlink(missing_ok=True)
    result.update(exit_code=code, error=None if code == 0 else error_line(text))
    result.update(from_report(out / "report.json"), seconds=round(time.perf_counter() - t0, 1))
    return result


def summarize(results: list[dict], env: dict) -> str:
    ok = [r for r in results if r["exit_code"] == 0 and r.get("verify_ok")]
    lines = [
        f"timm {_common.version_of('timm')}, torch {env['torch']}; random weights, `pcompile --method l1 "
        f"--ratio {RATIO} --formats pt2`, one model per family.",
        "",
        f"**{len(ok)}/{len(results)}** slimmed and verified.",
        "",
    ]
    rows = []
    for r in results:
        params = (f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M"
                  if r.get("params_after") is not None else "-")
        groups = f"{r['groups_pruned']}/{r['groups_total']}" if r.get("groups_total") is not None else "-"
        err = r.get("verify_max_error")
        rows.append([r["family"], r["model"], r["input"], r["exit_code"], r.get("verify_ok"),
                     "-" if err is None else f"{err:.2g}", params, groups, f"{r['seconds']:.0f}" if r.get("seconds") else "-", r.get("error") or ""])
    headers = ["family", "model", "input", "exit", "verify", "max error", "params", "groups pruned", "s", "error"]
    return "\n".join(lines) + "\n" + markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cli"]:
        from pcompiler.cli import main as pcompile

        return pcompile(argv[1:])
    if argv[:1] == ["--save"]:
        save_model(argv[1], json.loads(argv[2]), Path(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated model names from the sample (default: all)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child process (default 600)")
    ap.add_argument("--out", type=Path, default=DOCS, help="output folder (default docs/)")
    ap.add_argument("--workdir", type=Path, help="models, outputs and logs (default: a new temporary folder)")
    args = ap.parse_args(argv)
    wanted = set(args.models.split(",")) if args.models else None
    families = [f for f, (m, _, _) in SAMPLE.items() if wanted is None or m in wanted]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pcompiler_timm_sample_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    for i, family in enumerate(families, 1):
        r = run_model(family, workdir, args.timeout)
        results.append(r)
        print(f"[{i}/{len(families)}] {r['model']:<34} exit {r['exit_code']}  {r.get('seconds')} s"
              f"  {r.get('error') or ''}", flush=True)
    write_json(args.out / "timm_sample.json", {"environment": env, "timm": _common.version_of("timm"),
                                               "ratio": RATIO, "results": results})
    text = summarize(results, env)
    write_text(args.out / "timm_sample.md", text)
    print("\n" + text + f"\n\nwrote {args.out}/timm_sample.json and .md; logs in {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
