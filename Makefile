# Set-up and entry points. Every target creates the virtual environment when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on machines without a GPU; override for CUDA (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,serve,demo]"
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -q

# The whole product on scikit-learn's digits; DEMO_FLAGS=--fresh redoes every stage.
demo: $(STAMP)
	OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true $(PY) -m lvvit.demo --out demo_out $(DEMO_FLAGS)
