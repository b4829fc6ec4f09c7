# Every target sets itself up on a fresh machine: it creates .venv and installs vs2ray.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Machine-specific pins for the 2-core CPU development machines and CI: this torch /
# torchvision pair lies on their disk (PyPI's torchvision does not import beside the
# CPU torch wheel there). Override on other machines: make test TORCH_PINS=
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= cpu,dev,bench,mlflow,tensorboard  # bench: sparsify, whose own loader the SAE export tests

.PHONY: install test faults lint docs demo world world-card gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	test -z "$(TORCH_PINS)" || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

# The fault suite (tests/test_faults.py, issue 32): actors, trial workers and nodes killed, full disks, two
# drivers on one store, damaged part files, S3 storage (moto's server). Six to ten minutes on 2 cores; CI runs it.
# The full-disk tests mount a tmpfs and need root.
faults: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m faults tests/test_faults.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

# The documentation site (docs/, mkdocs.yml) into build/site; strict: a broken link or a missing page fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The bundled world end to end: extraction, the quickstart sweep (8 trials), then its report.
demo: install
	name=quickstart-demo-$$(date +%Y%m%d-%H%M%S) && \
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(PY) -m vs2ray.sweep --config sweeps/quickstart.yaml --name $$name && \
	$(PY) -m analysis.report $${VS2RAY_EXPERIMENTS:-$${VS2RAY_ROOT:-$$HOME/vs2ray}/experiments}/$$name

# Re-create the bundled world's weights: vs2ray-tiny (about 4 minutes on 2 cores) and
# vs2ray-tiny-retrieval (about 5 minutes), then measure the world card on the quickstart's stores.
world: install
	$(PY) scripts/train_tiny_clip.py
	$(PY) scripts/train_retrieval_encoder.py
	$(MAKE) world-card

# The world card on the quickstart's stores (extracts them first when missing).
world-card: install
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(PY) scripts/world_card.py --config sweeps/quickstart.yaml

# The GPU check on a machine with one NVIDIA GPU (no Ray needed; see docs/gpus.md for the
# wheels to bring to a bare machine). It runs outside .venv on purpose: `make gpu-check PYTHON=python3`.
# Its CPU mode (--device cpu --small) runs in `make test` (tests/test_gpu_check.py).
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
