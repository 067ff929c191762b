#!/usr/bin/env bash
# The device check in two parts that fit one short GPU session back to back (README "GPU check").
#
#   bash tools/gpu_check.sh --part 1                  build, warm-up, headline bench, correctness core,
#                                                     sanitizers (<= 7 min); writes the reuse archive
#   bash tools/gpu_check.sh --part 2 --reuse FILE     the rest of the bench (diffusers rows included), the full
#                                                     GPU pytest, model-shape selftest (<= 5 min)
#   bash tools/gpu_check.sh [--part all]              both parts in one call (a GPU machine without time limits)
#   bash tools/gpu_check.sh --rehearse [--part ...]   the same stages on CPU (also chosen when torch sees no
#                                                     GPU): no CUDA build, Triton in its interpreter, tiny rows
#
# Stages of part 1 (each under `timeout` with its cap in seconds; a later stage runs even when an earlier one
# failed; a stage that would start with too little of the part's budget left is skipped with that reason):
#   env          30  versions, device, missing modules, the project commit            -> env.json
#   build       150  CUDA extension against this machine's torch, in place (measured: 77 s on 16 cores)
#   warmup      120  tools/gpu_warmup.py: every Triton specialization the later stages use, compiled on all
#                    cores into one TRITON_CACHE_DIR that every later stage shares
#   pack         40  the reuse archive: built extension + Triton and inductor caches   -> gpu_reuse.tar.gz
#   bench       120  tools/gpu_check_bench.py --part 1: the headline shape's rows and the rectified_cfg rows
#   host_overhead 45 tools/host_overhead.py: the host path of one call, eager vs CUDA-graph replay
#   then at once (none of them is timed): smoke 40 (tools/sra_cuda_smoke.py), racecheck 150, memcheck 120,
#   synccheck 90, initcheck 90 (compute-sanitizer over the smoke shapes), pytest_core 120
#   (tests/test_sra_cuda.py, tests/test_cfg_triton.py), selftest_core 120 (small shapes, every dtype/head dim)
#   cache        20  the compiled kernels in the Triton cache, per kernel, against the count after the warm-up
#   repack       40  the reuse archive again, with what the stages compiled
# Stages of part 2: env 30; reuse 60 (with --reuse FILE: unpack it, then build and warm-up are skipped; without
# it, or when it does not match this machine: build 150 and warmup 120 as in part 1, and 270 s more budget); wheels 90
# (tools/gpu_wheels.sh install: diffusers from .gpu_wheels/, offline); bench 200 (--part 2: every other row,
# diffusers included); then at once pytest_gpu 240 (the GPU test files) and selftest_models 180; cache 20.
#
# Output ($OUT, default ./gpu_check_out/part<N>): at most 8 files, no folders: gpu_check.md (the summary),
# gpu_check.json, stages.csv, env.json, bench.csv, bench.json, logs.tar.gz (the console log, one log per
# stage, bench_rows.jsonl, pytest.xml, selftest.json, warmup.json, the cache counts) and, in part 1,
# gpu_reuse.tar.gz. They are rewritten after every stage, so a run cut short keeps what it did. The working
# files live in .gpu_reuse/ (ignored by git): work-part<N>/, triton-cache/, inductor-cache/ and the archive
# .gpu_reuse/gpu_reuse.tar.gz that part 2 takes with --reuse. Exit status 0 only when every stage passed or
# was skipped for a stated reason other than the time budget.
#
# Every stage runs with the repository root (and .gpu_wheels/site when present) on PYTHONPATH: the package
# is importable however the tree got here (built in place, not installed).
#
# Environment:
#   GPU_CHECK_COMMIT      the project commit to record (a copy of the tree has no git); default: git, when the
#                         repository root is the git top level, else "unknown"
#   GPU_CHECK_MODE        auto (default) | device | rehearse; device without a GPU is a dry run of the GPU path
#                         whose stages fail fast (tests/test_gpu_check.py uses it)
#   GPU_CHECK_BUDGET_S    seconds of the part (default: part 1 420, part 2 300, all 720; rehearsal 1200)
#   GPU_CHECK_SWEEP       1 runs the Triton tile sweep at the end of part 2 (tools/triton_sweep.py, 240 s more
#                         budget); otherwise it is skipped and says so (the rehearsal always runs it)
#   GPU_CHECK_CAP_SCALE   every stage cap times this (default 1 on a GPU, 3 in the rehearsal)
#   GPU_CHECK_ARCH_LIST   TORCH_CUDA_ARCH_LIST of the build (default: this GPU's arch only, "9.0a" on H100/H200)
#   GPU_CHECK_PYTEST_FILES  the test files of the pytest stages (default per stage, above)
#   MAX_JOBS              parallel compile jobs of the build and processes of the warm-up (default: every core)
#   PYTHON                default .venv/bin/python if present, else python3
# shellcheck disable=SC2016  # a stage's command is a bash string that the stage's own shell expands
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

