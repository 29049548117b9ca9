"""The app-managed runtime on a virtual board against real Mosquitto: boot with bad or
missing files, user_main failures, the memory fail-safe, safe mode, WLAN and heap."""

import re
from pathlib import Path

import pytest

from mpy_blox_tools.micropython import BOARD_HEAP_64, format_size
from mpy_blox_tools.micropython import DEFAULT_HEAP as ESP32_HEAP

REPO = Path(__file__).resolve().parent.parent.parent

FAST_RESTARTS = {"app": {"crash_limit": 3, "crash_window_s": 60, "restart_delay_ms": 50}}

RAISING = """
import asyncio
async def user_main():
    print("USER start")
    await asyncio.sleep_ms(200)
    raise RuntimeError("user bug")
"""

RAISES_TWICE_THEN_RUNS = """
import asyncio, os
async def user_main():
    try:
        n = int(open("/runs").read())
    except OSError:
        n = 0
    with open("/runs", "w") as f:
        f.write(str(n + 1))
    print("USER run %d" % (n + 1))
    if n < 2:
        raise ValueError("not yet")
    while True:
        await asyncio.sleep(1)
"""

OUT_OF_MEMORY_ONCE = """
import asyncio
import mpy_blox.app
hog = []
async def user_main():
    first = not hasattr(mpy_blox.app, "_oom_seen")
    mpy_blox.app._oom_seen = True
    print("USER start, first=%s" % first)
    if first:
        while True:
            hog.append(bytearray(4096))  # until the heap is gone
    hog.clear()
    while True:
        await asyncio.sleep(1)
"""

CRASHING_BACKGROUND_TASK = """
import asyncio
async def _worker():
    await asyncio.sleep_ms(100)
    raise OSError("sensor gone")
async def user_main():
    print("USER start")
    asyncio.create_task(_worker())  # nobody awaits it
    while True:
        await asyncio.sleep(1)
"""


def test_malformed_settings_boot_with_defaults_and_one_clear_line(
    app_board, boards, broker, watch
):
    # The broker comes from the secure store, which overrides settings.json: a
    # provisioned device stays reachable even when its settings.json is broken.
    board = app_board(
        '{"mqtt": {"server": "127.0.0.1", "port": 18',
        {"mqtt.server": broker.host, "mqtt.port": broker.port},
    )
    w = watch(board)
    # The 64-bit lane's equivalent of an ESP32's 100K (heap figures are the 32-bit
    # lane's): at 100K there, a first boot that ingests provision.json is on the edge.
    rb = boards.start(board, heap=format_size(BOARD_HEAP_64))
    rb.wait_for(r"USER up")
    w.wait("status", state="online")
    lines = [l for l in rb.console().splitlines() if "settings.json" in l]
    assert (
        len(lines) == 1
        and "settings.json is malformed" in lines[0]
        and "using defaults" in lines[0]
    )


def test_missing_user_main_is_said_once_and_the_board_stays_on_mqtt(
    app_board, boards, broker, watch, settings_for
):
    board = app_board(settings_for(broker), user_main=None)
    w = watch(board)
    rb = boards.start(board)
    rb.wait_for(r"booted; free heap \d+ bytes")
    w.wait("status", state="online")
    assert len(re.findall(r"no user_main.py: running without user code", rb.console())) == 1


def test_raising_user_main_is_logged_with_traceback_and_restarted(
    app_board, boards, broker, settings_for
):
    board = app_board(settings_for(broker, **FAST_RESTARTS), user_main=RAISES_TWICE_THEN_RUNS)
    rb = boards.start(board)
    rb.wait_for(r"USER run 3")
    out = rb.console()
    assert out.count("user_main: failed: ValueError('not yet',)") == 2
    assert out.count("in user_main\nValueError: not yet") == 2  # with its traceback
    assert "restarting in 50 ms" in out and "restarting in 100 ms" in out  # backoff
    assert "safe mode" not in out


def test_a_user_main_that_does_not_compile_is_reported_once_per_attempt(
    app_board, boards, broker, settings_for, watch
):
    # The first attempt is the early import in boot: its failure is kept and
    # reported when user code would start, like every later attempt.
    board = app_board(settings_for(broker, **FAST_RESTARTS), user_main="async def user_main(:\n")
    w = watch(board)
    rb = boards.start(board)
    assert "failed 3 times" in w.wait("status", state="safe_mode")["error"]
    out = rb.console()
    assert out.count("user_main: failed: SyntaxError") == 3, out
    assert out.index("user_main: failed: SyntaxError") > out.index("booted; free heap")


