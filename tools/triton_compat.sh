#!/usr/bin/env bash
# The Triton versions the pins allow besides CI's own (which `make test` checks directly):
# 1. the interpreter tests under triton 3.6.0, the version of the lent GPU machines' image. Creates or
#    reuses .venv-triton36 (torch 2.13.0 CPU, triton 3.6.0, the test dependencies; NumPy unpinned, so the
#    NumPy >= 2.4 case of dare_kernels/triton/_compat.py is covered) and runs the files under
#    TRITON_INTERPRET=1, time-boxed;
# 2. the compile-only resource proof (aot_check --all: no spill, nothing over shared memory, every compile
#    OK) under 3.6.0 (that venv) and 3.8.0 (its wheel alone, --no-deps, in .triton-aot/3.8.0 on PYTHONPATH
#    over the same venv: compiling for a GPUTarget needs no matching torch). Each version's committed seed
#    (bench/results/triton_resources-<version>.json) answers the cases; --verify recompiles a random
#    sample that must reproduce it, so a stale seed or a changed kernel fails here.
#   TRITON36_VENV=path       the venv (default .venv-triton36)
#   TRITON36_TIMEOUT=secs    limit of the pytest run (default 900); exceeding it fails
#   TRITON36_JOBS=n          pytest-xdist workers and parallel compiles (default 2)
#   TRITON_AOT_VERSIONS="…"  versions of step 2 (default "3.6.0 3.8.0"; empty skips it)
#   TRITON_AOT_VERIFY=n      cached cases recompiled per version (default 6)
#   TRITON_COMPAT_TESTS=0    step 2 only (make aot-check)
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
[ "${TRITON_COMPAT_TESTS:-1}" = 0 ] || TRITON_INTERPRET=1 timeout "$TIMEOUT" "$VENV/bin/python" -m pytest "${existing[@]}" -q -ra -n "$JOBS" \
  -p no:cacheprovider -p no:benchmark || rc=$?
echo "triton_compat: interpreter tests exit $rc after $(( $(date +%s) - start )) s (limit ${TIMEOUT} s; 124 = timed out)"

for v in ${TRITON_AOT_VERSIONS-3.6.0 3.8.0}; do
  pp=""
  if ! "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$v')" 2>/dev/null; then
    pp=.triton-aot/$v
    if ! PYTHONPATH=$pp "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$v')" 2>/dev/null; then
      if [ "${DARE_KERNELS_OFFLINE:-0}" = "1" ]; then
        echo "triton_compat: aot_check under triton $v skipped: not in $pp and DARE_KERNELS_OFFLINE=1"
        continue
      fi
      rm -rf "$pp"
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$pp" "triton==$v"
    fi
  fi
  t0=$(date +%s)
  arc=0
  PYTHONPATH=$pp "$VENV/bin/python" -m dare_kernels.triton.aot_check --all --verify "${TRITON_AOT_VERIFY:-6}" \
    -j "$JOBS" | grep -E "FAIL|MISMATCH|^aot_check" || arc=$?
  echo "triton_compat: aot_check --all under triton $v: exit $arc after $(( $(date +%s) - t0 )) s"
  [ "$arc" = 0 ] || rc=1
done
echo "triton_compat: exit $rc after $(( $(date +%s) - start )) s"
exit "$rc"
