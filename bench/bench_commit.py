"""What the journalled commit costs LittleFS: file by file, as mpypi_recover commits
today, against whole folders, as a journal of folder moves would.

On the board lane's MicroPython, LittleFS on a RAM block device that counts its
calls. The set is the peers bench's shape: the framework (53 files in six
folders, about 1.4 KB each) and a library (20 modules of 10 KB), each with its
.dist-info, and a 1 MiB data file. Every file of version 1 is on the
filesystem and version 2 staged when the clock starts; the commit then puts
version 2 in place and keeps version 1 as the backups:

  file by file       mpypi_recover.apply() of a journal listing every file (two
                     renames a file: the old one to its backup, the staged one
                     into place), as the install boot commits today
  one file changed   the same for a release that changes one module (what
                     staging leaves in the journal then)
  whole folders      two renames a top folder (each package's folder and its
                     .dist-info) and the data file: what a journal that moves a
                     package's folder would do; not built (docs/benchmarks.md)

twice: with the mount options an ESP32 boots with (MicroPython's defaults,
readsize and progsize 32: a 128-byte cache) and the virtual board's (progsize
256: 1 KiB). Columns: renames, block reads and the KB they read, block writes
(programs and erases), milliseconds on this machine, and reads over the whole
folders row's. The reads are what an ESP32 pays in SPI flash reads of that
size; the milliseconds are this machine's, with a block read costing a Python
call, not an SPI transaction.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mpy_blox_tools import micropython

# The board lane's MicroPython, not its board heap: the RAM flash (4 MiB) and the
# files written to it need far more, and the heap is not what this measures (so
# no LANE: bench/run.py records no board heap for it).
_LANE = micropython.board_lane()
HEAP = "24M"
TITLE = (
    "The journalled commit on LittleFS: file by file vs whole folders (block reads), "
    f"{_LANE.name} MicroPython"
)
REPO = Path(__file__).resolve().parents[1]

SNIPPET = """
import gc, hashlib, os, time, vfs
import mpypi_recover as R

BLOCK, BLOCKS = 4096, 1024
LAYOUT = (("mpy_blox", 12), ("mpy_blox/update", 18), ("mpy_blox/mqtt", 9),
          ("mpy_blox/hass", 6), ("mpy_blox/compat", 4), ("mpy_blox/vb", 4))


class RamFlash:
    # The extended block protocol, as esp32.Partition gives it, counting calls.
    def __init__(self):
        self.data = bytearray(BLOCK * BLOCKS)
        self.reads = self.read_bytes = self.writes = 0

    def readblocks(self, block, buf, offset=0):
        self.reads += 1
        self.read_bytes += len(buf)
        a = block * BLOCK + offset
        buf[:] = memoryview(self.data)[a : a + len(buf)]

    def writeblocks(self, block, buf, offset=0):
        self.writes += 1
        a = block * BLOCK + offset
        self.data[a : a + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:
            return BLOCKS
        if op == 5:
            return BLOCK
        if op == 6:
            self.writes += 1
            a = arg * BLOCK
            self.data[a : a + BLOCK] = b"\\xff" * BLOCK
        return 0


def files():
    out = []
    for folder, n in LAYOUT:
        out += [("/lib/%s/m%02d.mpy" % (folder, i), 1400) for i in range(n)]
    out += [("/lib/mpy_blox-2.0.dist-info/" + n, 600) for n in ("METADATA", "RECORD", "WHEEL")]
    out += [("/lib/biglib/mod%02d.py" % i, 10240) for i in range(20)]
    out += [("/lib/biglib-2.0.dist-info/" + n, 400) for n in ("METADATA", "RECORD", "WHEEL")]
    out += [("/data/blob.bin", 1 << 20)]
    return out


def body(path, size, version):
    seed = (path + " v%d " % version).encode()
    return (seed * (size // len(seed) + 1))[:size]


def sha(data):
    return "%064x" % int.from_bytes(hashlib.sha256(data).digest(), "big")


def write(path, data):
    R.makedirs(path)
    with open(path, "wb") as f:
        f.write(data)


def measure(method, progsize):
    flash = RamFlash()
    vfs.VfsLfs2.mkfs(flash, progsize=progsize)
    vfs.mount(vfs.VfsLfs2(flash, progsize=progsize), "/fs")
    root = "/fs"
    listed = files()
    changed = listed[:1] if method == "one file changed" else listed
    for path, size in listed:
        write(root + path, body(path, size, 1))
    renames = 0
    if method == "whole folders":
        tops = ("/lib/mpy_blox", "/lib/mpy_blox-2.0.dist-info", "/lib/biglib",
                "/lib/biglib-2.0.dist-info", "/data/blob.bin")
        for path, size in listed:
            write(root + R.STAGE + "/new" + path, body(path, size, 2))
        os.mkdir(root + R.STAGE + "/old")
        flash.reads = flash.read_bytes = flash.writes = 0
        t = time.ticks_us()
        for top in tops:
            name = top.replace("/", "_")
            os.rename(root + top, root + R.STAGE + "/old/" + name)
            os.rename(root + R.STAGE + "/new" + top, root + top)
            renames += 2
    else:
        ops = root + "/.mpypi/ops"
        R.makedirs(root + R.STAGE + "/x")
        with open(ops, "w") as f:
            for i, (path, size) in enumerate(changed):
                new, old = body(path, size, 2), body(path, size, 1)
                write(root + R.STAGE + "/n%d" % i, new)
                f.write("P %d %s %s %s\\n" % (i, path, sha(new), sha(old)))
                new = old = None
        R.write_journal(ops, root)
        flash.reads = flash.read_bytes = flash.writes = 0
        t = time.ticks_us()
        R.apply(root)
        renames = 2 * len(changed)
    us = time.ticks_diff(time.ticks_us(), t)
    for path, size in changed:
        with open(root + path, "rb") as f:
            if f.read(40) != body(path, 40, 2)[:40]:
                raise SystemExit("not committed: " + path)
    print("RESULT", method, progsize, renames, flash.reads, flash.read_bytes, flash.writes, us)
    vfs.umount("/fs")
    flash.data = None
    gc.collect()


for progsize in (32, 256):
    for method in ("file by file", "one file changed", "whole folders"):
        measure(method, progsize)
"""

MOUNTS = {32: "ESP32 boot (128 B cache)", 256: "virtual board (1 KiB cache)"}


def run(workdir: Path) -> list[dict]:
    root = workdir / "device"
    root.mkdir()
    shutil.copy(REPO / "mpypi_recover.py", root / "mpypi_recover.py")
    proc = micropython.run_snippet(
        SNIPPET, heap=HEAP, path=[str(root)], executable=_LANE.executable, timeout=600
    )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    got = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("RESULT ")]
    if len(got) != 6:
        raise RuntimeError(f"commit snippet failed:\n{out[-2000:]}")
    measured = []
    for line in got:
        *method, progsize, renames, reads, read_bytes, writes, us = line.split()
        measured.append(
            {
                "mount": MOUNTS[int(progsize)],
                "commit": " ".join(method),
                "renames": int(renames),
                "block reads": int(reads),
                "KB read": round(int(read_bytes) / 1024),
                "block writes": int(writes),
                "ms": int(us) / 1000,
            }
        )
    rows = []
    for mount in MOUNTS.values():
        here = [r for r in measured if r["mount"] == mount]
        folders = next(r for r in here if r["commit"] == "whole folders")["block reads"]
        for r in here:
            r["reads / folders'"] = round(r["block reads"] / folders, 1)
            rows.append(r)
    return rows
