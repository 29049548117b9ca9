"""No update can break recovery or hide the framework: the path rules of
mpy_blox/update/paths.py, the same on CPython (the publisher) and MicroPython (the
device), and what the installer does with the names a wheel and its RECORD give.

Names compare as FAT compares them (MAIN.PY and "main.py." are /main.py there); the
boot files, /.mpypi, the .dist-info folders and every module the boot path imports
are reserved (docs/protocol.md, "Paths").
"""

from __future__ import annotations

import ast
import json
import re
import struct
from pathlib import Path

import pytest
from test_update_refusals import V1, Device, refused
from update_kit import DRIVER, REPO, Pkg, board_files, make_src, make_wheel, record_hash, sha256

from mpy_blox.update import manifest, paths
from mpy_blox.update.paths import InvalidUpdate
from mpy_blox_tools import publish, wheel
from mpy_blox_tools.errors import MpyBloxError

# src targets (relative to the device root) and what is said about each: "ok" or the reason.
SRC = {
    "user_main.py": "ok",
    "lib/my_lib.py": "ok",
    "lib/my_pkg/os.py": "ok",
    "data/main.py": "ok",
    "main.py.bak": "ok",
    "osx.py": "ok",
    "config.json": "ok",
    "mpy_blox.json": "ok",
    "main.py": "reserved path",
    "MAIN.PY": "reserved path",
    "main.py.": "reserved path",
    "Main.Py..": "reserved path",
    "BOOT.py": "reserved path",
    "lib": "reserved path",
    "LIB.": "reserved path",
    ".mpypi/journal": "reserved path",
    ".MPYPI/journal": "reserved path",
    ".mpypi./applied": "reserved path",
    "mpypi_recover.py": "reserved path",
    "mpypi_recover.mpy": "reserved path",
    "MPYPI_RECOVER.PY": "reserved path",
    "mpypi_recover/x.py": "reserved path",
    "mpypi_recover./__init__.py": "reserved path",
    "mpy_blox/app.py": "reserved path",
    "mpy_blox.py": "reserved path",
    "MPY_BLOX.mpy": "reserved path",
    "os.py": "reserved path",
    "hashlib/__init__.py": "reserved path",
    "json.mpy": "reserved path",
    "asyncio/core.py": "reserved path",
    "lib/demo_pkg-1.0.dist-info/RECORD": "reserved path",
    "LIB/Demo_Pkg-1.0.DIST-INFO./record": "reserved path",
    "lib/mpypi_recover.py": "reserved path",
    "lib/mpypi_recover/x.py": "reserved path",
    "lib/os.py": "reserved path",
    "x/.../y.py": "unsafe path",
    "...": "unsafe path",
    "caf\u00e9.py": "non-ASCII character in path",
    "lib/\u00fcber.py": "non-ASCII character in path",
}
# Files of a wheel (relative to /lib), with its .dist-info folder.
DIST = "demo_pkg-2.0.dist-info"
WHEEL = {
    "demo_pkg/__init__.py": "ok",
    "demo_pkg/os.py": "ok",
    "demo_pkg+local/x.py": "ok",
    f"{DIST}/RECORD": "ok",
    f"{DIST}/licenses/LICENSE": "ok",
    "mpypi_recover.py": "reserved path",
    "MPYPI_RECOVER/x.py": "reserved path",
    "os.py": "reserved path",
    "mpy_blox/app.mpy": "reserved path",
    "demo_pkg-1.0.dist-info/RECORD": "not in the wheel's own .dist-info folder",
    "Demo_Pkg-2.0.DIST-INFO/RECORD": "not in the wheel's own .dist-info folder",
    f"{DIST}./RECORD": "not in the wheel's own .dist-info folder",
    DIST: "not in the wheel's own .dist-info folder",
    "../main.py": "unsafe path",
    "demo_pkg/caf\u00e9.py": "non-ASCII character in path",
}
FRAMEWORK = {"mpy_blox/app.mpy": "ok", "mpy_blox.py": "reserved path", "os.py": "reserved path"}
CASES = (
    [("src", p, None, why) for p, why in SRC.items()]
    + [("wheel", p, DIST, why) for p, why in WHEEL.items()]
    + [("wheel", p, "mpy_blox-0.7.0.dist-info", why) for p, why in FRAMEWORK.items()]
)

