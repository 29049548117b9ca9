"""A staged rollout (`mpy-blox rollout`, issue 17) to 10, 50 and 200 virtual boards.

The boards run under one `vboard fleet` supervisor on the lane fleets use (32-bit at
an ESP32's 100K when MPY_BLOX_MICROPYTHON32 names its binary), each with the framework
installed; the release is a new framework wheel and a new user_main.py, rolled out in
stages 1, 10%, 50%, 100% with no bake, through a Mosquitto of its own for each size
(so its peak RSS, VmHWM in /proc, is that size's). Per size: the time of each stage
(from the rollout's state: first list sent to last device confirmed) and in all, what
the workstation published (packages, cmd lists, the channel list and the rollout's
own retained state), the broker's peak memory, the supervisor's and the boards' RSS.

    BENCH_FLEET_SIZES=10,50 python bench/run.py fleet
    BENCH_FLEET_VERBOSE=1 ...   # the rollout's progress and summary on stdout
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from vboards import (
    MIB,
    USER_MAIN,
    PublishCounter,
    children,
    clone,
    deploy_template,
    load,
    peak_rss,
    rss,
    wait_reporting,
)

from mpy_blox_tools import build, micropython, mqtt, publish, rollout
from mpy_blox_tools import rollout_state as rs
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.vboard.process import RunningFleet

LANE = micropython.board_lane()
SIZES = tuple(int(n) for n in os.environ.get("BENCH_FLEET_SIZES", "10,50,200").split(","))
STAGES = "1,10%,50%,100%"
CHANNEL = "bench"
TITLE = (
    f"Fleet rollout: stages {STAGES} to {', '.join(map(str, SIZES))} boards under one "
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
    rows = []
    for size in SIZES:
        rows.append(_rollout(workdir / f"n{size}", size, key, installed, recover, packages))
    return rows


def _rollout(top: Path, size: int, key: str, installed: Path, recover: Path, packages) -> dict:
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
        )
        boards = [clone(template, top / f"b{i}", size * 1000 + i) for i in range(size)]
        load_before = load()
        booted = time.monotonic()
        with RunningFleet(boards, heap=LANE.heap, executable=LANE.executable) as fleet:
            for fb in fleet.boards:
                fb.wait_for("v1 running", timeout=60 + size)
            wait_reporting(url, CHANNEL, size, timeout=60 + size)
            boot_s = time.monotonic() - booted
            supervisor = fleet.process.pid
            verbose = os.environ.get("BENCH_FLEET_VERBOSE")  # the rollout's own lines
            with open(os.devnull, "w") as quiet, PublishCounter() as sent:
                started = time.monotonic()
                code = rollout.start(
                    url,
                    packages,
                    channel=CHANNEL,
                    stages=STAGES,
                    bake_s=0,
                    timeout_s=300 + 3 * size,
                    opts=rollout.Options(key=key.encode(), out=None if verbose else quiet),
                )
                elapsed = time.monotonic() - started
            client = mqtt.connect(url)
            try:
                doc = rollout.read_state(client, CHANNEL)
            finally:
                mqtt.disconnect(client)
            boards_rss = [rss(p) for p in children(supervisor)]
            row = {
                "boards": size,
                "stages": "/".join(map(str, doc["targets"])),
                "confirmed": sum(v["state"] == rs.OK for v in doc["devices"].values()),
                "exit": code,
                "boot s": boot_s,
                "stage s": " / ".join(f"{s:g}" for s in doc.get("stage_s", [])),
                "rollout s": elapsed,
                "published KiB": sum(sent.bytes.values()) / 1024,
                "packages KiB": sent.bytes.get("packages", 0) / 1024,
                "cmd lists KiB": sent.bytes.get("cmd", 0) / 1024,
                "state KiB": sent.bytes.get("rollouts", 0) / 1024,
                "state writes": sent.messages.get("rollouts", 0),
                "broker peak RSS MiB": peak_rss(broker.process.pid) / MIB,
                "supervisor RSS MiB": rss(supervisor) / MIB,
                "board RSS MiB": sum(boards_rss) / len(boards_rss) / MIB if boards_rss else 0,
                "load before/after": f"{load_before}/{load()}",
            }
    return row