def test_memory_error_in_user_code_collects_logs_free_heap_and_restarts(
    app_board, boards, broker, settings_for, watch
):
    board = app_board(settings_for(broker, **FAST_RESTARTS), user_main=OUT_OF_MEMORY_ONCE)
    w = watch(board)
    rb = boards.start(board)
    rb.wait_for(r"USER start, first=False")
    out = rb.console()
    booted = int(re.search(r"booted; free heap (\d+) bytes", out).group(1))
    m = re.search(r"user_main: out of memory; free heap after collect: (\d+) bytes", out)
    assert m and int(m.group(1)) > booted // 2, out  # the hog was let go, not kept
    w.wait("status", state="online")


def test_an_unawaited_user_task_crashing_restarts_user_main(
    app_board, boards, broker, settings_for
):
    board = app_board(settings_for(broker, **FAST_RESTARTS), user_main=CRASHING_BACKGROUND_TASK)
    rb = boards.start(board)
    rb.wait_for(r"USER start", count=2)
    assert "user_main: failed: OSError('sensor gone',)" in rb.console()


def test_crash_loop_enters_safe_mode_with_mqtt_still_up(
    app_board, boards, broker, settings_for, watch
):
    board = app_board(settings_for(broker, **FAST_RESTARTS), user_main=RAISING)
    w = watch(board)
    rb = boards.start(board)
    rb.wait_for(r"safe mode: user_main failed 3 times in 60 s")
    status = w.wait("status", state="safe_mode")
    assert status["safe_mode"] is True and "failed 3 times" in status["error"]
    assert w.wait("info", safe_mode=True)["device_id"] == board.device_id
    out = rb.console()  # safe mode is the device's word that it starts user code no more
    assert out.count("USER start") == 3
    assert w.latest["status"]["state"] == "safe_mode"  # no will: still connected


def test_wlan_down_at_boot_connects_when_the_network_returns(
    app_board, boards, broker, settings_for, watch
):
    board = app_board(
        settings_for(broker),
        {"wlan.ssid": "testnet", "wlan.psk": "good-psk"},
        wlan={"ssid": "testnet", "psk": "good-psk"},
    )
    board.set_network(False)
    rb = boards.start(board)
    rb.wait_for(r"wlan: cannot connect to 'testnet': no access point found; retry in 1 s")
    rb.wait_for(r"retry in 2 s")
    assert "wlan: connected" not in rb.console()
    board.set_network(True)
    rb.wait_for(r"wlan: connected to 'testnet', address 127.0.0.1")
    rb.wait_for(r"USER up")


def test_wrong_wlan_password_is_reported_clearly(app_board, boards, broker, settings_for):
    board = app_board(
        settings_for(broker),
        {"wlan.ssid": "testnet", "wlan.psk": "bad-psk"},
        wlan={"ssid": "testnet", "psk": "good-psk"},
    )
    rb = boards.start(board)
    rb.wait_for(r"wlan: cannot connect to 'testnet': wrong password; retry in 2 s")


@pytest.mark.parametrize(
    ("form", "parts"),
    [
        ("source", "runtime"),
        ("mpy", "runtime"),
        ("mpy", "full"),
    ],
)
def test_the_app_boots_and_idles_in_a_100k_heap(
    form,
    parts,
    lane,
    app_board,
    boards,
    broker,
    settings_for,
    watch,
    runtime_mpy,
    full_mpy,
    heap_report,
):
    example = (REPO / "examples" / "user_main.py").read_text()
    settings = settings_for(broker, user={"interval_s": 1})
    board = app_board(
        settings, user_main=example, framework="runtime-src" if form == "source" else None
    )
    if form == "mpy":
        board.put_tree(runtime_mpy if parts == "runtime" else full_mpy, "lib/mpy_blox")
    w = watch(board)
    # An ESP32's 100K on the 32-bit lane; the same carried to the 64-bit one.
    heap = lane.carried(ESP32_HEAP)
    rb = boards.start(board, heap=heap, lane=lane)
    m = rb.wait_for(r"booted; free heap (\d+) bytes")
    w.wait("status", state="online")  # whatever else fits, the device is reachable
    rb.wait_for(r"user_main is alive 3")  # and idles through its sleeps
    info = w.wait("info")
    out = rb.console()
    agent = "not installed"
    if parts == "full":
        failed = "cannot import mpy_blox.update.agent" in out or "agent failed to start" in out
        agent = "did NOT fit" if failed else "started"
    heap_report(
        f"{lane.name} lane, {format_size(heap)} board, {form}, {parts}: "
        f"free heap after boot {m.group(1)} bytes, info.mem_free {info['mem_free']}, "
        f"update agent {agent}"
    )
    assert "fatal" not in out
    assert int(m.group(1)) > 14 * 1024  # with user_main loaded: .mpy boards load it early


