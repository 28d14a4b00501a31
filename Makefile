# Quick start: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on this project's machines; an existing torch in $(VENV) is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.peftkern-installed

.PHONY: venv test demo bench kernels gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	# no build isolation: csrc/torch (a torch extension) builds against the torch installed here
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m peftkern.cli demo

bench: venv
	$(PY) -m peftkern.cli bench lora

# every Triton kernel compiled ahead of time for sm_80 and sm_90; fails on a compile error or a register spill
kernels: venv
	$(VENV)/bin/peftkern kernels --arch 80 90

# on a CUDA machine, in under 8 minutes: the GPU tests, the kernels gate and the quick benchmarks, one JSON report;
# exits 2 without CUDA
gpu-check: venv
	$(VENV)/bin/peftkern gpu-check --json benchmarks/results/gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info
