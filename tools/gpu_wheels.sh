#!/usr/bin/env bash
# diffusers for a GPU machine without a network: fetch its wheels on a machine with a package index, carry
# the folder with the tree, install them there offline (tools/gpu_check.sh part 2 runs `install`).
#
#   bash tools/gpu_wheels.sh fetch      wheels of diffusers and of what it needs beyond a CUDA torch image
#                                       (torch's own requirements and numpy are left out: the image has them)
#                                       into .gpu_wheels/ (ignored by git), for CPython $GPU_PYTHON on
#                                       manylinux x86_64; prints their total size
#   bash tools/gpu_wheels.sh install    pip install --no-index --no-deps --target .gpu_wheels/site
#                                       .gpu_wheels/*.whl (plain unzip when pip is missing), then imports
#                                       diffusers from there; "SKIP:" when .gpu_wheels/ holds no wheels
#
# gpu_check.sh puts .gpu_wheels/site on PYTHONPATH of every stage, after the repository root.
# Environment: PYTHON (default .venv/bin/python, else python3), DIFFUSERS_VERSION (default 0.42.1, the version
# the test suite runs against), GPU_PYTHON (default 3.12, the GPU image's Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DIR=.gpu_wheels
SITE=$DIR/site
VERSION=${DIFFUSERS_VERSION:-0.42.1}
GPU_PYTHON=${GPU_PYTHON:-3.12}
# on the image already (a CUDA torch and what it requires, numpy): a copy in the wheel folder would shadow them
IMAGE_HAS='^(torch|triton|numpy|nvidia_.*|nvidia-.*|cuda_.*|filelock|typing_extensions|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|setuptools)$'

fetch() {
  mkdir -p "$DIR"
  "$PY" -m pip download --disable-pip-version-check --only-binary=:all: --implementation cp \
    --python-version "$GPU_PYTHON" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DIR" "diffusers==$VERSION"
  local whl name
  for whl in "$DIR"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    if [[ $name =~ $IMAGE_HAS ]]; then rm -f "$whl"; echo "left out (the image has it): $(basename "$whl")"; fi
  done
  ls -1 "$DIR"/*.whl
  echo "gpu_wheels: $(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -ch "$DIR"/*.whl | tail -n 1 | cut -f1) in $DIR/:" \
    "carry $DIR with the tree"
}

install() {
  local wheels=()
  shopt -s nullglob
  wheels=("$DIR"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "SKIP: no wheels in $DIR/ (bash tools/gpu_wheels.sh fetch on a machine with a package index, then carry $DIR)"
    return 0
  fi
  # a binary wheel for another CPython (fetched with another GPU_PYTHON) would not import: say so first
  "$PY" - "${wheels[@]}" <<'PYEOF' || return 1
import os, sys
here = "cp%d%d" % sys.version_info[:2]
other = [w for w in sys.argv[1:] if (lambda t: t[-3].startswith("cp") and t[-2] != "abi3" and t[-3] != here)(
    os.path.basename(w)[:-4].split("-"))]
if other:
    print(f"gpu_wheels: {len(other)} wheels are for another Python than this {here} (e.g. "
          f"{os.path.basename(other[0])}): fetch with GPU_PYTHON={sys.version_info[0]}.{sys.version_info[1]}")
    sys.exit(1)
PYEOF
  rm -rf "$SITE"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --target "$SITE" "${wheels[@]}"
  else  # a wheel is a zip of what goes into site-packages
    echo "pip is missing: unzipping ${#wheels[@]} wheels into $SITE"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "${wheels[@]}"
  fi
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "import diffusers; print(f'gpu_wheels: diffusers {diffusers.__version__} from {diffusers.__file__}')"
}

case ${1:-} in
  fetch) fetch ;;
  install) install ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
