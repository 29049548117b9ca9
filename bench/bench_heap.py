"""The board's heap through one update, on the 32-bit and the 64-bit lane side by side.

A virtual board with the framework compiled as its wheel installs it (the .mpy
files under /lib, mpypi_recover.mpy at the root) runs the app at its lane's board
heap (mpy_blox_tools.micropython: 100K on the 32-bit lane, as an ESP32; the 64-bit
lane's equivalent there). One signed list (a new framework wheel and a new
user_main.py) takes it through the agent, the install boot and the commit. At each
phase a probe collects the garbage and prints `gc.mem_free()` and the largest free
block (`micropython.mem_info()`'s "max free sz", in GC blocks of 16 bytes on the
32-bit lane and 32 on the 64-bit one). The probe is bench code only: main.py is
the framework's, with `import heapprobe` (a compiled module of the bench's, in
/lib) inserted before `import mpy_blox.app`; it wraps
the logger (a probe after the log lines "booted;", "update accepted", "install
boot;", "staging;" and "committing") and `open` (a probe at the first write of
the first entry staged from the wheel, its inflater's window allocated); the
idle probe is in the bench's user_main.py. The probe's own heap is a row of its
own: the figures are that much lower than without it.

Then, on each lane, the install boot's edge: stepping down from the board heap
1 KiB at a time, without the probe, the last --heap at which the same update
still installs before the first that fails. (Below that, a heap may pass again:
what fails is the deflate window's block in a fragmented heap, not the total.)
The heap figures in mpy_blox_tools/micropython.py (INSTALL_EDGE_*) come from it.

The 32-bit lane needs MPY_BLOX_MICROPYTHON32 (docs/runtime.md); without it its
columns say n/a.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import time
from pathlib import Path

from mpy_blox_tools import build, deploy, micropython, mqtt, publish
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.errors import MpyBloxError
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

TITLE = "Heap through an update (framework wheel + user_main.py), 32-bit and 64-bit lanes"
REPO = Path(__file__).resolve().parents[1]
CHANNEL = "bench-heap"

# (key in the probe's output, phase, what it means)
PHASES = [
    ("booted;", "boot", "the app is up: MQTT, agent and user_main loaded (log 'booted;')"),
    ("idle", "idle app", "user_main idled 3 s, printed by user_main itself"),
    ("update accepted", "list accepted", "the agent accepted the list, before its reset"),
    ("install boot;", "install boot", "the install boot, MQTT up, before the first download"),
    ("staging;", "staging", "packages downloaded and verified, the MQTT client stopped"),
    ("inflate", "inflate", "the wheel's first entry staged, its inflater's window allocated"),
    ("committing", "commit", "every file staged, the journal about to be written"),
]

# The probe, compiled to /lib/heapprobe.mpy (a longer main.py would cost heap to
# compile); main.py imports it just before the app.
PROBE = """
import gc, micropython, builtins
import mpy_blox.log
gc.collect()
_before = gc.mem_free()
def probe(where):
    gc.collect()
    print("HEAPPROBE", where, "free", gc.mem_free())
    micropython.mem_info()
_KEYS = ("booted;", "update accepted", "install boot;", "staging;", "committing")
_staging = [False]
_log = mpy_blox.log.Logger.log
def _probing_log(self, level, msg, *args):
    _log(self, level, msg, *args)
    for k in _KEYS:
        if msg.startswith(k):
            _staging[0] = _staging[0] or k == "staging;"
            probe(k)
mpy_blox.log.Logger.log = _probing_log
_open = builtins.open
class _Out:
    # The first file staged from the wheel: probed at its first write (its
    # inflater's window is allocated by then); open() is itself again after.
    def __init__(self, f):
        self.f = f
    def write(self, b):
        builtins.open = _open
        self.write = self.f.write
        probe("inflate")
        return self.f.write(b)
    def close(self):
        self.f.close()
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.f.close()
def _probing_open(path, mode="r", *a):
    f = _open(path, mode, *a)
    return _Out(f) if _staging[0] and mode == "wb" and "/stage/n" in path else f
