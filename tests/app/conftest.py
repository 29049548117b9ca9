"""Fixtures for the runtime tests: app boards and a watcher of a device's MQTT topics."""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sntp_server import NO_NTP

from mpy_blox_tools import build

REPO = Path(__file__).resolve().parent.parent.parent
MAIN_PY = (REPO / "main.py").read_text()
RECOVER = REPO / "mpypi_recover.py"


@functools.cache
def compiled_recover() -> bytes:
    """mpypi_recover compiled: compiling its source at every boot fragments the heap."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mpypi_recover.mpy"
        build.compile_source(RECOVER, RECOVER.name, build.PLATFORMS["unix"], out)
        return out.read_bytes()


# A user_main that proves it can read the configuration, then idles.
IDLE_USER_MAIN = """
import asyncio
import mpy_blox.app as app

async def user_main():
    print("USER up, psk=%s password=%s" % (app.config.get_str("wlan.psk"),
                                           app.config.get_str("mqtt.password")))
    while True:
        await asyncio.sleep(1)
"""


@pytest.fixture
def settings_for():
    """settings.json text pointing a board at a broker (as tests/conftest.py's helper),
    NTP off unless `ntp=` says."""

    def make(broker, **extra) -> str:
        settings = {"mqtt": {"server": broker.host, "port": broker.port}, **NO_NTP, **extra}
        return json.dumps(settings)

    return make


@pytest.fixture
def app_board(boards, runtime_src, runtime_mpy):
    """An app-managed board: main.py, mpypi_recover.mpy, the framework, and the given files.

    framework: "runtime" (mpy_blox without the update agent, as .mpy), "runtime-src"
    (the same as sources), "full" (all of it, as sources) or None (install your own).
    """

    def make(
        settings: str | dict | None = None,
        provision: dict | None = None,
        user_main: str | None = IDLE_USER_MAIN,
        framework: str | None = "runtime",
        **kwargs,
    ):
        files: dict[str, str | bytes] = {"main.py": MAIN_PY}
        if RECOVER.exists():  # the boot step, compiled as deploy-app installs it
            files["mpypi_recover.mpy"] = compiled_recover()
        if settings is not None:
            files["settings.json"] = (
                settings if isinstance(settings, str) else json.dumps(settings)
            )
        if provision is not None:
            files["provision.json"] = json.dumps(provision)
        if user_main is not None:
            files["user_main.py"] = user_main
        board = boards.create(framework=framework == "full", files=files, **kwargs)
        if framework == "runtime":
            board.put_tree(runtime_mpy, "lib/mpy_blox")
        elif framework == "runtime-src":
            board.put_tree(runtime_src, "lib/mpy_blox")
        return board

    return make


class Watcher:
    """The latest retained `info`/`status` of one device, as JSON, and every status seen."""

    def __init__(self, client, device_id: str) -> None:
        self.latest: dict[str, dict] = {}
        self.statuses: list[dict] = []
        self._cond = threading.Condition()
        client.on_message = self._on_message
        client.subscribe(f"mpypi/nodes/{device_id}/+", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        leaf = msg.topic.rsplit("/", 1)[1]
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"raw": msg.payload}
        with self._cond:
            self.latest[leaf] = payload
            if leaf == "status":
                self.statuses.append(payload)
            self._cond.notify_all()

    def wait(self, leaf: str, timeout: float = 20, **fields) -> dict:
        """Wait until the latest `leaf` message has all `fields`; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self.latest.get(leaf)
                if got is not None and all(got.get(k) == v for k, v in fields.items()):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {leaf} with {fields}; latest: {got}")
                self._cond.wait(left)


@pytest.fixture
def watch(mqtt_client):
    def make(board, broker=None) -> Watcher:
        c = mqtt_client() if broker is None else mqtt_client(broker)
        return Watcher(c, board.device_id)

    return make
