# Mpy-BLOX. `make demo` and `make test` bootstrap everything they need on a fresh
# machine: a .venv with Poetry inside it, the locked dependencies, and (for the
# tests) the Mosquitto broker.
#
# Device targets take DEVICE=<serial port> (default: the first one mpremote finds)
# and MPREMOTE=<mpremote program> (default: the one in .venv; under WSL2 the Windows
# mpremote.exe, with DEVICE=COM4). The environment's MPY_BLOX_MPREMOTE also names it.

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
MPREMOTE ?= $(MPY_BLOX_MPREMOTE)
DEPLOY = $(if $(MPREMOTE),MPY_BLOX_MPREMOTE="$(MPREMOTE)") $(VENV)/bin/mpy-blox deploy
PORT = $(if $(DEVICE),--device $(DEVICE))
WHEEL_ARG = $(if $(WHEEL),--wheel $(WHEEL))
REMOTE = "$(or $(MPREMOTE),$(VENV)/bin/mpremote)" $(if $(DEVICE),connect $(DEVICE))

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
	@$(DEPLOY) lib $(PORT) $(WHEEL_ARG)

deploy-app: setup
	@$(DEPLOY) app $(PORT) --settings $(SETTINGS) --provision $(PROVISION) \
		--user-main $(USER_MAIN) $(WHEEL_ARG)

deploy-user: setup
	@$(DEPLOY) user $(PORT) --user-main $(USER_MAIN)

provision: setup
	@$(DEPLOY) provision $(PORT) --provision $(PROVISION)

unprovision: setup
	@$(DEPLOY) unprovision $(PORT)

purge-lib: setup
	@$(DEPLOY) purge-lib $(PORT)

repl: setup
	@echo "repl: $(or $(DEVICE),first device) (Ctrl-] or Ctrl-X to leave)"
	@$(REMOTE) repl

mounted-repl: setup
	@echo "mounted-repl: $(CURDIR) mounted at /remote on $(or $(DEVICE),first device)"
	@$(REMOTE) mount . repl

# Workstation and device code, tests included (device code keeps MicroPython idioms).
lint: setup
	$(VENV)/bin/ruff check mpy_blox_tools tests scripts bench
	$(VENV)/bin/ruff format --check mpy_blox_tools tests/tools tests/test_*.py tests/conftest.py bench scripts

clean:
	rm -rf dist .boards .pytest_cache
