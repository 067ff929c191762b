#!/usr/bin/env bash
# Sets up .venv for dare_kernels on a fresh machine (Python 3.11, no torch needed beforehand) and
# builds the extension. Idempotent: a second run only rebuilds what changed.
#   EXTRAS=test|bench|test,bench   which optional dependencies to install (default: test,bench)
#   DARE_KERNELS_OFFLINE=1         no package index (GPU machines): build with what is installed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test,bench}

if [ ! -x "$VENV/bin/python" ]; then
  # system site-packages: a GPU machine's preinstalled CUDA torch (and triton) are used as they are
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  # no torch yet: the CPU wheel (a CUDA machine brings its own torch)
  pip_install "torch==2.13.0" || pip_install torch
fi
export DARE_KERNELS_REQUIRE_EXT=${DARE_KERNELS_REQUIRE_EXT:-1}
if [ "${DARE_KERNELS_OFFLINE:-0}" = "1" ]; then
  # a machine without a package index (the lent GPU machines): use what is installed, no extras
  pip_install --no-index --no-deps --no-build-isolation -e .
else
  pip_install "setuptools>=64" wheel "cmake>=3.26" ninja
  pip_install --no-build-isolation -e ".[${EXTRAS}]"
fi
"$VPY" -m dare_kernels info
