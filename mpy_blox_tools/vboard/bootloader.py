"""The virtual board's partition table and second-stage bootloader.

A board from 4M of flash up has an ESP32's OTA layout (MicroPython's
`partitions-4MiB-ota.csv`, `partitions-8MiBplus-ota.csv`): `otadata` and two app
partitions, `ota_0` and `ota_1`, each a file in the board's folder
(`otadata.img`, `ota_0.img`, `ota_1.img`) that the board reads and writes through
`esp32.Partition`. A smaller board has one `factory` app partition with no bytes
behind it: it runs the executable the supervisor is given, as before.

Before each boot but a soft reset (which restarts the interpreter, not the chip)
the supervisor runs `select_boot`, which does what ESP-IDF's bootloader does with
app rollback enabled (MicroPython's `sdkconfig.base` enables it):
`bootloader_utility_get_selected_boot_partition` and `..._load_boot_image` in
components/bootloader_support. otadata holds two 32-byte entries, one per
sector (`esp_ota_select_entry_t`: ota_seq, seq_label, ota_state, crc32 of
ota_seq); the valid one with the higher sequence names the slot,
`(seq - 1) % 2`. An entry found PENDING_VERIFY (booted once, never confirmed)
becomes ABORTED, so the other entry's slot boots; a NEW one becomes
PENDING_VERIFY and boots. The slot's image is then verified (magic, chip,
length, SHA256); an invalid one is passed over for the next slot down, then up.

The flash size names the filesystem partition's size, as it did before boards had
app partitions: the app partitions come on top of it (a 4 MB ESP32 with this
layout has 960 KB left for its filesystem).
"""

from __future__ import annotations

import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard import image

SECTOR = 4096
MIB = 1024 * 1024
OTA_FLASH = 4 * MIB  # from this flash size up, a board has OTA partitions
TYPE_APP, TYPE_DATA = 0, 1
SUBTYPE_FACTORY, SUBTYPE_OTA_0 = 0x00, 0x10
SUBTYPE_OTADATA, SUBTYPE_FAT = 0x00, 0x81
OTADATA_AT, OTADATA_SIZE = 0xD000, 0x2000
APP_AT = 0x10000

# esp_ota_img_states_t (bootloader_support/include/esp_flash_partitions.h).
NEW, PENDING_VERIFY, VALID, INVALID, ABORTED = 0, 1, 2, 3, 4
UNDEFINED = 0xFFFFFFFF
STATE_NAMES = {
    NEW: "new",
    PENDING_VERIFY: "pending-verify",
    VALID: "valid",
    INVALID: "invalid",
    ABORTED: "aborted",
    UNDEFINED: "undefined",
}
ENTRY = struct.Struct("<I20sII")  # esp_ota_select_entry_t


def partition_table(flash_size: int) -> list[list]:
    """[[label, type, subtype, address, size], ...] of a board with `flash_size`."""
    if flash_size < OTA_FLASH:
        factory = 0x160000  # partitions-2MiB.csv
        return [
            ["factory", TYPE_APP, SUBTYPE_FACTORY, APP_AT, factory],
            ["vfs", TYPE_DATA, SUBTYPE_FAT, APP_AT + factory, flash_size],
        ]
    slot = 0x180000 if flash_size < 8 * MIB else 0x270000
    return [
        ["otadata", TYPE_DATA, SUBTYPE_OTADATA, OTADATA_AT, OTADATA_SIZE],
        ["ota_0", TYPE_APP, SUBTYPE_OTA_0, APP_AT, slot],
        ["ota_1", TYPE_APP, SUBTYPE_OTA_0 + 1, APP_AT + slot, slot],
        ["vfs", TYPE_DATA, SUBTYPE_FAT, APP_AT + 2 * slot, flash_size],
    ]


def slots(config: dict) -> list[list]:
    """The OTA app partitions of a board (empty without them), in slot order."""
    return [p for p in config.get("partitions", ()) if p[0].startswith("ota_")]


def make_partitions(directory: Path, config: dict, executable: str) -> None:
    """The files of a new board's partitions: erased otadata, `executable` in ota_0."""
    parts = slots(config)
    if not parts:
        return
    payload = Path(executable).read_bytes()
    data = image.make_image(payload, _executable_version(executable))
    if len(data) > parts[0][4]:
        raise MpyBloxError(
            f"{executable} ({len(payload)} bytes) does not fit an app partition of "
            f"{parts[0][4]} bytes"
        )
    # As after `esptool erase_flash write_flash`: erased flash reads 0xFF.
    (directory / "otadata.img").write_bytes(b"\xff" * OTADATA_SIZE)
    for label, _, _, _, size in parts:
        (directory / f"{label}.img").write_bytes(b"\xff" * size)
    with open(directory / "ota_0.img", "r+b") as f:
        f.write(data)


def _executable_version(executable: str) -> str:
    from mpy_blox_tools import micropython

    bits = micropython.word_bits(executable)
    return f"factory {bits}-bit"


# -- otadata -------------------------------------------------------------------------


