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

stamp="$VENV/.dare_kernels-setup"
key="$(cat pyproject.toml setup.py | sha1sum | cut -c1-16) extras=$EXTRAS"
have_torch=1; "$VPY" -c "import torch" 2>/dev/null || have_torch=0
offline=${DARE_KERNELS_OFFLINE:-}
if [ -z "$offline" ]; then
  if [ "$have_torch" = "1" ] && [ -f "$stamp" ] && grep -qxF -e "$key" -e "$key offline" "$stamp"; then
    offline=0  # nothing to install: the index is not asked
  else
    step "checking that the package index answers (DARE_KERNELS_OFFLINE=1 skips this)"
    if "$VPY" -m pip install --dry-run --no-deps --retries 0 --timeout 5 --disable-pip-version-check -q \
        --upgrade pip >/dev/null 2>&1; then offline=0; else offline=1; step "no package index: offline set-up"; fi
  fi
fi

if [ "$have_torch" = "0" ]; then
  if [ "$offline" = "1" ]; then
    step "ERROR: no torch in $VENV and no package index; install torch first"; exit 1
  fi
  # no torch yet: the CPU wheel (a CUDA machine brings its own torch)
  step "installing torch 2.13.0 (CPU wheel; about a minute)"
  pip_install "torch==2.13.0" || pip_install torch
fi
if [ "$offline" = "1" ]; then key="$key offline"; fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  step "dependencies [$EXTRAS] already installed (remove $stamp to reinstall)"
elif [ "$offline" = "1" ]; then
  # a machine without a package index (the lent GPU machines): the package itself, no dependencies fetched
  step "offline: installing the package itself (editable, no dependencies fetched)"
  DARE_KERNELS_BUILD_EXT=0 pip_install -q --no-index --no-deps --no-build-isolation -e .
  echo "$key" >"$stamp"
else
  step "installing build tools (setuptools, wheel, cmake>=3.26, ninja)"
  pip_install "setuptools>=77" wheel "cmake>=3.26" ninja
  step "installing dare_kernels (editable) with [$EXTRAS] and their dependencies"
  DARE_KERNELS_BUILD_EXT=0 pip_install --no-build-isolation -e ".[${EXTRAS}]"
  case ",$EXTRAS," in
    *,test,*)
      # the Triton interpreter suite on a CPU-only torch (a CUDA torch brings the triton it was built with)
      if "$VPY" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)" \
         && [ "$(uname -sm)" = "Linux x86_64" ]; then
        step "installing triton 3.7.1 for the CPU interpreter tests"
        pip_install "triton==3.7.1"
      fi ;;
  esac
  echo "$key" >"$stamp"
fi
if [ "$offline" = "1" ]; then
  missing=$("$VPY" -c '
import importlib.util, sys
want = {"test": ["pytest", "xdist", "hypothesis", "expecttest", "diffusers", "transformers", "matplotlib", "triton"],
        "bench": ["pytest", "pytest_benchmark", "matplotlib", "diffusers", "transformers"]}
mods = sorted({m for e in sys.argv[1].split(",") for m in want.get(e, [])})
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))' "$EXTRAS")
  if [ -n "$missing" ]; then
    step "offline: not installed here: $missing (the tests and benchmarks that need them are skipped, with the reason)"
  fi
fi

# the extension, built here rather than inside pip so its progress shows (pip hides a build's output);
# a persistent CMake folder keyed by torch version (build/cmake-*) makes a second run recompile only changes
step "building the extension dare_kernels._C against torch $("$VPY" -c 'import torch; print(torch.__version__)') (only what changed)"
"$VPY" setup.py -q build_ext --inplace
step "done; what is usable here:"
"$VPY" -m dare_kernels info
