"""`mpy-blox demo` (= `make demo`): a fleet update, end to end, on the embedded defaults.

1. start a local broker (Mosquitto, or the embedded one without it);
2. make an Ed25519 release key (as `mpy-blox keygen`), create three virtual
   boards and deploy the framework on each over its serial port, exactly as
   `make deploy-app` does on hardware (settings pointing at the broker, the
   release key's public half provisioned as update.pubkey, a first user_main.py);
3. boot them and wait until each reports its `info`;
4. build the current source as a dev version and publish it, signed with the
   release key, with a new
   user_main.py, following every board's progress live;
5. show the fleet table: all three on the new version, the new user_main running.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from mpy_blox_tools import build, deploy, fleet, keys, micropython, mqtt, publish
from mpy_blox_tools.broker import local_broker
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

BOARDS = 3
CHANNEL = "demo"
USER_MAIN = """\
import asyncio


async def user_main():
    while True:
        print("user_main {version} says hello")
        await asyncio.sleep(2)
"""


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run_demo(
    workdir: Path | None = None,
    boards: int = BOARDS,
    timeout: float = 120,
    heap: str | None = None,
    engine: str = "auto",
    lane: micropython.Lane | None = None,
) -> int:
    """Run the demonstration; boards run on `lane` (default: the 32-bit one when
    MPY_BLOX_MICROPYTHON32 names it, else the 64-bit one) with its board heap."""
    started = time.monotonic()
    lane = lane or micropython.board_lane()
    heap = heap or lane.heap
    with tempfile.TemporaryDirectory(prefix="mpy-blox-demo-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        release_key = work / "release.key"
        pubkey = keys.generate(release_key).public_hex
        broker = local_broker(work / "broker", engine)
        _step(f"starting a local broker ({broker.name})")
        with broker:
            print(f"broker: {broker.url}")
            url = mqtt.BrokerURL(broker.host, broker.port)
            settings = work / "settings.json"
            settings.write_text(
                json.dumps(
                    {
                        "logging": {"level": "INFO"},
                        "mqtt": {"server": broker.host, "port": broker.port},
                        "update": {"channel": CHANNEL, "auto_update": True},
                    },
                    indent=2,
                )
            )
            (work / "provision.json").write_text(json.dumps({"update.pubkey": pubkey}))
            (work / "user_main.py").write_text(USER_MAIN.format(version="v1"))
            wheel_v1 = build.build(out_dir=work / "dist")
            running: list[RunningBoard] = []
            try:
                _step(
                    f"creating {boards} virtual boards ({lane.name} MicroPython, {heap} heap) "
                    "and deploying the framework over their serial ports (as make deploy-app)"
                )
                for i in range(boards):
                    board = Board.create(work / f"board{i + 1}")
                    rb = RunningBoard(board, heap=heap, executable=lane.executable).start()
                    running.append(rb)
                    rb.wait_for(r"\[vboard\] boot 1")
                    print(f"-- {board.device_id} on {rb.serial_port}")
                    deploy.deploy_app(
                        rb.serial_port,
                        settings,
                        work / "provision.json",
                        work / "user_main.py",
                        wheel_v1,
                    )
                _step("waiting for every board to come online")
                for rb in running:
                    rb.wait_for("user_main v1 says hello", timeout=timeout)
                _show_fleet(url)
                _step("publishing the current source as a dev version with a new user_main.py")
                (work / "user_main.py").write_text(USER_MAIN.format(version="v2"))
                if not publish.publish_release(
                    broker=url,
                    key_file=release_key,
                    channel=CHANNEL,
                    extra_src_files=[work / "user_main.py"],
                    dev=True,
                    wait=timeout,
                ):
                    print("mpy-blox: the demo update did not reach every board", file=sys.stderr)
                    return 1
                for rb in running:
                    rb.wait_for("user_main v2 says hello", timeout=timeout)
                _step("the fleet after the update")
                _show_fleet(url)
                for rb in running:
                    last = [line for line in rb.console().splitlines() if "says hello" in line]
                    print(f"{rb.board.device_id}: {last[-1]}")
            finally:
                for rb in running:
                    rb.stop()
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    return 0


def _show_fleet(url: mqtt.BrokerURL) -> None:
    print(fleet.format_table(fleet.fetch(url)))
