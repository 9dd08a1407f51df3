# One-command set-up: `make test` and `make bench` create .venv, install the package and its extras, and run.
# On a machine without an NVIDIA GPU a CPU build of torch is enough (the kernels run in Triton's interpreter);
# override the pins with e.g. `make test TORCH=torch TRITON=triton`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH ?= $(if $(HAS_GPU),torch>=2.5,torch==2.13.0)
TRITON ?= $(if $(HAS_GPU),triton>=3.5,triton==3.8.0)
ARGS ?=

.PHONY: test bench install clean gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install --quiet -e ".[test,bench,hf]"
	touch $@

test: install
	$(PY) -m pytest -n 2 tests $(ARGS)

bench: install
	$(PY) -m benchmarks $(ARGS)

# The venv's python where `make install` made one, else python3: a lent GPU machine's image already holds torch,
# triton and transformers, and nothing can be installed there (run it as `make gpu-check ARGS="--out $$OUT"`).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks gpu-check $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache
