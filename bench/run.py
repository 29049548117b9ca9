"""`make bench`: run every benchmark module in bench/, print a table each, save JSON.

A benchmark module `bench/bench_<name>.py` defines `TITLE` and
`run(workdir: Path) -> list[dict]` (one dict per row). Benchmarks compare side by
side within one run (ratios), because these machines are shared and noisy.

The JSON (`bench-results/bench-<date>.json`, copied to `latest.json`); each
benchmark carries its own date and lane, so `bench/report.py` can take every one
from the latest run that has it:

    {
      "started": "2026-12-02T10:00:00Z",        # the run, UTC
      "machine": "Linux-6.18-x86_64-with-glibc2.36",
      "board_lane": {"name": "32-bit", "heap": "100K"},  # micropython.board_lane()
      "benchmarks": {
        "update": {
          "title": "Update end to end vs raw socket into flash, 32-bit, 100K heap",
          "date": "2026-12-02T10:00:01Z",       # this benchmark's start, UTC
          "lane": {"name": "32-bit", "heap": "100K"},  # the module's LANE, else null
          "seconds": 93.2,                      # the whole benchmark
          "rows": [{"payload": "64 KiB", "path": "raw socket", "seconds": 0.01}]
        }
      }
    }

    python bench/run.py [NAME ...]      # default: all
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "bench-results"


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[format_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def format_cell(value) -> str:
    """A row's value in a table: floats to 3 significant digits, whole from 100 up."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from mpy_blox_tools import micropython

    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    RESULTS.mkdir(exist_ok=True)
    board = micropython.board_lane()
    report = {
        "started": _utc_now(),
        "machine": platform.platform(),
        "board_lane": {"name": board.name, "heap": board.heap},
        "benchmarks": {},
    }
    failed = 0
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        print(f"\n## {module.TITLE}\n", flush=True)
        date = _utc_now()
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            started = time.monotonic()
            try:
                rows = module.run(Path(tmp))
            except Exception as e:
                print(f"FAILED: {type(e).__name__}: {e}")
                failed += 1
                continue
        elapsed = time.monotonic() - started
        print(format_table(rows))
        print(f"\n({elapsed:.1f}s)")
        # A bench whose boards all run on one lane names it LANE; the others (both
        # lanes side by side, or snippets at their own heap) say so in their title.
        lane = getattr(module, "LANE", None)
        report["benchmarks"][name] = {
            "title": module.TITLE,
            "date": date,
            "lane": {"name": lane.name, "heap": lane.heap} if lane else None,
            "seconds": round(elapsed, 1),
            "rows": rows,
        }
    out = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.json").write_text(out.read_text())
    print(f"\nresults: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
