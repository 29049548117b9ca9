"""Supervisor memory: one `vboard fleet` process for N boards against N `vboard run`s.

Each `vboard run` is a CPython process of its own; `vboard fleet` is one for all.
The boards are the same either way (one MicroPython process each, idle in main.py
after boot, on the lane fleets use: 32-bit at 100K when MPY_BLOX_MICROPYTHON32 names
its binary). RSS counts shared pages (CPython's libraries) in every process; PSS
divides them among their sharers, so N processes' PSS adds up to what they take.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vboards import MIB, children, clone, cpu_s, pss, rss

from mpy_blox_tools import micropython
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard, RunningFleet

LANE = micropython.board_lane()
SIZES = tuple(int(n) for n in os.environ.get("BENCH_SUPERVISOR_SIZES", "1,10,50").split(","))
TITLE = (
    f"Supervisor memory: one fleet process vs one `vboard run` per board, {SIZES} boards "
    f"({LANE.name}, {LANE.heap} heap)"
)
# `vboard run` for each board up to this many (each is a CPython process of ~37 MB).
SINGLES_MAX = int(os.environ.get("BENCH_SUPERVISOR_SINGLES_MAX", "50"))
CPU_WINDOW_S = 5.0  # the supervisors' CPU time over this long, boards idle
IDLE_MAIN = "import time\nprint('idle')\nwhile True:\n    time.sleep(1)\n"


def _measure(mode: str, supervisors: list[int], size: int) -> dict:
    time.sleep(1)  # past the boots' transients
    boards = [c for s in supervisors for c in children(s)]
    before, started = sum(map(cpu_s, supervisors)), time.monotonic()
    time.sleep(CPU_WINDOW_S)
    busy = (sum(map(cpu_s, supervisors)) - before) / (time.monotonic() - started)
    return {
        "mode": mode,
        "boards": size,
        "supervisor processes": len(supervisors),
        "supervisors RSS MiB": sum(map(rss, supervisors)) / MIB,
        "supervisors PSS MiB": sum(map(pss, supervisors)) / MIB,
        "PSS MiB per board": sum(map(pss, supervisors)) / MIB / size,
        "board process RSS MiB": sum(map(rss, boards)) / MIB / len(boards),
        "board process PSS MiB": sum(map(pss, boards)) / MIB / len(boards),
        "supervisors CPU % idle": 100 * busy,
    }


def run(workdir: Path) -> list[dict]:
    template = Board.create(workdir / "template", executable=LANE.executable)
    template.write("main.py", IDLE_MAIN.encode())
    rows = []
    for size in SIZES:
        made = [clone(template, workdir / f"s{size}-{i}", size * 1000 + i) for i in range(size)]
        singles = [RunningBoard(b, heap=LANE.heap, executable=LANE.executable) for b in made]
        if size > SINGLES_MAX:
            singles = []
        try:
            for rb in singles:
                rb.start()
            for rb in singles:
                rb.wait_for("idle", timeout=120)
            if singles:
                rows.append(_measure("vboard run each", [rb.process.pid for rb in singles], size))
        finally:
            for rb in singles:
                rb.stop()
        with RunningFleet(made, heap=LANE.heap, executable=LANE.executable) as fleet:
            for fb in fleet.boards:
                fb.wait_for("idle", timeout=120)
            rows.append(_measure("vboard fleet", [fleet.process.pid], size))
    return rows
