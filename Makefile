# Developer and CI entry points for plait. `make test` is what CI runs (.ci/run).
#
#   make venv      .venv with torch, the build tools and the test tools
#   make build     editable install of plait, compiling plait._C (nvcc too, when found)
#   make test      build, then pytest without the tests marked slow (PYTEST_ARGS adds arguments)
#   make test-all  the same with the slow tests (end-to-end benchmark smoke runs)
#   make demo      build, then examples/demo.py (plait train on this repository's text, 2x2x2 vs one process)
#   make bench     build, then the benchmarks and the README's results table
#   make gpu-check on one CUDA GPU: build, GPU tests, compute-sanitizer, GPU benchmarks, a summary
#                  (scripts/gpu_check.py; without a GPU one line, exit 0; DRY_RUN=1 lists the stages)
#   make clean     remove build outputs; make distclean also removes .venv
#
# When $(PYTHON) can already import torch (a GPU machine with a system CUDA torch), the
# venv sees the system packages and installs nothing that is already importable, so it
# works offline. Otherwise it installs $(TORCH_SPEC): torch==2.13.0 is a local CPU wheel
# here, while a bare `torch` would fetch the multi-GB CUDA build.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PYTEST_MARKS ?= not slow
PLAIT_TIMEOUT_S ?= 60
export PLAIT_TIMEOUT_S
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1
export PIP_PROGRESS_BAR := off

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# Needed to build and test; checked by import name, installed only when missing (ninja:
# the binary on PATH also counts; wheel: not needed by setuptools >= 70.1).
TOOLS := numpy pytest hypothesis pybind11 ninja setuptools wheel
# The optional extras (plait[hf,serve,train]) as import-name:pip-name; installed when missing, and a
# failure (no network, e.g. on the GPU machine) only warns: their tests skip without them.
EXTRAS := transformers:transformers safetensors:safetensors tokenizers:tokenizers fastapi:fastapi openai:openai \
  uvicorn:uvicorn prometheus_client:prometheus-client httpx:httpx tqdm:tqdm yaml:pyyaml tensorboard:tensorboard
SETUPTOOLS_OK := import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)
DEPS_STAMP := $(VENV)/.deps.stamp
# --system-site-packages reaches the *base* interpreter's packages, not those of a venv that
# $(PYTHON) itself runs in (the GPU machine's python3 is /opt/torch/.venv/bin/python3): a .pth
# file puts that venv's site-packages on the new venv's path.
PARENT_VENV_PTH := parent=$$($(PYTHON) -c "import site, sys; sys.prefix != sys.base_prefix and \
  print('\n'.join(site.getsitepackages()))"); \
  if [ -n "$$parent" ]; then echo "   $(PYTHON) runs in a venv: its packages reach $(VENV) through parent-venv.pth"; \
  echo "$$parent" > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/parent-venv.pth"; fi
BUILD_STAMP := $(VENV)/.build.stamp
CSRC_FILES := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test test-all demo bench gpu-check clean distclean

venv: $(DEPS_STAMP)

$(VPY):
	@echo ">> creating $(VENV)"
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "   $(PYTHON) has torch: the venv uses the system packages"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV) 2>/dev/null || { \
	    echo "   no ensurepip: creating the venv without pip (the system pip serves it)"; \
	    rm -rf $(VENV); $(PYTHON) -m venv --system-site-packages --without-pip $(VENV); }; \
	  $(PARENT_VENV_PTH); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@$(PIP) --version >/dev/null || { echo "error: $(VENV) has no pip; install pip for $(PYTHON)"; exit 1; }

$(DEPS_STAMP): pyproject.toml Makefile | $(VPY)
	@echo ">> checking packages in $(VENV)"
	@if ! $(VPY) -c "import torch" 2>/dev/null; then \
	  echo "   installing $(TORCH_SPEC)"; $(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	@missing=""; \
	for m in $(TOOLS); do \
	  case $$m in \
	    ninja) command -v ninja >/dev/null && continue;; \
	    wheel) $(VPY) -c "import setuptools.command.bdist_wheel" 2>/dev/null && continue;; \
	    setuptools) $(VPY) -c "$(SETUPTOOLS_OK)" 2>/dev/null || missing="$$missing setuptools>=64"; continue;; \
	  esac; \
	  $(VPY) -c "import $$m" 2>/dev/null || missing="$$missing $$m"; \
	done; \
	if [ -n "$$missing" ]; then echo "   installing$$missing"; $(PIP) install -q $$missing; fi
	@if ! $(VPY) -c "import triton" 2>/dev/null; then \
	  echo "   installing triton"; \
	  $(PIP) install -q triton || echo "warning: triton did not install; plait.kernels will be unavailable"; \
	fi
	@missing=""; \
	for pair in $(EXTRAS); do \
	  $(VPY) -c "import $${pair%%:*}" 2>/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then echo "   installing extras:$$missing"; \
	  $(PIP) install -q $$missing || echo "warning: extras did not install; their tests will skip"; fi
	@touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC_FILES)
	@echo ">> building plait (editable) and plait._C"
	@$(PIP) install -q --no-build-isolation --no-deps -e .
	@$(VPY) -c "from plait import _C; print('   plait._C:', _C.build_info())"
	@touch $@

test: build
	@echo ">> pytest tests (PLAIT_TIMEOUT_S=$(PLAIT_TIMEOUT_S))"
	@rc=0; $(VPY) -m pytest tests -q -m "$(PYTEST_MARKS)" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; \
	exit $$rc

test-all:
	@$(MAKE) --no-print-directory test PYTEST_MARKS="slow or not slow"

demo: build
	@echo ">> examples/demo.py"
	@$(VPY) examples/demo.py

# Benchmarks that run anywhere; gemm needs a CUDA GPU and is skipped, with a line, without one.
BENCHES ?= tp_layers comm pipeline train plan_validation hf train_hf serve

bench: build
	@$(VPY) -c "import matplotlib" 2>/dev/null || $(PIP) install -q matplotlib 2>/dev/null || \
	  echo "   matplotlib not installable here: benchmarks write JSON without PNG plots"
	@$(VPY) -c "import deepspeed" 2>/dev/null || $(PIP) install -q deepspeed 2>/dev/null || \
	  echo "   deepspeed not installable here: plait bench comm compares with gloo only, plait bench serve runs without DeepSpeed AutoTP"
	@$(VPY) -c "import accelerate" 2>/dev/null || $(PIP) install -q accelerate 2>/dev/null || \
	  echo "   accelerate not installable here: plait bench hf runs without transformers' tensor parallelism"
	@for name in $(BENCHES); do echo ">> plait bench $$name"; $(VENV)/bin/plait bench $$name; done
	@if $(VPY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  echo ">> plait bench gemm --plot"; $(VENV)/bin/plait bench gemm --plot; \
	  echo ">> plait bench comm_gpu"; $(VENV)/bin/plait bench comm_gpu; \
	else echo ">> plait bench gemm, comm_gpu: skipped (need a CUDA GPU)"; fi
	@echo ">> bench/report.py"
	@$(VPY) bench/report.py

# Runs with $(PYTHON) itself (standard library only); its build stage calls `make build`.
GPU_CHECK_ARGS ?=
gpu-check:
	@$(PYTHON) scripts/gpu_check.py $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(GPU_CHECK_ARGS)

clean:
	@echo ">> removing build outputs"
	@rm -rf build *.egg-info python/*.egg-info
	@rm -f python/plait/_C*.so $(DEPS_STAMP) $(BUILD_STAMP)

distclean: clean
	@echo ">> removing $(VENV)"
	@rm -rf $(VENV)