usage() { sed -n '2,/^# shellcheck disable/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
PART=all
REUSE=""
MODE=${GPU_CHECK_MODE:-auto}
while [ $# -gt 0 ]; do
  case $1 in
    --part) PART=${2:-}; shift 2 || shift ;;
    --part=*) PART=${1#*=}; shift ;;
    --reuse) REUSE=${2:-}; shift 2 || shift ;;
    --reuse=*) REUSE=${1#*=}; shift ;;
    --rehearse) MODE=rehearse; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
case $PART in 1|2|all) ;; *) echo "gpu_check: --part must be 1, 2 or all, got '$PART'" >&2; exit 2 ;; esac
if [ -n "$REUSE" ] && [ "$PART" != 2 ]; then echo "gpu_check: --reuse goes with --part 2" >&2; exit 2; fi
[ -n "$REUSE" ] && REUSE=$(cd "$(dirname "$REUSE")" 2>/dev/null && pwd)/$(basename "$REUSE")

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
case $PY in /*) ;; */*) PY=$ROOT/$PY ;; esac
# the package from this tree, in every stage (scripts run as `python tools/x.py` get tools/ as their first
# path entry, not the root); the offline diffusers wheels (tools/gpu_wheels.sh install, a stage of part 2)
# after it, on the path whether or not they are installed yet
PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}:$ROOT/.gpu_wheels/site
export PYTHONPATH

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

COMMIT=$("$PY" tools/gpu_check_report.py commit 2>/dev/null || echo unknown)
REUSE_DIR=$ROOT/.gpu_reuse
WORK=$REUSE_DIR/work-part$PART
ARCHIVE=$REUSE_DIR/gpu_reuse.tar.gz
OUT_DIR=${OUT:-$ROOT/gpu_check_out/part$PART}
mkdir -p "$OUT_DIR" "$REUSE_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -rf "$WORK"
mkdir -p "$WORK/logs"
# one compile cache for every stage (and the archive); part 1 starts it empty when it is ours, so that the
# count after the stages says what they compiled; part 2 keeps what is there (part 1's on a warm machine)
if [ -z "${TRITON_CACHE_DIR:-}" ]; then
  TRITON_CACHE_DIR=$REUSE_DIR/triton-cache
  [ "$PART" != 2 ] && rm -rf "$TRITON_CACHE_DIR"
fi
TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$REUSE_DIR/inductor-cache}
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
case $PART in 1) BUDGET_DEFAULT=420 ;; 2) BUDGET_DEFAULT=300 ;; *) BUDGET_DEFAULT=720 ;; esac
[ "$MODE" = rehearse ] && BUDGET_DEFAULT=1200
SWEEP=${GPU_CHECK_SWEEP:-0}
[ "$SWEEP" = 1 ] && [ "$PART" != 1 ] && BUDGET_DEFAULT=$(( BUDGET_DEFAULT + 240 ))
BUDGET=${GPU_CHECK_BUDGET_S:-$BUDGET_DEFAULT}
# the rehearsal's caps are loose: the interpreter is slow and CI machines are shared (a wall-clock squeeze
# would make it flaky); its budget is long enough never to skip a stage
CAP_SCALE=${GPU_CHECK_CAP_SCALE:-$([ "$MODE" = rehearse ] && echo 3 || echo 1)}
DEADLINE=$(( $(date +%s) + BUDGET ))
NPROC=$(nproc 2>/dev/null || echo 4)
JOBS=${MAX_JOBS:-$NPROC}
export PY MODE WORK OUT_DIR ROOT NPROC TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR JOBS

