#!/usr/bin/env bash
# Sets up $VENV (default .venv) for dare_kernels on a fresh machine (Python >= 3.10, no torch needed
# beforehand) and builds the extension against the torch in it. Every step says what it does.
# Idempotent: a second run installs nothing new (a stamp in the venv records what was installed) and
# only recompiles what changed.
#   EXTRAS=test|bench|test,bench   optional dependencies to install (default test,bench; `make bench`: bench)
#   DARE_KERNELS_OFFLINE=1         no package index (the GPU machines): use what is installed, say what is not
#                                  (also detected: an index that does not answer in a few seconds)
#   MAX_JOBS=N                     parallel compile jobs of the extension
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test,bench}
step() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  # system site-packages: a GPU machine's preinstalled CUDA torch (and triton) are used as they are
  step "creating $VENV ($("$PY" --version 2>&1), system site-packages visible)"
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check --progress-bar off "$@"; }

offline=${DARE_KERNELS_OFFLINE:-}
if [ -z "$offline" ]; then
  step "checking that the package index answers (DARE_KERNELS_OFFLINE=1 skips this)"
  if "$VPY" -m pip install --dry-run --no-deps --retries 0 --timeout 5 --disable-pip-version-check -q \
      --upgrade pip >/dev/null 2>&1; then offline=0; else offline=1; step "no package index: offline set-up"; fi
fi

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ "$offline" = "1" ]; then
    step "ERROR: no torch in $VENV and no package index; install torch first"; exit 1
  fi
  # no torch yet: the CPU wheel (a CUDA machine brings its own torch)
  step "installing torch 2.13.0 (CPU wheel; about a minute)"
  pip_install "torch==2.13.0" || pip_install torch
fi
step "torch $("$VPY" -c 'import torch; print(torch.__version__)')"

stamp="$VENV/.dare_kernels-setup"
key="$(cat pyproject.toml setup.py | "$VPY" -c 'import hashlib,sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:16])') extras=$EXTRAS"
if [ "$offline" = "1" ]; then
  # a machine without a package index (the lent GPU machines): the package itself, no dependencies fetched
  step "offline: installing the package itself (editable, no dependencies fetched)"
  DARE_KERNELS_BUILD_EXT=0 pip_install -q --no-index --no-deps --no-build-isolation -e .
  missing=$("$VPY" - "$EXTRAS" <<'EOF'
import importlib.util, sys
want = {"test": ["pytest", "xdist", "hypothesis", "expecttest", "diffusers", "transformers", "matplotlib", "triton"],
        "bench": ["pytest", "pytest_benchmark", "matplotlib", "diffusers", "transformers"]}
mods = sorted({m for e in sys.argv[1].split(",") for m in want.get(e, [])})
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
  if [ -n "$missing" ]; then
    step "offline: not installed here: $missing (the tests and benchmarks that need them are skipped, with the reason)"
  fi
elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  step "dependencies [$EXTRAS] already installed (remove $stamp to reinstall)"
else
  step "installing build tools (setuptools, wheel, cmake>=3.26, ninja)"
  pip_install "setuptools>=64" wheel "cmake>=3.26" ninja
  step "installing dare_kernels (editable) with [$EXTRAS] and their dependencies"
  DARE_KERNELS_BUILD_EXT=0 pip_install --no-build-isolation -e ".[${EXTRAS}]"
  echo "$key" >"$stamp"
fi

# the extension, built here rather than inside pip so its progress shows (pip hides a build's output);
# a persistent CMake folder keyed by torch version (build/cmake-*) makes a second run recompile only changes
step "building the extension dare_kernels._C against torch $("$VPY" -c 'import torch; print(torch.__version__)')"
"$VPY" setup.py -q build_ext --inplace
step "done; what is usable here:"
"$VPY" -m dare_kernels info
