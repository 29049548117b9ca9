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
5. show the fleet table: all three on the new version, the new user_main running;
6. publish a broken user_main.py (it raises 2 s after it starts) to one board: the
   board runs it on trial, sees it fail before `update.healthy_after_s` (5 s here,
   30 by default), rolls back to the previous set by itself, and `--wait` reports
   `rolled_back` with the reason (docs/protocol.md, "Trial and rollback").
"""

from __future__ import annotations

import json
import re
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
# A trial is confirmed once user_main ran this long without raising: short, so the
# demo's updates confirm quickly; the broken user_main raises before it.
HEALTHY_AFTER_S = 5
USER_MAIN = """\
import asyncio


async def user_main():
    while True:
        print("user_main {version} says hello")
        await asyncio.sleep(2)
"""
BROKEN_USER_MAIN = """\
import asyncio


async def user_main():
    print("user_main v3 starts, and fails in 2 s")
    await asyncio.sleep(2)
    raise RuntimeError("broken on purpose by the demo")
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
                        "update": {
                            "channel": CHANNEL,
                            "auto_update": True,
                            "healthy_after_s": HEALTHY_AFTER_S,
                        },
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
                wheel_v2 = build.build(out_dir=work / "dist", dev=True)
                if not publish.publish_release(
                    broker=url,
                    key_file=release_key,
                    channel=CHANNEL,
                    extra_src_files=[work / "user_main.py"],
                    wheel=wheel_v2,
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
                target = running[0]
                hellos = len(re.findall("user_main v2 says hello", target.console()))
                if not roll_back_broken(
                    url, release_key, target.board.device_id, wheel_v2, work, timeout
                ):
                    return 1
                # The previous set runs again: v2 greets once more.
                target.wait_for("user_main v2 says hello", timeout=timeout, count=hellos + 1)
                _step("the fleet after the rollback")
                _show_fleet(url)
            finally:
                for rb in running:
                    rb.stop()
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    return 0


def roll_back_broken(
    url: mqtt.BrokerURL,
    release_key: Path,
    device_id: str,
    wheel: Path,
    work: Path,
    timeout: float,
) -> bool:
    """Step 6: publish a user_main.py that raises to `device_id` (the framework
    `wheel` it runs already) and expect `--wait` to report it rolled back; True if so."""
    _step(
        f"publishing a broken user_main.py to {device_id}: it raises 2 s after it "
        f"starts, so the board rolls back by itself (healthy after {HEALTHY_AFTER_S} s)"
    )
    broken = work / "broken" / "user_main.py"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text(BROKEN_USER_MAIN)
    outcome = publish.release(
        broker=url,
        key_file=release_key,
        device_ids=[device_id],
        extra_src_files=[broken],
        wheel=wheel,
        wait=timeout,
    )
    got = outcome.devices[0] if outcome.devices else None
    if outcome.ok or got is None or got.state != "rolled_back":
        said = f"{got.state}: {got.detail}" if got else "no answer"
        print(
            f"mpy-blox: {device_id} did not roll the broken user_main.py back ({said})",
            file=sys.stderr,
        )
        return False
    print(f"as expected: {device_id} {got.detail}")
    return True


def _show_fleet(url: mqtt.BrokerURL, settle: float = 10) -> None:
    # A confirmed device publishes its info, then its status `ok`: --wait is done at
    # the info, so give the statuses a moment to catch up (at most `settle` seconds).
    deadline = time.monotonic() + settle
    devices = fleet.fetch(url)
    while any(d.state == "trial" for d in devices) and time.monotonic() < deadline:
        time.sleep(0.2)
        devices = fleet.fetch(url)
    print(fleet.format_table(devices))
