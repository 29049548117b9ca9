"""Measure the heap of `make deploy-lib` on a virtual board (not a test: a tool).

    .venv/bin/python tests/update/heap_deploy.py [--heap 100K] [--wheel W] [--files N]

Does what mpy_blox_tools.deploy.deploy_lib does (the compiled install core and the
wheel copied to /_deploy, then `install()` run by `mpremote exec` right after the
soft reset it makes), with samples of the heap, each after a gc.collect(): free
before the import; free and largest free block (found by allocating) after it, at
the busiest points of the install (each staged file at its first write, when an
inflated entry's decoder and window are allocated, and each file hashed) and after
it. The sampling costs time, not heap worth mentioning; it collects more often than
the install alone, so it flatters fragmentation a little. (No largest-block probe
before the import: on the virtual board, a 50 KB probe block freed just before it
made the import of mpy_blox.log fail with a MemoryError for 320 bytes.)
`--files N` installs a generated wheel of N small modules instead of the
framework's (add `--flash-size 4M` from about 150 files).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mpy_blox_tools import build, deploy, publish
from mpy_blox_tools.vboard import Board
from mpy_blox_tools.vboard.process import RunningBoard

PROBE = """
import gc, os, sys, micropython
def _largest():
    gc.collect()
    lo, hi = 0, gc.mem_free()
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            b = bytearray(mid)
            b = None
            lo = mid
        except MemoryError:
            hi = mid - 1
    return lo
_S = {"min_free": 1 << 30, "min_largest": 1 << 30, "n": 0}
def _sample(where):
    gc.collect()
    f = gc.mem_free()
    l = _largest()
    _S["n"] += 1
    if f < _S["min_free"]:
        _S["min_free"] = f
        _S["at_free"] = where
    if l < _S["min_largest"]:
        _S["min_largest"] = l
        _S["at_largest"] = where
try:
    os.remove("/mpypi_recover.py")
except OSError:
    pass
sys.path.insert(0, {work!r})
gc.collect()
print("HEAP before-import free %d" % gc.mem_free())
micropython.mem_info()
try:
    from mpy_blox.update.install import install
except MemoryError as e:
    sys.print_exception(e)
    print("HEAP import failed: free %d largest %d" % (gc.mem_free(), _largest()))
    micropython.mem_info()
    raise
import mpypi_recover
from mpy_blox.update import zipwheel
gc.collect()
print("HEAP after-import free %d largest %d" % (gc.mem_free(), _largest()))
micropython.mem_info()
import builtins
_open = builtins.open
class _Out:
    # A staged file: sampled at its first write (an inflated entry's decoder
    # and window are allocated by then).
    def __init__(self, f):
        self.f = f
        self.seen = 0
    def write(self, b):
        if not self.seen:
            self.seen = 1
            _sample("stage file")
        return self.f.write(b)
    def close(self):
        self.f.close()
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.f.close()
def _open_hook(path, mode="r", *a):
    f = _open(path, mode, *a)
    return _Out(f) if mode == "wb" and "/stage/n" in path else f
builtins.open = _open_hook
_hash = mpypi_recover.file_sha256
def _file_sha256(path, buf=None):
    _sample("file_sha256")
    return _hash(path, buf)
mpypi_recover.file_sha256 = _file_sha256
class _Reader:
    def __init__(self, path):
        self.f = open(path, "rb")
    def readinto(self, buf):
        return self.f.readinto(buf)
entry = {entry!r}
try:
    done = install([entry], lambda e: _Reader({work!r} + "/package.whl"))
    print("HEAP result", "installed" if done else "unchanged")
except Exception as e:
    print("HEAP result failed:", repr(e))
    sys.print_exception(e)
    micropython.mem_info(1)
gc.collect()
print("HEAP during-install min free %d (at %s) min largest free block %d (at %s), %d samples"
      % (_S["min_free"], _S.get("at_free"), _S["min_largest"], _S.get("at_largest"), _S["n"]))
print("HEAP after-install free %d largest %d" % (gc.mem_free(), _largest()))
"""


def _mpremote(port: str, *args: str) -> str:
    # Not deploy.mpremote: a traceback is part of what this tool reports.
    cmd = [sys.executable, "-m", "mpremote", "connect", port, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    return proc.stdout + proc.stderr


def generated_wheel(n: int, out_dir: Path) -> Path:
    from mpy_blox_tools import wheel

    files = {f"gen_pkg/m{i:03d}.py": (f"X{i} = {i}\n" * 20).encode() for i in range(n)}
    files["gen_pkg/__init__.py"] = b"VERSION = '1.0'\n"
    path = out_dir / wheel.wheel_name("gen-pkg", "1.0", "py3-none-any")
    return wheel.assemble(path, "gen-pkg", "1.0", "py3-none-any", files, generator="heap_deploy")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--heap", default="100K")
    p.add_argument("--wheel", type=Path)
    p.add_argument("--files", type=int)
    p.add_argument("--fs", default="littlefs")
    p.add_argument("--flash-size", default="2M")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="heap-deploy-") as tmp:
        tmp = Path(tmp)
        if args.files:
            source = generated_wheel(args.files, tmp)
        else:
            source = args.wheel or build.build(platform="esp32", out_dir=tmp)
        package = publish.wheel_package(Path(source))
        print(f"wheel {Path(source).name}: {len(package.data)} bytes, heap {args.heap}")
        work = tmp / "work"
        for name, data in build.compile_tree(build.SOURCE, "0.0.0", "xtensawin").items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        (work / "package.whl").write_bytes(package.data)
        recovery = tmp / deploy.RECOVERY_MPY
        build.compile_source(REPO / deploy.RECOVERY, deploy.RECOVERY, "xtensawin", recovery)
        board = Board.create(tmp / "board", fs=args.fs, flash_size=args.flash_size)
        with RunningBoard(board, heap=args.heap) as rb:
            port = rb.serial_port
            out = _mpremote(
                port,
                "fs",
                "cp",
                str(recovery),
                ":/" + deploy.RECOVERY_MPY,
                "+",
                "fs",
                "cp",
                "-r",
                str(work) + "/",
                ":" + deploy.WORK,
                "+",
                "exec",
                PROBE.replace("{work!r}", repr(deploy.WORK)).replace(
                    "{entry!r}", repr(package.entry)
                ),
            )
        print(out.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
