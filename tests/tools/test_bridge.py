"""examples/mosquitto-bridge: two Mosquittos bridged on mpypi/#, built from the example's
files. The publisher and `mpy-blox status` use the central broker, the boards log in on
the edge: the update converges on every board, and the central broker sees every board,
the will of one that stops included."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mpy_blox_tools import build, deploy, fleet, publish
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.mqtt import BrokerURL

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mosquitto-bridge"
RECIPE_ACL = REPO / "examples" / "mosquitto" / "mpypi.acl"
BOARDS = ("esp32-b41d9e000001", "esp32-b41d9e000002")
PUBLISHER = ("publisher", "pub-secret")
# An account on the edge that reads what the recipe's ACL lets any client read.
READER = ("t-reader", "reader-secret")
CHANNEL = "bridged"
# Lines of the example that name machine paths, listeners or TLS files; the test
# supplies its own (loopback listeners, no TLS, files in tmp_path).
MACHINE_SPECIFIC = (
    "listener",
    "certfile",
    "keyfile",
    "password_file",
    "acl_file",
    "persistence_location",
    "allow_anonymous",
    "bridge_cafile",
)
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)


def _config(name: str) -> list[list[str]]:
    """The example's lines, as words, comments and blank lines left out."""
    return [
        line.split()
        for line in (EXAMPLE / name).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _value(lines: list[list[str]], option: str) -> str:
    return next(words[1] for words in lines if words[0] == option)


def _passwd(path: Path, accounts: dict[str, str]) -> Path:
    for i, (user, password) in enumerate(accounts.items()):
        create = [] if i else ["-c"]
        subprocess.run(["mosquitto_passwd", "-b", *create, str(path), user, password], check=True)
    return path


def _machine(lines: list[list[str]], **replace: str) -> str:
    """The example as this machine runs it: its own files, `replace`d option values."""
    kept = []
    for words in lines:
        if words[0] in MACHINE_SPECIFIC:
            continue
        kept.append(f"{words[0]} {replace[words[0]]}" if words[0] in replace else " ".join(words))
    return "\n".join(kept)


def _retained(broker, topic: str, user: tuple[str, str] = PUBLISHER) -> bytes | None:
    """The retained message on `topic` (read as `user`), or None."""
    got: list[bytes] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}")
    c.username_pw_set(*user)

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        done.set()

    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.subscribe(topic, qos=1)
    done.wait(1.0)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


@pytest.fixture
def bridged(broker_factory, tmp_path):
    """(central, edge, edge account, board passwords): the example's brokers, the edge
    bridged to the central as its config says, its link up."""
    central_lines, edge_lines = _config("central.conf"), _config("edge.conf")
    edge_user = _value(edge_lines, "remote_username")
    accounts = {PUBLISHER[0]: PUBLISHER[1], edge_user: _value(edge_lines, "remote_password")}
    # The central's ACL is the recipe's with the example's bridge section, as its README says.
    central_acl = tmp_path / "central.acl"
    central_acl.write_text(RECIPE_ACL.read_text() + (EXAMPLE / "bridge.acl").read_text())
    central = broker_factory(
        _machine(central_lines)
        + f"\npassword_file {_passwd(tmp_path / 'central.passwd', accounts)}"
        + f"\nacl_file {central_acl}",
        allow_anonymous=False,
    )
    # The edge: its boards' accounts and the recipe's ACL; then the bridge section, last
    # (Mosquitto reads the options after `connection` as the bridge's).
    board_accounts = {d: f"pw-{d}" for d in BOARDS}
    edge_accounts = {**board_accounts, READER[0]: READER[1]}
    bridge_at = next(i for i, words in enumerate(edge_lines) if words[0] == "connection")
    edge = broker_factory(
        _machine(edge_lines[:bridge_at])
        + f"\npassword_file {_passwd(tmp_path / 'edge.passwd', edge_accounts)}"
        + f"\nacl_file {RECIPE_ACL}\n"
        + _machine(edge_lines[bridge_at:], address=f"{central.host}:{central.port}"),
        allow_anonymous=False,
    )
    # The bridge's notification (retained, on both sides) says when the link is up.
    state = _value(edge_lines, "notification_topic")
    deadline = time.monotonic() + 20
    while _retained(central, state) != b"1":
        assert time.monotonic() < deadline, f"the bridge did not connect:\n{edge.log()}"
        time.sleep(0.2)
    return central, edge, edge_user, board_accounts


