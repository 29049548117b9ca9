"""`make bench-report`: docs/benchmarks.md's tables and plots from bench-results/.

For each benchmark in bench/ (`bench_<name>.py`), the latest `bench-results/bench-*.json`
that has it (bench/run.py writes them; their names sort by date) gives one table, with
that run's date, machine and lane; a benchmark no run has says "not run yet". Two
plots go to docs/img/, so a reader sees the shape rather than reads numbers:

- time against package size: the `update` bench's rows (and a `firmware` bench's, if
  one was run) whose payload (or image) is a size (`64 KiB`, `1 MiB`, `4 MiB`), one
  line per path (end to end, download, the raw socket);
- time against fleet size: `fleet_publish` (one publish) and `fleet` (a staged
  rollout), time against the number of boards.

The generated text sits between BEGIN and END in docs/benchmarks.md (appended the
first time); the prose outside them is left as it is. The output depends on the JSON
only: no dates of its own, and PNGs without a Software or date entry, so a second
run on the same JSON changes nothing.

    python bench/report.py [--results DIR] [--doc FILE] [--img DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from run import format_cell

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BEGIN = "<!-- bench-report: begin (make bench-report writes this part; edit bench/report.py) -->"
END = "<!-- bench-report: end -->"
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# The benches whose rows plot against package size, and their label in the legend.
PACKAGE_BENCHES = {"update": "update", "firmware": "firmware"}
# The benches whose rows plot against fleet size: the row's time column and the label.
FLEET_BENCHES = {
    "fleet_publish": ("update s", "one publish to all (fleet_publish)"),
    "fleet": ("rollout s", "staged rollout 1, 10%, 50%, 100% (fleet)"),
}
PLOTS = {"package": "bench-package-size.png", "fleet": "bench-fleet-size.png"}


class ReportError(Exception):
    """The report cannot be written (its document is missing, a result is unreadable)."""


@dataclass(frozen=True)
class Result:
    """One benchmark's entry in the latest run that has it."""

    name: str
    title: str
    rows: list[dict]
    date: str
    machine: str
    lane: str  # "32-bit, 100K heap" (see _lane_text)
    source: str  # the JSON's file name

    @property
    def day(self) -> str:
        return self.date[:10]


