"""Update agent end to end: publish -> installed, against the raw-socket limit.

For src packages of 64 KiB, 1 MiB and 4 MiB, each published as one message and
in 64 KiB chunks, on a virtual board with its lane's board
heap (the 32-bit lane's 100K, an ESP32's, when MPY_BLOX_MICROPYTHON32 names its
binary; else the 64-bit lane's equivalent, mpy_blox_tools.micropython) and 16 MiB
of flash, running the full app:

- end to end: from the moment the publisher starts sending until the board reports
  `rebooting` after `installing` (so the agent's acceptance, the reset into the
  install boot, the download, the SHA256 check, the staging and the journalled
  commit are in; the reboot into the new code is not);
- download: from the board's first `downloading` report to its `installing` report;
- raw socket: the same bytes sent by a plain TCP server to a board whose main.py
  reads them into one 4 KiB buffer, hashes them and writes them to a file on the
  same kind of flash (the limit: no MQTT, no checks, no commit).

Ratios compare within the run (the machine is shared and noisy).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path

from mpy_blox_tools import chunks, deploy, micropython, mqtt, publish
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

LANE = micropython.board_lane()
TITLE = f"Update end to end vs raw socket into flash, {LANE.name}, {LANE.heap} heap"
SIZES = {"64 KiB": 64 * 1024, "1 MiB": 1024 * 1024, "4 MiB": 4 * 1024 * 1024}
# Each size both ways: one message, and chunks of the publisher's default size
# (a package no larger than a chunk is one message either way: one row).
FORMS = {"single message": 0, "64K chunks": chunks.DEFAULT_CHUNK_SIZE}
FLASH = "16M"

RAW_MAIN = """
import socket, hashlib, time, gc
buf = bytearray(4096)
mv = memoryview(buf)
for size in {sizes}:
    gc.collect()
    s = socket.socket()
    t0 = time.ticks_us()
    s.connect(socket.getaddrinfo("127.0.0.1", {port})[0][-1])
    h = hashlib.sha256()
    got = 0
    with open("/raw.bin", "wb") as f:
        while got < size:
            n = s.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
            f.write(mv[:n])
            got += n
    s.close()
    print("RAW", size, got, time.ticks_diff(time.ticks_us(), t0), gc.mem_free())
"""


# Logged once the app's agent has its subscriptions acknowledged (mpy_blox/app.py).
APP_READY = r"app: booted; free heap"


def _raw_limit(workdir: Path) -> dict[int, float]:
    """Seconds for each size through a raw socket into a file on the board's flash."""
    payloads = {size: os.urandom(size) for size in SIZES.values()}
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        for size in SIZES.values():
            conn, _ = server.accept()
            with conn:
                conn.sendall(payloads[size])

    threading.Thread(target=serve, daemon=True).start()
    board = Board.create(workdir / "raw", flash_size=FLASH, executable=LANE.executable)
    board.write("main.py", RAW_MAIN.format(sizes=list(SIZES.values()), port=port).encode())
    with RunningBoard(board, heap=LANE.heap, executable=LANE.executable) as rb:
        rb.wait_for(r"RAW %d " % SIZES["4 MiB"], timeout=120)
        out = rb.console()
    server.close()
    return {int(m[0]): int(m[2]) / 1e6 for m in re.findall(r"^RAW (\d+) (\d+) (\d+)", out, re.M)}


class StatusTimeline:
    """When the board's live status reports reached each state, per publish."""

    def __init__(self, client, device_id: str) -> None:
        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        client.message_callback_add(f"mpypi/nodes/{device_id}/status", self._on)
        client.subscribe(f"mpypi/nodes/{device_id}/status", qos=1)

    def _on(self, client, userdata, msg) -> None:
        if msg.retain or not msg.payload:
            return
        state = json.loads(msg.payload).get("state", "")
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


def run(workdir: Path) -> list[dict]:
    raw = _raw_limit(workdir)
    key = secrets.token_hex(32)
    rows = []
    with Mosquitto(
        workdir / "broker", persistence=False, extra_config="max_packet_size 16777216"
    ) as broker:
        url = mqtt.BrokerURL(broker.host, broker.port)
        settings = workdir / "settings.json"
        settings.write_text(
            json.dumps(
                {
                    "mqtt": {"server": broker.host, "port": broker.port},
                    # INFO: the board says when it is up and subscribed, and its heap.
                    "logging": {"level": "INFO"},
                    "update": {"channel": "bench", "auto_update": True},
                }
            )
        )
        (workdir / "provision.json").write_text(json.dumps({"update.key": key}))
        board = Board.create(workdir / "board", flash_size=FLASH, executable=LANE.executable)
        with RunningBoard(board, heap=LANE.heap, executable=LANE.executable) as rb:
            rb.wait_for(r"\[vboard\] boot 1")
            deploy.deploy_app(rb.serial_port, settings, workdir / "provision.json")
            rb.wait_for(r"\[vboard\] boot 2")
            client = mqtt.connect(url)
            timeline = StatusTimeline(client, board.device_id)
            booted = 1
            rb.wait_for(APP_READY, count=booted, timeout=60)
            for (label, size), (form, chunk_size) in itertools.product(
                SIZES.items(), FORMS.items()
            ):
                if chunk_size and size <= chunk_size:
                    continue
                blob = workdir / f"blob{size}.bin"
                blob.write_bytes(os.urandom(size))  # new bytes: a package to install
                package = publish.src_package(blob, "data/blob.bin")
                boots = rb.boots()
                t0 = time.monotonic()
                publish.publish_update(
                    url,
                    [package],
                    channel="bench",
                    key=key.encode(),
                    chunk_size=chunk_size,
                    client=client,
                    log=lambda *a: None,
                )
                # accepted -> rebooting -> (install boot) installing -> downloading ->
                # verifying -> installing -> rebooting: the last three mark the phases.
                marks = timeline.wait_for(t0, "downloading", "installing", "rebooting")
                e2e = marks["rebooting"] - t0
                download = marks["installing"] - marks["downloading"]
                # Two resets: into the install boot, and out of it. Counted from
                # before the publish: the second may already be on the console.
                rb.wait_for(r"(?m)^\[vboard\] boot \d+", count=boots + 2, timeout=60)
                rows_here = [(f"update e2e, {form}", e2e), (f"update download, {form}", download)]
                if form == "single message":
                    rows_here.append(("raw socket", raw[size]))
                for path, seconds in rows_here:
                    rows.append(
                        {
                            "payload": label,
                            "path": path,
                            "seconds": round(seconds, 3),
                            "MiB/s": round(size / 1048576 / seconds, 2),
                            "vs raw": round(raw[size] / seconds, 2),
                        }
                    )
                booted += 1
                rb.wait_for(APP_READY, count=booted, timeout=60)  # back, subscribed again
            mqtt.disconnect(client)
            free = re.findall(r"free heap (\d+)", rb.console())
        if free:
            rows.append(
                {
                    "payload": "-",
                    "path": "min free heap logged by the board",
                    "seconds": "",
                    "MiB/s": "",
                    "vs raw": min(map(int, free)),
                }
            )
    return rows
