"""`mpy-blox logs DEVICE [--follow] [--level L]`: a device's remote log.

Devices with `logging.remote` publish their log records to `mpypi/nodes/<id>/log`
(mpy_blox/remotelog.py), and the last ones again at every (re)connect. This prints
them, one line each, in the device's own format with the device id in front:

    esp32-840d8ed29760 I 12.345 user_main: pump on

Without --follow it prints what arrives within --wait seconds and ends.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

from mpy_blox.topics import node_topic
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.mqtt import BrokerURL, connect, disconnect

LEVELS = {"D": 10, "I": 20, "W": 30, "E": 40, "C": 50}
NAMES = {"DEBUG": "D", "INFO": "I", "WARNING": "W", "ERROR": "E", "CRITICAL": "C"}


def format_record(device: str, payload: bytes) -> str | None:
    """One line for a record; None for a payload that is not one (said, not raised)."""
    try:
        rec = json.loads(payload)
        t = int(rec["t"])
        line = f"{device} {rec['level']} {t // 1000}.{t % 1000:03d} {rec['logger']}: {rec['msg']}"
    except (ValueError, KeyError, TypeError):
        return f"{device} ? (not a log record: {payload[:60]!r})"
    if rec.get("dropped"):
        line += f"  [{rec['dropped']} record(s) dropped before this one]"
    return line


def follow(
    broker: BrokerURL,
    device: str,
    level: str = "DEBUG",
    follow: bool = True,
    wait: float = 3.0,
    out: TextIO = sys.stdout,
) -> int:
    """Print `device`'s records at `level` and above; return how many were printed."""
    letter = NAMES.get(level.upper())
    if letter is None:
        raise MpyBloxError(f"unknown level {level!r}: choose one of {', '.join(NAMES)}")
    if device in ("", "+", "#") or "/" in device:
        raise MpyBloxError(f"{device!r} is not a device id")
    floor = LEVELS[letter]
    client = connect(broker)
    count = 0
    lock = threading.Lock()

    def on_message(c, userdata, msg):
        nonlocal count
        try:
            got = LEVELS.get(json.loads(msg.payload).get("level"), 0)
        except (ValueError, AttributeError):
            got = 50  # not a record: shown, as format_record says
        if got < floor:
            return
        line = format_record(device, msg.payload)
        with lock:
            print(line, file=out, flush=True)
            count += 1

    client.on_message = on_message
    client.subscribe(node_topic(device, "log"), qos=0)
    try:
        if follow:
            while True:
                time.sleep(3600)
        time.sleep(wait)
    finally:
        disconnect(client)
    return count