CHECK = """
import json
from mpy_blox.update import paths
def check(kind, path, dist):
    try:
        if kind == "src":
            paths.check_src_path(path)
        else:
            paths.check_wheel_path(path, dist)
        return "ok"
    except paths.InvalidUpdate as e:
        return str(e)
"""


def check(kind: str, path: str, dist: str | None) -> str:
    scope: dict = {}
    exec(CHECK, scope)
    return scope["check"](kind, path, dist)


@pytest.mark.parametrize("kind,path,dist,why", CASES)
def test_paths_are_checked_as_fat_compares_names(kind, path, dist, why):
    said = check(kind, path, dist)
    assert said == "ok" if why == "ok" else said.startswith(why), said


def test_the_device_checks_paths_as_the_publisher_does(run_mpy, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([c[:3] for c in CASES]))
    code = (
        CHECK
        + f"""
for kind, path, dist in json.load(open({str(cases)!r})):
    print(json.dumps(check(kind, path, dist)))
"""
    )
    device = [json.loads(line) for line in run_mpy(code).strip().splitlines()]
    assert device == [check(*c[:3]) for c in CASES]


def test_fold_is_how_fat_compares_names():
    assert paths.fold("Lib/Demo.Dist-Info./RECORD ") == "lib/demo.dist-info/record"


def _boot_imports() -> set[str]:
    """Top-level modules that main.py, mpypi_recover.py and mpy_blox import."""
    files = [
        REPO / "main.py",
        REPO / "mpypi_recover.py",
        *sorted((REPO / "mpy_blox").rglob("*.py")),
    ]
    names = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_no_src_file_or_wheel_can_take_the_name_of_a_module_the_boot_path_imports():
    names = _boot_imports()
    assert {"mpypi_recover", "mpy_blox", "os", "hashlib", "json"} <= names
    for name in sorted(names):
        for path in (f"{name}.py", f"{name}.mpy", f"{name}/__init__.py"):
            for target in (path, "lib/" + path):
                with pytest.raises(InvalidUpdate, match="reserved path"):
                    paths.check_src_path(target)
            if name != "mpy_blox" or "/" not in path:
                with pytest.raises(InvalidUpdate, match="reserved path"):
                    paths.check_wheel_path(path, "mpy_blox-0.7.0.dist-info")


def test_a_src_path_twice_in_two_spellings_is_refused():
    # On FAT, User_Main.py and user_main.py are one file: one target, two operations.
    entries = [make_src("user_main.py", b"a").entry, make_src("User_Main.py", b"b").entry]
    with pytest.raises(InvalidUpdate, match="listed twice"):
        manifest.decode_list(manifest.encode_list(entries))


# -- the installer, in a host root on MicroPython ---------------------------------------

V2 = {"demo_pkg/__init__.py": b"VERSION = '2.0'\n"}
BOOT = {"main.py": b"# the boot file\n", "mpypi_recover.py": b"# recovery\n"}


@pytest.fixture
def device(tmp_path, run_mpy, core_mpy):
    """demo-pkg 1.0 and user_main.py installed, beside the boot files an update never writes."""
    d = Device(tmp_path, run_mpy, str(core_mpy.parent))
    for name, data in BOOT.items():
        (d.root / name).write_bytes(data)
    assert d.install(make_wheel("demo-pkg", "1.0", V1), make_src("user_main.py", b"v1\n")) == (
        "INSTALLED 2"
    )
    d.before = d.snapshot()
    return d


def zip_wheel(name: str, version: str, members: list[tuple[str, bytes]]) -> Pkg:
    """A wheel of exactly `members`, in that order (names may repeat)."""
    entries = [wheel.ZipEntry(path, data, 10) for path, data in members]
    data = wheel.zip_bytes(entries, b"wbits=10")
    return Pkg(data, manifest.wheel_entry(name, version, sha256(data), len(data)))


