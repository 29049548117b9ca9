"""What the single-board update benchmarks share (not a benchmark: bench/run.py runs
bench_*): one virtual board running the full app against a Mosquitto of its own,
deployed as a user deploys it, with a client following its live status; and the
raw-socket limit they compare with."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shaper import Shaper, link_from_env

from mpy_blox_tools import deploy, mqtt, publish
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

CHANNEL = "bench"
# Logged once the app's agent has its subscriptions acknowledged (mpy_blox/app.py).
APP_READY = r"app: booted; free heap"


def raw_limit(
    workdir: Path, lane, flash: str, sizes: list[int], main: str, link: tuple | None = None
) -> dict[int, float]:
    """Seconds for each of `sizes` sent by a plain TCP server to a board whose main.py
    is `main` (given SIZES and PORT; it prints `RAW size got microseconds free` for each,
    having read the bytes into flash its own way): the limit a benchmark compares with.
    link: (rate, delay_s) to reach the board through a shaped link (shaper.Shaper)."""
    payloads = {size: os.urandom(size) for size in sizes}
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        for size in sizes:
            conn, _ = server.accept()
            with conn:
                conn.sendall(payloads[size])

    threading.Thread(target=serve, daemon=True).start()
    board = Board.create(workdir / "raw", flash_size=flash, executable=lane.executable)
    with _link(server.getsockname(), link) as port:
        board.write("main.py", f"SIZES = {sizes}\nPORT = {port}\n{main}".encode())
        with RunningBoard(board, heap=lane.heap, executable=lane.executable) as rb:
            rb.wait_for(r"RAW %d " % sizes[-1], timeout=300)
            out = rb.console()
    server.close()
    return {int(m[0]): int(m[2]) / 1e6 for m in re.findall(r"^RAW (\d+) (\d+) (\d+)", out, re.M)}


def on_each_link(workdir: Path, prefix: str, run_link) -> list[dict]:
    """The rows of run_link(workdir, suffix, link) on the loopback (suffix "", link
    None), then through the shaped link (" (shaped)", (rate, delay_s) from
    {prefix}_RATE and {prefix}_DELAY_MS: shaper.link_from_env), each in its own
    folder of `workdir`."""
    rows = []
    for name, suffix, link in (
        ("loopback", "", None),
        ("shaped", " (shaped)", link_from_env(prefix)),
    ):
        (workdir / name).mkdir()
        rows += run_link(workdir / name, suffix, link)
    return rows


@contextmanager
def _link(target: tuple[str, int], link: tuple | None):
    # The port a board dials for `target`: the target's own, or a shaper's before it.
    if link is None:
        yield target[1]
        return
    with Shaper(target, rate=link[0], delay_s=link[1]) as shaper:
        yield shaper.port


def ratio_rows(key: str, label: str, size: int, raw_s: float, timed) -> list[dict]:
    """A table row for each (path, seconds) of `timed` moving `size` bytes: its MiB/s and
    its ratio to the raw socket's `raw_s` (1 is the limit); `key` names the size column."""
    return [
        {
            key: label,
            "path": path,
            "seconds": round(seconds, 3),
            "MiB/s": round(size / 1048576 / seconds, 2),
            "vs raw": round(raw_s / seconds, 2),
        }
        for path, seconds in timed
    ]


def heap_row(key: str, path: str, free: int) -> dict:
    """A row of the same table for a heap figure, in the ratio column."""
    return {key: "-", "path": path, "seconds": "", "MiB/s": "", "vs raw": free}


class StatusTimeline:
    """When the board's live status reports reached each state, per publish (and
    when it published its info: the state `info`)."""

    def __init__(self, client, device_id: str) -> None:
        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        for kind in ("status", "info"):
            client.message_callback_add(f"mpypi/nodes/{device_id}/{kind}", self._on)
            client.subscribe(f"mpypi/nodes/{device_id}/{kind}", qos=1)

    def _on(self, client, userdata, msg) -> None:
        if msg.retain or not msg.payload:
            return
        info = msg.topic.endswith("/info")
        state = "info" if info else json.loads(msg.payload).get("state", "")
        with self.lock:
            self.events.append((time.monotonic(), state))

    def wait_for(self, since: float, *states: str, timeout: float = 300) -> dict[str, float]:
        """When each of `states` was first reported after `since`, each after the one
        before it; a `failed` report raises."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                ev = [(t, s) for t, s in self.events if t >= since]
            if any(s == "failed" for _, s in ev):
                raise RuntimeError(f"update failed: {ev}")
            marks, i = {}, 0
            for state in states:
                i = next((j for j in range(i, len(ev)) if ev[j][1] == state), -1)
                if i < 0:
                    break
                marks[state] = ev[i][0]
            if len(marks) == len(states):
                return marks
            time.sleep(0.01)
        raise TimeoutError(f"no {' -> '.join(states)} within the timeout")


@dataclass
class AppBoard:
    board: Board
    rb: RunningBoard
    url: mqtt.BrokerURL
    client: object  # a connected paho client
    timeline: StatusTimeline
    key: str
    booted: int = 1  # app boots seen: wait_app() waits for the next

    def publish(self, packages, chunk_size: int = 0) -> None:
        publish.publish_update(
            self.url,
            packages,
            channel=CHANNEL,
            key=self.key.encode(),
            chunk_size=chunk_size,
            client=self.client,
            log=lambda *a: None,
        )

    def wait_app(self, timeout: float = 60) -> None:
        """Until the app of the next boot is up and subscribed."""
        self.booted += 1
        self.rb.wait_for(APP_READY, count=self.booted, timeout=timeout)


@contextmanager
def app_board(workdir: Path, lane, flash: str, link: tuple | None = None, **update):
    """A board on `lane` at its heap with `flash`, the app deployed with update
    settings `update` (auto_update on), up and subscribed. link: (rate, delay_s)
    of a shaped link between the board and the broker (the publisher's is not)."""
    key = secrets.token_hex(32)
    with (
        Mosquitto(
            workdir / "broker", persistence=False, extra_config="max_packet_size 16777216"
        ) as broker,
        _link((broker.host, broker.port), link) as port,
    ):
        url = mqtt.BrokerURL(broker.host, broker.port)
        settings = workdir / "settings.json"
        settings.write_text(
            json.dumps(
                {
                    "mqtt": {"server": broker.host, "port": port},
                    # INFO: the board says when it is up and subscribed, and its heap.
                    "logging": {"level": "INFO"},
                    "update": {"channel": CHANNEL, "auto_update": True, **update},
                    "ntp": {"enabled": False},  # no time server on loopback
                }
            )
        )
        (workdir / "provision.json").write_text(json.dumps({"update.key": key}))
        board = Board.create(workdir / "board", flash_size=flash, executable=lane.executable)
        with RunningBoard(board, heap=lane.heap, executable=lane.executable) as rb:
            rb.wait_for(r"\[vboard\] boot 1")
            deploy.deploy_app(rb.serial_port, settings, workdir / "provision.json")
            rb.wait_for(r"\[vboard\] boot 2")
            client = mqtt.connect(url)
            try:
                timeline = StatusTimeline(client, board.device_id)
                rb.wait_for(APP_READY, timeout=60)
                yield AppBoard(board, rb, url, client, timeline, key)
            finally:
                mqtt.disconnect(client)
