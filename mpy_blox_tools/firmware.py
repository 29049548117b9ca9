"""Firmware images, as the publisher checks them before they go to a fleet.

Two formats, one function (`parse_image`, `read_image`):

- an ESP32 application image, as ESP-IDF builds it and MicroPython's downloads
  ship it (`ESP32_GENERIC-*.app-bin`, or `build/micropython.bin`): what goes into
  an OTA app partition. Layout (ESP-IDF `esp_app_format.h`, `esp_image_format.c`):

      24-byte header   magic 0xE9, segment count, SPI mode/speed/size, entry
                       address, then the extended header: WP pin, pin drive,
                       chip id (u16), chip revisions, reserved, hash_appended
      segments         each an 8-byte header (load address, length) + data;
                       the first holds esp_app_desc_t (magic 0xABCD5432, then
                       the version string at offset 16, 32 bytes)
      checksum         XOR of every segment data byte with 0xEF, in the last
                       byte of the padding to a 16-byte boundary
      SHA256           of everything before it, when hash_appended is 1

- a virtual-board image (`vboard/image.py`): a MicroPython unix executable
  behind a small header, what a virtual board's app partitions hold.

A file that is neither is refused with the reason; the common mistake, a full
flash image (bootloader, partition table and app, as `esptool write_flash`
takes it from 0x1000 or 0x0), is named as such.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import struct
from dataclasses import dataclass
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError, read_file
from mpy_blox_tools.vboard import image as vboard_image

# ESP-IDF's esp_chip_id_t (components/bootloader_support/include/esp_app_format.h).
CHIP_IDS = {
    "esp32": 0x0000,
    "esp32s2": 0x0002,
    "esp32c3": 0x0005,
    "esp32s3": 0x0009,
    "esp32c2": 0x000C,
    "esp32c6": 0x000D,
    "esp32h2": 0x0010,
    "esp32p4": 0x0012,
    "esp32c61": 0x0014,
    "esp32c5": 0x0017,
}
CHIPS = {v: k for k, v in CHIP_IDS.items()}

ESP_MAGIC = 0xE9
ESP_HEADER = struct.Struct("<BBBBIBBBBHBHH4sB")  # esp_image_header_t, 24 bytes
SEGMENT = struct.Struct("<II")
MAX_SEGMENTS = 16  # ESP_IMAGE_MAX_SEGMENTS
CHECKSUM_INITIAL = 0xEF
APP_DESC_MAGIC = 0xABCD5432
HASH_LEN = 32
# Where a partition table (magic 0xAA 0x50) sits in a full flash image: at flash
# address 0x8000, so at 0x8000 in a dump from 0x0 and at 0x7000 in a file written
# from 0x1000 (the ESP32's bootloader address; later chips put it at 0x0).
PARTITION_TABLE_MAGIC = b"\xaa\x50"
PARTITION_TABLE_AT = (0x8000, 0x7000)


@dataclass(frozen=True)
class FirmwareImage:
    """What a firmware list entry says about an image."""

    format: str  # "esp32-app" or "vboard"
    chip: str  # "esp32", "esp32s3", ...
    version: str | None  # esp_app_desc_t.version, or the vboard header's; None if absent
    size: int  # bytes of the file
    sha256: str  # of the whole file, lower-case hex (the package's topic name)


def read_image(path: str | Path) -> FirmwareImage:
    """Check the firmware image file at `path`; raise MpyBloxError saying what is wrong."""
    data = read_file(Path(path), "firmware image")
    try:
        return parse_image(data)
    except MpyBloxError as e:
        raise MpyBloxError(f"{path}: {e}") from None


def parse_image(data: bytes) -> FirmwareImage:
    """The FirmwareImage of `data`, an ESP32 app image or a virtual-board image."""
    if not data:
        raise MpyBloxError("empty file")
    if data[:4] == vboard_image.MAGIC:
        return _parse_vboard(data)
    _refuse_full_flash(data)
    if data[0] != ESP_MAGIC:
        raise MpyBloxError(
            f"not a firmware image: first byte 0x{data[0]:02x}, an ESP32 app image "
            f"starts with 0xE9 and a virtual-board image with {vboard_image.MAGIC.decode()}"
        )
    return _parse_esp_app(data)


def _refuse_full_flash(data: bytes) -> None:
    for at in PARTITION_TABLE_AT:
        if data[at : at + 2] == PARTITION_TABLE_MAGIC:
            start = "0x1000" if at == 0x7000 else "0x0"
            raise MpyBloxError(
                f"a full flash image (bootloader, partition table at 0x{at:x} in the file, "
                f"app), as esptool writes it from {start}: an OTA update takes the "
                "application image alone (MicroPython's ESP32_GENERIC-*.app-bin, or "
                "build/micropython.bin)"
            )


def _parse_esp_app(data: bytes) -> FirmwareImage:
    if len(data) < ESP_HEADER.size:
        raise MpyBloxError(f"truncated: {len(data)} bytes, an app image header is 24")
    (_, segments, _, _, _, _, _, _, _, chip_id, _, _, _, _, hash_appended) = (
        ESP_HEADER.unpack_from(data)
    )
    if not 0 < segments <= MAX_SEGMENTS:
        raise MpyBloxError(f"an app image with {segments} segments (1 to {MAX_SEGMENTS})")
    if chip_id not in CHIPS:
        raise MpyBloxError(f"unknown chip id 0x{chip_id:04x} in the app image header")
    pos = ESP_HEADER.size
    checksum = CHECKSUM_INITIAL
    version = None
    for i in range(segments):
        if pos + SEGMENT.size > len(data):
            raise MpyBloxError(f"truncated in the header of segment {i}")
        _, length = SEGMENT.unpack_from(data, pos)
        pos += SEGMENT.size
        if length % 4:
            raise MpyBloxError(f"segment {i}: length {length} is not a multiple of 4")
        if pos + length > len(data):
            raise MpyBloxError(f"truncated in segment {i} ({len(data) - pos} of {length} bytes)")
        segment = data[pos : pos + length]
        if i == 0 and segment[:4] == APP_DESC_MAGIC.to_bytes(4, "little"):
            version = segment[16:48].split(b"\0", 1)[0].decode(errors="replace")
        checksum ^= _xor(segment)
        pos += length
    end = (pos + 16) & ~15  # the checksum byte ends the padding to 16 bytes
    if end > len(data):
        raise MpyBloxError("truncated before the checksum")
    if data[end - 1] != checksum:
        raise MpyBloxError(f"checksum 0x{data[end - 1]:02x}, the segments give 0x{checksum:02x}")
    if hash_appended == 1:
        if end + HASH_LEN > len(data):
            raise MpyBloxError("truncated: the appended SHA256 is missing")
        if hashlib.sha256(data[:end]).digest() != data[end : end + HASH_LEN]:
            raise MpyBloxError("the appended SHA256 does not match the image (corrupted)")
        end += HASH_LEN
    _refuse_trailing(data, end)
    return FirmwareImage("esp32-app", CHIPS[chip_id], version, len(data), _sha256(data))


def _parse_vboard(data: bytes) -> FirmwareImage:
    chip_id, length, version, digest = vboard_image.unpack_header(data)
    if chip_id not in CHIPS:
        raise MpyBloxError(f"unknown chip id 0x{chip_id:04x} in the image header")
    end = vboard_image.HEADER_SIZE + length
    if len(data) < end:
        raise MpyBloxError(f"truncated: {len(data)} bytes of {end}")
    if hashlib.sha256(data[vboard_image.HEADER_SIZE : end]).digest() != digest:
        raise MpyBloxError("the payload's SHA256 does not match the header (corrupted)")
    _refuse_trailing(data, end)
    return FirmwareImage("vboard", CHIPS[chip_id], version, len(data), _sha256(data))


def _refuse_trailing(data: bytes, end: int) -> None:
    if len(data) > end:
        raise MpyBloxError(f"{len(data) - end} bytes after the image's end (at {end})")


def _xor(segment: bytes) -> int:
    # The XOR of all bytes, a 32-bit word at a time (segment lengths are multiples
    # of 4), folded to a byte, as esp_image_format.c computes it.
    word = functools.reduce(operator.xor, memoryview(segment).cast("I"), 0)
    return (word ^ word >> 8 ^ word >> 16 ^ word >> 24) & 0xFF


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
