"""The install core's heap: wheels of many files on a 100K-heap board, RECORD lookups.

A wheel of ~30 files used to fragment a 100 KB heap until the deflate window or a
2 KB buffer no longer fitted (a table of every entry and every RECORD line, built
between short-lived buffers). The core now keeps nothing per file; these tests
install 60-file wheels the way `make deploy-lib` does, right after a reset, and
check the RECORD index (no names held) against shuffled, duplicated and partial
RECORDs in a host root.
"""

from __future__ import annotations

import io
import random
import re
import zipfile

import pytest
from test_update_refusals import V1, Device, refused
from update_kit import make_src, make_wheel, sha256

from mpy_blox.update import manifest
from mpy_blox_tools import wheel
from mpy_blox_tools.micropython import DEFAULT_HEAP as ESP32_HEAP

# The heap edges' tests run one at a time under `make test`'s -n (one worker takes
# them all): two of them never share the cores, whose timing moves the edge.
pytestmark = pytest.mark.xdist_group("heap")

# main.py of a board that does only what deploy-lib's `mpremote exec` does after
# its soft reset: import the install core, install one wheel.
DEPLOY_MAIN = """
import gc
gc.collect()
print("HEAP before-import", gc.mem_free())
from mpy_blox.update.install import install
import mpypi_recover  # the install loads it at its start, and keeps it
gc.collect()
print("HEAP after-import", gc.mem_free())
try:
    done = install([%r], lambda e: open("/pkg.whl", "rb"))
    print("INSTALLED", len(done))
except Exception as e:
    print("ERROR", repr(e))
gc.collect()
print("HEAP after-install", gc.mem_free())
print("DONE")
"""


@pytest.fixture
def device(tmp_path, run_mpy, core_mpy):
    """A host root with demo-pkg 1.0 and a src file installed (as in the refusal tests)."""
    d = Device(tmp_path, run_mpy, str(core_mpy.parent))
    assert d.install(make_wheel("demo-pkg", "1.0", V1), make_src("user_main.py", b"v1\n")) == (
        "INSTALLED 2"
    )
    d.before = d.snapshot()
    return d


def many_files(n: int, version: str) -> dict[str, bytes]:
    files = {f"many_pkg/m{i:03d}.py": f"X = {i}  # {version}\n".encode() * 8 for i in range(n)}
    files["many_pkg/__init__.py"] = f"VERSION = {version!r}\n".encode()
    return files


def install_on_board(boards, update_board, pkg, lane, board=None):
    if board is None:
        board = update_board(flash_size="4M", lane=lane)
    board.write("main.py", (DEPLOY_MAIN % pkg.entry).encode())
    board.write("pkg.whl", pkg.data)
    rb = boards.start(board, heap=ESP32_HEAP, lane=lane)
    rb.wait_for(r"\nDONE", timeout=120)
    out = rb.console()
    rb.stop()
    return board, out


def test_60_file_wheel_installs_then_upgrades_on_a_100k_board_after_a_reset(
    lane, boards, update_board, heap_report
):
    v1 = many_files(60, "1.0")
    board, out = install_on_board(boards, update_board, make_wheel("many-pkg", "1.0", v1), lane)
    assert "INSTALLED 1" in out, out
    files = board.ls()
    for path, data in v1.items():
        assert board.cat("lib/" + path) == data, path
    assert "lib/many_pkg-1.0.dist-info/RECORD" in files

    # 2.0 changes every file, drops ten and adds five: the stale ones go.
    v2 = many_files(55, "2.0")
    for i in range(60, 65):
        v2[f"many_pkg/n{i:03d}.py"] = b"NEW = 1\n"
    board, out = install_on_board(
        boards, update_board, make_wheel("many-pkg", "2.0", v2), lane, board
    )
    assert "INSTALLED 1" in out, out
    files = board.ls()
    for path, data in v2.items():
        assert board.cat("lib/" + path) == data, path
    assert not any(re.match(r"lib/many_pkg/m05[5-9]\.py$", p) for p in files)
    assert not any(p.startswith("lib/many_pkg-1.0.dist-info") for p in files)
    heap = {k: int(v) for k, v in re.findall(r"HEAP (\S+) (\d+)", out)}
    heap_report(f"{lane.name} lane, 100K board, 60-file upgrade: free heap {heap}")
    # Nothing per file outlives the install: the heap comes back (the modules stay).
    assert heap["after-install"] > heap["after-import"] - 16 * 1024, out


def _rewrite_record(pkg, edit):
    """The same wheel with RECORD's lines passed through edit(lines) -> lines."""
    with zipfile.ZipFile(io.BytesIO(pkg.data)) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    name = next(n for n in members if n.endswith(".dist-info/RECORD"))
    lines = members[name].decode().splitlines()
    return "\n".join(edit(lines)) + "\n"


def test_record_in_another_order_than_the_zip_still_installs(device):
    files = {f"demo_pkg/f{i}.py": b"F = %d\n" % i for i in range(20)}
    files["demo_pkg/__init__.py"] = b"VERSION = '2.0'\n"
    base = make_wheel("demo-pkg", "2.0", files)

    def shuffle(lines):
        random.Random(7).shuffle(lines)
        return lines

    w = make_wheel("demo-pkg", "2.0", files, record=_rewrite_record(base, shuffle))
    assert device.install(w) == "INSTALLED 1"
    snap = device.snapshot()
    assert snap["lib/demo_pkg/f7.py"] == b"F = 7\n"
    assert not (device.root / "lib/demo_pkg-1.0.dist-info").exists()


def test_record_listing_a_file_twice_is_refused_and_nothing_changes(device):
    files = {"demo_pkg/__init__.py": b"v2", "demo_pkg/a.py": b"a"}
    base = make_wheel("demo-pkg", "2.0", files)

    def twice(lines):
        a = next(ln for ln in lines if ln.startswith("demo_pkg/a.py,"))
        return [ln for ln in lines if not ln.startswith("demo_pkg/__init__.py,")] + [a]

    w = make_wheel("demo-pkg", "2.0", files, record=_rewrite_record(base, twice))
    refused(device, device.install(w), "RECORD lists a file twice: demo_pkg/a.py")


def test_record_naming_another_file_is_refused_and_nothing_changes(device):
    files = {"demo_pkg/__init__.py": b"v2", "demo_pkg/a.py": b"a"}
    base = make_wheel("demo-pkg", "2.0", files)

    def rename(lines):
        return [ln.replace("demo_pkg/a.py,", "demo_pkg/b.py,") for ln in lines]

    w = make_wheel("demo-pkg", "2.0", files, record=_rewrite_record(base, rename))
    refused(device, device.install(w), "file not in RECORD: demo_pkg/a.py")


def test_zip_with_a_file_twice_is_refused_and_nothing_changes(device):
    w = make_wheel("demo-pkg", "2.0", {"demo_pkg/__init__.py": b"v2"})
    with zipfile.ZipFile(io.BytesIO(w.data)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
        comment = zf.comment
    entries = []
    for name, data in members:
        entries.append(wheel.ZipEntry(name, data, None))
        if name == "demo_pkg/__init__.py":
            entries.append(wheel.ZipEntry(name, data, None))  # the same name again
    data = wheel.zip_bytes(entries, comment)
    entry = dict(w.entry, pkg_sha256=sha256(data), size=len(data))
    out = device.run(manifest.encode_list([entry]), served={entry["pkg_sha256"]: data})
    refused(device, out, "RECORD does not match")
