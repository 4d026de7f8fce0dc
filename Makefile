# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The lock (pip-tools, hashed): requirements.lock is what the image runs, requirements-dev.lock
# the same versions plus the tools and tests. `make lock` writes both.
LOCK     := requirements-dev.lock
PIP      := $(PY) -m pip --disable-pip-version-check
PIP_TOOLS ?= pip-tools==7.5.3
LOCK_VENV ?= $(VENV)-lock
LOCK_UPGRADE ?= --upgrade
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links $(LOCK_UPGRADE)

.PHONY: demo test check lint format typecheck bench faults clean lock

# Exactly the locked versions, each checked against its hash, and nothing else: --no-deps
# installs the list as it is (no resolver step); `pip check` fails when pyproject.toml names
# a dependency the lock lacks (run `make lock`). An unchanged lock does not reinstall.
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --require-hashes --no-deps -r $(LOCK)
	@$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@$(PIP) check >/dev/null || { $(PIP) check; exit 1; }
	@touch $(STAMP)

# Resolve again (newest versions pyproject.toml allows; LOCK_UPGRADE= keeps the pins that
# still fit) and write both lock files; pip-compile runs from a venv of its own.
lock:
	@test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) \
		&& $(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check $(PIP_TOOLS); }
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --build-deps-for=wheel \
		-o requirements.lock pyproject.toml
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra=dev --build-deps-for=editable \
		-c requirements.lock -o requirements-dev.lock pyproject.toml

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
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
