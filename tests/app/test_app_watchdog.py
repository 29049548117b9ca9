"""The watchdog on a virtual board against real Mosquitto: a user_main that blocks the
loop is reset, a healthy board never is, and watchdog resets in a row end in safe mode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import serial

REPO = Path(__file__).resolve().parent.parent.parent

# Blocks the loop on its first run only (a file on the flash counts the runs);
# runs well from the second on.
BLOCKS_ONCE = """
import asyncio, time
async def user_main():
    try:
        n = int(open("/runs").read())
    except OSError:
        n = 0
    with open("/runs", "w") as f:
        f.write(str(n + 1))
    print("USER run %d" % (n + 1))
    if n == 0:
        time.sleep(3600)  # blocks the loop: no task runs, the feeder neither
    i = 0
    while True:
        i += 1
        print("USER alive %d" % i)
        await asyncio.sleep_ms(500)
"""

BLOCKS_ALWAYS = """
print("USER imported")
async def user_main():
    print("USER start")
    while True:
        pass
"""

# Counts its own time: "alive 8" is 8 s of the board's clock, four 2-s timeouts.
HEALTHY = """
import asyncio
async def user_main():
    i = 0
    while True:
        i += 1
        print("USER alive %d" % i)
        await asyncio.sleep(1)
"""


@pytest.fixture
def esp32(board_lane):
    """Start options for an ESP32's heap (the 32-bit lane's 100K, or the same carried)."""
    return {"lane": board_lane, "heap": board_lane.carried("100K")}


def _settings(settings_for, broker, timeout_s, **app):
    return settings_for(broker, watchdog={"timeout_s": timeout_s}, app=app)


def test_a_user_main_blocking_the_loop_is_reset_by_the_watchdog(
    esp32, app_board, boards, broker, settings_for
):
    board = app_board(_settings(settings_for, broker, 2), user_main=BLOCKS_ONCE)
    rb = boards.start(board, **esp32)
    rb.wait_for(r"USER alive 1")
    out = rb.console()
    first, second = out.split("[vboard] board stopped: watchdog reset\n")
    assert "watchdog: armed: 2 s, fed every 500 ms" in first
    assert "USER run 1" in first and "USER alive" not in first
    assert second.startswith("[vboard] boot 2 (reset cause 3,")
    assert "watchdog: reset by the watchdog (1 in a row)" in second
    assert rb.boots() == 2


def test_a_healthy_board_is_fed_and_never_reset_over_several_timeouts(
    esp32, app_board, boards, broker, settings_for
):
    board = app_board(_settings(settings_for, broker, 2), user_main=HEALTHY)
    rb = boards.start(board, **esp32)
    rb.wait_for(r"USER alive 8")
    assert (board.run_dir / "wdt").stat().st_size  # armed
    out = rb.console()
    assert "watchdog: armed: 2 s" in out
    assert "watchdog reset" not in out and rb.boots() == 1


def test_timeout_0_never_arms_the_watchdog(esp32, app_board, boards, broker, settings_for):
    # The same blocking user_main the first test sees reset; the emulation's file
    # is what an armed watchdog writes.
    board = app_board(_settings(settings_for, broker, 0), user_main=BLOCKS_ONCE)
    rb = boards.start(board, **esp32)
    rb.wait_for(r"USER run 1")
    assert "watchdog: watchdog off (watchdog.timeout_s 0)" in rb.console()
    assert (board.run_dir / "wdt").stat().st_size == 0
    assert "armed" not in rb.console()


@pytest.mark.parametrize("timeout_s", [-1, 86401])
def test_a_timeout_out_of_range_is_one_line_and_arms_the_default(
    esp32, app_board, boards, broker, settings_for, timeout_s
):
    # Fails closed: a typo neither switches the watchdog off nor stops the boot.
    board = app_board(_settings(settings_for, broker, timeout_s), user_main=HEALTHY)
    rb = boards.start(board, **esp32)
    rb.wait_for(r"USER alive 1")
    out = rb.console()
    assert f"watchdog.timeout_s {timeout_s}: 0 (off) to 86400; using 30" in out
    assert "watchdog: armed: 30 s, fed every 5000 ms" in out


def test_crash_limit_watchdog_resets_end_in_safe_mode_reported_over_mqtt(
    esp32, app_board, boards, broker, settings_for, watch
):
    board = app_board(_settings(settings_for, broker, 1, crash_limit=3), user_main=BLOCKS_ALWAYS)
    w = watch(board)
    rb = boards.start(board, **esp32)
    status = w.wait("status", state="safe_mode", timeout=60)
    assert status["error"] == "user_main blocked the loop: 3 watchdog resets"
    assert w.wait("info", safe_mode=True)["device_id"] == board.device_id
    out = rb.console()
    assert out.count("[vboard] board stopped: watchdog reset") == 3
    assert out.count("USER start") == 3  # the fourth boot starts no user code
    assert "watchdog: reset by the watchdog (3 in a row)" in out
    # Safe mode is fed like any boot, and lasts until the next reset: the count is
    # gone, so the next boot gives user code its chance again.
    rb.stop()
    assert "wdt_resets" not in board.nvs()["mpy_blox"]
    rb = boards.start(board, **esp32)
    rb.wait_for(r"USER start")


def test_the_count_is_forgotten_once_user_main_ran_a_crash_window_well(
    esp32, app_board, boards, broker, settings_for
):
    board = app_board(_settings(settings_for, broker, 1, crash_window_s=2), user_main=BLOCKS_ONCE)
    rb = boards.start(board, **esp32)
    rb.wait_for(r"watchdog: watchdog resets forgotten")
    out = rb.console()
    assert "reset by the watchdog (1 in a row)" in out
    assert "USER alive 3" in out.split("forgotten")[0]  # after the window, not before
    rb.stop()
    assert "wdt_resets" not in board.nvs()["mpy_blox"]


# The count alone, on a board whose main.py arms the watchdog and blocks twice.
COUNT_MAIN = """
import machine, os
from mpy_blox import watchdog
if %r and machine.reset_cause() != machine.WDT_RESET:
    os.mkdir("/.mpypi")
    open("/.mpypi/applied", "w").close()