def test_the_full_framework_boots_with_heap_to_spare_below_100k(
    lane, app_board, boards, broker, settings_for, full_mpy
):
    # The margin, not just the fit: 6 KB under an ESP32's 100K (on the 64-bit lane,
    # the same carried over) the full .mpy framework still starts its agent and
    # runs the example. A change that costs heap, or leaves it in smaller pieces
    # (the parser needs KB-sized blocks), fails here first.
    example = (REPO / "examples" / "user_main.py").read_text()
    board = app_board(
        settings_for(broker, user={"interval_s": 1}), user_main=example, framework=None
    )
    board.put_tree(full_mpy, "lib/mpy_blox")
    rb = boards.start(board, heap=lane.carried("94K"), lane=lane)
    rb.wait_for(r"user_main is alive 2")
    out = rb.console()
    assert "cannot import" not in out
    assert "update agent failed" not in out and "no update agent" not in out


# More at import than is free once the framework is up (measured by the test on
# its own lane), so more than user code may take ahead of the framework.
GREEDY_AT_IMPORT = """
import asyncio
HOARD = bytearray(%d)
print("USER imported")
async def user_main():
    while True:
        await asyncio.sleep(1)
"""
IDLE = "import asyncio\nasync def user_main():\n    while True:\n        await asyncio.sleep(1)\n"


def test_a_user_main_too_big_to_load_first_cannot_cost_the_device_its_network(
    lane, app_board, boards, broker, settings_for, watch, full_mpy
):
    # An .mpy framework imports user_main before itself, while the heap has the
    # blocks the parser needs, but never at the price of MQTT and the agent: this
    # one is unloaded again and imported last, where it fails into safe mode on a
    # device that can still be sent a fix. Its hoard is 4 KB more than the same
    # board has free after booting a user_main that takes nothing.
    board = app_board(settings_for(broker, **FAST_RESTARTS), user_main=IDLE, framework=None)
    board.put_tree(full_mpy, "lib/mpy_blox")
    rb = boards.start(board, heap=lane.carried(ESP32_HEAP), lane=lane)
    free = int(rb.wait_for(r"booted; free heap (\d+) bytes").group(1))
    rb.stop()
    board.write("user_main.py", (GREEDY_AT_IMPORT % (free + 4096)).encode())
    w = watch(board)
    rb = boards.start(board, heap=lane.carried(ESP32_HEAP), lane=lane)
    rb.wait_for(r"user_main: imported after the framework: \d+ bytes free")
    status = w.wait("status", state="safe_mode")
    assert "failed 3 times" in status["error"]
    out = rb.console()
    assert "USER imported" in out.split("imported after the framework")[0]  # it was loaded first
    assert "MemoryError" in out
    assert "cannot import" not in out and "no update agent" not in out
    assert "seq" in w.wait("info", safe_mode=True)  # an agent field: the agent is up


def test_an_error_escaping_everything_is_logged_and_resets_instead_of_a_dead_repl(
    app_board, boards, broker, settings_for
):
    # SystemExit is not an Exception: the supervisor lets it through, main() catches it.
    exiting = "import sys\nasync def user_main():\n    print('USER exit')\n    sys.exit(3)\n"
    board = app_board(settings_for(broker), user_main=exiting)
    rb = boards.start(board)
    rb.wait_for(r"app: fatal: SystemExit\(3,\); reset in 5 s")
    rb.wait_for(r"USER exit", count=2, timeout=30)  # booted again
    assert rb.boots() == 2
    assert ">>> " not in rb.console()


def test_a_heap_too_small_for_everything_still_boots_reachable_and_says_why(
    lane32, app_board, boards, broker, settings_for, watch, full_mpy
):
    # The whole framework, as the device wheel installs it, in 69K: the runtime and
    # MQTT fit, the update agent does not. Before issue 14 that window was 62K-65K
    # on the 32-bit lane; the trial and the watchdog (2.7 KB after boot) moved it:
    # at 66K MQTT found no block, at 68K the agent failed to start, at 70K it
    # started (measured). The download path's client code (issue 13, 0.3 KB
    # compiled) moved it again: at 68K MQTT finds no block, at 69K and 70K the
    # agent fails to start (measured). What does not fit is logged and left out;
    # the device stays on MQTT. An ESP32's figure, so the 32-bit lane's alone: on the 64-bit
    # lane no heap leaves that window open in every layout (at 100K a .py
    # framework failed to compile its core in some checkouts; at 92K MQTT finds
    # no block).
    board = app_board(settings_for(broker), framework=None)
    board.put_tree(full_mpy, "lib/mpy_blox")
    w = watch(board)
    rb = boards.start(board, heap="69K", lane=lane32)
    rb.wait_for(r"booted; free heap \d+ bytes")
    w.wait("status", state="online")
    out = rb.console()
    assert "fatal" not in out and rb.boots() == 1
    assert "update agent failed to start" in out or "cannot import mpy_blox.update" in out, out