def entry_crc(seq: int) -> int:
    """bootloader_common_ota_select_crc: CRC32 of ota_seq alone."""
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF


def read_otadata(path: Path) -> list[tuple[int, int, int]]:
    """The two entries: [(seq, state, crc), (seq, state, crc)]."""
    data = path.read_bytes()
    out = []
    for i in (0, 1):
        seq, _, state, crc = ENTRY.unpack_from(data, i * SECTOR)
        out.append((seq, state, crc))
    return out


def write_entry(path: Path, index: int, seq: int, state: int) -> None:
    """Rewrite entry `index` (its sector erased, then written), as ESP-IDF does."""
    entry = ENTRY.pack(seq, b"\xff" * 20, state, entry_crc(seq))
    sector = entry + b"\xff" * (SECTOR - len(entry))
    with open(path, "r+b") as f:
        f.seek(index * SECTOR)
        f.write(sector)
        f.flush()
        os.fsync(f.fileno())


def _invalid(entry: tuple[int, int, int]) -> bool:
    seq, state, _ = entry
    return seq == 0xFFFFFFFF or state in (INVALID, ABORTED)


def _valid(entry: tuple[int, int, int]) -> bool:
    return not _invalid(entry) and entry[2] == entry_crc(entry[0])


def active_entry(entries: list[tuple[int, int, int]]) -> int:
    """bootloader_common_get_active_otadata: the valid entry with the higher seq, or -1."""
    valid = [i for i in (0, 1) if _valid(entries[i])]
    if not valid:
        return -1
    return max(valid, key=lambda i: entries[i][0])


# -- booting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    """What the bootloader chose: the slot, its executable and how it got there."""

    label: str
    executable: Path
    version: str
    state: str  # the otadata state the slot boots in
    notes: tuple[str, ...]  # what the bootloader did, for the console


def select_boot(board_dir: Path, config: dict) -> Boot:
    """Run the emulated bootloader once: update otadata, verify, pick a slot."""
    parts = slots(config)
    path = board_dir / "otadata.img"
    entries = read_otadata(path)
    notes = []
    for i in (0, 1):
        seq, state, _ = entries[i]
        if state == PENDING_VERIFY:
            write_entry(path, i, seq, ABORTED)
            entries[i] = (seq, ABORTED, entry_crc(seq))
            label = parts[(seq - 1) % len(parts)][0]
            notes.append(f"{label} booted on trial without confirming: aborted (rolled back)")
    initial = False
    if _invalid(entries[0]) and _invalid(entries[1]):
        start = 0  # no factory partition: ota_0
        initial = all(e[0] == 0xFFFFFFFF or e[2] != entry_crc(e[0]) for e in entries)
    else:
        active = active_entry(entries)
        if active == -1:
            start = -1  # "ota data partition invalid and no factory, will try all"
        else:
            seq, state, _ = entries[active]
            start = (seq - 1) % len(parts)
            if state == NEW:
                write_entry(path, active, seq, PENDING_VERIFY)
                entries[active] = (seq, PENDING_VERIFY, entry_crc(seq))
    # bootloader_utility_load_boot_image: from `start` down, then up.
    order = list(range(start, -1, -1)) + list(range(start + 1, len(parts)))
    for index in order:
        label = parts[index][0]
        try:
            exe, version = _load(board_dir, config, parts[index])
        except MpyBloxError as e:
            notes.append(f"{label}: not bootable ({e})")
            continue
        if initial:  # set_actual_ota_seq: the first boot records its slot as valid
            write_entry(path, 0, index + 1, VALID)
        active = active_entry(read_otadata(path))
        state = "undefined"
        if active != -1:
            seq, st, _ = read_otadata(path)[active]
            if (seq - 1) % len(parts) == index:
                state = STATE_NAMES.get(st, str(st))
        return Boot(label, exe, version, state, tuple(notes))
    raise MpyBloxError(
        "no bootable app partition (" + "; ".join(notes or ["all slots empty"]) + ")"
    )


def _load(board_dir: Path, config: dict, part: list) -> tuple[Path, str]:
    """Verify the image in `part` and give its executable a file of its own."""
    from mpy_blox_tools.firmware import CHIP_IDS

    label, _, _, _, size = part
    with open(board_dir / f"{label}.img", "rb") as f:
        head = f.read(image.HEADER_SIZE)
        chip_id, length, version, digest = image.unpack_header(head)
        chip = config.get("chip", "esp32")
        if chip_id != CHIP_IDS.get(chip):
            raise MpyBloxError(f"an image for chip id {chip_id}, this board is an {chip}")
        if image.HEADER_SIZE + length > size:
            raise MpyBloxError(f"its length {length} overruns the partition")
        payload = f.read(length)
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        raise MpyBloxError("SHA256 mismatch")
    cache = board_dir / "run" / "firmware"
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / digest.hex()[:16]
    if not exe.exists():
        tmp = exe.with_suffix(".tmp")
        tmp.write_bytes(payload)
        tmp.chmod(0o755)
        tmp.replace(exe)
    return exe, version
