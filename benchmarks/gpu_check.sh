#!/usr/bin/env bash
# One-shot GPU check (issue 21, item 4): everything that needs CUDA, run once on a lent GPU
# machine, every result in ONE JSON file, OUT/gpu_check.json (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--dry | --dry-cpu] [--out DIR] [--budget S] [--steps a,b]
#                                [--python PY] [--wheelhouse DIR]
#
#   --out DIR      where gpu_check.json and logs/ go (default: $OUT if set, else a temporary folder)
#   --dry          run no CUDA step (also automatic without CUDA): check packages, collect the GPU
#                  tests, parse every command with the CLI's own parser, build the latency models
#   --dry-cpu      --dry, and run the command-line steps on the CPU (--reg-steps 20
#                  --finetune-epochs 0.2) and a tiny latency run on torch-cpu (about 1-2 min)
#   --rehearse-cpu to test the checker itself without a GPU: the GPU code path (not the dry checks)
#                  with CPU variants of each step (about 1.5 min on 2 cores)
#   --budget S     seconds for the whole check from this script's start (default 450: with the
#                  device tool's 8-minute limit there is room to spare)
#   --steps LIST   only these steps: pytest-gpu, main-tpp-amp, distill-greg1-amp, latency-cuda,
#                  latency-model-cuda, torchrun-ddp
#   --python PY    the interpreter with the machine's torch (default: the first of python3.12,
#                  python3, python, .venv/bin/python that imports torch)
#   --wheelhouse   folder of wheels to install missing packages from (default: .whl/)
#
# On the device machine (the device tool's `run`, in the repository root, $OUT set; carry .whl):
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
#
# What it does:
#   (a) makes a throwaway virtual environment in a temporary folder with --system-site-packages
#       and without pip of its own, so the machine's CUDA torch (and its pip) is used as it is,
#       and nothing is installed into the machine's own Python;
#   (b) maps the package folders as pyproject.toml's [tool.setuptools.package-dir] does
#       (pcompiler -> pcompiler/, pcompiler.passes -> passes/, pcompiler.targets -> targets/) with
#       an import hook loaded by a .pth file in that environment: what an editable install does,
#       but without setuptools, pip or network, and in every process of that interpreter
#       (torchrun's workers and the tests' subprocesses too; PYTHONPATH alone cannot, since
#       `python -m` from the repository root finds pcompiler/ first, without passes/);
#   (c) installs what is missing from the wheelhouse .whl/, offline (pip install --no-index
#       --find-links .whl), with the installed torch, torchvision, triton, numpy, onnx and
#       onnxruntime pinned so that nothing replaces them (torch never comes from the wheelhouse);
#   (d) runs benchmarks/gpu_check.py, which writes OUT/gpu_check.json (after each step, so a run
#       stopped from outside keeps what it had), OUT/logs/ (each step's full stdout and stderr,
#       setup.log, setup.json) and the step outputs (OUT/main-tpp-amp/report.json, ...), and
#       prints a summary table. Exit code: 0 all ok or skipped, 1 a step failed, 2 the checker broke.
#
# The wheelhouse (.whl/, ignored by git; at most 64 MiB with anything else carried). The GPU
# machine has Python 3.12 with torch (CUDA), torchvision, timm, onnx and CPU onnxruntime, and no
# network. What the steps need on top of that:
#   every pcompile run (steps 2, 3, 5; step 1's test files import the CLI):
#                        click, rich (markdown-it-py, mdurl, pygments), scipy (the analyze pass)
#   --data digits (2, 3, 5): scikit-learn (joblib, threadpoolctl, narwhals)
#   the ONNX export of step 2 (torch's dynamo exporter; without it the legacy exporter is tried):
#                        onnxscript (onnx-ir, ml-dtypes)
#   step 1:              pytest (iniconfig, pluggy, packaging, pygments)
#   step 4:              scipy; transformers is optional: without it the decoder is
#                        benchmarks/llm_meta.py's plain-torch LLaMA of the same widths
#   optional:            matplotlib (report plots only; without it the report has no plots)
# Prepare it on a machine with network (any OS: the platform options pick the GPU machine's
# wheels), from the repository root. --no-deps keeps out what the GPU machine already has (numpy,
# onnx, protobuf, sympy, torch and its nvidia-* wheels, ...); the versions are the ones .venv runs:
#
#   rm -rf .whl && python3 -m pip download -d .whl --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     click==8.5.1 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 \
#     scipy==1.17.1 scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 \
#     onnxscript==0.7.2 onnx-ir==1.1.0 ml-dtypes==0.7.0 \
#     pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4
#   du -sh .whl     # about 47 MiB (scipy 34, scikit-learn 9); transformers with its tokenizers,
#                   # regex, typer and huggingface-hub>=1.31 would add about 20 MiB: over 64
#
# A package the wheelhouse lacks is recorded as missing in the JSON, and each step that needs it
# is skipped with that reason; setup problems are in OUT/logs/setup.log.
set -uo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
T0=$(date +%s)

OUTDIR="" PY="${GPU_CHECK_PYTHON:-}" WHEELHOUSE="$ROOT/.whl"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUTDIR=${1#*=}; shift ;;
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ -z "$OUTDIR" ]; then
  OUTDIR=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
fi
mkdir -p "$OUTDIR/logs" || exit 2
OUTDIR=$(cd -- "$OUTDIR" && pwd)
LOG="$OUTDIR/logs/setup.log"
: >"$LOG"
say() { printf '[gpu_check.sh] %s\n' "$*" | tee -a "$LOG" >&2; }

# The interpreter: the first that imports torch.
if [ -z "$PY" ]; then
  for c in python3.12 python3 python "$ROOT/.venv/bin/python"; do
    p=$(command -v "$c" 2>/dev/null) || continue
    if "$p" -c 'import torch' >/dev/null 2>&1; then PY=$p; break; fi
  done
  if [ -z "$PY" ]; then
    PY=$(command -v python3 || command -v python) || { say "no python found"; exit 2; }
    say "no interpreter imports torch; using $PY (the steps that need torch will fail or be skipped)"
  fi
fi
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)); out: $OUTDIR"

# (a) a throwaway environment on top of the machine's packages.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_env.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VPY=$PY VENV=""
if "$PY" -m venv --without-pip --system-site-packages "$WORK/venv" >>"$LOG" 2>&1; then
  VPY="$WORK/venv/bin/python" VENV="$WORK/venv"
else
  say "could not make a virtual environment (see setup.log); using $PY itself (user site, pip --user)"
fi

# (b) + (c): map the package folders, install what is missing from the wheelhouse.
SETUP=("$VPY" "$ROOT/benchmarks/gpu_check.py" --setup --out "$OUTDIR" --parent-python "$PY")
[ -n "$VENV" ] && SETUP+=(--venv "$VENV")
[ -d "$WHEELHOUSE" ] && SETUP+=(--wheelhouse "$WHEELHOUSE")
if ! "${SETUP[@]}" 2>>"$LOG"; then
  say "setup failed (see $LOG); running the check anyway"
fi

# (d) the check.
"$VPY" "$ROOT/benchmarks/gpu_check.py" --out "$OUTDIR" --t0 "$T0" ${ARGS[@]+"${ARGS[@]}"}
exit $?
