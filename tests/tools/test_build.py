"""`mpy-blox build`: reproducible device wheels with a small deflate window."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from mpy_blox_tools import build, wheel
from mpy_blox_tools.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_of_the_same_sources_are_byte_identical(tmp_path):
    a = build.build(out_dir=tmp_path / "a")
    b = build.build(out_dir=tmp_path / "b")
    assert a.name == b.name == f"mpy_blox-{build.project_version()}-mpy6-bytecode-esp32.whl"
    assert sha256(a) == sha256(b)


def test_dev_builds_get_unique_pep440_versions_newer_than_each_other(tmp_path):
    v1 = build.dev_version("0.7.0", now=1_800_000_000.001)
    v2 = build.dev_version("0.7.0", now=1_800_000_000.002)
    assert Version(v1).is_devrelease and Version(v1).base_version == "0.7.0"
    assert Version(v2) > Version(v1)
    assert build.dev_version("1.0.0rc1.post2").startswith("1.0.0rc1.post2.dev")
    path = build.build(out_dir=tmp_path, dev=True)
    assert ".dev" in path.name


def test_the_wheel_is_a_correct_wheel_for_cpython_zipfile(tmp_path):
    path = build.build(out_dir=tmp_path, version="1.2.3")
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert z.comment == b"wbits=%d" % wheel.DEVICE_WBITS  # the window, for the device
        names = z.namelist()
        assert names[-1] == "mpy_blox-1.2.3.dist-info/RECORD"
        assert "mpy_blox/__init__.mpy" in names and "mpy_blox/log.mpy" in names
        assert not any(n.endswith(".py") for n in names)
        wheel_meta = z.read("mpy_blox-1.2.3.dist-info/WHEEL").decode()
        assert "Tag: mpy6-bytecode-esp32\n" in wheel_meta
        assert "Version: 1.2.3\n" in z.read("mpy_blox-1.2.3.dist-info/METADATA").decode()
        for line in z.read(names[-1]).decode().splitlines():
            name, digest, size = line.split(",")
            if name == names[-1]:
                assert digest == size == ""
                continue
            data = z.read(name)
            assert digest == wheel.record_hash(data) and int(size) == len(data)
        for info in z.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert (info.external_attr >> 16) & 0o170000 == 0o100000  # regular files only


def test_the_wheel_bytecode_runs_and_carries_the_build_version(tmp_path, run_mpy):
    path = build.build(out_dir=tmp_path, version="9.8.7", platform="unix")
    lib = tmp_path / "lib"
    with zipfile.ZipFile(path) as z:
        z.extractall(lib)
    out = run_mpy(f"""
import sys
sys.path.insert(0, {str(lib)!r})
import mpy_blox, mpy_blox.log
print(mpy_blox.__version__, mpy_blox.__file__, mpy_blox.log.__file__)
""")
    assert "9.8.7" in out and "__init__.mpy" in out and "log.mpy" in out


def test_entries_are_deflated_with_the_device_window(tmp_path):
    big = (bytes(range(256)) * 64) + b"x" * 5000  # repeats far apart need a big window
    files = {"pkg/a.bin": big}
    path = wheel.assemble(
        tmp_path / "t-1-py3-none-any.whl", "t", "1", "py3-none-any", files, generator="test"
    )
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("pkg/a.bin")
        raw = path.read_bytes()[info.header_offset + 30 + len(info.filename) :][
            : info.compress_size
        ]
    import zlib

    d = zlib.decompressobj(-wheel.DEVICE_WBITS)  # a window of 2**DEVICE_WBITS is enough
    assert d.decompress(raw) + d.flush() == big


def test_a_foreign_wheel_is_repacked_with_the_small_window_and_same_files(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    src = tmp_path / "in.whl"
    record = "lib1/__init__.py,sha256=x,10\nlib1-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:  # wbits 15, as everyone does
        z.writestr("lib1/__init__.py", "X = 1\n" * 2000)
        z.writestr("lib1-1.0.dist-info/RECORD", record)
    out = wheel.repack(src, tmp_path / "out")
    assert wheel.read_wheel(out) == wheel.read_wheel(src)
    assert out.stat().st_size < src.stat().st_size * 1.2


def test_a_compile_error_is_reported_with_the_compiler_output(tmp_path, capsys):
    pkg = tmp_path / "mpy_blox"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "1.0"\n')
    (pkg / "broken.py").write_text("def f(:\n    pass\n")
    with pytest.raises(
        build.MpyBloxError, match=r"(?s)mpy-cross failed on mpy_blox/broken.py:\n.*SyntaxError"
    ):
        build.build(out_dir=tmp_path / "dist", source_dir=pkg)


def test_build_cli_prints_the_wheel_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["build", "--platform", "unix"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("dist/") and out.endswith("-mpy6-bytecode-unix.whl")
    assert (tmp_path / out).is_file()


def test_build_cli_runs_as_a_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpy_blox_tools.cli", "build", "--platform", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
