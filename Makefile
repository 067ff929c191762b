# The two entry points of the README. Each does all set-up itself (tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench clean aot-check

setup:
	bash tools/setup_env.sh

# correctness suite (what CI runs); pytest's exit code 5 (no tests ran) fails it
test: setup
	$(PY) -m pytest tests -q -ra -n 2 --dist loadgroup -p no:cacheprovider -p no:benchmark
	bash tools/triton_compat.sh

# the benchmark suite against every peer available here, then the comparison table
bench: setup
	$(PY) -m dare_kernels.cli bench

clean:
	rm -rf build $(VENV) dare_kernels/_C*.so

# every Triton kernel x pickable config x head dim x dtype compiled for sm_90 / sm_80 (no GPU needed)
aot-check: setup
	$(PY) -m dare_kernels.triton.aot_check --all --verify 8
