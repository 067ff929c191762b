#!/usr/bin/env bash
# compute-sanitizer recipe for the CUDA SRA kernels: memcheck (out-of-bounds / misaligned accesses),
# racecheck (shared-memory hazards), synccheck and initcheck over tools/sra_cuda_smoke.py's small shapes.
# Needs a GPU, the extension built with CUDA kernels, and compute-sanitizer (CUDA toolkit). Skips (exit 0)
# with a message when any of them is missing, so a GPU self-check can always call it.
#   PYTHON=.venv/bin/python tools/sanitize_sra_cuda.sh [tool ...]     (default: memcheck racecheck synccheck initcheck)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SAN=$(command -v compute-sanitizer || true)
for c in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
  [ -z "$SAN" ] && [ -n "$c" ] && [ -x "$c/bin/compute-sanitizer" ] && SAN="$c/bin/compute-sanitizer"
done
if [ -z "$SAN" ]; then echo "sanitize_sra_cuda: compute-sanitizer not found; skipped"; exit 0; fi
if ! "$PY" -c "import sys, torch; from dare_kernels import _ext; sys.exit(0 if torch.cuda.is_available() and _ext.has_cuda_kernels() else 1)"; then
  echo "sanitize_sra_cuda: no CUDA device or no CUDA build of the extension; skipped"; exit 0
fi
TOOLS=("$@")
[ ${#TOOLS[@]} -eq 0 ] && TOOLS=(memcheck racecheck synccheck initcheck)
status=0
for tool in "${TOOLS[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  # only our kernels (names contain "sra_"): torch's own kernels are not under test
  "$SAN" --tool "$tool" --error-exitcode 99 --kernel-name kns=sra_ \
    "$PY" tools/sra_cuda_smoke.py || { echo "!! $tool failed"; status=1; }
done
exit $status
