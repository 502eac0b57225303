# The two commands a new user runs on a fresh machine:
#   make demo   -> virtualenv, install, run the main job on the embedded default model
#   make test   -> install what the tests need and run them
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# torch is only used for parity tests against HF transformers; never a runtime dependency.
# Installed only from a local CPU wheel directory, so a fresh machine never downloads GBs of CUDA.
TORCH_WHEELS ?= /opt/wheels

.PHONY: demo test test-fast bench install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.parity: $(VENV)/.installed
	@if ls $(TORCH_WHEELS)/torch-2.13.0*.whl >/dev/null 2>&1; then \
	  $(PIP) install -q "torch==2.13.0" "transformers>=4.45" || echo "parity deps failed to install: torch tests will skip"; \
	else echo "no local torch wheel in $(TORCH_WHEELS): torch parity tests will skip"; fi
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/opd-jax demo

test: $(VENV)/.parity
	$(PY) -m pytest -q --durations=25

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not torch"

bench: $(VENV)/.installed
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) .pytest_cache
