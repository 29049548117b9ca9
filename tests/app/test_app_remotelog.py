"""The remote log (mpy_blox/remotelog.py) on a virtual board through real Mosquitto, and
`mpy-blox logs DEVICE` (mpy_blox_tools/logs.py) reading it."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sntp_server import NO_NTP

from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.logs import follow, format_record
from mpy_blox_tools.micropython import DEFAULT_HEAP as ESP32_HEAP
from mpy_blox_tools.mqtt import BrokerURL

REPO = Path(__file__).resolve().parent.parent.parent

CHATTY = """
import asyncio
import logging
from mpy_blox.log import get_logger
log = get_logger("user_main")

async def user_main():
    n = 0
    while True:
        n += 1
        logging.getLogger("pump").info("pump record %d", n)
        log.debug("debug record %d", n)
        await asyncio.sleep_ms(300)
"""

FIVE_THEN_QUIET = """
import asyncio
from mpy_blox.log import get_logger
log = get_logger("user_main")

async def user_main():
    for n in range(1, 6):
        log.warning("early record %d", n)
    while True:
        await asyncio.sleep(1)
"""


def remote_board(app_board, broker, full_mpy, user_main, **logging):
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port},
        "logging": {"remote": True, "remote_level": "INFO", **logging},
        **NO_NTP,  # its warnings would be records too
    }
    board = app_board(json.dumps(settings), user_main=user_main, framework=None)
    board.put_tree(full_mpy, "lib/mpy_blox")
    board.write("lib/logging.mpy", (full_mpy.parent / "logging.mpy").read_bytes())
    return board


def test_mpy_blox_logs_follow_shows_a_record_from_user_main(
    lane, app_board, boards, broker, full_mpy
):
    board = remote_board(app_board, broker, full_mpy, CHATTY)
    rb = boards.start(board, heap=lane.carried(ESP32_HEAP), lane=lane)
    rb.wait_for("pump record 1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpy_blox_tools.cli", "logs", board.device_id, "--follow"]
        + ["--broker", f"mqtt://{broker.host}:{broker.port}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            try:
                got.append(lines.get(timeout=1))
            except queue.Empty:
                pass
    finally:
        proc.terminate()
        proc.wait(10)
    assert len(got) == 3, got
    for line in got:  # the device's own format, its id in front; INFO and above only
        assert line.startswith(f"{board.device_id} I "), line
        assert "pump: pump record" in line and "debug record" not in line
    # A level above what the device sends shows nothing.
    quiet = []

    class Out:
        def write(self, text):
            quiet.append(text)

        def flush(self):
            pass

    url = BrokerURL.parse(f"mqtt://{broker.host}:{broker.port}")
    assert follow(url, board.device_id, "WARNING", follow=False, wait=1.5, out=Out()) == 0
    assert quiet == []


def test_the_last_records_are_sent_again_on_reconnect(
    lane, app_board, boards, broker_factory, full_mpy, mqtt_client
):
    b = broker_factory()
    board = remote_board(app_board, b, full_mpy, FIVE_THEN_QUIET, replay=3)
    rb = boards.start(board, heap=lane.carried(ESP32_HEAP), lane=lane)
    rb.wait_for("early record 5")
    got: queue.Queue[dict] = queue.Queue()
    time.sleep(1)  # sent (to nobody) by now
    b.stop()
    rb.wait_for("mqtt: disconnected", timeout=30)
    b.start()
    c = mqtt_client(b)
    c.on_message = lambda cl, u, m: got.put(json.loads(m.payload))
    c.subscribe(f"mpypi/nodes/{board.device_id}/log", qos=0)
    records = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not any("early record 5" in r["msg"] for r in records):
        try:
            records.append(got.get(timeout=1))
        except queue.Empty:
            pass
    early = [r["msg"] for r in records if r["msg"].startswith("early record")]
    # The buffer holds the last 3 records at WARNING and INFO (replay=3): connect
    # lines of the app may be among them, the last of the five is.
    assert early and early[-1] == "early record 5", records
    assert "early record 1" not in early  # over the bound
    assert all(r["level"] in ("I", "W", "E") and r["logger"] for r in records)


def test_logs_refuses_bad_arguments_and_shows_a_bad_record_plainly():
    url = BrokerURL.parse("mqtt://127.0.0.1:1")
    with pytest.raises(MpyBloxError, match="unknown level"):
        follow(url, "esp32-0a0b0c0d0e0f", "LOUD", follow=False)
    with pytest.raises(MpyBloxError, match="not a device id"):
        follow(url, "esp32/#", "INFO", follow=False)
    assert format_record("d", b'{"t": 1234, "level": "W", "logger": "x", "msg": "hi"}') == (
        "d W 1.234 x: hi"
    )
    assert "not a log record" in format_record("d", b"garbage")
    assert "[2 record(s) dropped" in format_record(
        "d", b'{"t": 1, "level": "I", "logger": "x", "msg": "m", "dropped": 2}'
    )
