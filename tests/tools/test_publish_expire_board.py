"""--expire on a real board: a device that comes back after its package expired
reports `failed: package not on the broker` and keeps what it runs (issue 15)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import pytest
from sntp_server import NO_NTP

from mpy_blox import topics
from mpy_blox_tools import deploy, fleet, mqtt, publish
from mpy_blox_tools.cli import main as cli

USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)


def test_a_device_that_comes_back_after_its_package_expired_fails_and_nothing_changes(
    boards, broker, tmp_path, board_lane
):
    key = secrets.token_hex(32)
    (tmp_path / "key").write_text(key)
    channel = "t-expired"
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "mqtt": {"server": broker.host, "port": broker.port},
                **NO_NTP,
                "update": {"channel": channel, "auto_update": True, "healthy_after_s": 1},
            }
        )
    )
    (tmp_path / "provision.json").write_text(json.dumps({"update.key": key}))
    (tmp_path / "user_main.py").write_text(USER_MAIN.format(tag="v1"))
    board = boards.create(clock="host")  # a set clock, as NTP would have set it
    rb = boards.start(board, heap=board_lane.heap, lane=board_lane)
    rb.wait_for(r"\[vboard\] boot 1")
    deploy.deploy_app(
        rb.serial_port, settings, tmp_path / "provision.json", tmp_path / "user_main.py"
    )
    rb.wait_for("v1 running", timeout=60)
    rb.stop()  # away while the release comes and its package expires

    (tmp_path / "user_main.py").write_text(USER_MAIN.format(tag="v2-expire"))
    args = ["publish", "--broker", broker.url, "--key-file", "key", "--channel", channel]
    assert cli([*args, "--expire", "2s", "--extra-src-files", "user_main.py"]) == 0
    time.sleep(3)
    c = mqtt.connect(mqtt.BrokerURL(broker.host, broker.port))
    try:
        v2 = hashlib.sha256(USER_MAIN.format(tag="v2-expire").encode()).hexdigest()
        assert not mqtt.collect_retained(c, f"mpypi/packages/src/user_main.py/{v2}")
        assert mqtt.collect_retained(c, topics.channel_topic(channel))  # the list stays
    finally:
        mqtt.disconnect(c)

    rb = boards.start(board, heap=board_lane.heap, lane=board_lane)
    rb.wait_for("package not on the broker: user_main.py", timeout=120)
    rb.wait_for("v1 running", timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [device] = [d for d in fleet.fetch(mqtt.BrokerURL(broker.host, broker.port))
                    if d.device_id == board.device_id]  # fmt: skip
        if device.info.get("last_update", {}).get("result") == "failed":
            break
        time.sleep(0.5)
    # The install boot said `failed` and rebooted into the old set: its info keeps why.
    assert device.info["last_update"]["result"] == "failed", device.info
    assert "package not on the broker: user_main.py" in device.error
    assert "v2-expire running" not in rb.console()
    rb.stop()
    assert board.cat("user_main.py").decode() == USER_MAIN.format(tag="v1")