json_str() {  # a JSON string literal of $1 (python, so any byte is escaped right)
  "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || echo '""'
}

SEQ=0
record() {  # record NAME STATUS RC SECONDS LIMIT REASON NOTE
  printf '{"seq": %s, "name": %s, "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "reason": %s, "note": %s, "log": %s}\n' \
    "$SEQ" "$(json_str "$1")" "$2" "$3" "$4" "$5" "$(json_str "$6")" "$(json_str "$7")" \
    "$(json_str "logs/$1.log")" >> "$WORK/stages.jsonl"
  echo "-- [$1] $2 (rc $3, $4 s)${6:+: $6}"
}

publish() {  # the files of $OUT, rewritten after every stage: a run cut short keeps what it did
  "$PY" tools/gpu_check_report.py summary "$WORK" "$OUT_DIR" "$MODE" "$PART" > "$WORK/summary.txt" 2>&1
  tar -czf "$OUT_DIR/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT_DIR/logs.tar.gz.tmp" "$OUT_DIR/logs.tar.gz"
}

# stage NAME CAP_S RESERVE_S COMMAND [bg]: run COMMAND (a bash string; {BUDGET} becomes the seconds it may
# use, less 10) for at most CAP_S seconds, leaving RESERVE_S of the budget to the stages after it. With "bg"
# the console shows the start and the result only (stages run at once).
stage() {
  local name=$1 cap=$2 reserve=$3 cmd=$4 bg=${5:-}
  SEQ=$(( SEQ + 1 ))
  cap=$(( cap * CAP_SCALE ))
  local left=$(( DEADLINE - $(date +%s) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 8 ]; then
    record "$name" skipped 0 0 "$limit" "time budget: $(( DEADLINE - $(date +%s) )) s of ${BUDGET} s left" ""
    return
  fi
  cmd=${cmd//\{BUDGET\}/$(( limit - 10 ))}  # a row that starts before this still ends inside the limit
  local log=$WORK/logs/$name.log
  echo
  echo "== [$name] up to ${limit} s: $cmd"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" bash -c "$cmd" > "$log" 2>&1 &
  local pid=$! tail_pid=""
  if [ -z "$bg" ]; then
    tail -n +1 -f "$log" --pid=$pid 2>/dev/null &
    tail_pid=$!
  fi
  wait $pid
  local rc=$?
  [ -n "$tail_pid" ] && wait "$tail_pid" 2>/dev/null
  local secs=$(( SECONDS - t0 ))
  local last
  last=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-240)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" timeout $rc $secs "$limit" "killed at its ${limit} s limit" "$last"
  elif [ $rc -ne 0 ]; then
    record "$name" failed $rc $secs "$limit" "" "$last"
  elif [[ "$last" =~ (SKIP:|\;\ skipped$) ]]; then
    record "$name" skipped 0 $secs "$limit" "${last#*SKIP: }" ""
  else
    record "$name" passed 0 $secs "$limit" "" "$last"
  fi
  [ -z "$bg" ] && publish
}

# at_once RESERVE_S "NAME CAP_S COMMAND" ...: the stages started together (correctness and the sanitizer are
# not timed, so they share the machine); each keeps its own cap and log
at_once() {
  local reserve=$1 spec name cap cmd
  shift
  local pids=()
  for spec in "$@"; do
    name=${spec%% *}; spec=${spec#* }; cap=${spec%% *}; cmd=${spec#* }
    stage "$name" "$cap" "$reserve" "$cmd" bg &
    pids+=($!)
    SEQ=$(( SEQ + 1 ))
  done
  wait "${pids[@]}"
  publish
}

build_cuda() {  # the CUDA extension against this machine's torch, no network, in place
  local arch=${GPU_CHECK_ARCH_LIST:-$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if (a, b) == (9, 0) else ''))" 2>/dev/null)}
  if [ -z "$arch" ]; then  # also keeps a dry run on a machine without a GPU from building in the tree
    echo "no CUDA device to build for (torch.cuda.get_device_capability failed); set GPU_CHECK_ARCH_LIST"; return 1
  fi
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$JOBS"
  DARE_KERNELS_CUDA=1 DARE_KERNELS_REQUIRE_EXT=1 MAX_JOBS=$JOBS \
    TORCH_CUDA_ARCH_LIST=$arch "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import json; from dare_kernels import _ext; assert _ext.has_cuda_kernels(), _ext.EXT_ERROR or 'no CUDA kernels in the build'; print(json.dumps(_ext.build_info()))"
}

run_pytest() {  # run_pytest TAG FILES...: GPU test files (not tests/: collecting every file needs packages this machine may lack)
  if ! "$PY" -c "import pytest" 2>/dev/null; then echo "SKIP: pytest is not installed here"; return 0; fi
  local tag=$1
  shift
  local files=${GPU_CHECK_PYTEST_FILES:-$*} sel=() xdist=()
  [ "$MODE" = rehearse ] && { files=tests/test_sra_cuda.py; sel=(-m gpu); }  # no GPU: they skip, with the reason
  [ "$MODE" = device ] && [ "$NPROC" -ge 8 ] && "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
  # shellcheck disable=SC2086
  "$PY" -m pytest $files "${sel[@]}" "${xdist[@]}" -q -rfEs -p no:cacheprovider -p no:benchmark \
    --junitxml="$WORK/pytest-$tag.xml"
}

smoke() {
  if [ "$MODE" = rehearse ]; then
    "$PY" tools/sra_cuda_smoke.py --import-only && echo "SKIP: rehearsal: the CUDA kernels need a GPU (imports checked)"
  else
    "$PY" tools/sra_cuda_smoke.py
  fi
}

sanitize() {  # sanitize TOOL (on a GPU a missing compute-sanitizer or CUDA build is a failure, not a skip)
  SANITIZE_REQUIRE=$([ "$MODE" = device ] && echo 1 || echo 0) PYTHON="$PY" bash tools/sanitize_sra_cuda.sh "$1"
}

bench() {  # bench PART [budget]
  if [ "$MODE" = device ]; then
    "$PY" tools/gpu_check_bench.py --out "$WORK" --device cuda --budget-s "$2" --part "$1"
  else
    "$PY" tools/gpu_check_bench.py --out "$WORK" --device cpu --tiny --rows-per-provider 1 --budget-s 20 --part "$1"
  fi
}

host_overhead() {
  "$PY" tools/host_overhead.py --out "$WORK" --device "$([ "$MODE" = device ] && echo cuda || echo cpu)"
}

sweep() {  # sweep BUDGET: the Triton tile sweep on what the part's budget leaves (its table lands in logs.tar.gz)
  if [ "$MODE" = device ]; then
    "$PY" tools/triton_sweep.py --out "$WORK" --budget-s "$1"
  else
    "$PY" tools/triton_sweep.py --out "$WORK" --budget-s 20 --rehearse
  fi
}

warmup() {
  local rc
  if [ "$MODE" = device ]; then
    "$PY" tools/gpu_warmup.py run --device cuda --jobs "$JOBS" --json "$WORK/warmup.json"
  else  # the interpreter compiles nothing: the command path at tiny shapes, two processes
    "$PY" tools/gpu_warmup.py run --device cpu --jobs 2 --json "$WORK/warmup.json"
  fi
  rc=$?
  "$PY" tools/gpu_warmup.py count "$TRITON_CACHE_DIR" --json "$WORK/cache_after_warmup.json" | tail -n 1
  return $rc
}

pack() {
  "$PY" tools/gpu_warmup.py pack "$ARCHIVE" || return 1
  cp -f "$ARCHIVE" "$OUT_DIR/gpu_reuse.tar.gz"
}

cache_count() {
  "$PY" tools/gpu_warmup.py count "$TRITON_CACHE_DIR" --json "$WORK/cache_after_stages.json"
  "$PY" tools/gpu_check_report.py cache "$WORK"
}

selftest() {  # selftest ARGS...
  local dev=cuda
  [ "$MODE" = rehearse ] && dev=cpu
  "$PY" -m dare_kernels.cli selftest --device "$dev" --no-bench "$@"
}
export -f build_cuda run_pytest smoke sanitize bench host_overhead sweep warmup pack cache_count selftest
export ARCHIVE REUSE

build_and_warm() {
  if [ "$MODE" = device ]; then
    stage build 150 240 'build_cuda'
  else
    SEQ=$(( SEQ + 1 )); record build skipped 0 0 0 "rehearsal: no CUDA build (the extension is used as found)" ""
  fi
  stage warmup 120 200 'warmup'
}

part1() {
  build_and_warm
  stage pack 40 190 'pack'
  stage bench 120 150 'bench 1 {BUDGET}'
  stage host_overhead 45 130 'host_overhead'
  at_once 30 "smoke 40 smoke" "racecheck 150 sanitize racecheck" "memcheck 120 sanitize memcheck" \
    "synccheck 90 sanitize synccheck" "initcheck 90 sanitize initcheck" \
    "pytest_core 120 run_pytest core tests/test_sra_cuda.py tests/test_cfg_triton.py" \
    "selftest_core 120 selftest --no-models --json \"\$WORK/selftest-core.json\""
}

part2() {
  local reused=""
  if [ -n "$REUSE" ]; then
    stage reuse 60 240 '"$PY" tools/gpu_warmup.py unpack "$REUSE" &&
      "$PY" tools/gpu_warmup.py count "$TRITON_CACHE_DIR" --json "$WORK/cache_after_warmup.json" | tail -n 1'
    tail -n 1 "$WORK/stages.jsonl" | grep -q '"status": "passed"' && reused=1
  fi
  if [ -n "$reused" ]; then
    SEQ=$(( SEQ + 1 )); record build skipped 0 0 0 "reused: the extension from $(basename "$REUSE")" ""
    SEQ=$(( SEQ + 1 )); record warmup skipped 0 0 0 "reused: the Triton cache from $(basename "$REUSE")" ""
  elif [ "$PART" = 2 ]; then
    if [ -z "${GPU_CHECK_BUDGET_S:-}" ]; then
      DEADLINE=$(( DEADLINE + 270 ))
      echo "gpu_check: no reuse archive: the part's budget grows by 270 s for the build and the warm-up"
    fi
    build_and_warm
  fi
  stage wheels 90 220 'PYTHON="$PY" bash tools/gpu_wheels.sh install'
  stage bench2 200 110 'bench 2 {BUDGET}'
  at_once 10 "pytest_gpu 240 run_pytest gpu tests/test_sra_conformance.py tests/test_sra_cuda.py tests/test_cfg_triton.py tests/test_diffusers_offload.py" \
    "selftest_models 180 selftest --no-small --json \"\$WORK/selftest-models.json\""
  # last and asked for: the sweep times tiles on what the budget leaves (GPU_CHECK_SWEEP=1 adds its 240 s)
  if [ "$MODE" = rehearse ] || [ "$SWEEP" = 1 ]; then
    stage sweep 240 0 'sweep {BUDGET}'
  else
    SEQ=$(( SEQ + 1 )); record sweep skipped 0 0 0 "not asked: GPU_CHECK_SWEEP=1 runs the Triton tile sweep (+240 s)" ""
  fi
}

main() {
  echo "gpu_check: part $PART, mode $MODE, budget ${BUDGET} s, python $PY, commit $COMMIT,"
  echo "  output $OUT_DIR, work $WORK, TRITON_CACHE_DIR $TRITON_CACHE_DIR${NO_GPU_NOTE:+ ($NO_GPU_NOTE)}"
  echo "  PYTHONPATH $PYTHONPATH"
  stage env 30 0 '"$PY" tools/gpu_check_report.py env "$WORK" && cp -f "$WORK/env.json" "$OUT_DIR/env.json"'
  case $PART in
    1) part1 ;;
    2) part2 ;;
    all) part1; part2 ;;
  esac
  stage cache 20 0 'cache_count'
  [ "$PART" != 2 ] && stage repack 40 0 'pack'
  publish
  cat "$WORK/summary.txt"
}

main 2>&1 | tee "$WORK/gpu_check.log"
publish
"$PY" tools/gpu_check_report.py summary "$WORK" "$OUT_DIR" "$MODE" "$PART" --quiet
