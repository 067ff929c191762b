# The two entry points of the README. Each does all set-up itself (tools/setup_env.sh).
# SKIP_SETUP=1 uses $(VENV) as it is (a venv you manage yourself).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV
SETUP := $(if $(filter 1,$(SKIP_SETUP)),,setup)

.PHONY: setup test bench bench-full bench-publish clean aot-check

setup:
	bash tools/setup_env.sh

# correctness suite (what CI runs); pytest's exit code 5 (no tests ran) fails it. -ra lists every skip with
# its reason (an offline machine without some test dependencies runs what it can)
XDIST = $$($(PY) -c 'import xdist' 2>/dev/null && printf '%s' '-n 2 --dist loadgroup')
test: export EXTRAS ?= test,bench
test: setup
	$(PY) -m pytest tests -q -ra $(XDIST) -p no:cacheprovider -p no:benchmark
	bash tools/triton_compat.sh
	@if $(PY) -c 'import triton' 2>/dev/null; then $(PY) -m dare_kernels.triton.aot_check --all --verify 8; \
	else echo "aot_check: skipped: triton is not installed in $(VENV)"; fi

# the main job: the quick, time-budgeted comparison against every peer available here (a few minutes on
# a 2-core CPU), then the table; results in the untracked bench/results/local/. Triton is not needed.
bench: export EXTRAS ?= bench
bench: $(SETUP)
	$(PY) -m dare_kernels.cli bench

# the exhaustive suite (every shape and peer, no budget on CPU; the progress line gives an ETA)
bench-full: export EXTRAS ?= bench
bench-full: $(SETUP)
	$(PY) -m dare_kernels.cli bench --full

# the exhaustive suite, rows and report written into the committed bench/results/ (to commit them)
bench-publish: export EXTRAS ?= bench
bench-publish: $(SETUP)
	$(PY) -m dare_kernels.cli bench --full --publish

clean:
	rm -rf build $(VENV) dare_kernels/_C*.so

# every Triton kernel x pickable config x head dim x dtype compiled for sm_90 / sm_80 (no GPU needed), under
# this venv's Triton and then 3.6.0 and 3.8.0 (tools/triton_compat.sh), each against its committed seed
aot-check: setup
	$(PY) -m dare_kernels.triton.aot_check --all --verify 8
	TRITON_COMPAT_TESTS=0 bash tools/triton_compat.sh