def dist_files(name: str, version: str) -> list[tuple[str, bytes]]:
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    return [
        (
            f"{dist}/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n".encode(),
        ),
        (f"{dist}/WHEEL", b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
    ]


def record_of(members: list[tuple[str, bytes]], own: str, *extra: str) -> bytes:
    lines = [f"{p},{record_hash(d)},{len(d)}" for p, d in members] + list(extra)
    return ("\n".join([*lines, f"{own},,"]) + "\n").encode()


def test_a_wheel_with_a_second_record_is_refused_and_nothing_changes(device):
    # The first RECORD of the directory was skipped unread, so a line of the
    # second that no file claims (here ../main.py) was installed, for the next
    # upgrade to delete.
    members = [("demo_pkg/__init__.py", b"VERSION = '2.0'\n"), *dist_files("demo-pkg", "2.0")]
    own = "demo_pkg-2.0.dist-info/RECORD"
    planted = record_of(members, own, f"../main.py,{record_hash(BOOT['main.py'])},16")
    w = zip_wheel("demo-pkg", "2.0", [*members, (own, record_of(members, own)), (own, planted)])
    refused(device, device.install(w), "wheel lists a file twice: " + own)


@pytest.mark.parametrize(
    "line,reason",
    [
        ("../main.py,sha256=x,16", "unsafe path: ../main.py"),
        ("../mpypi_recover.py,sha256=x,11", "unsafe path: ../mpypi_recover.py"),
        ("mpypi_recover.py,sha256=x,11", "reserved path: mpypi_recover.py"),
        ("other_pkg-1.0.dist-info/RECORD,sha256=x,1", "not in the wheel's own .dist-info"),
        ("demo_pkg/__init__.py,sha256=x,16", "RECORD lists a file twice: demo_pkg/__init__.py"),
        ("DEMO_PKG/__init__.py,sha256=x,16", "RECORD lists a file twice: demo_pkg/__init__.py"),
    ],
)
def test_an_installed_record_is_checked_before_an_upgrade_deletes_what_it_names(
    device, line, reason
):
    # A RECORD planted on the device (by an older installer, a src file, by hand)
    # names what the next upgrade deletes: /lib/../main.py is /main.py.
    record = device.root / "lib/demo_pkg-1.0.dist-info/RECORD"
    record.write_bytes(line.encode() + b"\n" + record.read_bytes())
    device.before = device.snapshot()
    out = device.install(make_wheel("demo-pkg", "2.0", V2))
    refused(device, out, "installed demo_pkg-1.0.dist-info/RECORD: " + reason)
    assert (device.root / "main.py").read_bytes() == BOOT["main.py"]


def test_an_upgrade_still_removes_what_the_old_record_names(device):
    assert device.install(make_wheel("demo-pkg", "2.0", V2)) == "INSTALLED 1"
    files = device.snapshot()
    assert files["lib/demo_pkg/__init__.py"] == V2["demo_pkg/__init__.py"]
    assert not any(p.startswith("lib/demo_pkg-1.0.dist-info") for p in files)
    assert {p: files[p] for p in BOOT} == BOOT


@pytest.mark.parametrize(
    "path",
    ["lib/demo_pkg-1.0.dist-info/RECORD", "mpypi_recover/__init__.py", "MAIN.PY", "lib/os.py"],
)
def test_a_src_file_that_would_break_recovery_is_refused_and_nothing_changes(device, path):
    entry = manifest.src_entry(path, sha256(b"x"), 1)
    out = device.run(json.dumps([entry]).encode(), served={sha256(b"x"): b"x"})
    refused(device, out, "reserved path: " + path)


@pytest.mark.parametrize(
    "files,reason",
    [
        ({"mpypi_recover.py": b"x"}, "reserved path: mpypi_recover.py"),
        ({"mpy_blox/app.py": b"x"}, "reserved path: mpy_blox/app.py"),
        ({"demo_pkg/a.py": b"a", "demo_pkg/A.py": b"b"}, "RECORD lists a file twice"),
    ],
)
def test_a_wheel_file_that_would_shadow_recovery_or_collide_on_fat_is_refused(
    device, files, reason
):
    w = make_wheel("demo-pkg", "2.0", {**V2, **files})
    refused(device, device.install(w), reason)


def test_a_wheel_writing_into_another_dist_info_is_refused(device):
    # "demo_pkg-1.0.dist-info." is demo_pkg-1.0.dist-info on FAT.
    w = make_wheel("demo-pkg", "2.0", {**V2, "demo_pkg-1.0.dist-info./RECORD": b"../main.py,,\n"})
    refused(device, device.install(w), "wheel has two .dist-info folders")


# -- on the virtual board ---------------------------------------------------------------


def run_to_done(boards, board) -> str:
    rb = boards.start(board)
    rb.wait_for(r"\nDONE", timeout=120)
    out = rb.console()
    rb.stop()
    return out


@pytest.mark.parametrize("path", ["MAIN.PY", "main.py."])
def test_on_fat_main_py_in_another_spelling_is_refused_and_the_boot_file_is_safe(
    boards, update_board, path
):
    s = make_src(path, b"print('not the boot file')\n")
    board = update_board(board_files([s], manifest.encode_list([s.entry])), fs="fat")
    out = run_to_done(boards, board)
    assert f"ERROR reserved path: {path}" in out, out
    assert board.cat("main.py") == DRIVER.encode()
    out = run_to_done(boards, board)  # and it still boots into the same main.py
    assert "RECOVER none" in out and f"ERROR reserved path: {path}" in out, out


def understate(data: bytes, name: str, usize: int) -> bytes:
    """`data` with `name`'s uncompressed size said to be `usize` in the zip directory
    and in its local header (RECORD still says the truth)."""
    out = bytearray(data)
    raw = name.encode()
    for sig, at, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        i = out.find(sig)
        while i >= 0:
            if out[i + name_at : i + name_at + len(raw)] == raw:
                struct.pack_into("<I", out, i + at, usize)
            i = out.find(sig, i + 4)
    return bytes(out)


def test_a_wheel_whose_zip_directory_understates_its_sizes_is_refused_before_unpacking(
    boards, update_board
):
    # 3 MiB of zeros deflate to a few KB: the download and the pre-flight fit a
    # 2 MiB flash. The directory says 100 bytes; extraction is bounded by RECORD's
    # 3 MiB, and so must the check be, or the flash fills while staging.
    big = bytes(3 * 1024 * 1024)
    w = make_wheel("demo-pkg", "1.0", {"demo_pkg/__init__.py": b"", "demo_pkg/big.bin": big})
    data = understate(w.data, "demo_pkg/big.bin", 100)
    assert len(data) < 20_000
    w = Pkg(data, dict(w.entry, pkg_sha256=sha256(data), size=len(data)))
    board = update_board(board_files([w], manifest.encode_list([w.entry])), flash_size="2M")
    before = board.ls()
    out = run_to_done(boards, board)
    said = re.search(r"ERROR does not fit: wheel unpacks to (\d+) bytes", out)
    assert said and int(said.group(1)) > len(big), out
    assert {p: s for p, s in board.ls().items() if not p.startswith(".mpypi")} == before
    # Refused before anything was unpacked: the download and RECORD, no 3 MiB.
    assert board.block_writes() < 200, board.block_writes()


# -- the publisher ----------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")


def wheel_file(tmp_path: Path, pkg: Pkg, name: str = "demo_pkg-2.0-py3-none-any.whl") -> Path:
    path = tmp_path / name
    path.write_bytes(pkg.data)
    return path


@pytest.mark.parametrize(
    "files,reason",
    [
        # (no UTF-8 flag from our zip writer: zipfile reads the name as cp437)
        ({"demo_pkg/caf\u00e9.py": b"x"}, "non-ASCII character in path: demo_pkg/caf"),
        ({"mpypi_recover.py": b"x"}, "reserved path: mpypi_recover.py"),
        ({"demo_pkg/a.py": b"a", "demo_pkg/A.py": b"b"}, "listed twice: demo_pkg/A.py"),
        ({"other-1.0.dist-info/RECORD": b""}, "not in the wheel's own .dist-info"),
    ],
)
def test_the_publisher_refuses_a_wheel_the_device_would_refuse(tmp_path, state_dir, files, reason):
    path = wheel_file(tmp_path, make_wheel("demo-pkg", "2.0", {**V2, **files}))
    with pytest.raises(MpyBloxError) as e:
        publish.wheel_package(path)
    assert reason in str(e.value) and "\n" not in str(e.value), e.value


def test_the_publisher_refuses_a_record_line_the_device_would_refuse(tmp_path, state_dir):
    record = record_of(
        [("demo_pkg/__init__.py", V2["demo_pkg/__init__.py"])],
        "demo_pkg-2.0.dist-info/RECORD",
        "../main.py,sha256=x,1",
    ).decode()
    w = make_wheel("demo-pkg", "2.0", V2, record=record)
    with pytest.raises(MpyBloxError, match=r"unsafe path: \.\./main\.py"):
        publish.wheel_package(wheel_file(tmp_path, w))


def test_the_publisher_refuses_a_non_ascii_wheel_name(tmp_path, state_dir):
    w = make_wheel("d\u00e9mo-pkg", "2.0", {"d\u00e9mo_pkg/__init__.py": b""})
    with pytest.raises(MpyBloxError, match=r"non-ASCII|bad name"):
        publish.wheel_package(wheel_file(tmp_path, w))


def test_a_non_ascii_wheel_name_is_refused_on_cpython_as_on_micropython():
    entry = manifest.wheel_entry("d\u00e9mo-pkg", "2.0", "ab" * 32, 1)
    with pytest.raises(InvalidUpdate, match="bad name"):
        manifest.check_entry(entry, True)


def test_the_publisher_accepts_a_good_wheel(tmp_path, state_dir):
    package = publish.wheel_package(wheel_file(tmp_path, make_wheel("demo-pkg", "2.0", V2)))
    assert package.entry["name"] == "demo-pkg"


@pytest.mark.parametrize("path", ["MAIN.PY", "main.py.", "mpy_blox/app.py", "caf\u00e9.py"])
def test_the_publisher_refuses_a_src_path_the_device_would_refuse(tmp_path, path):
    local = tmp_path / "file.py"
    local.write_bytes(b"x")
    with pytest.raises(MpyBloxError, match="cannot publish to device path"):
        publish.src_package(local, path)


@pytest.mark.parametrize(
    "path,reason",
    [
        ("user_main.py/x.py", "/user_main.py is in the way of /user_main.py/x.py"),
        ("lib/demo_pkg", "/lib/demo_pkg is in the way of /lib/demo_pkg"),
    ],
)
def test_a_file_where_a_folder_is_or_a_folder_where_a_file_is_is_refused(device, path, reason):
    # apply() would stop half-way (ENOTDIR, EISDIR) and leave a journal it can never
    # finish: every later install refused with "journal not applied".
    s = make_src(path, b"x")
    refused(device, device.run(manifest.encode_list([s.entry]), [s]), reason)
    other = make_src("other.py", b"y")
    assert device.run(manifest.encode_list([other.entry]), [other]) == "INSTALLED 1"


def test_two_packages_writing_one_file_are_refused_and_nothing_changes(device):
    # Two operations on one file: a cut between them leaves a journal that
    # apply() cannot finish (the first one's staged file is gone).
    s = make_src("lib/demo_pkg/__init__.py", b"VERSION = 'src'\n")
    w = make_wheel("demo-pkg", "2.0", V2)
    refused(device, device.install(s, w), "installed twice: /lib/demo_pkg/__init__.py")


@pytest.mark.parametrize("first,second", [("data", "data/x.json"), ("DATA/x.json", "data.")])
def test_a_file_where_another_package_needs_a_folder_is_refused(device, first, second):
    a, b = make_src(first, b"a"), make_src(second, b"b")
    refused(device, device.install(a, b), "a file is in the way of a folder")
