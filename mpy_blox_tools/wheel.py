"""Writing wheels that a device can unpack in a few KB of heap.

A device inflates wheel entries with MicroPython's `deflate.DeflateIO(f, RAW, wbits)`,
which allocates a window of 2**wbits bytes. Standard wheels are deflated with a 32 KiB
window (wbits 15): too big for an ESP32 without PSRAM. Our wheels are deflated with a
small window (DEVICE_WBITS), written deterministically (sorted entries, fixed
timestamps) so the same files always give the same bytes and the same SHA256.

The zip is written here rather than with `zipfile` because `zipfile` offers no way to
choose the deflate window. A raw deflate stream does not say how large a window it
needs, so the archive comment declares it: `wbits=10` (docs/protocol.md); a device
refuses a wheel whose window does not fit its free heap before it allocates it.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zlib_ng import zlib_ng

from mpy_blox_tools.errors import MpyBloxError

# 1 KiB window: ~10 KB of device heap to inflate (measured on the unix port, see
# "The deflate window rule" in docs/protocol.md), and within a few percent of
# wbits 15 on .mpy files, whose repetitions are short-range.
DEVICE_WBITS = 10
LEVEL = 9
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold: reproducible
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1
_VERSION = 20  # "2.0": deflate, no zip64


def record_hash(data: bytes) -> str:
    """A RECORD hash field: sha256=<urlsafe base64, no padding> (PEP 376/427)."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def deflate_raw(data: bytes, wbits: int = DEVICE_WBITS, level: int = LEVEL) -> bytes:
    c = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -wbits, 9)
    return c.compress(data) + c.flush()


def make_record(files: dict[str, bytes], record_path: str) -> bytes:
    lines = [f"{name},{record_hash(data)},{len(data)}" for name, data in sorted(files.items())]
    lines.append(f"{record_path},,")
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class ZipEntry:
    """One member of a zip: its bytes, how they are compressed, its unix mode.

    `wbits` None stores the data; otherwise it is raw-deflated with a 2**wbits window
    (`deflated`, when the caller has already done so).
    """

    name: str
    data: bytes
    wbits: int | None = DEVICE_WBITS
    level: int = LEVEL
    mode: int = 0o100644  # a regular file, rw-r--r--
    deflated: bytes | None = None


def zip_bytes(entries: Iterable[ZipEntry], comment: bytes = b"") -> bytes:
    """A zip of `entries` in the order given: no zip64, no data descriptors, fixed
    timestamps. The one zip writer of the project; `write_zip` decides what goes in."""
    local = bytearray()
    central = bytearray()
    count = 0
    for entry in entries:
        data, raw = entry.data, entry.name.encode()
        crc = zipfile.crc32(data) & 0xFFFFFFFF
        if entry.wbits is None:
            packed, method = data, 0
        else:
            packed = entry.deflated
            if packed is None:
                packed = deflate_raw(data, entry.wbits, entry.level)
            method = 8
        offset = len(local)
        local += struct.pack(
            "<4s5H3L2H",
            b"PK\x03\x04",
            _VERSION,
            0,
            method,
            _DOS_TIME,
            _DOS_DATE,
            crc,
            len(packed),
            len(data),
            len(raw),
            0,
        )
        local += raw + packed
        central += struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            (3 << 8) | _VERSION,  # made by: unix, so the external attributes are a mode
            _VERSION,
            0,
            method,
            _DOS_TIME,
            _DOS_DATE,
            crc,
            len(packed),
            len(data),
            len(raw),
            0,
            0,
            0,
            0,
            entry.mode << 16,
            offset,
        )
        central += raw
        count += 1
    if len(local) > 0xFFFFFFFF or count > 0xFFFF:
        raise MpyBloxError("wheel too large for a zip without zip64")
    end = struct.pack(
        "<4s4H2LH",
        b"PK\x05\x06",
        0,
        0,
        count,
        count,
        len(central),
        len(local),
        len(comment),
    )
    return bytes(local + central + end + comment)


def write_zip(path: Path, files: dict[str, bytes], wbits: int = DEVICE_WBITS) -> None:
    """Write `files` ({archive name: bytes}) as a deterministic zip deflated with `wbits`,
    declared in the archive comment (docs/protocol.md).

    Entries are sorted by name, except that the .dist-info files come last (as
    wheel tools do, so RECORD is the final entry). Regular files only: no symlinks,
    ever. An entry that deflate would only grow is stored.
    """
    names = sorted(files, key=lambda n: (".dist-info/" in n, n.endswith("/RECORD"), n))
    entries = []
    for name in names:
        data = files[name]
        packed = deflate_raw(data, wbits)
        if len(packed) < len(data):
            entries.append(ZipEntry(name, data, wbits, deflated=packed))
        else:
            entries.append(ZipEntry(name, data, None))
    path.write_bytes(zip_bytes(entries, b"wbits=%d" % wbits))


def wheel_name(distribution: str, version: str, tag: str) -> str:
    return f"{distribution.replace('-', '_')}-{version}-{tag}.whl"


def read_wheel(path: Path) -> dict[str, bytes]:
    """All files of a wheel, by archive name (for repacking and checks)."""
    try:
        with zipfile.ZipFile(path) as z:
            return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
    except (OSError, zipfile.BadZipFile) as e:
        raise MpyBloxError(f"{path}: not a readable wheel ({e})") from None


def repack(source: Path, dest_dir: Path, wbits: int = DEVICE_WBITS) -> Path:
    """Re-deflate a foreign wheel with the device window; its files and RECORD stay as they are."""
    files = read_wheel(source)
    records = [n for n in files if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise MpyBloxError(f"{source.name}: a wheel has exactly one .dist-info/RECORD")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / source.name
    if dest.resolve() == source.resolve():
        raise MpyBloxError(f"{source}: would repack onto itself")
    write_zip(dest, files, wbits)
    return dest


def dist_info_files(name: str, version: str, tag: str, generator: str) -> dict[str, bytes]:
    """METADATA and WHEEL for a wheel of `name` `version` tagged `tag`."""
    return {
        "METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        "WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: {generator}\nRoot-Is-Purelib: true\nTag: {tag}\n"
        ).encode(),
    }


def assemble(
    path: Path,
    name: str,
    version: str,
    tag: str,
    files: dict[str, bytes],
    generator: str,
    extra_wheel_lines: Iterable[str] = (),
) -> Path:
    """Write a complete wheel: `files` plus its .dist-info (METADATA, WHEEL, RECORD)."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    meta = dist_info_files(name, version, tag, generator)
    if extra_wheel_lines:
        meta["WHEEL"] += "".join(f"{line}\n" for line in extra_wheel_lines).encode()
    all_files = dict(files)
    for fname, data in meta.items():
        all_files[f"{dist_info}/{fname}"] = data
    record = f"{dist_info}/RECORD"
    all_files[record] = make_record(all_files, record)
    write_zip(path, all_files)
    return path
