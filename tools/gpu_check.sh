#!/usr/bin/env bash
# The prepared device check: one call on a lent GPU machine (README "GPU check"), at most ~8 minutes.
#
#   bash tools/gpu_check.sh              on a GPU: build the CUDA extension, correctness, sanitizer, benchmarks
#   bash tools/gpu_check.sh --rehearse   the same stages on CPU (also chosen when torch sees no GPU): no CUDA
#                                        build, Triton in its interpreter at tiny shapes, tiny bench rows
#
# Stages, in order (each under `timeout`; a later stage runs even when an earlier one failed):
#   env        versions, device, missing modules                      -> env.json
#   build      CUDA extension against this machine's torch, in place  (rehearsal: skipped)
#   pytest     tests/test_sra_cuda.py + tests/test_cfg_triton.py      -> pytest.xml
#   selftest   dare-kernels selftest: Triton and CUDA vs the float64 reference, small and model shapes
#   smoke      tools/sra_cuda_smoke.py (edge shapes on the CUDA kernels, no sanitizer)
#   racecheck, memcheck, synccheck, initcheck   compute-sanitizer over the smoke shapes (sanitize_sra_cuda.sh)
#   bench      tools/gpu_check_bench.py: the benchmark table, on what is left of the budget -> bench.csv/.json
# Everything goes under $OUT (default ./gpu_check_out): gpu_check.log, one log per stage in logs/,
# stages.jsonl / stages.csv, gpu_check.json and gpu_check.md (the summary: the stages, and the bench rows
# with their ratio to SDPA flash). Exit status 0 only when every stage passed or was skipped for a stated
# reason other than the time budget.
#
# Knobs (environment):
#   GPU_CHECK_MODE        auto (default) | device | rehearse; device without a GPU is a dry run of the GPU
#                         path whose stages fail fast (tests/test_gpu_check.py uses it)
#   GPU_CHECK_BUDGET_S    default 465 on a GPU, 420 in rehearsal: stages and bench rows that would start
#                         later are skipped and recorded with the reason
#   GPU_CHECK_ARCH_LIST   TORCH_CUDA_ARCH_LIST of the build; default this GPU's arch only ("9.0a" on an
#                         H100 / H200) to keep the build short; the release default is in CMakeLists.txt
#   MAX_JOBS              parallel compile jobs (default: every core)
#   PYTHON                default .venv/bin/python if present, else python3
#   GPU_CHECK_PYTEST_FILES  the test files of the pytest stage
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${GPU_CHECK_MODE:-auto}
[ "${1:-}" = "--rehearse" ] && MODE=rehearse
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "$MODE" = auto ]; then
  MODE=device
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    MODE=rehearse
    NO_GPU_NOTE="torch sees no CUDA device here: running the CPU rehearsal"
  fi
elif [ "$MODE" != device ] && [ "$MODE" != rehearse ]; then
  echo "gpu_check: GPU_CHECK_MODE must be auto, device or rehearse, got '$MODE'" >&2
  exit 2
fi
OUT_DIR=${OUT:-./gpu_check_out}
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR/stages.jsonl" "$OUT_DIR/bench_rows.jsonl"
if [ "$MODE" = device ]; then BUDGET=${GPU_CHECK_BUDGET_S:-465}; else BUDGET=${GPU_CHECK_BUDGET_S:-420}; fi
DEADLINE=$(( $(date +%s) + BUDGET ))
export PY OUT_DIR MODE

json_str() {  # a JSON string literal of $1 (python, so any byte is escaped right)
  "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || echo '""'
}

record() {  # record NAME STATUS RC SECONDS LIMIT REASON NOTE
  printf '{"name": %s, "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "reason": %s, "note": %s, "log": %s}\n' \
    "$(json_str "$1")" "$2" "$3" "$4" "$5" "$(json_str "$6")" "$(json_str "$7")" "$(json_str "logs/$1.log")" \
    >> "$OUT_DIR/stages.jsonl"
  echo "-- [$1] $2 (rc $3, $4 s)${6:+: $6}"
}

