"""What the fleet benchmarks share: boards copied from a template, and the memory of
processes as /proc counts it (not a benchmark: bench/run.py runs bench_*)."""

from __future__ import annotations

from pathlib import Path

from mpy_blox_tools.vboard.board import Board

MIB = 1024 * 1024


def clone(template: Board, directory: Path, n: int) -> Board:
    """A copy of `template` with device id number `n` (creating 200 boards is slow)."""
    return template.clone(directory, device_id="esp32-%012x" % (0xB0A4D0000000 + n))


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss(pid: int) -> int:
    """Resident set now, in bytes (shared pages counted in full)."""
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """The highest resident set the process has had (VmHWM), in bytes."""
    return _status_kb(pid, "VmHWM") * 1024


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages divided among their sharers, so
    the PSS of N processes adds up to what they hold together."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """The direct children of `pid` (a supervisor's board processes)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out
