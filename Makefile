# Mpy-BLOX. `make demo` and `make test` bootstrap everything they need on a fresh
# machine: a .venv with Poetry inside it, the locked dependencies, and (for the
# tests) the Mosquitto broker.
#
# Device targets take DEVICE=<serial port> (default: the first one mpremote finds)
# and MPREMOTE=<mpremote program> (default: the one in .venv; under WSL2 the Windows
# mpremote.exe, with DEVICE=COM4). The environment's MPY_BLOX_MPREMOTE also names it.
# deploy-app and provision take SEQ_FLOOR=<the fleet's update seq>: the device's
# seq is raised to it, so no older signed list can be replayed onto it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
POETRY := $(VENV)/bin/poetry
INSTALLED := $(VENV)/.installed
INSTALLED_BENCH := $(VENV)/.installed-bench

DEVICE ?=
SETTINGS ?= settings.json
PROVISION ?= provision.json
USER_MAIN ?= user_main.py
WHEEL ?=
SEQ_FLOOR ?=
MPREMOTE ?= $(MPY_BLOX_MPREMOTE)
DEPLOY = $(if $(MPREMOTE),MPY_BLOX_MPREMOTE="$(MPREMOTE)") $(VENV)/bin/mpy-blox deploy
PORT = $(if $(DEVICE),--device $(DEVICE))
WHEEL_ARG = $(if $(WHEEL),--wheel $(WHEEL))
SEQ_FLOOR_ARG = $(if $(SEQ_FLOOR),--seq-floor $(SEQ_FLOOR))
REMOTE = "$(or $(MPREMOTE),$(VENV)/bin/mpremote)" $(if $(DEVICE),connect $(DEVICE))

# The 32-bit lane (docs/runtime.md): a 32-bit MicroPython has an ESP32's object
# sizes, so the tests' heap figures hold for the device. Used when
# MPY_BLOX_MICROPYTHON32 names one; by default the one the team keeps beside the
# repository, if it is there. MPY_BLOX_MICROPYTHON32= (empty) skips the lane.
MICROPYTHON32_DEFAULT := $(abspath ../shared/tools/micropython32/micropython)
ifeq ($(origin MPY_BLOX_MICROPYTHON32),undefined)
ifneq ($(wildcard $(MICROPYTHON32_DEFAULT)),)
export MPY_BLOX_MICROPYTHON32 := $(MICROPYTHON32_DEFAULT)
endif
endif

.PHONY: setup bench-setup test demo bench bench-report heap soak lint mosquitto lane32 clean
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

# The benches' own group (matplotlib for the report's plots): not for `make test`.
bench-setup: $(INSTALLED_BENCH)

$(INSTALLED_BENCH): $(INSTALLED)
	@echo "mpy-blox: installing the bench group (poetry install --with bench)"
	VIRTUAL_ENV=$(abspath $(VENV)) $(POETRY) install --all-extras --with bench --no-interaction --quiet
	@touch $@

mosquitto:
	@sh scripts/ensure-mosquitto.sh

# The 32-bit lane's binary runs (libc6-i386 installed when we can), or nothing to do.
lane32:
	@if [ -n "$$MPY_BLOX_MICROPYTHON32" ]; then \
		sh scripts/ensure-libc6-i386.sh "$$MPY_BLOX_MICROPYTHON32" && \
		echo "mpy-blox: 32-bit lane: $$MPY_BLOX_MICROPYTHON32"; \
	else echo "mpy-blox: no 32-bit lane (MPY_BLOX_MICROPYTHON32 unset): its tests are skipped"; fi

# The suite runs on TEST_WORKERS processes (pytest-xdist): its boards and brokers
# mostly wait, so two workers on two cores take half the time of one. Each worker
# has its own session broker and temporary folders. TEST_WORKERS=0: one process.
# --dist loadgroup: a module marked xdist_group stays on one worker (one RabbitMQ
# node; the heap edges' tests one at a time).
TEST_WORKERS ?= 2
TEST_DIST = $(if $(filter 0,$(TEST_WORKERS)),,--dist loadgroup)

# pytest exits 5 when it collected no test: a broken suite, not a pass.
test: setup mosquitto lane32
	@$(PY) -m pytest -n $(TEST_WORKERS) $(TEST_DIST) $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "mpy-blox: no tests were collected"; fi; \
	exit $$status

# The demo prefers Mosquitto (installed here when we can) and otherwise runs
# the embedded amqtt broker.
demo: setup lane32
	@sh scripts/ensure-mosquitto.sh 2>/dev/null || echo "mpy-blox: no Mosquitto: the demo uses the embedded broker"
	@$(VENV)/bin/mpy-blox demo

# Benchmarks: tables on stdout, JSON in bench-results/. `make bench BENCH=mqtt` runs one.
bench: bench-setup mosquitto lane32
	@$(PY) bench/run.py $(BENCH)

# docs/benchmarks.md's generated section and docs/img/bench-*.png from the latest
# run of each benchmark in bench-results/ (bench/report.py).
bench-report: bench-setup
	@$(PY) bench/report.py

# The heap at each phase of an update and the install boot's edge, 32-bit and
# 64-bit side by side (bench/bench_heap.py); JSON in bench-results/.
heap: setup mosquitto lane32
	@$(PY) bench/run.py heap

# The long, exhaustive variants of the tests (e.g. a power cut at every flash write).
soak: setup mosquitto lane32
	@$(PY) -m pytest --soak -m soak $(PYTEST_ARGS)

# -- a device over its serial port (DEVICE=/dev/ttyUSB0, /dev/cu.usbserial-0001, COM4) --

deploy-lib: setup
	@$(DEPLOY) lib $(PORT) $(WHEEL_ARG)

deploy-app: setup
	@$(DEPLOY) app $(PORT) --settings $(SETTINGS) --provision $(PROVISION) \
		--user-main $(USER_MAIN) $(WHEEL_ARG) $(SEQ_FLOOR_ARG)

deploy-user: setup
	@$(DEPLOY) user $(PORT) --user-main $(USER_MAIN)

provision: setup
	@$(DEPLOY) provision $(PORT) --provision $(PROVISION) $(SEQ_FLOOR_ARG)

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
LINTED = mpy_blox mpypi_recover.py main.py mpy_blox_tools tests bench scripts
lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

clean:
	rm -rf dist .boards .pytest_cache
