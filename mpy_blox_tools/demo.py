"""`mpy-blox demo`: what Mpy-BLOX does, end to end, on the embedded defaults.

For now (the foundation) it boots one virtual board from a fresh flash, shows
its console, lets it reset itself, and shows it coming back with its flash and
NVS intact. The update demonstration replaces this once the update agent lands.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

DEMO_MAIN = """\
import esp32, machine, os
nvs = esp32.NVS("demo")
try:
    boots = nvs.get_i32("boots") + 1
except OSError:
    boots = 1
nvs.set_i32("boots", boots)
nvs.commit()
print("hello from %s, boot %d, files %s" % (os.uname().machine, boots, os.listdir("/")))
if boots < 2:
    print("resetting...")
    machine.reset()
print("demo done")
"""


def run_demo(workdir: Path | None = None, out=print) -> int:
    with tempfile.TemporaryDirectory(prefix="mpy-blox-demo-") as tmp:
        board = Board.create(Path(workdir or tmp) / "board")
        board.write("main.py", DEMO_MAIN.encode())
        out(f"created virtual board {board.device_id} in {board.dir}")
        started = time.monotonic()
        with RunningBoard(board) as rb:
            out(f"serial port: {rb.serial_port}  (try: mpremote connect {rb.serial_port} repl)")
            rb.wait_for("demo done")
            rb.wait_for(">>> ")
            out(rb.console().rstrip())
        out(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    return 0
