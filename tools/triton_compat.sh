#!/usr/bin/env bash
# The Triton interpreter tests under triton 3.6.0, the version of the lent GPU machines' image (CI runs
# them under its own pinned version through pytest as well). Creates or reuses .venv-triton36 (torch
# 2.13.0 CPU, triton 3.6.0, the test dependencies; NumPy unpinned, so the NumPy >= 2.4 case of
# dare_kernels/triton/_compat.py is covered) and runs the files under TRITON_INTERPRET=1, time-boxed.
#   TRITON36_VENV=path       the venv (default .venv-triton36)
#   TRITON36_TIMEOUT=secs    limit of the pytest run (default 900); exceeding it fails
#   TRITON36_JOBS=n          pytest-xdist workers (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TRITON36_VENV:-.venv-triton36}
TIMEOUT=${TRITON36_TIMEOUT:-900}
JOBS=${TRITON36_JOBS:-2}
TESTS=(tests/test_sra_triton.py tests/test_cfg_triton.py tests/test_triton_configs.py)

start=$(date +%s)
if ! "$VENV/bin/python" -c "import torch, triton, pytest, xdist, hypothesis, expecttest
assert triton.__version__ == '3.6.0', triton.__version__" 2>/dev/null; then
  if [ "${DARE_KERNELS_OFFLINE:-0}" = "1" ]; then
    echo "triton_compat: skipped: no $VENV with triton 3.6.0 here and DARE_KERNELS_OFFLINE=1 (no package index)"
    exit 0
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.0" numpy \
    "pytest>=8" pytest-xdist hypothesis expecttest
fi
"$VENV/bin/python" -c "import numpy, torch, triton; print(f'triton_compat: triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}')"
existing=()
for t in "${TESTS[@]}"; do [ -f "$t" ] && existing+=("$t"); done
rc=0
TRITON_INTERPRET=1 timeout "$TIMEOUT" "$VENV/bin/python" -m pytest "${existing[@]}" -q -ra -n "$JOBS" \
  -p no:cacheprovider -p no:benchmark || rc=$?
echo "triton_compat: exit $rc after $(( $(date +%s) - start )) s (limit ${TIMEOUT} s for pytest; 124 = timed out)"
exit "$rc"
