# The two commands of README: `make demo` (the main job on the embedded default) and `make test`.
PY ?= python
# On a laptop/CI the CPU build of torch; a GPU image brings its own torch and skips this.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-unit lint format bench gpu-bundle gpu-bundle-proof

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"

demo: install
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

# The GPU checks' packages for the device image (bench/gpu_bundle.py), and their CPU proof in a venv holding only
# that image's packages (~5 minutes the first time: the venv, the bundle, a DeepSpeed op build, two CPU steps).
gpu-bundle:
	$(PY) bench/gpu_bundle.py --out .gpu-bundle

gpu-bundle-proof:
	$(PY) bench/gpu_bundle.py --proof $${GPU_BUNDLE_PROOF_DIR:-/tmp/uft-gpu-bundle-proof}