def test_an_update_published_on_the_central_broker_reaches_boards_on_the_edge(
    bridged, boards, board_lane, tmp_path, monkeypatch, capsys
):
    central, edge, edge_user, passwords = bridged
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)
    key = secrets.token_hex(32)
    (tmp_path / "key").write_text(key)
    wheel = build.build(platform="esp32")
    user_main = tmp_path / "user_main.py"
    user_main.write_text(USER_MAIN.format(tag="v1"))
    running = {}
    for device in BOARDS:
        # As a user sets a board up: its id as user name, on the edge broker.
        settings = tmp_path / f"settings-{device}.json"
        mqtt_settings = {"server": edge.host, "port": edge.port, "username": device}
        update = {"channel": CHANNEL, "auto_update": True, "healthy_after_s": 1}
        settings.write_text(json.dumps({"mqtt": mqtt_settings, "update": update}))
        provision = tmp_path / f"provision-{device}.json"
        provision.write_text(json.dumps({"mqtt.password": passwords[device], "update.key": key}))
        rb = boards.start(boards.create(device_id=device), heap=board_lane.heap, lane=board_lane)
        rb.wait_for(r"\[vboard\] boot 1")
        deploy.deploy_app(rb.serial_port, settings, provision, user_main, wheel_path=wheel)
        running[device] = rb
    for rb in running.values():
        rb.wait_for("v1 running", timeout=60)

    # The release, on the central broker only, followed there (--wait) to the end.
    user_main.write_text(USER_MAIN.format(tag="v2"))
    central_url = f"mqtt://{PUBLISHER[0]}:{PUBLISHER[1]}@{central.host}:{central.port}"
    published = cli(
        [
            "publish", "--broker", central_url, "--channel", CHANNEL, "--wheel", str(wheel),
            "--key-file", "key", "--extra-src-files", "user_main.py", "--wait", "120",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert published == 0, out + edge.log()
    for rb in running.values():
        rb.wait_for("v2 running", timeout=60)
    sha = re.search(r"user_main\.py.*-> mpypi/packages/src/user_main\.py/([0-9a-f]{64})", out)
    assert sha, out
    # The list and the package are retained on the edge too (a board that boots while
    # the link is down finds them there): they crossed the bridge with their retain flag.
    # (Read with an account of its own: a board's would knock the board off the edge.)
    assert _retained(edge, f"mpypi/channels/{CHANNEL}", READER)
    assert _retained(edge, f"mpypi/packages/src/user_main.py/{sha[1]}", READER)

    # `status` on the central broker: every board, its trial confirmed (the retained
    # status goes from trial to ok a moment after --wait has seen the new versions).
    url = BrokerURL(central.host, central.port, False, *PUBLISHER)
    deadline = time.monotonic() + 30
    while {d.device_id: d.state for d in fleet.fetch(url)} != dict.fromkeys(BOARDS, "ok"):
        assert time.monotonic() < deadline, fleet.fetch(url)
        time.sleep(0.2)
    assert cli(["status", "--broker", central_url, "--json"]) == 0
    devices = {d["device_id"]: d for d in json.loads(capsys.readouterr().out)}
    for device in BOARDS:
        assert devices[device]["info"]["src"] == {"user_main.py": sha[1]}, devices[device]
        assert devices[device]["channel"] == CHANNEL, devices[device]

    # A board that stops: its will fires on the edge and crosses to the central broker.
    gone = BOARDS[1]
    running[gone].stop()
    deadline = time.monotonic() + 30
    while {d.device_id: d.state for d in fleet.fetch(url)}.get(gone) != "offline":
        assert time.monotonic() < deadline, f"no offline will on the central broker for {gone}"
        time.sleep(0.2)
    assert cli(["status", "--broker", central_url]) == 0
    rows = {r.split()[0]: re.split(r"\s{2,}", r) for r in capsys.readouterr().out.splitlines()}
    assert rows[gone][1] == "offline", rows
    assert rows[BOARDS[0]][1] != "offline", rows
    # The bridge logged in on the central broker with the edge's account (bridge.acl).
    assert f"u'{edge_user}'" in central.log()


def _login(broker, user: tuple[str, str], will: tuple[str, bytes] | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user[0])
    c.username_pw_set(*user)
    if will:
        c.will_set(*will, qos=1, retain=True)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _wait_retained(broker, topic: str, want: bytes, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while (got := _retained(broker, topic)) != want:
        assert time.monotonic() < deadline, f"{topic}: {got!r}, not {want!r}"
        time.sleep(0.2)


def test_a_will_fired_while_the_link_is_down_reaches_the_central_broker_when_it_is_back(
    bridged,
):
    # The edge sends what changed while the central broker was away (its retained
    # messages cross again when the link is back): a board's will, here.
    central, edge, _, passwords = bridged
    device = BOARDS[0]
    status = f"mpypi/nodes/{device}/status"
    board = _login(edge, (device, passwords[device]), (status, b'{"state": "offline"}'))
    board.publish(status, b'{"state": "online"}', qos=1, retain=True).wait_for_publish(5)
    _wait_retained(central, status, b'{"state": "online"}')
    # No loop: one publish on the central broker is delivered there once.
    seen: list[bytes] = []
    watcher = _login(central, PUBLISHER)
    watcher.on_message = lambda c, u, msg: seen.append(msg.payload)
    watcher.subscribe(f"mpypi/nodes/{device}/cmd", qos=1)
    time.sleep(0.3)
    watcher.publish(f"mpypi/nodes/{device}/cmd", b"[]", qos=1).wait_for_publish(5)
    time.sleep(1)
    watcher.loop_stop()
    watcher.disconnect()
    assert seen == [b"[]"]

    central.stop()
    board.socket().close()  # the board dies: no DISCONNECT, the edge sends its will
    board.loop_stop()
    central.start()  # the same port and store: still `online` there until the link is back
    _wait_retained(central, status, b'{"state": "offline"}')