# stage NAME CAP_S RESERVE_S COMMAND: run COMMAND (a bash string; {BUDGET} becomes the seconds it may use, less 10)
# for at most CAP_S seconds, leaving RESERVE_S of the budget to the stages after it.
stage() {
  local name=$1 cap=$2 reserve=$3 cmd=$4
  local left=$(( DEADLINE - $(date +%s) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 8 ]; then
    record "$name" skipped 0 0 "$limit" "time budget: $(( DEADLINE - $(date +%s) )) s of ${BUDGET} s left" ""
    return
  fi
  cmd=${cmd//\{BUDGET\}/$(( limit - 10 ))}  # a row that starts before this still ends inside the limit
  echo
  echo "== [$name] up to ${limit} s: $cmd"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" bash -c "$cmd" > "$OUT_DIR/logs/$name.log" 2>&1 &
  local pid=$!
  tail -n +1 -f "$OUT_DIR/logs/$name.log" --pid=$pid 2>/dev/null &
  local tail_pid=$!
  wait $pid
  local rc=$?
  wait $tail_pid 2>/dev/null
  local secs=$(( SECONDS - t0 ))
  local last
  last=$(grep -v '^\s*$' "$OUT_DIR/logs/$name.log" | tail -n 1 | cut -c1-240)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" timeout $rc $secs "$limit" "killed at its ${limit} s limit" "$last"
  elif [ $rc -ne 0 ]; then
    record "$name" failed $rc $secs "$limit" "" "$last"
  elif [[ "$last" =~ (SKIP:|\;\ skipped$) ]]; then
    record "$name" skipped 0 $secs "$limit" "${last#*SKIP: }" ""
  else
    record "$name" passed 0 $secs "$limit" "" "$last"
  fi
}

build_cuda() {  # the CUDA extension against this machine's torch, no network, in place
  local arch=${GPU_CHECK_ARCH_LIST:-$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if (a, b) == (9, 0) else ''))" 2>/dev/null)}
  if [ -z "$arch" ]; then  # also keeps a dry run on a machine without a GPU from building in the tree
    echo "no CUDA device to build for (torch.cuda.get_device_capability failed); set GPU_CHECK_ARCH_LIST"; return 1
  fi
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)}"
  DARE_KERNELS_CUDA=1 DARE_KERNELS_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    TORCH_CUDA_ARCH_LIST=$arch "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import json; from dare_kernels import _ext; assert _ext.has_cuda_kernels(), _ext.EXT_ERROR or 'no CUDA kernels in the build'; print(json.dumps(_ext.build_info()))"
}

run_pytest() {  # the GPU unit tests (files, not tests/: collecting every file needs packages this machine may lack)
  if ! "$PY" -c "import pytest" 2>/dev/null; then echo "SKIP: pytest is not installed here"; return 0; fi
  local files=${GPU_CHECK_PYTEST_FILES:-tests/test_sra_conformance.py tests/test_sra_cuda.py tests/test_cfg_triton.py}
  local sel=()
  [ "$MODE" = rehearse ] && { files=tests/test_sra_cuda.py; sel=(-m gpu); }  # no GPU: they skip, with the reason
  # shellcheck disable=SC2086
  "$PY" -m pytest $files "${sel[@]}" -q -rfEs -p no:cacheprovider -p no:benchmark --junitxml="$OUT_DIR/pytest.xml"
}

sanitize() {  # sanitize TOOL
  if [ "$MODE" = rehearse ]; then echo "SKIP: rehearsal (compute-sanitizer needs a GPU)"; return 0; fi
  PYTHON="$PY" bash tools/sanitize_sra_cuda.sh "$1"
}
export -f build_cuda run_pytest sanitize

# stage arguments: NAME CAP_S RESERVE_S COMMAND (the reserve keeps time for what follows: correctness first,
# then the sanitizer, then as much of the benchmark table as fits)
main() {
  echo "gpu_check: mode $MODE, budget ${BUDGET} s, python $PY, output $OUT_DIR${NO_GPU_NOTE:+ ($NO_GPU_NOTE)}"
  stage env 30 0 '"$PY" tools/gpu_check_report.py env "$OUT_DIR"'
  if [ "$MODE" = device ]; then
    stage build 240 200 'build_cuda'
    stage pytest 80 180 'run_pytest'
    stage selftest 180 120 '"$PY" -m dare_kernels.cli selftest --device cuda --no-bench --json "$OUT_DIR/selftest.json"'
    stage smoke 40 110 '"$PY" tools/sra_cuda_smoke.py'
    stage racecheck 60 90 'sanitize racecheck'
    stage memcheck 60 70 'sanitize memcheck'
    stage synccheck 30 55 'sanitize synccheck'
    stage initcheck 30 50 'sanitize initcheck'
    stage bench 400 5 '"$PY" tools/gpu_check_bench.py --out "$OUT_DIR" --device cuda --budget-s {BUDGET}'
  else
    # little work under generous limits (the interpreter is slow and CI machines are shared, so a wall-clock
    # squeeze would make the rehearsal flaky); the bench rows get a small budget of their own
    record build skipped 0 0 0 "rehearsal: no CUDA build (the extension is used as found)" ""
    stage pytest 90 150 'run_pytest'
    stage selftest 120 100 '"$PY" -m dare_kernels.cli selftest --device cpu --no-bench --no-models --json "$OUT_DIR/selftest.json"'
    record smoke skipped 0 0 0 "rehearsal: the CUDA kernels need a GPU" ""
    local tool
    for tool in racecheck memcheck synccheck initcheck; do stage $tool 30 70 "sanitize $tool"; done
    stage bench 120 0 '"$PY" tools/gpu_check_bench.py --out "$OUT_DIR" --device cpu --tiny --rows-per-provider 1 --budget-s 20'
  fi
  "$PY" tools/gpu_check_report.py summary "$OUT_DIR" "$MODE"
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
