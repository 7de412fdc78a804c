# The one entry point: `make test` and `make bench` each set up .venv on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test bench lint format check clean test-triton-gpu-image test-oldest-torch

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,peers]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/fastxent bench

check: $(STAMP)
	$(BIN)/fastxent check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The Triton tests (interpreter, and ahead-of-time cubin builds for sm_90/sm_80) against the
# triton of the GPU machine's image (3.6.0). Its interpreter predates NumPy 2.3's stricter
# array-to-int conversion, hence the NumPy bound; on a GPU no interpreter runs.
GPU_IMAGE_VENV := .venv-triton-3.6
test-triton-gpu-image:
	test -x $(GPU_IMAGE_VENV)/bin/python || $(PY) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/pip install -q -c constraints.txt torch "numpy<2.3" pytest "triton==3.6.0"
	PYTHONPATH=src $(GPU_IMAGE_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_triton.py tests/test_triton_compile.py

# The whole suite on the oldest torch the package admits (2.4.1), in a venv of its own: no CPU
# wheel of it lies on this machine, so this pulls the index's CUDA build (several GB; it runs on
# the CPU). It brings triton 3.0, which fastxent does not use (its Triton tests skip), and needs
# NumPy < 2.3. What the suite skips there: tests/versions.py.
OLDEST_TORCH_VENV := .venv-torch-2.4
test-oldest-torch:
	test -x $(OLDEST_TORCH_VENV)/bin/python || $(PY) -m venv $(OLDEST_TORCH_VENV)
	$(OLDEST_TORCH_VENV)/bin/pip install -q "torch==2.4.1" "numpy<2.3" -e ".[dev,peers]"
	$(OLDEST_TORCH_VENV)/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) $(GPU_IMAGE_VENV) $(OLDEST_TORCH_VENV) build *.egg-info src/*.egg-info .pytest_cache
