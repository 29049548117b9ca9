"""`make bench-report` (bench/report.py): tables and plots from the latest bench results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402  (bench/ is no package)

PROSE = "# Benchmarks\n\nHand-written prose.\n"
MACHINE = "Linux-test-x86_64"


def _bench_dir(tmp_path: Path) -> Path:
    """Three benches: two run below, `mqtt` never."""
    benches = tmp_path / "bench"
    benches.mkdir()
    for name, doc in (
        ("update", "Update agent end to end."),
        ("fleet_publish", "One publish to N boards."),
        ("mqtt", "MQTT streaming vs a raw socket."),
    ):
        (benches / f"bench_{name}.py").write_text(f'"""{doc}\n\nMore."""\n')
    return benches


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "bench-results"
    results.mkdir()
    lane = {"name": "32-bit", "heap": "100K"}
    old = {"title": "old", "date": "2026-01-01T00:00:00Z", "lane": lane, "rows": [{"a": 1}]}
    update_rows = [
        {"payload": size, "path": path, "seconds": seconds}
        for size, scale in (("64 KiB", 1), ("1 MiB", 8), ("4 MiB", 30))
        for path, seconds in (
            ("update e2e, single message", 0.5 * scale),
            ("raw socket", 0.01 * scale),
        )
    ] + [{"payload": "-", "path": "min free heap | logged", "seconds": ""}]
    (results / "bench-20260101T000000.json").write_text(
        json.dumps(
            {"started": "2026-01-01T00:00:00Z", "machine": "old", "benchmarks": {"update": old}}
        )
    )
    new = {
        "started": "2026-02-01T00:00:00Z",
        "machine": MACHINE,
        "benchmarks": {
            "update": {
                "title": "Update end to end vs raw socket",
                "date": "2026-02-01T00:00:05Z",
                "lane": lane,
                "rows": update_rows,
            }
        },
    }
    (results / "bench-20260201T000000.json").write_text(json.dumps(new))
    # A later run of another bench only: the update table still comes from the one above.
    fleet = {
        "started": "2026-03-01T00:00:00Z",
        "machine": MACHINE,
        "benchmarks": {
            "fleet_publish": {
                "title": "Fleet update",
                "date": "2026-03-01T00:00:01Z",
                "lane": lane,
                "rows": [{"boards": n, "update s": n / 10, "all ok": True} for n in (10, 50)],
            }
        },
    }
    (results / "bench-20260301T000000.json").write_text(json.dumps(fleet))
    return results


def test_each_bench_takes_its_latest_run_and_a_bench_never_run_says_so(tmp_path):
    latest = report.load_latest(_results(tmp_path))
    assert latest["update"].date == "2026-02-01T00:00:05Z"
    assert latest["update"].machine == MACHINE
    text = report.section(latest, report.known_benches(_bench_dir(tmp_path)), {})
    assert "### `mqtt`\n\nNot run yet (`make bench BENCH=mqtt`). MQTT streaming" in text
    assert "Run 2026-02-01T00:00:05Z on `Linux-test-x86_64`, lane 32-bit, 100K heap" in text
    assert "| payload | path | seconds |" in text
    assert "| 4 MiB | raw socket | 0.3 |" in text
    assert "Update end to end vs raw socket.\n" in text
    assert "| - | min free heap \\| logged |  |" in text  # a | in a cell does not end it
    assert "Time against package size: not run yet" in text  # no plot link given


def test_firmware_images_plot_against_their_size_beside_the_update_packages(tmp_path):
    rows = [
        {"image": "1.25 MiB", "path": "firmware e2e, single message", "seconds": 2.0},
        {"image": "1.25 MiB", "path": "raw socket into the partition", "seconds": 0.5},
        {"image": "-", "path": "install boot: min free heap before a download", "seconds": ""},
    ]
    latest = report.load_latest(_results(tmp_path))
    latest["firmware"] = report.Result("firmware", "Firmware", rows, "d", "m", "l", "f.json")
    series = report.package_series(latest)
    assert series["firmware e2e, single message"] == [(1280 * 1024, 2.0)]
    assert series["firmware: raw socket into the partition"] == [(1280 * 1024, 0.5)]
    assert series["raw socket"] == [(65536, 0.01), (1048576, 0.08), (4194304, 0.3)]


def test_the_report_writes_plots_and_the_same_json_gives_the_same_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    results, benches = _results(tmp_path), _bench_dir(tmp_path)
    doc, img = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "img"
    doc.parent.mkdir()
    doc.write_text(PROSE)
    argv = ["--results", str(results), "--doc", str(doc), "--img", str(img)]
    assert report.main([*argv, "--bench-dir", str(benches)]) == 0
    plots = {p.name: p.read_bytes() for p in img.iterdir()}
    assert sorted(plots) == ["bench-fleet-size.png", "bench-package-size.png"]
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in plots.values())
    assert b"Software" not in plots["bench-package-size.png"]
    text = doc.read_text()
    assert text.startswith(PROSE)
    assert "![Time against package size](img/bench-package-size.png)" in text
    assert "![Time against fleet size](img/bench-fleet-size.png)" in text
    assert text.count(report.BEGIN) == 1

    doc.write_text(text + "\nProse after the section.\n")
    assert report.main([*argv, "--bench-dir", str(benches)]) == 0
    assert doc.read_text() == text + "\nProse after the section.\n"  # replaced, not appended
    assert {p.name: p.read_bytes() for p in img.iterdir()} == plots


def test_a_plot_without_data_is_not_linked_and_its_old_png_goes(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "bench-fleet-size.png").write_bytes(b"old")
    assert report.write_plots({}, img) == {"package": None, "fleet": None}
    assert not list(img.iterdir())
