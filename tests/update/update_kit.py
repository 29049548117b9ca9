"""Helpers for the update tests: build wheels and lists, drive boards.

`make_wheel` builds a wheel with CPython's zipfile, raw-deflated with a chosen
window (`wbits`, declared in the archive comment as docs/protocol.md says) and a
correct RECORD unless a test asks for a broken one.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import json
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from mpy_blox.update import manifest

REPO = Path(__file__).resolve().parents[2]
DRIVER = (Path(__file__).with_name("device_driver.py")).read_text()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


@contextlib.contextmanager
def _raw_deflate(wbits: int, level: int):
    # zipfile always deflates with a 32K window: swap its compressor factory.
    original = zipfile._get_compressor

    def compressor(compress_type, compresslevel=None):
        if compress_type == zipfile.ZIP_DEFLATED:
            return zlib.compressobj(level, zlib.DEFLATED, -wbits)
        return original(compress_type, compresslevel)

    zipfile._get_compressor = compressor
    try:
        yield
    finally:
        zipfile._get_compressor = original


@dataclass
class Pkg:
    data: bytes
    entry: dict

    @property
    def sha(self) -> str:
        return self.entry["pkg_sha256"]


def make_wheel(
    name: str,
    version: str,
    files: dict[str, bytes],
    *,
    tag: str = "py3-none-any",
    wbits: int | None = 10,
    level: int = 6,
    stored: bool = False,
    record: str | None = None,
    extra: dict[str, bytes] | None = None,
    symlink: str | None = None,
    declare_tag: bool = False,
) -> Pkg:
    """A wheel Pkg; `extra` adds files that are NOT in RECORD; `record` replaces RECORD."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    members = dict(files)
    members[f"{dist}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n".encode()
    )
    members[f"{dist}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    ).encode()
    lines = [f"{p},{record_hash(d)},{len(d)}" for p, d in members.items()]
    lines.append(f"{dist}/RECORD,,")
    members[f"{dist}/RECORD"] = (
        record if record is not None else "\n".join(lines) + "\n"
    ).encode()
    members.update(extra or {})
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with _raw_deflate(wbits or 15, level), zipfile.ZipFile(buf, "w", method) as zf:
        for path, data in members.items():
            zf.writestr(zipfile.ZipInfo(path, (2024, 1, 1, 0, 0, 0)), data, compress_type=method)
        if symlink:
            info = zipfile.ZipInfo(symlink, (2024, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            zf.writestr(info, b"/etc/passwd")
        if wbits is not None:
            zf.comment = b"wbits=%d" % wbits
    data = buf.getvalue()
    entry = manifest.wheel_entry(
        name, version, sha256(data), len(data), tag if declare_tag else None
    )
    return Pkg(data, entry)


def make_src(path: str, data: bytes) -> Pkg:
    return Pkg(data, manifest.src_entry(path, sha256(data), len(data)))


def board_files(pkgs: list[Pkg], payload: bytes, expect: dict | None = None) -> dict[str, bytes]:
    """Flash files for the device driver: packages, the list, what to expect."""
    files = {f"pkgs/{p.sha}": p.data for p in pkgs}
    files["todo.bin"] = payload
    files["expect.json"] = json.dumps(expect or {"old": {}, "new": {}}).encode()
    return files


def framework_files() -> dict[str, bytes]:
    """The driver as main.py, and the recovery module compiled, as it should be deployed."""
    return {"main.py": DRIVER.encode(), "mpypi_recover.mpy": compiled_recover()}


@functools.cache
def compiled_recover() -> bytes:
    from mpy_blox_tools import build

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mpypi_recover.mpy"
        recover = REPO / "mpypi_recover.py"
        build.compile_source(recover, recover.name, build.PLATFORMS["unix"], out)
        return out.read_bytes()


def clone_board(board, directory: Path):
    """A copy of a stopped board's folder (flash, NVS), to cut power in again."""
    from mpy_blox_tools.vboard.board import Board

    shutil.copytree(board.dir, directory, ignore=shutil.ignore_patterns("run", "console.log"))
    return Board(directory)
