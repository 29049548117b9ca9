"""Fleet update time for 1, 10 and 50 virtual boards, and what the publisher sent.

One publish reaches the whole fleet: the publisher sends the packages and the list
once, whatever the fleet's size (the broker fans them out), so "publisher bytes" must
stay flat while the time grows only with the machine's load.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from mpy_blox_tools import build, deploy, micropython, mqtt, publish, watch
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

# The 32-bit lane at an ESP32's 100K when MPY_BLOX_MICROPYTHON32 names its binary,
# else the 64-bit lane at its equivalent (mpy_blox_tools.micropython).
LANE = micropython.board_lane()
TITLE = f"Fleet update: one publish to 1, 10 and 50 boards ({LANE.name}, {LANE.heap} heap)"
SIZES = (1, 10, 50)
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n    print('{tag}')\n    await asyncio.sleep(3600)\n"
)


def _template(work: Path, broker: Mosquitto, key: str) -> Board:
    """One deployed board whose folder is copied for the others (deploying 50 is slow)."""
    settings = work / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "mqtt": {"server": broker.host, "port": broker.port},
                "update": {"channel": "bench", "auto_update": True},
            }
        )
    )
    (work / "provision.json").write_text(json.dumps({"update.key": key}))
    (work / "user_main.py").write_text(USER_MAIN.format(tag="v1"))
    board = Board.create(work / "template")
    with RunningBoard(board, heap=LANE.heap, executable=LANE.executable) as rb:
        rb.wait_for(r"\[vboard\] boot 1")
        deploy.deploy_app(
            rb.serial_port, settings, work / "provision.json", work / "user_main.py", reset=False
        )
    return board


def _clone(template: Board, directory: Path, n: int) -> Board:
    import shutil

    shutil.copytree(template.dir, directory, ignore=shutil.ignore_patterns("run", "console.log"))
    config = json.loads((directory / "board.json").read_text())
    config["unique_id"] = "%012x" % (0xB0A4D0000000 + n)
    (directory / "board.json").write_text(json.dumps(config))
    return Board(directory)


def run(workdir: Path) -> list[dict]:
    rows = []
    key = secrets.token_hex(32)
    (workdir / "key").write_text(key)
    with Mosquitto(workdir / "broker") as broker:
        url = mqtt.BrokerURL(broker.host, broker.port)
        template = _template(workdir, broker, key)
        for size in SIZES:
            boards = [
                _clone(template, workdir / f"fleet{size}-{i}", size * 1000 + i)
                for i in range(size)
            ]
            running = [RunningBoard(b, heap=LANE.heap, executable=LANE.executable) for b in boards]
            try:
                for rb in running:
                    rb.start()
                for rb in running:
                    rb.wait_for("v1", timeout=120)
                (workdir / "user_main.py").write_text(USER_MAIN.format(tag=f"v2-{size}"))
                packages = [
                    publish.wheel_package(build.build(out_dir=workdir / "dist", dev=True)),
                    publish.src_package(workdir / "user_main.py"),
                ]
                client = mqtt.connect(url)
                watcher = watch.Watcher([p.entry for p in packages], channel=None)
                watcher.attach(client, tuple(b.device_id for b in boards))
                started = time.monotonic()
                sent = publish.publish_update(
                    url,
                    packages,
                    channel="bench",
                    key=key.encode(),
                    client=client,
                    log=lambda *a: None,
                    on_list=watcher.expect_list,
                ).payload_bytes
                with open("/dev/null", "w") as quiet:
                    ok = watcher.wait(300, out=quiet)
                elapsed = time.monotonic() - started
                # New clones must boot on v1: take the retained list away again.
                client.publish("mpypi/channels/bench", b"", qos=1, retain=True).wait_for_publish(
                    10
                )
                mqtt.disconnect(client)
                done = sum(p.outcome == watch.DONE for p in watcher.devices.values())
                rows.append(
                    {
                        "boards": size,
                        "updated": done,
                        "seconds": elapsed,
                        "s per board": elapsed / size,
                        "publisher bytes": sent,
                        "bytes per board": sent // size,
                        "all ok": ok,
                    }
                )
            finally:
                for rb in running:
                    rb.stop()
    return rows