print("count", watchdog._count())
try:
    n = int(open("/boots").read())
except OSError:
    n = 0
with open("/boots", "w") as f:
    f.write(str(n + 1))
if n < 2:
    machine.WDT(timeout=100)
    while True:
        pass
print("done")
"""


@pytest.mark.parametrize("on_trial", [False, True])
def test_watchdog_resets_count_in_nvs_except_on_trial(esp32, boards, on_trial):
    board = boards.create(framework=True, files={"main.py": COUNT_MAIN % on_trial})
    rb = boards.start(board, **esp32)
    rb.wait_for("done")
    counts = [int(c) for c in re.findall(r"count (\d+)", rb.console())]
    rb.stop()
    # Beside boot_count, in the secure store's namespace.
    namespace = re.search(r'NAMESPACE = "(\w+)"', (REPO / "mpy_blox/secure.py").read_text())[1]
    nvs = board.nvs().get(namespace, {})
    if on_trial:  # boot recovery rolls back instead (mpypi_recover.py)
        assert counts == [0, 0, 0] and "wdt_resets" not in nvs
    else:
        assert counts == [0, 1, 2] and nvs["wdt_resets"] == ["i32", 2]


def test_ctrl_c_gives_the_usb_session_ten_minutes_before_the_watchdog_resets(
    esp32, app_board, boards, broker, settings_for
):
    # mpremote (a deploy, a REPL) interrupts the loop that feeds the watchdog; at
    # a 1-s timeout the session would be cut. The emulation's file holds the
    # timeout the watchdog runs with.
    board = app_board(_settings(settings_for, broker, 1), user_main=HEALTHY)
    rb = boards.start(board, **esp32)
    rb.wait_for(r"USER alive 1")
    with serial.Serial(rb.serial_port, 115200, timeout=0.2) as port:
        port.write(b"\x03")
        rb.wait_for(r"watchdog: Ctrl-C: the watchdog resets the device in 600 s")
        rb.wait_for(">>> ")
        assert int((board.run_dir / "wdt").read_bytes()) == 600_000
        port.write(b"print(6 * 7)\r")
        rb.wait_for(r"\b42\b")
    assert rb.boots() == 1
