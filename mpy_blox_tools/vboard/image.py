"""Virtual-board firmware images: a MicroPython unix executable behind a small header.

A virtual board's app partitions (`ota_0`, `ota_1`) hold these, as an ESP32's hold
application images; the emulated bootloader (`bootloader.py`) checks one as ESP-IDF
checks an app image (magic, chip, length, hash) before it boots the executable.

    offset  size  field
    0       4     magic b"MPVB"
    4       1     header format (1)
    5       1     chip id, ESP-IDF's esp_chip_id_t (esp32 = 0; firmware.CHIPS)
    6       2     reserved, 0
    8       4     payload length, little-endian
    12      32    version, UTF-8, NUL-padded (as esp_app_desc_t.version)
    44      32    SHA256 of the payload
    76      ...   payload: the executable's bytes

`mpy-blox vboard firmware BINARY --version V [--chip esp32] -o IMAGE` makes one;
`firmware.parse_image` reads one (and real ESP32 app images) for the publisher.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError, read_file

MAGIC = b"MPVB"
FORMAT = 1
HEADER = struct.Struct("<4sBBHI32s32s")
HEADER_SIZE = HEADER.size  # 76
VERSION_MAX = 31  # bytes, leaving the NUL of esp_app_desc_t.version


def make_image(payload: bytes, version: str, chip_id: int = 0) -> bytes:
    """The image of `payload` (an executable's bytes)."""
    raw = version.encode()
    if not raw or len(raw) > VERSION_MAX or b"\0" in raw:
        raise MpyBloxError(f"version {version!r}: 1 to {VERSION_MAX} bytes of text")
    if not payload:
        raise MpyBloxError("an empty executable is not firmware")
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(MAGIC, FORMAT, chip_id, 0, len(payload), raw, digest) + payload


def write_image(binary: str | Path, version: str, output: str | Path, chip: str = "esp32") -> Path:
    """`mpy-blox vboard firmware`: wrap the executable `binary` into `output`."""
    from mpy_blox_tools.firmware import CHIP_IDS

    if chip not in CHIP_IDS:
        raise MpyBloxError(f"unknown chip {chip!r}: one of {', '.join(CHIP_IDS)}")
    payload = read_file(Path(binary), "executable")
    if not payload.startswith((b"\x7fELF", b"#!")):
        raise MpyBloxError(f"{binary}: not an executable (neither ELF nor a #! script)")
    data = make_image(payload, version, CHIP_IDS[chip])
    output = Path(output)
    output.write_bytes(data)
    return output


def unpack_header(data: bytes) -> tuple[int, int, str, bytes]:
    """(chip id, payload length, version, payload SHA256) of an image's first bytes."""
    if len(data) < HEADER_SIZE:
        raise MpyBloxError(f"truncated: {len(data)} bytes, a header needs {HEADER_SIZE}")
    magic, fmt, chip_id, _, length, version, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MpyBloxError("not a virtual-board image (no MPVB magic)")
    if fmt != FORMAT:
        raise MpyBloxError(f"virtual-board image format {fmt}: this version reads {FORMAT}")
    text = version.split(b"\0", 1)[0].decode(errors="replace")
    return chip_id, length, text, digest
