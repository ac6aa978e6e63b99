# Set-up and the project's main jobs. `make demo` and `make test` are all a fresh clone needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: a CPU wheel on these machines (local disk), the CUDA build from PyPI on GPU nodes.
TORCH ?= torch==2.13.0

.PHONY: setup demo serve test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) examples/demo.py

serve: setup
	$(VENV)/bin/mlip serve

test: setup
	$(PY) -m pytest -q
