"""Publishing to real virtual boards: --wait outcomes, status of a live fleet, the demo."""

from __future__ import annotations

import json
import re
import secrets
import time

import pytest
from sntp_server import NO_NTP

from mpy_blox_tools import deploy, fleet, mqtt, publish
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.demo import run_demo

# The boards run on the 32-bit lane at an ESP32's 100K when MPY_BLOX_MICROPYTHON32
# names its binary, else on the 64-bit lane at its equivalent (board_lane).
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fleet_of(boards, broker, tmp_path, board_lane):
    """Deployed, running boards (as make deploy-app does), on channel `t-<n>`."""

    def make(n: int, key: str | None, channel: str):
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
        provision = tmp_path / "provision.json"
        provision.write_text(json.dumps({"update.key": key} if key else {}))
        user_main = tmp_path / "user_main.py"
        user_main.write_text(USER_MAIN.format(tag="v1"))
        running = []
        for _ in range(n):
            rb = boards.start(boards.create(), heap=board_lane.heap, lane=board_lane)
            rb.wait_for(r"\[vboard\] boot 1")
            deploy.deploy_app(rb.serial_port, settings, provision if key else None, user_main)
            running.append(rb)
        for rb in running:
            rb.wait_for("v1 running", timeout=60)
        return running

    return make


