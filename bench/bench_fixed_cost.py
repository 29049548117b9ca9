"""Where the end-to-end time of a small update goes (issue 13, "the fixed cost").

A 64 KiB src file, published REPEAT times to one virtual board running the full app
(its lane's board heap, 16 MiB of flash), timed by the board's live status reports and
its info as the workstation receives them:

    publish -> rebooting (the app checked the list and resets) -> installing (the
    install boot is up and connected) -> downloading -> verifying -> rebooting (staged
    and committed) -> the new app's info (it is up and connected)

One row per phase: the median over the runs, its share of the whole, and the
fastest and slowest run. The download phase is the part that scales with the size;
the rest is what every update pays.

    BENCH_FIXED_COST_REPEAT=5 python bench/run.py fixed_cost
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from appboard import app_board

from mpy_blox_tools import micropython, publish

LANE = micropython.board_lane()
REPEAT = int(os.environ.get("BENCH_FIXED_COST_REPEAT", "5"))
SIZE = 64 * 1024
TITLE = f"Fixed cost of an update: a 64 KiB src file, phase by phase ({LANE.name}, {LANE.heap})"
PHASES = (  # each starts where the one before ended
    "accept: the app takes and checks the list",
    "reset, install boot, MQTT connect",
    "fetch the list, subscribe",
    "download (64 KiB)",
    "verify, stage, commit",
    "reboot into the new app, MQTT connect",
)


def run(workdir: Path) -> list[dict]:
    runs: list[list[float]] = []
    with app_board(workdir, LANE, "16M") as app:
        for n in range(REPEAT):
            blob = workdir / f"blob{n}.bin"
            blob.write_bytes(os.urandom(SIZE))
            t0 = time.monotonic()
            app.publish([publish.src_package(blob, "data/blob.bin")])
            marks = app.timeline.wait_for(
                t0, "rebooting", "installing", "downloading", "verifying"
            )
            ends = [marks[m] for m in ("rebooting", "installing", "downloading", "verifying")]
            ends.append(app.timeline.wait_for(ends[-1], "rebooting")["rebooting"])  # committed
            # The new app's first info (the install boot's comes before its rebooting).
            ends.append(app.timeline.wait_for(ends[-1], "info")["info"])
            app.wait_app()
            starts = [t0, *ends[:-1]]
            runs.append([end - start for start, end in zip(starts, ends)])
    totals = [sum(r) for r in runs]
    rows = []
    for i, name in enumerate(PHASES):
        times = [r[i] for r in runs]
        rows.append(
            {
                "phase": name,
                "median s": round(statistics.median(times), 3),
                "share": f"{statistics.median(times) / statistics.median(totals):.0%}",
                "min s": round(min(times), 3),
                "max s": round(max(times), 3),
            }
        )
    rows.append(
        {
            "phase": f"end to end ({REPEAT} runs)",
            "median s": round(statistics.median(totals), 3),
            "share": "100%",
            "min s": round(min(totals), 3),
            "max s": round(max(totals), 3),
        }
    )
    return rows
