# make test | make bench | make gpu-check -- each does the set-up it needs.
#
# test/bench: a virtualenv in .venv with torch (the CUDA build, so the CUDA sources compile even
# on a machine without a GPU), triton, pytest, pytest-benchmark, ninja and pybind11; then the
# extension is built in place (pip install --no-build-isolation -e .). Both steps are skipped when
# nothing they depend on changed.
# gpu-check: for a GPU machine with no package registry: builds with the python3 found there and
# what it has installed, runs every test on CUDA and the benchmarks, and writes a report into
# benchmarks/results/. The build is skipped when the extension in place is current for that
# machine (fused_attn._extension.stale_reason: loads, same torch, CUDA kernels for its GPU, same
# sources), e.g. built beforehand elsewhere for the same Python and torch; GPU_CHECK_ARGS go to
# benchmarks/gpu_check.py (--budget SECONDS, --skip-bench, --suites ..., --tag ...).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := $(TORCH_SPEC) triton pytest pytest-benchmark ninja pybind11 numpy tqdm "setuptools>=77" wheel transformers matplotlib onnx onnxscript onnxruntime

NPROC := $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS ?= $(NPROC)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_GPU),0)
TEST_ENV := TRITON_INTERPRET=1
endif

SOURCES := setup.py fused_attn/_cpu_isa.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/include/fused_attn/*)

.PHONY: test bench build venv gpu-check gpu-prebuild info clean

test: $(VENV)/.built
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.built
	$(PY) -m fused_attn bench $(BENCH_ARGS)

info: $(VENV)/.built
	$(PY) -m fused_attn info

build: $(VENV)/.built

venv: $(VENV)/.deps

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $@

# The package is installed editable once (console script, metadata); the extension is built in
# place by ninja under build/, so a change to one source recompiles that source alone.
$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	FUSED_ATTN_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The marker takes the time the build started, so that a source edited while it ran is built next time.
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	touch $@.started
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m fused_attn info
	mv $@.started $@

# Built against the GPU machine's own torch: its headers may warn where CI's do not, so nvcc
# warnings stay warnings there.
STALE_CHECK := from fused_attn import _extension as e; r = e.stale_reason(); print("extension: " + (r or "current, not rebuilt")); raise SystemExit(r is not None)

gpu-check:
	$(PYTHON) -c '$(STALE_CHECK)' || FUSED_ATTN_WERROR=0 $(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) -m fused_attn info
	$(PYTHON) benchmarks/gpu_check.py --python $(PYTHON) $(GPU_CHECK_ARGS)

# gpu-prebuild: the extension built here for a GPU machine's Python and torch, so that
# `make gpu-check` there finds it current and spends none of its time building: a virtualenv of
# GPU_PYTHON with GPU_TORCH (a CUDA build from the registry, several GB), then the extension built
# in place for GPU_ARCH alone. The Python tag is part of the files' names
# (_C.cpython-312-*.so, _build_info.cpython-312.json), so this build sits beside the local one;
# a GPU_PYTHON of the local venv's version is refused, since it would replace the local build.
GPU_PYTHON ?= python3.12
GPU_TORCH ?= torch==2.11.0
GPU_ARCH ?= 9.0
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
TAG := import sys; print(sys.implementation.cache_tag)

gpu-prebuild:
	test -x $(GPU_PY) || $(GPU_PYTHON) -m venv $(GPU_VENV)
	@if [ -x $(PY) ] && [ "$$($(PY) -c '$(TAG)')" = "$$($(GPU_PY) -c '$(TAG)')" ]; then \
		echo "gpu-prebuild: $(GPU_PYTHON) is the local venv's Python version; its build would replace the local one" >&2; \
		exit 2; fi
	$(GPU_PY) -m pip install -q $(GPU_TORCH) ninja pybind11 numpy wheel "setuptools>=77,<82"
	TORCH_CUDA_ARCH_LIST="$(GPU_ARCH)" FUSED_ATTN_WERROR=0 $(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -c 'from fused_attn import _extension as e; print("built for the GPU machine:", e.stale_reason() or "current")'

clean:
	rm -rf build *.egg-info fused_attn/_C*.so fused_attn/_build_info*.json $(VENV)/.built $(VENV)/.installed
