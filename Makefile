# Mpy-BLOX. `make demo` and `make test` bootstrap everything they need on a fresh
# machine: a .venv with Poetry inside it, the locked dependencies, and (for the
# tests) the Mosquitto broker.
#
# Device targets take DEVICE=<serial port> (default: the first one mpremote finds).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
POETRY := $(VENV)/bin/poetry
INSTALLED := $(VENV)/.installed

.PHONY: setup test demo bench soak lint mosquitto clean

setup: $(INSTALLED)

$(PY):
	@echo "mpy-blox: creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(POETRY): | $(PY)
	@echo "mpy-blox: installing Poetry into $(VENV)"
	$(PY) -m pip install --quiet "poetry>=2,<3"

$(INSTALLED): pyproject.toml poetry.lock | $(POETRY)
	@echo "mpy-blox: installing dependencies (poetry install)"
	VIRTUAL_ENV=$(abspath $(VENV)) $(POETRY) install --no-interaction --quiet
	@touch $@

mosquitto:
	@sh scripts/ensure-mosquitto.sh

# pytest exits 5 when it collected no test: a broken suite, not a pass.
test: setup mosquitto
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "mpy-blox: no tests were collected"; fi; \
	exit $$status

demo: setup
	@$(VENV)/bin/mpy-blox demo

# Benchmarks: tables on stdout, JSON in bench-results/. `make bench BENCH=mqtt` runs one.
bench: setup mosquitto
	@$(PY) bench/run.py $(BENCH)

# The long, exhaustive variants of the tests (e.g. a power cut at every flash write).
soak: setup mosquitto
	@$(PY) -m pytest --soak -m soak $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check mpy_blox_tools tests scripts
	$(VENV)/bin/ruff format --check mpy_blox_tools tests scripts

clean:
	rm -rf dist .boards .pytest_cache