builtins.open = _probing_open
gc.collect()
print("HEAPPROBE cost", _before - gc.mem_free())
"""

USER_V1 = """
import asyncio, gc, micropython
async def user_main():
    print("USER v1")
    await asyncio.sleep(3)
    gc.collect()
    print("HEAPPROBE idle free %d" % gc.mem_free())
    micropython.mem_info()
    while True:
        await asyncio.sleep(1)
"""
USER_V2 = "async def user_main():\n    print('USER v2')\n"


def _with_probe(main: str, module: str = "heapprobe") -> str:
    """main.py with `import {module}` just before its `import mpy_blox.app` statement.

    Found by parsing main.py, not by its text: the statement may sit in a block
    (main.py imports the app inside a try), and the probe's import takes its line's
    indentation so main.py stays valid Python."""
    tree = ast.parse(main)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "mpy_blox.app" for a in node.names):
            break
    else:
        raise RuntimeError("main.py has no 'import mpy_blox.app' statement to probe before")
    lines = main.splitlines(keepends=True)
    indent = lines[node.lineno - 1][: node.col_offset]
    lines.insert(node.lineno - 1, indent + f"import {module}\n")
    probed = "".join(lines)
    ast.parse(probed)  # still valid: a bad insertion fails here, not at the board's boot
    return probed


def _board(work: Path, name: str, broker: Mosquitto, key: str, channel: str, probe: bool) -> Board:
    board = Board.create(work / name)
    framework = work / "framework-0.1.0" / "mpy_blox"
    if not framework.is_dir():  # compiled once for every board of the run
        build.compile_framework(framework.parent, version="0.1.0", platform="esp32")
    board.put_tree(framework, "lib/mpy_blox")  # one flash operation, not one per file
    recovery = framework.parent / deploy.RECOVERY_MPY
    main = (REPO / "main.py").read_text()
    if probe:
        main = _with_probe(main)
        source, compiled = work / "heapprobe.py", work / "heapprobe.mpy"
        source.write_text(PROBE)
        build.compile_source(source, "heapprobe.py", "xtensawin", compiled)
        board.write("lib/heapprobe.mpy", compiled.read_bytes())
    settings = {
        "mqtt": {"server": broker.host, "port": broker.port},
        "update": {"channel": channel},
    }
    files = {
        "main.py": main.encode(),
        deploy.RECOVERY_MPY: recovery.read_bytes(),
        "settings.json": json.dumps(settings).encode(),
        "provision.json": json.dumps({"update.key": key}).encode(),
        "user_main.py": USER_V1.encode(),
    }
    for path, data in files.items():
        board.write(path, data)
    return board


class _Update:
    """The packages of the update, built once; published with a fresh channel each time."""

    def __init__(self, work: Path, broker: Mosquitto, key: str) -> None:
        self.url = mqtt.BrokerURL(broker.host, broker.port)
        self.key = key
        user = work / "user_main_v2.py"
        user.write_text(USER_V2)
        wheel = build.build(out_dir=work / "dist", version="0.2.0")
        self.packages = [publish.wheel_package(wheel), publish.src_package(user, "user_main.py")]
        self.n = 0

    def run(self, work: Path, broker: Mosquitto, lane, heap: int, probe: bool) -> tuple[bool, str]:
        """Boot a fresh board at `heap`, update it; (installed?, its console)."""
        self.n += 1
        channel = f"{CHANNEL}-{self.n}"
        board = _board(work, f"board{self.n}", broker, self.key, channel, probe)
        with RunningBoard(board, heap=heap, executable=lane.executable) as rb:
            try:
                # user_main runs once the agent's subscriptions are acknowledged
                # (mpy_blox/app.py): from here a publish reaches the board.
                rb.wait_for("USER v1", timeout=60)
                if probe:
                    rb.wait_for("HEAPPROBE idle", timeout=30)
            except (TimeoutError, MpyBloxError):
                return False, rb.console()  # too small for the app itself
            publish.publish_update(
                self.url,
                self.packages,
                channel=channel,
                key=self.key.encode(),
                log=lambda *a: None,
            )
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                out = rb.console()
                if "USER v2" in out:
                    return True, out
                if "update failed" in out or "install boot did not finish" in out:
                    return False, out
                time.sleep(0.1)
            return False, rb.console()


def _probes(out: str, block: int) -> dict[str, tuple[int, int]]:
    """{phase key: (free, largest free block)}; the lowest of repeated probes."""
    found: dict[str, tuple[int, int]] = {}
    pattern = r"HEAPPROBE (.+?) free (\d+)\r?\n(?:.*\n){0,4}?.*max free sz: (\d+)"
    for where, free, largest in re.findall(pattern, out):
        free, largest = int(free), int(largest) * block
        old = found.get(where)
        found[where] = (min(free, old[0]), min(largest, old[1])) if old else (free, largest)
    return found


def _edge(update: _Update, work: Path, broker: Mosquitto, lane, start: int) -> int:
    """The smallest heap from which every heap up to `start` installs (1 KiB steps down).

    Not a bisection: the install boot's failures are fragmentation (its largest free
    block, not its free total, runs out), so a heap below the first failure may pass
    again; the figure that holds is where the failures start."""
    heap = start
    while heap > start // 2:
        ok, _ = update.run(work, broker, lane, heap - 1024, probe=False)
        if not ok:
            return heap
        heap -= 1024
    return heap


def run(workdir: Path) -> list[dict]:
    lanes = [lane for lane in (micropython.lane32(), micropython.lane64()) if lane]
    key = secrets.token_hex(32)
    figures: dict[str, dict] = {}
    with Mosquitto(workdir / "broker") as broker:
        update = _Update(workdir, broker, key)
        for lane in lanes:
            block = 4 * micropython.word_bits(lane.executable) // 8
            ok, out = update.run(workdir, broker, lane, lane.board_heap, probe=True)
            if not ok:
                raise RuntimeError(
                    f"{lane.name}: the update failed at {lane.heap}:\n{out[-3000:]}"
                )
            cost = re.search(r"HEAPPROBE cost (\d+)", out)
            figures[lane.name] = {
                "probes": _probes(out, block),
                "cost": int(cost.group(1)) if cost else None,
                "edge": _edge(update, workdir, broker, lane, lane.board_heap),
                "heap": lane.board_heap,
            }
    rows = []

    def row(phase: str, meaning: str, cells: dict[str, tuple]) -> None:
        r = {"phase": phase}
        for name in ("32-bit", "64-bit"):
            free, largest = cells.get(name, ("n/a", "n/a"))
            r[f"{name} free"] = free
            r[f"{name} largest"] = largest
        r["meaning"] = meaning
        rows.append(r)

    row(
        "board heap",
        "--heap of the board (the lane's board heap)",
        {n: (micropython.format_size(f["heap"]), "") for n, f in figures.items()},
    )
    for key_, phase, meaning in PHASES:
        row(phase, meaning, {n: f["probes"].get(key_, ("-", "-")) for n, f in figures.items()})
    row(
        "probe cost",
        "heap the probe's code itself holds (included in every figure above)",
        {n: (f["cost"], "") for n, f in figures.items()},
    )
    row(
        "install edge",
        "the update installs at every --heap from this one to the board heap (no probe)",
        {n: (micropython.format_size(f["edge"]), "") for n, f in figures.items()},
    )
    return rows


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import format_table

    with tempfile.TemporaryDirectory(prefix="bench-heap-") as tmp:
        print(format_table(run(Path(tmp))))