def test_wait_succeeds_when_every_device_reports_the_new_versions(
    fleet_of, broker, tmp_path, capsys
):
    key = secrets.token_hex(32)
    (tmp_path / "key").write_text(key)
    running = fleet_of(2, key, "t-ok")
    (tmp_path / "user_main.py").write_text(USER_MAIN.format(tag="v2"))
    ids = [rb.board.device_id for rb in running]
    status = cli(
        [
            "publish",
            "--broker",
            broker.url,
            "--key-file",
            "key",
            "--dev",
            "--device-ids",
            *ids,
            "--extra-src-files",
            "user_main.py",
            "--wait",
            "120",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    summary = out[out.index("DEVICE") :]
    for d in ids:
        # Each board ran the new set on trial first, then confirmed it (issue 14).
        assert re.search(rf"^{d} +trial \(\d+s left\)$", out, re.M), out
        row = next(line for line in summary.splitlines() if line.startswith(d))
        assert re.fullmatch(
            rf"{d}  ok      mpy_blox \S+\.dev\d+, user_main\.py [0-9a-f]{{8}}", row
        )
    for rb in running:
        rb.wait_for("v2 running", timeout=60)
    devices = {d.device_id: d for d in fleet.fetch(mqtt.BrokerURL(broker.host, broker.port))}
    assert all(".dev" in devices[d].framework and devices[d].last_update == "ok" for d in ids)


def test_wait_fails_with_the_reason_of_a_device_that_refuses(fleet_of, broker, tmp_path, capsys):
    running = fleet_of(1, secrets.token_hex(32), "t-refuse")
    device = running[0].board.device_id
    # No key on this side: the keyed device must refuse the unsigned list.
    status = cli(["publish", "--broker", broker.url, "--device-ids", device, "--wait", "60"])
    out = capsys.readouterr().out
    assert status == 1
    row = next(line for line in out[out.index("DEVICE") :].splitlines() if device in line)
    assert "FAILED" in row and "unsigned" in row


def test_wait_fails_for_a_device_that_never_answers(broker, tmp_path, capsys):
    status = cli(
        ["publish", "--broker", broker.url, "--device-ids", "esp32-0000000000ff", "--wait", "2"]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "esp32-0000000000ff  FAILED  no answer in 2s" in out


def test_the_demo_runs_to_completion(tmp_path, capsys, board_lane):
    assert run_demo(tmp_path / "demo", boards=2, lane=board_lane) == 0
    out = capsys.readouterr().out
    assert out.count("user_main v2 says hello") == 2
    # Step 6 (trial boots, issue 14): the broken user_main.py is rolled back by the
    # board itself and --wait says so.
    rolled = re.search(r"as expected: (esp32-[0-9a-f]{12}) rolled_back: \S", out)
    assert rolled, out
    assert re.search(rf"{rolled[1]}  FAILED  rolled_back: \S", out), out
    assert "demo finished in" in out
    # Signed with a keygen'd Ed25519 release key whose public half the boards hold.
    pub = (tmp_path / "demo" / "release.key.pub").read_text().strip()
    provision = json.loads((tmp_path / "demo" / "provision.json").read_text())
    assert provision == {"update.pubkey": pub}


def test_the_demo_runs_on_the_embedded_broker_without_mosquitto(tmp_path, capsys, board_lane):
    pytest.importorskip("amqtt")
    assert run_demo(tmp_path / "demo", boards=1, engine="amqtt", lane=board_lane) == 0
    out = capsys.readouterr().out
    assert "starting a local broker (embedded amqtt)" in out
    assert out.count("user_main v2 says hello") == 1


def test_status_shows_the_safe_mode_of_a_real_board_with_its_reason(
    boards, broker, tmp_path, board_lane, capsys
):
    # Issue 16: a user_main.py that raises showed `safe_mode` with `ok: user_main
    # failed 5 times in 60 s` (the app's error in the LAST UPDATE column).
    settings = tmp_path / "settings.json"
    app = {"crash_limit": 2, "restart_delay_ms": 50}
    mqtt_settings = {"server": broker.host, "port": broker.port}
    update = {"healthy_after_s": 1}
    settings.write_text(
        json.dumps({"mqtt": mqtt_settings, **NO_NTP, "app": app, "update": update})
    )
    user_main = tmp_path / "user_main.py"
    user_main.write_text(USER_MAIN.format(tag="v1"))
    rb = boards.start(boards.create(), heap=board_lane.heap, lane=board_lane)
    rb.wait_for(r"\[vboard\] boot 1")
    deploy.deploy_app(rb.serial_port, settings, None, user_main)
    # Then break user_main.py the way a user does (make deploy-user, then a reset).
    rb.wait_for("v1 running", timeout=60)
    user_main.write_text("async def user_main():\n    raise ValueError('broken')\n")
    deploy.deploy_user(rb.serial_port, user_main)
    deploy.mpremote(rb.serial_port, "reset")
    rb.wait_for("safe mode: user_main failed 2 times in 60 s", timeout=60)
    device = rb.board.device_id
    url = mqtt.BrokerURL(broker.host, broker.port)
    # The device publishes safe_mode right after it logs it: read until it is there.
    deadline = time.monotonic() + 20
    while {d.device_id: d.state for d in fleet.fetch(url)}.get(device) != "safe_mode":
        assert time.monotonic() < deadline, "no safe_mode status"
        time.sleep(0.1)
    capsys.readouterr()
    assert cli(["status", "--broker", broker.url]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith(device))
    cells = re.split(r"\s{2,}", row)
    assert cells[1] == "safe_mode: user_main failed 2 times in 60 s", row
    assert cells[5] == "-", row  # LAST UPDATE: none yet (a deploy is not one), not the error


def _state_of(url, device: str, want: str, limit: float = 30) -> None:
    # Reads the retained status until it is `want` (the broker's will, a boot's report).
    deadline = time.monotonic() + limit
    while {d.device_id: d.state for d in fleet.fetch(url)}.get(device) != want:
        assert time.monotonic() < deadline, f"{device} not {want} in {limit}s"
        time.sleep(0.2)


def test_a_board_mpremote_leaves_at_the_repl_is_offline_until_reset(
    boards, broker, tmp_path, board_lane, capsys
):
    # docs/vboard.md: as on hardware, mpremote leaves the board at its REPL (main.py
    # not running, off MQTT): `status` shows it offline until `mpremote reset`.
    settings = tmp_path / "settings.json"
    mqtt_settings = {"server": broker.host, "port": broker.port}
    settings.write_text(
        json.dumps({"mqtt": mqtt_settings, **NO_NTP, "update": {"healthy_after_s": 1}})
    )
    user_main = tmp_path / "user_main.py"
    user_main.write_text(USER_MAIN.format(tag="v1"))
    rb = boards.start(boards.create(), heap=board_lane.heap, lane=board_lane)
    rb.wait_for(r"\[vboard\] boot 1")
    deploy.deploy_app(rb.serial_port, settings, None, user_main)
    rb.wait_for("v1 running", timeout=60)
    device, url = rb.board.device_id, mqtt.BrokerURL(broker.host, broker.port)
    _state_of(url, device, "online")
    deploy.mpremote(rb.serial_port, "fs", "ls")
    _state_of(url, device, "offline")
    capsys.readouterr()
    assert cli(["status", "--broker", broker.url]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith(device))
    assert re.split(r"\s{2,}", row)[1] == "offline" and row.endswith(" -"), row
    deploy.mpremote(rb.serial_port, "reset")
    _state_of(url, device, "online")
