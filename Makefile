# `make test` and `make demo` set themselves up: they create .venv when missing and install into it.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test test-fast demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	# Without a GPU, take the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true; fi
	# Every extra but [gpu] (flash-attn builds against a CUDA torch: see the README).
	$(PY) -m pip install -q -e '.[preprocess,train,dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, deepspeed, ray, pyarrow, webdataset, fsspec, braceexpand, PIL"
	touch $(STAMP)

# Everything: tests/unit and tests/integration (ranks, Ray, Slurm, the demo); prints the 25 slowest tests.
# TEST_WORKERS pytest-xdist processes: a single pytest process leaves one of two cores idle for most of the suite
# (unit tests and single-process checks run on one thread). A module runs whole on one worker (its module fixtures
# are built once), the longest modules first (tests/conftest.py orders them).
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The unit tests only (tests/unit: no ranks, Ray, Slurm or demo): 1.5 to 2 minutes on 2 CPU cores (measured
# 84 s and 120 s of wall time on a 2-core machine others were also using). tests/conftest.py marks all of
# tests/integration `integration` and refuses that mark under tests/unit: the same set as -m "not integration".
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(PY) -m launchers.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo-output
