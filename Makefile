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

DEVICE ?=
SETTINGS ?= settings.json
PROVISION ?= provision.json
USER_MAIN ?= user_main.py
WHEEL ?=
DEPLOY = $(PY) -m mpy_blox_tools.deploy $(if $(DEVICE),--device $(DEVICE)) \
	--settings $(SETTINGS) --provision $(PROVISION) --user-main $(USER_MAIN) \
	$(if $(WHEEL),--wheel $(WHEEL))
MPREMOTE = $(VENV)/bin/mpremote $(if $(DEVICE),connect $(DEVICE))

.PHONY: setup test demo bench soak lint mosquitto clean
.PHONY: deploy-lib deploy-app deploy-user provision unprovision purge-lib repl mounted-repl

setup: $(INSTALLED)

$(PY):
	@echo "mpy-blox: creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(POETRY): | $(PY)
	@echo "mpy-blox: installing Poetry into $(VENV)"
	$(PY) -m pip install --quiet "poetry>=2,<3"

$(INSTALLED): pyproject.toml poetry.lock | $(POETRY)
	@echo "mpy-blox: installing dependencies (poetry install --all-extras)"
	VIRTUAL_ENV=$(abspath $(VENV)) $(POETRY) install --all-extras --no-interaction --quiet
	@touch $@

mosquitto:
	@sh scripts/ensure-mosquitto.sh

# pytest exits 5 when it collected no test: a broken suite, not a pass.
test: setup mosquitto
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "mpy-blox: no tests were collected"; fi; \
	exit $$status

# The demo prefers Mosquitto (installed here when we can) and otherwise runs
# the embedded amqtt broker.
demo: setup
	@sh scripts/ensure-mosquitto.sh 2>/dev/null || echo "mpy-blox: no Mosquitto: the demo uses the embedded broker"
	@$(VENV)/bin/mpy-blox demo

# Benchmarks: tables on stdout, JSON in bench-results/. `make bench BENCH=mqtt` runs one.
bench: setup mosquitto
	@$(PY) bench/run.py $(BENCH)

# The long, exhaustive variants of the tests (e.g. a power cut at every flash write).
soak: setup mosquitto
	@$(PY) -m pytest --soak -m soak $(PYTEST_ARGS)

# -- a device over its serial port (DEVICE=/dev/ttyUSB0, /dev/cu.usbserial-0001, COM4) --

deploy-lib: setup
	@$(DEPLOY) lib

deploy-app: setup
	@$(DEPLOY) app

deploy-user: setup
	@$(DEPLOY) user

provision: setup
	@$(DEPLOY) provision

unprovision: setup
	@$(DEPLOY) unprovision

purge-lib: setup
	@$(DEPLOY) purge-lib

repl: setup
	@echo "repl: $(or $(DEVICE),first device) (Ctrl-] or Ctrl-X to leave)"
	@$(MPREMOTE) repl

mounted-repl: setup
	@echo "mounted-repl: $(CURDIR) mounted at /remote on $(or $(DEVICE),first device)"
	@$(MPREMOTE) mount . repl

# Workstation and device code, tests included (device code keeps MicroPython idioms).
lint: setup
	$(VENV)/bin/ruff check mpy_blox_tools tests scripts bench
	$(VENV)/bin/ruff format --check mpy_blox_tools tests/tools tests/test_*.py tests/conftest.py bench scripts

clean:
	rm -rf dist .boards .pytest_cache
