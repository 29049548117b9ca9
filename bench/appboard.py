"""One virtual board running the full app against a Mosquitto of its own, deployed as
a user deploys it, with a client following its live status: what the single-board
update benchmarks share (not a benchmark: bench/run.py runs bench_*)."""

from __future__ import annotations

import json
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench_update import APP_READY, StatusTimeline

from mpy_blox_tools import deploy, mqtt, publish
from mpy_blox_tools.broker import Mosquitto
from mpy_blox_tools.vboard.board import Board
from mpy_blox_tools.vboard.process import RunningBoard

CHANNEL = "bench"


@dataclass
class AppBoard:
    board: Board
    rb: RunningBoard
    url: mqtt.BrokerURL
    client: object  # a connected paho client
    timeline: StatusTimeline
    key: str
    booted: int = 1  # app boots seen: wait_app() waits for the next

    def publish(self, packages, chunk_size: int = 0) -> None:
        publish.publish_update(
            self.url,
            packages,
            channel=CHANNEL,
            key=self.key.encode(),
            chunk_size=chunk_size,
            client=self.client,
            log=lambda *a: None,
        )

    def wait_app(self, timeout: float = 60) -> None:
        """Until the app of the next boot is up and subscribed."""
        self.booted += 1
        self.rb.wait_for(APP_READY, count=self.booted, timeout=timeout)


@contextmanager
def app_board(workdir: Path, lane, flash: str, **update):
    """A board on `lane` at its heap with `flash`, the app deployed with update
    settings `update` (auto_update on), up and subscribed."""
    key = secrets.token_hex(32)
    with Mosquitto(
        workdir / "broker", persistence=False, extra_config="max_packet_size 16777216"
    ) as broker:
        url = mqtt.BrokerURL(broker.host, broker.port)
        settings = workdir / "settings.json"
        settings.write_text(
            json.dumps(
                {
                    "mqtt": {"server": broker.host, "port": broker.port},
                    # INFO: the board says when it is up and subscribed, and its heap.
                    "logging": {"level": "INFO"},
                    "update": {"channel": CHANNEL, "auto_update": True, **update},
                }
            )
        )
        (workdir / "provision.json").write_text(json.dumps({"update.key": key}))
        board = Board.create(workdir / "board", flash_size=flash, executable=lane.executable)
        with RunningBoard(board, heap=lane.heap, executable=lane.executable) as rb:
            rb.wait_for(r"\[vboard\] boot 1")
            deploy.deploy_app(rb.serial_port, settings, workdir / "provision.json")
            rb.wait_for(r"\[vboard\] boot 2")
            client = mqtt.connect(url)
            try:
                timeline = StatusTimeline(client, board.device_id)
                rb.wait_for(APP_READY, timeout=60)
                yield AppBoard(board, rb, url, client, timeline, key)
            finally:
                mqtt.disconnect(client)
