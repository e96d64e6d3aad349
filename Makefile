# personvlad — developer entry points.  `make demo` and `make test` bootstrap
# .venv on a fresh machine through `make install`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 7.5;8.0;8.6;8.9;9.0+PTX
# The real CUDA toolkit root (the directory with lib64/libcudart.so); nvcc on
# PATH may be a wrapper script, from which torch would infer a wrong root.
CUDA_HOME ?= $(shell $(PYTHON) setup.py --print-cuda-home 2>/dev/null)
ifneq ($(strip $(CUDA_HOME)),)
export CUDA_HOME
endif

EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
STAMP_DEPS := $(VENV)/.deps-installed
STAMP := $(VENV)/.personvlad-built

.PHONY: install test demo bench cmake-test compat-test clean ci

install: $(STAMP)

$(STAMP_DEPS): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION) numpy ninja pytest pytest-benchmark pyyaml tqdm scipy matplotlib pillow faiss-cpu \
	  onnx onnxscript onnxruntime
	touch $@

$(STAMP): $(STAMP_DEPS) $(EXT_SOURCES)
	@echo "building personvlad (CUDA_HOME=$(CUDA_HOME), TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST), MAX_JOBS=$(MAX_JOBS))"
	time $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/personvlad demo

bench: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=bench/results/cpu-latest.json

cmake-test: $(STAMP_DEPS)  # needs torch only, not the Python extension
	cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build-cmake -j $(MAX_JOBS)
	cd build-cmake && ctest --output-on-failure

# The oldest supported torch (the GPU machine's 2.11, with its Triton 3.6): the
# extension is built and the whole suite run against it, in a copy of the
# tracked tree -- an editable build writes personvlad/_C*.so into the source
# tree, which must stay .venv's.  One GPU architecture is enough to check that
# the sources compile against that torch's headers.  Triton 3.6's interpreter
# needs numpy < 2.4 (it converts 1-element arrays to Python ints, which numpy
# 2.4 refuses).  The tests marked `emulation` (CUDA device code on the CPU)
# and `packaging` (sdist -> wheel -> install) do not depend on torch's
# version and run in `make test` only.
COMPAT_TORCH ?= 2.11.0
COMPAT_NUMPY ?= numpy<2.4
COMPAT_VENV ?= .venv-torch$(COMPAT_TORCH)
COMPAT_DIR ?= build-compat
COMPAT_PY := $(abspath $(COMPAT_VENV))/bin/python

$(COMPAT_VENV)/.deps-installed:
	@test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip setuptools wheel
	$(COMPAT_PY) -m pip install -q torch==$(COMPAT_TORCH) "$(COMPAT_NUMPY)" ninja pytest pytest-benchmark pyyaml tqdm scipy matplotlib pillow \
	  onnx onnxscript onnxruntime
	touch $@

compat-test: $(COMPAT_VENV)/.deps-installed
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR)
	git ls-files -z | tar --null -T - -cf - | tar -xf - -C $(COMPAT_DIR)
	cd $(COMPAT_DIR) && TORCH_CUDA_ARCH_LIST="9.0" $(COMPAT_PY) -m pip install -q --no-build-isolation --no-deps -e .
	cd $(COMPAT_DIR) && $(COMPAT_PY) -c "import torch, triton, personvlad.ops as o; print('compat: torch', torch.__version__, 'triton', triton.__version__, 'extension', o.extension_loaded())"
	cd $(COMPAT_DIR) && $(COMPAT_PY) -m pytest -q -p no:cacheprovider -m "not emulation and not packaging" tests

clean:
	rm -rf build build-cmake build-compat *.egg-info personvlad/_C*.so $(STAMP)