def known_benches(bench_dir: Path = HERE) -> dict[str, str]:
    """{name: the first line of its docstring} for each bench/bench_<name>.py."""
    out = {}
    for path in sorted(bench_dir.glob("bench_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.stem.removeprefix("bench_")] = doc.splitlines()[0] if doc else ""
    return out


def load_latest(results: Path) -> dict[str, Result]:
    """Each benchmark's entry in the latest bench-*.json (by name) that has it."""
    latest: dict[str, Result] = {}
    for path in sorted(results.glob("bench-*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ReportError(f"{path}: unreadable ({e})") from e
        for name, bench in run.get("benchmarks", {}).items():
            latest[name] = Result(
                name=name,
                title=bench.get("title", name),
                rows=bench.get("rows", []),
                date=bench.get("date") or run.get("started", "?"),
                machine=run.get("machine", "?"),
                # Runs before bench/run.py recorded the lane have no such key.
                lane=_lane_text(bench["lane"]) if "lane" in bench else "not recorded",
                source=path.name,
            )
    return latest


def _lane_text(lane: dict | None) -> str:
    if lane is None:  # a bench of both lanes, or of snippets at their own heap
        return "as the title says"
    return f"{lane['name']}, {lane['heap']} heap"


def _markdown_cell(value) -> str:
    # As bench/run.py prints it, with no | or line break to end the cell early.
    return format_cell(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(_markdown_cell(row.get(c, "")) for c in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def payload_bytes(label) -> int | None:
    """`64 KiB` -> 65536; None for anything that is not a size."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(B|KiB|MiB|GiB)\s*", str(label))
    return round(float(m[1]) * UNITS[m[2]]) if m else None


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def package_series(latest: dict[str, Result]) -> dict[str, list[tuple[int, float]]]:
    """{legend label: [(package bytes, seconds)]} from the package-size benches."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name, prefix in PACKAGE_BENCHES.items():
        if name not in latest:
            continue
        for row in latest[name].rows:
            # `update` names the size "payload", `firmware` (issue 11) "image".
            size = payload_bytes(row.get("payload", row.get("image")))
            seconds = _number(row.get("seconds"))
            if size is not None and seconds is not None and seconds > 0:
                path = str(row.get("path", "seconds"))
                label = (
                    path if path.startswith(prefix) or name == "update" else f"{prefix}: {path}"
                )
                series.setdefault(label, []).append((size, seconds))
    return {k: sorted(v) for k, v in series.items()}


def fleet_series(latest: dict[str, Result]) -> dict[str, list[tuple[int, float]]]:
    """{legend label: [(boards, seconds)]} from the fleet-size benches."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name, (column, label) in FLEET_BENCHES.items():
        if name not in latest:
            continue
        points = [
            (int(row["boards"]), _number(row.get(column)))
            for row in latest[name].rows
            if _number(row.get("boards")) is not None and _number(row.get(column)) is not None
        ]
        if points:
            series[label] = sorted(points)
    return series


def _size_label(n: float) -> str:
    for unit in ("MiB", "KiB"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:g} {unit}"
    return f"{n:g} B"


def plot(
    series: dict[str, list[tuple[int, float]]], path: Path, *, title: str, xlabel: str, sizes: bool
) -> None:
    """Seconds against x, one line per series; a PNG with no date in it.

    Package sizes (`sizes`) go on log-log axes (64 KiB to 4 MiB); fleet sizes on
    linear ones from 0, where a straight line is time growing with the boards.
    Paths of one form share a colour: end to end solid, its download dashed; the
    same through the shaped link (a label ending in "(shaped)") with square marks.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(11, 5), dpi=100)
    forms: dict[str, str] = {}
    for label, points in series.items():
        form = re.sub(r"\b(e2e|download)\b|\(shaped\)", "", label).strip()
        colour = forms.setdefault(form, f"C{len(forms)}")
        style = "--" if "download" in label else "-"
        marker = "s" if label.endswith("(shaped)") else "o"
        ax.plot(*zip(*points), style, color=colour, marker=marker, label=label)
    if sizes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(
            FixedLocator(sorted({x for p in series.values() for x, _ in p}))
        )
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _size_label(x)))
        ax.tick_params(axis="x", labelrotation=30)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds" + (" (log scale)" if sizes else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # No Software entry (matplotlib's version) and no date: the same JSON, the same bytes.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _provenance(latest: dict[str, Result], names) -> str:
    return "; ".join(
        f"{latest[n].name} {latest[n].day}, {latest[n].lane}" for n in names if n in latest
    )


def write_plots(latest: dict[str, Result], img: Path) -> dict[str, Path | None]:
    """The two PNGs where there is data ({kind: path}, None where there is none);
    a plot with no data left from before is removed."""
    made: dict[str, Path | None] = {}
    jobs = {
        "package": (package_series(latest), PACKAGE_BENCHES, "package size", "log scale", True),
        "fleet": (fleet_series(latest), FLEET_BENCHES, "fleet size", "boards", False),
    }
    for kind, (series, names, what, unit, sizes) in jobs.items():
        path = img / PLOTS[kind]
        if not series:
            path.unlink(missing_ok=True)
            made[kind] = None
            continue
        title = f"Time against {what}\n{_provenance(latest, names)}"
        plot(series, path, title=title, xlabel=f"{what} ({unit})", sizes=sizes)
        made[kind] = path
    return made


def section(latest: dict[str, Result], known: dict[str, str], plots: dict[str, str | None]) -> str:
    """The generated Markdown: the plots (relative links), then one table per bench."""
    out = [
        BEGIN,
        "",
        "## Latest results (generated)",
        "",
        "`make bench-report` writes this section (`bench/report.py`): for each benchmark,\n"
        "its latest run in `bench-results/`, which its table names. One run each, on a\n"
        "shared machine: read the ratios and the shape, not the seconds.",
        "",
    ]
    captions = {
        "package": ("Time against package size", "`make bench BENCH=update`"),
        "fleet": ("Time against fleet size", "`make bench BENCH=fleet_publish` or `fleet`"),
    }
    for kind, (caption, how) in captions.items():
        link = plots.get(kind)
        out += [f"![{caption}]({link})" if link else f"{caption}: not run yet ({how}).", ""]
    for name in sorted(set(known) | set(latest)):
        out.append(f"### `{name}`")
        out.append("")
        if name not in latest:
            out += [f"Not run yet (`make bench BENCH={name}`). {known.get(name, '')}".rstrip(), ""]
            continue
        r = latest[name]
        out += [
            f"{r.title}.",
            "",
            f"Run {r.date} on `{r.machine}`, lane {r.lane} (`bench-results/{r.source}`).",
            "",
            markdown_table(r.rows),
            "",
        ]
    out.append(END)
    return "\n".join(out) + "\n"


def splice(doc: str, generated: str) -> str:
    """`doc` with its generated part replaced by `generated` (appended if it has none)."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start == -1 and end == -1:
        return doc.rstrip("\n") + "\n\n" + generated
    if start == -1 or end < start:
        raise ReportError("the document's bench-report markers are out of order or one is missing")
    after = doc[end + len(END) :].strip("\n")
    return doc[:start] + generated + ("\n" + after + "\n" if after else "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "bench-results")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if not args.doc.is_file():
            raise ReportError(f"{args.doc}: no such document")
        latest = load_latest(args.results)
        made = write_plots(latest, args.img)
        links = {
            k: Path(os.path.relpath(p, args.doc.parent)).as_posix() if p else None
            for k, p in made.items()
        }
        text = splice(args.doc.read_text(), section(latest, known_benches(args.bench_dir), links))
        args.doc.write_text(text)
    except ReportError as e:
        print(f"bench-report: {e}", file=sys.stderr)
        return 1
    plots = ", ".join(p.name for p in made.values() if p) or "none"
    print(f"bench-report: {args.doc} ({len(latest)} benchmarks run; plots: {plots})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
