"""The deflate window of device wheels: compressed size against device heap to inflate.

For each wbits, the framework's .mpy files are deflated with that window (zlib-ng,
level 9) and inflated on the MicroPython unix port, which reports the heap the
inflater took. Chooses DEVICE_WBITS in mpy_blox_tools/wheel.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mpy_blox_tools import build, micropython, wheel

TITLE = "Wheel deflate window: size vs device heap (framework .mpy files)"

INFLATE = """
import deflate, gc, io, micropython
data = open({path!r}, "rb").read()
gc.collect()
before = gc.mem_alloc()
d = deflate.DeflateIO(io.BytesIO(data), deflate.RAW, {wbits})
buf = bytearray(256)
n = 0
while True:
    k = d.readinto(buf)
    if not k:
        break
    n += k
print(n, gc.mem_alloc() - before)
"""


def run(workdir: Path) -> list[dict]:
    # Entries are deflated one by one in a wheel: measure them that way.
    files = build.compile_tree(build.SOURCE, "0.0.0", "xtensawin")
    total = sum(len(data) for data in files.values())
    largest = max(files.values(), key=len)
    size15 = sum(len(wheel.deflate_raw(data, 15)) for data in files.values())
    rows = []
    for wbits in range(9, 16):
        deflated = sum(len(wheel.deflate_raw(data, wbits)) for data in files.values())
        path = Path(tempfile.mktemp(dir=workdir))
        path.write_bytes(wheel.deflate_raw(largest, wbits))
        proc = micropython.run_snippet(INFLATE.format(path=str(path), wbits=wbits), heap="200K")
        out = proc.stdout.decode().split()
        ok = proc.returncode == 0 and int(out[0]) == len(largest)
        rows.append(
            {
                "wbits": wbits,
                "window": 2**wbits,
                "files": len(files),
                "mpy bytes": total,
                "deflated": deflated,
                "ratio": deflated / total,
                "vs wbits 15": deflated / size15,
                "inflate heap": int(out[1]) if ok else "failed",
            }
        )
    return rows
