"""`make bench`: run every benchmark module in bench/, print a table each, save JSON.

A benchmark module `bench/bench_<name>.py` defines `TITLE` and
`run(workdir: Path) -> list[dict]` (one dict per row). Benchmarks compare side by
side within one run (ratios), because these machines are shared and noisy.

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
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    RESULTS.mkdir(exist_ok=True)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.platform(),
        "benchmarks": {},
    }
    failed = 0
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        print(f"\n## {module.TITLE}\n", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            started = time.monotonic()
            try:
                rows = module.run(Path(tmp))
            except Exception as e:
                print(f"FAILED: {type(e).__name__}: {e}")
                failed += 1
                continue
        print(format_table(rows))
        print(f"\n({time.monotonic() - started:.1f}s)")
        report["benchmarks"][name] = {"title": module.TITLE, "rows": rows}
    out = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.json").write_text(out.read_text())
    print(f"\nresults: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
