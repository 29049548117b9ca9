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

Every row runs twice: on the loopback, and through a link shaped like an ESP32's
Wi-Fi between the board and its server (bench/shaper.py: UPDATE_RATE bytes/s each
way, default 1000000, and UPDATE_DELAY_MS each way, default 20), the rows marked
`(shaped)`, each compared with the raw socket through the same link. On the
loopback the update's fixed cost (two resets, connects, stage, commit) weighs most;
on the shaped link, the bytes.

Ratios compare within the run (the machine is shared and noisy).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

from appboard import app_board, heap_row, on_each_link, ratio_rows, raw_limit

from mpy_blox_tools import chunks, micropython, publish

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
for size in SIZES:
    gc.collect()
    s = socket.socket()
    t0 = time.ticks_us()
    s.connect(socket.getaddrinfo("127.0.0.1", PORT)[0][-1])
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


def run(workdir: Path) -> list[dict]:
    return on_each_link(workdir, "UPDATE", _run)


def _run(workdir: Path, suffix: str, link: tuple | None) -> list[dict]:
    raw = raw_limit(workdir, LANE, FLASH, list(SIZES.values()), RAW_MAIN, link)
    rows = []
    with app_board(workdir, LANE, FLASH, link) as app:
        for (label, size), (form, chunk_size) in itertools.product(SIZES.items(), FORMS.items()):
            if chunk_size and size <= chunk_size:
                continue
            blob = workdir / f"blob{size}.bin"
            blob.write_bytes(os.urandom(size))  # new bytes: a package to install
            t0 = time.monotonic()
            app.publish([publish.src_package(blob, "data/blob.bin")], chunk_size)
            # accepted -> rebooting -> (install boot) installing -> downloading ->
            # verifying -> installing -> rebooting: the last three mark the phases.
            marks = app.timeline.wait_for(t0, "downloading", "installing", "rebooting")
            e2e = marks["rebooting"] - t0
            download = marks["installing"] - marks["downloading"]
            app.wait_app()  # back on the new set, subscribed again
            rows_here = [
                (f"update e2e, {form}{suffix}", e2e),
                (f"update download, {form}{suffix}", download),
            ]
            if form == "single message":
                rows_here.append((f"raw socket{suffix}", raw[size]))
            rows += ratio_rows("payload", label, size, raw[size], rows_here)
        heaps = [int(n) for n in re.findall(r"free heap (\d+)", app.rb.console())]
    if heaps:
        rows.append(heap_row("payload", f"min free heap logged by the board{suffix}", min(heaps)))
    return rows
