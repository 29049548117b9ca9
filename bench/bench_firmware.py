"""Firmware over the air: publish -> image set to boot, against the raw-socket limit
into the same OTA partition (issue 11).

A virtual board with 4 MiB of flash (two 1.5 MiB OTA app partitions, docs/vboard.md)
on its lane's board heap (the 32-bit lane's 100K, an ESP32's, when
MPY_BLOX_MICROPYTHON32 names its binary), running the full app, takes firmware
images of 512 KiB and 1.25 MiB (the lane's MicroPython executable, padded with a
comment: each image boots), each published as one message and in 64 KiB chunks:

- end to end: from the moment the publisher starts sending until the board reports
  `rebooting` after `verifying` (the agent's acceptance, the reset into the install
  boot, the pre-flight, the download into the partition, the read-back check, the
  journal and set_boot are in; the new image's boot and trial are not);
- download: from the board's first `downloading` report to its `verifying` report;
- raw socket: the same bytes from a plain TCP server to a board whose main.py reads
  them into one 4 KiB buffer, hashes them and erases and programs the next OTA
  partition block by block (the limit: no MQTT, no checks, no commit);
- the install boot's free heap before each download, as the board logs it.

Between rows the board confirms the image it booted (`ok` after its trial), so every
row starts from a confirmed firmware, in the other slot. Every row runs twice: on
the loopback, and through a link shaped like an ESP32's Wi-Fi (bench/shaper.py:
FIRMWARE_RATE bytes/s, default 1000000, and FIRMWARE_DELAY_MS, default 20, each
way), the rows marked `(shaped)`, each against the raw socket through the same link.
Ratios compare within the run (the machine is shared and noisy).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from appboard import app_board, heap_row, on_each_link, ratio_rows, raw_limit

from mpy_blox_tools import chunks, micropython, publish
from mpy_blox_tools.vboard.image import HEADER_SIZE, make_image

LANE = micropython.board_lane()
TITLE = f"Firmware update vs raw socket into the OTA partition, {LANE.name}, {LANE.heap} heap"
SIZES = {"512 KiB": 512 * 1024, "1.25 MiB": 1280 * 1024}
FORMS = {"single message": 0, "64K chunks": chunks.DEFAULT_CHUNK_SIZE}
FLASH = "4M"

RAW_MAIN = """
import socket, hashlib, time, gc, esp32
part = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
buf = bytearray(4096)
mv = memoryview(buf)
for size in SIZES:
    gc.collect()
    s = socket.socket()
    t0 = time.ticks_us()
    s.connect(socket.getaddrinfo("127.0.0.1", PORT)[0][-1])
    h = hashlib.sha256()
    got = 0
    block = 0
    while got < size:
        n = 0
        while n < 4096 and got + n < size:  # a whole block, as the flash takes it
            k = s.readinto(mv[n:])
            if not k:
                break
            n += k
        if not n:
            break
        h.update(mv[:n])
        part.ioctl(6, block)  # BLOCK_ERASE
        part.writeblocks(block, mv[:n], 0)
        block += 1
        got += n
    s.close()
    print("RAW", size, got, time.ticks_diff(time.ticks_us(), t0), gc.mem_free())
"""


def _image(workdir: Path, size: int, version: str) -> Path:
    """A bootable image of exactly `size` bytes: the lane's executable and a comment."""
    binary = Path(LANE.executable).read_bytes() + f"\n# {version}\n".encode()
    pad = size - HEADER_SIZE - len(binary)
    if pad < 0:
        raise RuntimeError(f"the executable is larger than a {size}-byte image")
    data = make_image(binary + b"#" * pad, version)
    assert len(data) == size, (len(data), size)
    path = workdir / f"{version}.img"
    path.write_bytes(data)
    return path


def run(workdir: Path) -> list[dict]:
    return on_each_link(workdir, "FIRMWARE", _run)


def _run(workdir: Path, suffix: str, link: tuple | None) -> list[dict]:
    raw = raw_limit(workdir, LANE, FLASH, list(SIZES.values()), RAW_MAIN, link)
    rows = []
    heaps = []
    with app_board(workdir, LANE, FLASH, link, healthy_after_s=1) as app:
        for n, ((label, size), (form, chunk_size)) in enumerate(
            itertools.product(SIZES.items(), FORMS.items())
        ):
            version = f"bench-{n}"
            image = _image(workdir, size, version)
            t0 = time.monotonic()
            app.publish([publish.firmware_package(image)], chunk_size)
            marks = app.timeline.wait_for(t0, "downloading", "verifying", "rebooting")
            e2e = marks["rebooting"] - t0
            download = marks["verifying"] - marks["downloading"]
            free = app.rb.wait_for(rf"firmware {version} into \w+; free heap (\d+) bytes")
            heaps.append(int(free.group(1)))
            app.timeline.wait_for(marks["rebooting"], "ok", timeout=120)  # the trial passed
            app.wait_app()
            rows_here = [
                (f"firmware e2e, {form}{suffix}", e2e),
                (f"firmware download, {form}{suffix}", download),
            ]
            if form == "single message":
                rows_here.append((f"raw socket into the partition{suffix}", raw[size]))
            rows += ratio_rows("image", label, size, raw[size], rows_here)
    path = f"install boot: min free heap before a download{suffix}"
    rows.append(heap_row("image", path, min(heaps)))
    return rows
