# Two commands do everything on a fresh machine: `make app` and `make test`.
# The virtual environment lives in .venv; torch is installed first (the local CPU build when no torch is
# present), so the package's `torch` requirement never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# The app listens on this machine only; `make app ADDRESS=0.0.0.0` opens it to the network.
ADDRESS ?= 127.0.0.1
PORT ?= 8501

.PHONY: app test test-all setup lint clean-venv figures gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

app: $(STAMP)
	$(BIN)/streamlit run app.py --server.address $(ADDRESS) --server.port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" --ignore-glob="*gpu*"

lint: $(STAMP)
	$(BIN)/ruff check asff_viz tests app.py

clean-venv:
	rm -rf $(VENV)

figures: $(STAMP)
	PYTHON=$(BIN)/python bash docs/make_figures.sh

# On a machine with a CUDA device (and the project's requirements installed next to a CUDA torch): the GPU tests and
# the GPU benchmark, one JSON and one Markdown table in runs/gpu_check/. Exit status 2 without a CUDA device.
# Wheels in .whl/ (`bash .ci/gpu_wheels.sh` where pip can download) are installed first, for machines without network.
GPU_SITE ?= /tmp/asff_viz_gpu_site
gpu-check:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "gpu-check: $(PYTHON) has no torch; run it with the Python that holds a CUDA build of torch: make gpu-check PYTHON=/path/to/python" >&2; exit 2; }
	@if [ -d .whl ]; then $(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --target $(GPU_SITE) .whl/*.whl 2>/dev/null || echo "gpu-check: the wheels in .whl/ do not install for $(PYTHON) (made for Python 3.12); going on without them" >&2; fi
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m asff_viz.bench.gpu_check --out runs/gpu_check
