# Set-up and entry points. Every target creates the virtual environment when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on machines without a GPU; override for CUDA (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint demo gpu-wheels gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,serve,demo]"
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# DeepSpeed JIT-builds its CPU shared-memory op on first use: build it inside this venv, so
# another checkout's venv never rebuilds it under our feet (ranks wait on its lock file).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions \
		$(PY) -m pytest -q

# The whole product on scikit-learn's digits; DEMO_FLAGS=--fresh redoes every stage.
demo: $(STAMP)
	OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true $(PY) -m lvvit.demo --out demo_out $(DEMO_FLAGS)

# The GPU check's luggage (docs/benchmarks.md): our wheel and those of the dependencies a bare
# GPU machine lacks (Python 3.12, x86-64; CUDA torch, numpy, pillow, yaml are there), in .whl/.
GPU_PY := --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_PURE := webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 \
	typing-inspection==0.4.5
GPU_BINARY := pydantic_core==2.50.5

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl .
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	$(PY) -m pip download -q --no-deps $(GPU_PY) -d .whl $(GPU_PURE) $(GPU_BINARY)
	du -sh .whl

# On the GPU machine, after `make gpu-wheels` here: writes gpu_check.md (or $$OUT/gpu_check.md).
gpu-check:
	benchmarks/gpu_check.sh
