"""Fixtures of the update tests: boards carrying the install core as a device has it.

A device gets mpy_blox as .mpy files from its wheel (compiling .py on a 100K heap
costs more than the code itself), so these boards get the modules the install
core needs from the session's compiled framework (tests/conftest.py), plus
mpypi_recover at the root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from update_kit import framework_files

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
    "update/layout.py",
]


@pytest.fixture(scope="session")
def core_mpy(full_mpy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("core_mpy") / "mpy_blox"
    for rel in CORE:
        compiled = rel[: -len(".py")] + ".mpy"
        (out / compiled).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full_mpy / compiled, out / compiled)
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
