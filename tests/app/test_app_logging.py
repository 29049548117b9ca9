"""`import logging` on the device (mpy_blox/compat/logging.py, shipped at the top of
/lib): the part of the standard module upstream code uses, routed to the device log;
and the upstream project's own example user_main.py, run unchanged on a virtual board."""

from pathlib import Path

from mpy_blox_tools.micropython import DEFAULT_HEAP as ESP32_HEAP

REPO = Path(__file__).resolve().parent.parent.parent
COMPAT = REPO / "mpy_blox" / "compat"

# maruno/mpy-blox 0.6.0, examples/user_main.py, unchanged.
UPSTREAM_USER_MAIN = """import logging
import uasyncio as asyncio


async def user_main():
    logging.info("ESP32 DEV testbed")

    while True:
        await asyncio.sleep(1)
        logging.info("Had a 1s nap")
"""


def test_logging_levels_handlers_formatting_and_exceptions(run_mpy):
    out = run_mpy(
        f"""
import sys
sys.path.insert(0, {str(COMPAT)!r})
import io
import logging
log = logging.getLogger("pump")
assert logging.getLogger("pump") is log and logging.getLogger() is logging.root
log.debug("hidden %d", 1)                      # the device's level: INFO
log.info("flow %d l/h of %s", 12, "water")
log.warning("bad format %d", "x")              # logged, not raised
logging.basicConfig(level=logging.DEBUG)
log.debug("now visible")
log.critical("on fire")
other = logging.getLogger("quiet")
other.setLevel("ERROR")
other.warning("hidden too")
assert other.isEnabledFor(logging.ERROR) and not other.isEnabledFor(logging.WARNING)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("division in %s", "pump")
buf = io.StringIO()
h = logging.StreamHandler(buf)
h.setFormatter(logging.Formatter("%(levelname)s [%(name)s] %(message)s"))
log.addHandler(h)
log.info("to the stream %s", "only")
log.removeHandler(h)
print("STREAM", repr(buf.getvalue()))
try:
    logging.basicConfig(level="LOUD")
except ValueError as e:
    print("refused", e)
print("level names", logging.getLevelName(logging.WARNING), logging.getLevelName("ERROR"))
""",
        heap="64K",
    )
    lines = out.splitlines()
    assert not any("hidden" in line for line in lines), out
    assert any(
        line.startswith("I ") and line.endswith("pump: flow 12 l/h of water") for line in lines
    )
    assert any(line.endswith("pump: bad format %d ('x',)") for line in lines)
    assert any(line.startswith("D ") and line.endswith("pump: now visible") for line in lines)
    assert any(line.startswith("C ") and line.endswith("pump: on fire") for line in lines)
    assert any(line.startswith("E ") and line.endswith("pump: division in pump") for line in lines)
    assert "ZeroDivisionError" in out  # the traceback
    assert "STREAM 'INFO [pump] to the stream only\\n'" in out
    assert not any(line.endswith("to the stream only") for line in lines)  # the handler's only
    assert "refused unknown level: 'LOUD'" in out
    assert "level names WARNING 40" in out


def test_the_upstream_example_user_main_runs_unchanged(
    lane, app_board, boards, broker, settings_for, watch, full_mpy
):
    # The framework as its wheel installs it: mpy_blox/ and logging.mpy in /lib.
    board = app_board(settings_for(broker), user_main=UPSTREAM_USER_MAIN, framework=None)
    board.put_tree(full_mpy, "lib/mpy_blox")
    board.write("lib/logging.mpy", (full_mpy.parent / "logging.mpy").read_bytes())
    w = watch(board)
    # An ESP32's 100K on the 32-bit lane; the same carried to the 64-bit one.
    rb = boards.start(board, heap=lane.carried(ESP32_HEAP), lane=lane)
    rb.wait_for(r"I [\d.]+ root: ESP32 DEV testbed")
    rb.wait_for(r"I [\d.]+ root: Had a 1s nap", count=2)
    w.wait("status", state="online")
    out = rb.console()
    assert "safe mode" not in out and "failed" not in out and "fatal" not in out
