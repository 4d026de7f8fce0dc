# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test check lint format typecheck bench faults clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apsis-export demo

# Redis for the tests: REDIS_URL when set (only its database index is flushed), else a
# redis-server started on a free port, else fakeredis's TCP server (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The fault suite; its dispatch-line tests run at APSIS's documented rates here (x10 in test).
faults: $(STAMP)
	APSIS_TEST_SCALE=1 $(PY) -m pytest -m faults -s $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff format worker tasks webhook sandbox bench tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check worker tasks webhook sandbox bench tests
	$(VENV)/bin/ruff check worker tasks webhook sandbox bench tests
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --ignore-missing-imports --explicit-package-bases tests

check: lint typecheck test

bench: $(STAMP)
	$(PY) -m bench.all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
