# `make run` and `make test` do all set-up themselves on a fresh machine (Python 3.11+ and make).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# GPU users get PyPI's normal (CUDA) build; CPU-only users can pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the 750 MB CPU build (see README).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: run test lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, and only when missing, so an existing CUDA build in the venv is never replaced.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX_ARG)
	touch $@

# Without a CUDA GPU the `cpu` extra comes too: the CTranslate2 engine, several times faster on a CPU.
CPU_EXTRA = $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '[cpu]')")

$(VENV)/.run: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".$(CPU_EXTRA)"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[dev,corpus]"
	touch $@ $(VENV)/.run

run: $(VENV)/.run
	$(VENV)/bin/chatbot start

lint: $(VENV)/.dev
	$(PY) -m ruff check bot model tests scripts
	$(PY) -m ruff format --check bot model tests scripts
	$(PY) -m mypy bot model

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

format: $(VENV)/.dev
	$(PY) -m ruff check --fix bot model tests scripts
	$(PY) -m ruff format bot model tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
