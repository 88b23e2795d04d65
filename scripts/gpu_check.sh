#!/usr/bin/env bash
# Device check on a CUDA machine: the Triton kernel's GPU tests and the CUDA speed table.
#
#   scripts/gpu_check.sh                # results in ./gpu_out
#   OUT=/some/dir scripts/gpu_check.sh
#
# Needs this repository, Python with torch (CUDA build) and triton; pytest and
# tabulate for the tests and the table. Installs nothing and needs no network:
# the package is imported from the working tree (PYTHONPATH). PYTHON picks the
# interpreter (default: .venv/bin/python if it sees CUDA, else python3).
# Every step has its own time limit; the whole script stays under 8 minutes (about 8 at most).
# Writes to $OUT: env.txt, tests.txt (+ tests.xml), speed_cuda.txt, e2e_cuda.txt, summary.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

status=0
: > "$OUT/summary.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (working tree differs)')"
  echo "python: $PYTHON"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  timeout 60 "$PYTHON" - <<'PY' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
PY
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if ! timeout 60 "$PYTHON" -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_check: needs torch with CUDA and triton ($PYTHON)" | tee -a "$OUT/summary.txt"
  exit 2
fi

echo "== GPU tests (tests/kernels/test_triton.py, tests/test_cuda.py; compiled kernels) =="
if timeout 30 "$PYTHON" -c "import pytest" 2>/dev/null; then
  timeout 210 "$PYTHON" -m pytest tests/kernels/test_triton.py tests/kernels/test_triton_inputs.py tests/test_cuda.py -q -rs \
    -p no:cacheprovider \
    --durations=10 --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "gpu_check: tests ran past 210 s" | tee -a "$OUT/tests.txt"
  echo "tests: exit $rc" >> "$OUT/summary.txt"
  [ "$rc" = 0 ] || status=1
else
  echo "gpu_check: pytest is not installed, tests skipped" | tee "$OUT/tests.txt"
  echo "tests: not run (no pytest)" >> "$OUT/summary.txt"
  status=1
fi

echo "== speed: SDPA flash vs the tiled op (Triton), bf16 =="
timeout 180 "$PYTHON" benchmarks/speed.py --device cuda --lengths 4096 8192 16384 32768 65536 \
  --sdpa-max 65536 --budgets 0.25 0.1 --repeat 5 --profile 2>&1 | tee "$OUT/speed_cuda.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check: speed ran past 180 s" | tee -a "$OUT/speed_cuda.txt"
echo "speed: exit $rc" >> "$OUT/summary.txt"
[ "$rc" = 0 ] || status=1

echo "== end to end: SmolLM2's architecture (random weights), original vs converted, bf16 =="
timeout 100 "$PYTHON" benchmarks/e2e.py --device cuda --random-weights --lengths 8192 32768 \
  --budgets 0.25 0.1 --repeat 3 2>&1 | tee "$OUT/e2e_cuda.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check: e2e ran past 100 s" | tee -a "$OUT/e2e_cuda.txt"
echo "e2e: exit $rc" >> "$OUT/summary.txt"
[ "$rc" = 0 ] || status=1

cat "$OUT/summary.txt"
exit $status
