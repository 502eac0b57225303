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
# tunix integration tests (tests/test_integrations_tunix.py): google-tunix 0.1.7 *without* its
# dependency tree. The full extra (pip install ".[tunix]") pulls ~1.6 GB (tensorflow-datasets, numba,
# kagglehub, ...) and takes ~13 min; the modules the integration and its tests import need only
# these packages on top of .[test] (pinned to what the full install resolves; all wheels). The
# import check fails the build if one is missing; make test sets OPD_JAX_REQUIRE_TUNIX=1 so the
# tunix tests error instead of skipping. See BUILD_NOTES.md "Test suite and CI".
# lint of make test (ruff config in pyproject.toml); a test-only tool, so not in .installed (demo)
RUFF = ruff==0.17.6
TUNIX_LEAN = google-tunix==0.1.7 jaxtyping==0.3.11 wadler-lindig==0.1.8 google-metrax==0.2.4 \
             clu==0.0.12 tensorboardX==2.6.5 perfetto==0.59.1 wrapt==2.5.2 pandas==3.1.1

.PHONY: demo test test-oldest test-fast bench install clean

# the demo's environment: the package and what the shipped configs use (no test tooling)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e ".[demo]"
	touch $@

$(VENV)/.testdeps: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.parity: $(VENV)/.testdeps
	@if ls $(TORCH_WHEELS)/torch-2.13.0*.whl >/dev/null 2>&1; then \
	  $(PIP) install -q "torch==2.13.0" "transformers>=4.45" || echo "parity deps failed to install: torch tests will skip"; \
	else echo "no local torch wheel in $(TORCH_WHEELS): torch parity tests will skip"; fi
	touch $@

$(VENV)/.tunix: $(VENV)/.testdeps Makefile
	$(PIP) install -q --no-deps $(TUNIX_LEAN)
	JAX_PLATFORMS=cpu $(PY) -c "import tunix.distillation.distillation_trainer, tunix.distillation.strategies, tunix.models.qwen3.model"
	touch $@

$(VENV)/.lint: $(VENV)/.testdeps Makefile
	$(PIP) install -q "$(RUFF)"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/opd-jax demo

test: $(VENV)/.parity $(VENV)/.tunix $(VENV)/.lint
	$(VENV)/bin/ruff check .
	OPD_JAX_REQUIRE_TUNIX=1 $(PY) -m pytest -q --durations=25 \
	  --deselect "tests/test_notebooks.py::test_notebook_runs[quickstart.ipynb]"   # in test-oldest

# CI's second pass, in its own environment: the package with the `[notebook]` extra alone (what
# a notebook user installs; plus the test runners) at the oldest supported jax / flax / optax /
# orbax / grain (ci/oldest.txt). It runs the loss library, a tiny end-to-end run (all stage
# kinds, a resume after a kill) and both notebooks (the quickstart runs only here). The
# compiled-memory bounds of the chunked losses are left out: they measure XLA's buffer
# assignment, which differs by XLA version (BUILD_NOTES "Today's JAX").
OLDEST = .venv-oldest
$(OLDEST)/.installed: pyproject.toml ci/oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q -U pip
	$(OLDEST)/bin/python -m pip install -q -c ci/oldest.txt -e ".[notebook]" \
	  "pytest>=8" "hypothesis>=6.100" "nbclient>=0.9" "nbformat>=5"
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('oldest pins:', jax.__version__, flax.__version__, optax.__version__, o.__version__)"
	JAX_PLATFORMS=cpu $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider \
	  tests/test_losses_divergences.py tests/test_losses_topk.py tests/test_losses_estimators.py \
	  tests/test_losses_reductions.py tests/test_losses_chunked.py tests/test_layout.py \
	  tests/test_train.py tests/test_notebooks.py \
	  -k "not memory_is_bounded and (losses or light or tiny_run_all_stage_kinds or resume_after_kill or notebook)"

test-fast: $(VENV)/.testdeps
	$(PY) -m pytest -q -m "not slow and not torch"

bench: $(VENV)/.installed
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) .pytest_cache
