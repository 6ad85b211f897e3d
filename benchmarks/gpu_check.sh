#!/usr/bin/env bash
# The CUDA check of docs/speed.md, in one go (under 8 minutes on one modern GPU).
#
# Needs: a CUDA GPU, this project installed in a clean venv
#   (python -m venv .venv && .venv/bin/pip install -e '.[dev]' -c .ci/constraints.txt),
#   and ../shared (weights/dinov2_vits14.safetensors, data/ecssd-dev/).
# Runs: the CUDA-marked tests; bench_engine's interleaved rounds at 448 and 896 px, batch
#   1/8/32, each precision (run vs bare fp32 backbone images/s, peak GPU memory); masks on
#   the GPU against the CPU's fp32 masks on 50 ecssd-dev images. Prints one table and
#   writes gpu_check.json (put its figures in docs/speed.md).
#
#   bash benchmarks/gpu_check.sh            # the check (PYTHON=.venv/bin/python to choose)
#   bash benchmarks/gpu_check.sh --dry-run  # print the steps, run nothing
#   bash benchmarks/gpu_check.sh --cpu      # the same code on the CPU at tiny sizes (smoke)
#
# Until it has run on a GPU, the CUDA path is unmeasured.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-.}
mode=${1:-}
case "$mode" in
  "" | --dry-run | --cpu) ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --cpu]" >&2; exit 2 ;;
esac

if [ "$mode" = "--cpu" ]; then
  check_args=(--device cpu --quick)
  tests=(tests/test_precision.py)
  limit=1800  # a 2-core CPU shared with other jobs
else
  check_args=(--device cuda)
  tests=(tests)
  limit=420
fi
steps=(
  "$PYTHON -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)'"
  "timeout 120 $PYTHON -m pytest -q -m cuda ${tests[*]}"
  "timeout $limit $PYTHON -m benchmarks.gpu_check ${check_args[*]} --json $OUT/gpu_check.json"
)
if [ "$mode" = "--cpu" ]; then
  steps=("${steps[@]:1}")
fi

for step in "${steps[@]}"; do
  echo "+ $step"
  if [ "$mode" != "--dry-run" ]; then
    start=$SECONDS
    status=0
    eval "$step" || status=$?
    if [ "$status" != 0 ]; then
      if [ "$status" = 3 ]; then
        echo "torch sees no CUDA device: the CUDA path stays unmeasured" >&2
      else
        echo "step failed (exit $status; 124: it ran past its timeout)" >&2
      fi
      exit "$status"
    fi
    echo "  ($((SECONDS - start)) s)"
  fi
done
if [ "$mode" != "" ]; then
  echo "the CUDA path is unmeasured: this was ${mode}, not the check on a GPU"
fi
