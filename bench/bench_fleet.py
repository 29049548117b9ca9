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
import time
from pathlib import Path

from vboards import MIB, PublishCounter, board_rss, booted_fleet, load, peak_rss, release, rss

from mpy_blox_tools import micropython, mqtt, rollout
from mpy_blox_tools import rollout_state as rs
from mpy_blox_tools.broker import Mosquitto

LANE = micropython.board_lane()
SIZES = tuple(int(n) for n in os.environ.get("BENCH_FLEET_SIZES", "10,50,200").split(","))
STAGES = "1,10%,50%,100%"
CHANNEL = "bench"
TITLE = (
    f"Fleet rollout: stages {STAGES} to {', '.join(map(str, SIZES))} boards under one "
    f"vboard fleet ({LANE.name}, {LANE.heap} heap)"
)


def run(workdir: Path) -> list[dict]:
    rel = release(workdir)
    return [_rollout(workdir / f"n{size}", size, rel) for size in SIZES]


def _rollout(top: Path, size: int, rel) -> dict:
    with Mosquitto(top / "broker") as broker:
        url = mqtt.BrokerURL(broker.host, broker.port)
        with booted_fleet(top, size, broker, CHANNEL, rel, LANE) as (fleet, boot_s, load_before):
            supervisor = fleet.process.pid
            verbose = os.environ.get("BENCH_FLEET_VERBOSE")  # the rollout's own lines
            with open(os.devnull, "w") as quiet, PublishCounter() as sent:
                started = time.monotonic()
                code = rollout.start(
                    url,
                    rel.packages,
                    channel=CHANNEL,
                    stages=STAGES,
                    bake_s=0,
                    timeout_s=300 + 3 * size,
                    opts=rollout.Options(key=rel.key.encode(), out=None if verbose else quiet),
                )
                elapsed = time.monotonic() - started
            client = mqtt.connect(url)
            try:
                doc = rollout.read_state(client, CHANNEL)
            finally:
                mqtt.disconnect(client)
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
                "board RSS MiB": board_rss(supervisor) / MIB,
                "load before/after": f"{load_before}/{load()}",
            }
    return row
