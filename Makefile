# Developer entry points. `make test` and `make report` work from a fresh clone: they create .venv,
# install the package with its test/bench extras, then run.
#
# The dev environment pins a CPU build of torch (TORCH_SPEC) so a CPU machine does not download a
# multi-GB CUDA build; the package itself only asks for torch>=2.4. Override for a GPU machine:
#     make test TORCH_SPEC='torch'
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv build-ext test lint report report-full bench compile-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,bench,lint]"
	touch $(STAMP)

# The compiled CPU backend, built ahead of time into the build cache (~/.cache/spectraformer_fused, or
# $SPECTRAFORMER_FUSED_CACHE_DIR); a no-op when it is cached. `make test` runs it first so that the tests
# find the binary instead of compiling it on first use.
build-ext: venv
	$(PY) -m spectraformer_fused.build

test: venv build-ext
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff check (pyflakes, pycodestyle, import order, bugbear) and ruff's formatter, configured in pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

report: venv build-ext
	$(PY) -m bench.report

report-full: venv
	$(PY) -m bench.report --full

bench: venv build-ext
	$(PY) -m pytest bench -q

# Every Triton kernel compiled for sm_90 (no GPU needed): registers, spills, shared memory per kernel.
compile-check: venv
	$(PY) -m bench.perf.compile_check --cases full --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
