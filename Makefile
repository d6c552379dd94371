# One command each for a new user: `make demo`, `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench gpu-check tensorboard clean

install: $(STAMP)

# The venv sees system site-packages, so a torch that is already installed (e.g. a CUDA build)
# is used as it is; torch==2.13.0 (CPU) is installed only when no torch imports at all.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: install  # SEED=N: train the models with another seed
	$(PY) scripts/demo.py $(if $(SEED),--seed $(SEED))

# Lint (pyflakes, pycodestyle, import order), the import layers, then the tests.
test: install
	$(VENV)/bin/ruff check p2ch_app scripts tests
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# `make bench STEP ...` runs only those steps (e.g. `make bench serve`); the step names are no targets.
BENCH_STEPS := $(filter-out bench,$(MAKECMDGOALS))
bench: install
	$(PY) scripts/bench.py $(BENCH_STEPS)
ifneq ($(filter bench,$(MAKECMDGOALS)),)
$(BENCH_STEPS): ; @:
endif

# On a CUDA GPU (a few minutes on one): the tests marked cuda, the real CT on CUDA against the book's
# candidates (exact and --fast), its time, an AMP epoch of each trainer, DDP over NCCL; a table of the
# figures and bench-results/gpu-check.json. Without a GPU it says so and stops with exit code 2.
gpu-check: install
	$(PY) scripts/gpu_check.py

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs

# Removes generated data, caches and runs; keeps .venv (rm -rf .venv to drop it too).
clean:
	rm -rf data-unversioned/demo data-unversioned/demo-malignancy data-unversioned/demo-further data-unversioned/bench runs/*/ bench-results
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
