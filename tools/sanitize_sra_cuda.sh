#!/usr/bin/env bash
# compute-sanitizer recipe for the CUDA SRA kernels: memcheck (out-of-bounds / misaligned accesses),
# racecheck (shared-memory hazards), synccheck and initcheck over tools/sra_cuda_smoke.py's small shapes.
# Needs a GPU, the extension built with CUDA kernels, and compute-sanitizer (CUDA toolkit). Skips (exit 0)
# with a message when any of them is missing, so a GPU self-check can always call it; with
# SANITIZE_REQUIRE=1 (the device check on a GPU) a missing one fails instead.
#   PYTHON=.venv/bin/python tools/sanitize_sra_cuda.sh [tool ...]     (default: memcheck racecheck synccheck initcheck)
# The repository root goes first on PYTHONPATH (the package may be built in place, not installed), and the
# smoke script's imports are checked first, with the same interpreter and environment as the sanitized run:
# an import error fails here, not as a sanitizer finding, and is never hidden behind a skip.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
"$PY" tools/sra_cuda_smoke.py --import-only || { echo "!! sanitize_sra_cuda: tools/sra_cuda_smoke.py cannot import its modules"; exit 1; }
SAN=$(command -v compute-sanitizer || true)
for c in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
  [ -z "$SAN" ] && [ -n "$c" ] && [ -x "$c/bin/compute-sanitizer" ] && SAN="$c/bin/compute-sanitizer"
done
missing() {
  if [ "${SANITIZE_REQUIRE:-0}" = 1 ]; then echo "!! sanitize_sra_cuda: $1 (SANITIZE_REQUIRE=1)"; exit 1; fi
  echo "sanitize_sra_cuda: $1; skipped"; exit 0
}
[ -n "$SAN" ] || missing "compute-sanitizer not found"
"$PY" -c "import sys, torch; from dare_kernels import _ext; sys.exit(0 if torch.cuda.is_available() and _ext.has_cuda_kernels() else 1)" \
  || missing "no CUDA device or no CUDA build of the extension"
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
