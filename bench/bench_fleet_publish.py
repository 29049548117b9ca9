"""How many virtual boards one publish updates at once: one channel list to N boards.

The boards (framework installed, auto-update on) run under one `vboard fleet` on the
lane fleets use (32-bit at 100K when MPY_BLOX_MICROPYTHON32 names its binary); one
publish of a new framework wheel and user_main.py on their channel reaches them all at
once, through a Mosquitto of its own per size. Per size: how many updated and how long
it took, what the publisher sent (flat: the broker fans out), the broker's peak RSS
(VmHWM), the supervisor's RSS, the boards' RSS and the machine's load. docs/scaling.md,
"Virtual boards on one machine", reads the results.

    BENCH_FLEET_PUBLISH_SIZES=200,500 python bench/run.py fleet_publish
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from vboards import (
    MIB,
    USER_MAIN,
    children,
    clone,
    deploy_template,
    load,
    peak_rss,
    rss,
    wait_reporting,
)

from mpy_blox_tools import build, micropython, mqtt, publish, watch
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.vboard.process import RunningFleet

LANE = micropython.board_lane()
SIZES = tuple(int(n) for n in os.environ.get("BENCH_FLEET_PUBLISH_SIZES", "10,50,200").split(","))
CHANNEL = "bench"
TITLE = (
    f"Fleet update: one publish to {', '.join(map(str, SIZES))} boards under one "
    f"vboard fleet ({LANE.name}, {LANE.heap} heap)"
)


def run(workdir: Path) -> list[dict]:
    key = secrets.token_hex(32)
    installed = build.build(out_dir=workdir / "installed")
    release_wheel = build.build(dev=True, out_dir=workdir / "release")
    recover = build.compile_framework(workdir / "compiled").parent / "mpypi_recover.mpy"
    (workdir / "user_main.py").write_text(USER_MAIN.format(tag="v2"))
    packages = [
        publish.wheel_package(release_wheel),
        publish.src_package(workdir / "user_main.py"),
    ]
    return [
        _update(workdir / f"n{size}", size, key, installed, recover, packages) for size in SIZES
    ]


def _update(top: Path, size: int, key: str, installed: Path, recover: Path, packages) -> dict:
    with Mosquitto(top / "broker") as broker:
        url = mqtt.BrokerURL(broker.host, broker.port)
        template = deploy_template(
            top / "template",
            broker,
            CHANNEL,
            lane=LANE,
            framework_wheel=installed,
            recover_mpy=recover,
            key=key,
            auto_update=True,
        )
        boards = [clone(template, top / f"b{i}", size * 1000 + i) for i in range(size)]
        load_before = load()
        booted = time.monotonic()
        with RunningFleet(boards, heap=LANE.heap, executable=LANE.executable) as fleet:
            for fb in fleet.boards:
                fb.wait_for("v1 running", timeout=60 + size)
            wait_reporting(url, CHANNEL, size, timeout=60 + size)
            boot_s = time.monotonic() - booted
            idle_supervisor = rss(fleet.process.pid)
            client = mqtt.connect(url)
            watcher = watch.Watcher([p.entry for p in packages], channel=None)
            watcher.attach(client, tuple(b.device_id for b in boards))
            started = time.monotonic()
            sent = publish.publish_update(
                url,
                packages,
                channel=CHANNEL,
                key=key.encode(),
                client=client,
                log=lambda *a: None,
                on_list=watcher.expect_list,
            ).payload_bytes
            with open(os.devnull, "w") as quiet:
                ok = watcher.wait(300 + 3 * size, out=quiet)
            elapsed = time.monotonic() - started
            mqtt.disconnect(client)
            done = sum(p.outcome == watch.DONE for p in watcher.devices.values())
            boards_rss = [rss(p) for p in children(fleet.process.pid)]
            outcomes: dict[str, int] = {}
            for p in watcher.devices.values():
                outcomes[str(p.outcome)] = outcomes.get(str(p.outcome), 0) + 1
            return {
                "boards": size,
                "updated": done,
                "all ok": ok,
                "outcomes": " ".join(f"{k}:{v}" for k, v in sorted(outcomes.items())),
                "boot s": boot_s,
                "update s": elapsed,
                "publisher KiB": sent / 1024,
                "broker peak RSS MiB": peak_rss(broker.process.pid) / MIB,
                "supervisor RSS MiB idle/after": (
                    f"{idle_supervisor / MIB:.1f}/{rss(fleet.process.pid) / MIB:.1f}"
                ),
                "board RSS MiB": sum(boards_rss) / len(boards_rss) / MIB if boards_rss else 0,
                "load before/after": f"{load_before}/{load()}",
            }
