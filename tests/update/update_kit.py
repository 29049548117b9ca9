"""Helpers for the update tests: build wheels and lists, drive boards.

`make_wheel` builds a wheel with the product's zip writer (mpy_blox_tools.wheel),
raw-deflated with a chosen window (`wbits`, declared in the archive comment as
docs/protocol.md says) and a correct RECORD unless a test asks for a broken one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mpy_blox.update import manifest
from mpy_blox_tools import wheel

REPO = Path(__file__).resolve().parents[2]
DRIVER = (Path(__file__).with_name("device_driver.py")).read_text()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


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
    # The product's zip writer, with what a test may ask for beyond it: a standard
    # window (wbits None: 32 KiB, undeclared), stored entries, a symlink.
    window = None if stored else (wbits or 15)
    entries = [wheel.ZipEntry(path, d, window, level) for path, d in members.items()]
    if symlink:
        entries.append(wheel.ZipEntry(symlink, b"/etc/passwd", None, mode=0o120777))
    data = wheel.zip_bytes(entries, b"wbits=%d" % wbits if wbits is not None else b"")
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


# The journal's own files: what a snapshot of the installed set leaves out, with
# the test drivers' main.py and their flag files.
_NOT_INSTALLED = ("main.py", "action", "wdt", ".mpypi/journal", ".mpypi/applied")


def snapshot(board) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) of a stopped board, but the journal's."""
    out = {}
    for path, size in board.ls().items():
        if path in _NOT_INSTALLED or path.startswith((".mpypi/stage", ".mpypi/rollback")):
            continue
        out[path] = None if size is None else board.cat(path)
    return out


def nvs_key(board, key: str, namespace: str = "mpypi"):
    """[type, value] of an NVS key of a stopped board, or None."""
    return board.nvs().get(namespace, {}).get(key)


def set_nvs_key(board, key: str, value: list, namespace: str = "mpypi") -> None:
    """Set an NVS key of a stopped board, as a device's earlier boot would have."""
    store = board.nvs()
    store.setdefault(namespace, {})[key] = value
    (board.dir / "nvs.json").write_text(json.dumps(store))
