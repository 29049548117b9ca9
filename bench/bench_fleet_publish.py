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
import time
from pathlib import Path

from vboards import MIB, board_rss, booted_fleet, load, peak_rss, release, rss

from mpy_blox_tools import micropython, mqtt, publish, watch
from mpy_blox_tools.broker import Mosquitto

LANE = micropython.board_lane()
SIZES = tuple(int(n) for n in os.environ.get("BENCH_FLEET_PUBLISH_SIZES", "10,50,200").split(","))
CHANNEL = "bench"
TITLE = (
    f"Fleet update: one publish to {', '.join(map(str, SIZES))} boards under one "
    f"vboard fleet ({LANE.name}, {LANE.heap} heap)"
)


def run(workdir: Path) -> list[dict]:
    rel = release(workdir)
    return [_update(workdir / f"n{size}", size, rel) for size in SIZES]


def _update(top: Path, size: int, rel) -> dict:
    with Mosquitto(top / "broker") as broker:
        url = mqtt.BrokerURL(broker.host, broker.port)
        with booted_fleet(top, size, broker, CHANNEL, rel, LANE, auto_update=True) as (
            fleet,
            boot_s,
            load_before,
        ):
            idle_supervisor = rss(fleet.process.pid)
            client = mqtt.connect(url)
            watcher = watch.Watcher([p.entry for p in rel.packages], channel=None)
            watcher.attach(client, tuple(fb.board.device_id for fb in fleet.boards))
            started = time.monotonic()
            sent = publish.publish_update(
                url,
                rel.packages,
                channel=CHANNEL,
                key=rel.key.encode(),
                client=client,
                log=lambda *a: None,
                on_list=watcher.expect_list,
            ).payload_bytes
            with open(os.devnull, "w") as quiet:
                ok = watcher.wait(300 + 3 * size, out=quiet)
            elapsed = time.monotonic() - started
            mqtt.disconnect(client)
            done = sum(p.outcome == watch.DONE for p in watcher.devices.values())
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
                "board RSS MiB": board_rss(fleet.process.pid) / MIB,
                "load before/after": f"{load_before}/{load()}",
            }
