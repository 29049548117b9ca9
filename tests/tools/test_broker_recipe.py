"""examples/mosquitto: a device's credentials cannot push code; the publisher's can;
a board configured as a user does it logs in with its own id and installs an update."""

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
from sntp_server import NO_NTP

from mpy_blox_tools import deploy, micropython, publish
from mpy_blox_tools.mqtt import BrokerURL

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "mosquitto"
DEVICE = "esp32-840d8ed29760"
OTHER = "esp32-000000000002"
PASSWORDS = {"publisher": "pub-secret", DEVICE: "dev-secret", OTHER: "other"}
# The install boot's board heap on the 64-bit lane (docs/protocol.md).
HEAP = micropython.BOARD_HEAP_64
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)
# Lines of the recipe that name machine paths or listeners; the test supplies its own.
MACHINE_SPECIFIC = (
    "listener",
    "certfile",
    "keyfile",
    "password_file",
    "acl_file",
    "persistence_location",
)


@pytest.fixture
def fleet_broker(broker_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        subprocess.run(
            ["mosquitto_passwd", "-b"] + ([] if i else ["-c"]) + [str(pwfile), user, password],
            check=True,
        )
    lines = [
        line.split()
        for line in (RECIPE / "mosquitto.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept = [" ".join(w) for w in lines if w[0] not in MACHINE_SPECIFIC + ("allow_anonymous",)]
    # The broker's own config sets allow_anonymous: pass it the recipe's value.
    anonymous = ["allow_anonymous", "true"] in lines
    extra = "\n".join(kept + [f"password_file {pwfile}", f"acl_file {RECIPE / 'mpypi.acl'}"])
    return broker_factory(extra, allow_anonymous=anonymous)


def _client(broker, user, password):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{id(broker)}")
    c.username_pw_set(user, password)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _retained(broker, topic) -> bytes | None:
    c = _client(broker, "publisher", "pub-secret")
    got: list[bytes] = []
    done = threading.Event()

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        done.set()

    c.on_message = on_message
    c.subscribe(topic, qos=1)
    done.wait(1.0)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def test_a_device_cannot_publish_lists_packages_or_another_devices_status(fleet_broker):
    dev = _client(fleet_broker, DEVICE, "dev-secret")
    for topic in (
        "mpypi/channels/stable",
        f"mpypi/packages/wheel/{'ab' * 32}",
        f"mpypi/packages/src/user_main.py/{'cd' * 32}",
        "mpypi/nodes/esp32-000000000002/status",
        "mpypi/nodes/esp32-000000000002/cmd",
    ):
        dev.publish(topic, b"evil", qos=1, retain=True).wait_for_publish(5)
        assert _retained(fleet_broker, topic) is None, topic
    dev.publish(
        f"mpypi/nodes/{DEVICE}/status", b'{"state": "idle"}', qos=1, retain=True
    ).wait_for_publish(5)
    assert _retained(fleet_broker, f"mpypi/nodes/{DEVICE}/status") == b'{"state": "idle"}'
    dev.loop_stop()
    dev.disconnect()


def test_a_device_reads_lists_packages_and_only_its_own_commands(fleet_broker):
    pub = _client(fleet_broker, "publisher", "pub-secret")
    for topic in (
        "mpypi/channels/stable",
        f"mpypi/nodes/{DEVICE}/cmd",
        "mpypi/nodes/esp32-000000000002/cmd",
        f"mpypi/packages/wheel/{'ab' * 32}",
    ):
        pub.publish(topic, topic.encode(), qos=1, retain=True).wait_for_publish(5)
    dev = _client(fleet_broker, DEVICE, "dev-secret")
    got: dict[str, bytes] = {}
    dev.on_message = lambda c, u, msg: got.__setitem__(msg.topic, msg.payload)
    dev.subscribe("mpypi/#", qos=1)
    deadline = threading.Event()
    deadline.wait(1.0)
    assert set(got) == {
        "mpypi/channels/stable",
        f"mpypi/nodes/{DEVICE}/cmd",
        f"mpypi/packages/wheel/{'ab' * 32}",
    }
    for c in (dev, pub):
        c.loop_stop()
        c.disconnect()


def test_anonymous_clients_are_refused(fleet_broker):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    result = {}
    done = threading.Event()
    c.on_connect = lambda client, u, f, reason, p: (result.setdefault("r", reason), done.set())
    c.connect(fleet_broker.host, fleet_broker.port)
    c.loop_start()
    done.wait(5)
    c.loop_stop()
    assert result["r"].is_failure


def test_an_account_reusing_a_devices_client_id_does_not_knock_it_off(fleet_broker):
    # The device connects as it does: its id as client id and as user name.
    lost = threading.Event()
    got = threading.Event()
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE)
    dev.username_pw_set(DEVICE, PASSWORDS[DEVICE])
    dev.on_disconnect = lambda *a: lost.set()
    dev.on_message = lambda c, u, msg: got.set()
    subscribed = threading.Event()
    dev.on_subscribe = lambda *a: subscribed.set()
    dev.connect(fleet_broker.host, fleet_broker.port)
    dev.loop_start()
    dev.subscribe(f"mpypi/nodes/{DEVICE}/cmd", qos=1)
    assert subscribed.wait(5)
    # Another account asks for the same client id: Mosquitto gives it its own name.
    other = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE)
    other.username_pw_set(OTHER, PASSWORDS[OTHER])
    accepted = threading.Event()
    other.on_connect = lambda c, u, f, reason, p: not reason.is_failure and accepted.set()
    other.connect(fleet_broker.host, fleet_broker.port)
    other.loop_start()
    assert accepted.wait(5)
    # The device is still there: a (not retained) command reaches it.
    pub = _client(fleet_broker, "publisher", "pub-secret")
    pub.publish(f"mpypi/nodes/{DEVICE}/cmd", b"[]", qos=1).wait_for_publish(5)
    assert got.wait(5), fleet_broker.log()
    assert not lost.is_set()
    for c in (pub, other, dev):
        c.loop_stop()
        c.disconnect()


class _Watcher:
    """A paho client logged in as `user`, collecting what reaches it on `topic_filter`."""

    def __init__(self, broker, user: str, topic_filter: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.client = _client(broker, user, PASSWORDS[user])
        self.client.on_message = lambda c, u, msg: self.got.append((msg.topic, msg.payload))
        self.client.subscribe(topic_filter, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _logins(broker, user: str) -> int:
    """How many times Mosquitto accepted a client logging in with user name `user`."""
    return len(re.findall(rf"New client connected from .* u'{re.escape(user)}'\)", broker.log()))


def test_a_board_logs_in_as_its_id_reports_and_installs_a_signed_update(
    fleet_broker, boards, tmp_path, monkeypatch
):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)  # the framework wheel is built into ./dist
    key = secrets.token_hex(32)
    # As a user sets a device up: its id as user name in settings.json, the password
    # and the update key in provision.json, then make deploy-app.
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "mqtt": {
                    "server": fleet_broker.host,
                    "port": fleet_broker.port,
                    "username": DEVICE,
                },
                **NO_NTP,
                "update": {"channel": "recipe", "auto_update": True, "healthy_after_s": 1},
            }
        )
    )
    provision = tmp_path / "provision.json"
    provision.write_text(json.dumps({"mqtt.password": PASSWORDS[DEVICE], "update.key": key}))
    user_main = tmp_path / "user_main.py"
    user_main.write_text(USER_MAIN.format(tag="v1"))
    board = boards.create(device_id=DEVICE)
    rb = boards.start(board, heap=HEAP)
    rb.wait_for(r"\[vboard\] boot 1")
    deploy.deploy_app(rb.serial_port, settings, provision, user_main)
    # Into the secure store over the REPL, before the reset into the app.
    rb.wait_for("mpy-blox-deploy: provisioned mqtt.password, update.key", timeout=30)
    rb.wait_for("v1 running", timeout=60)
    assert _logins(fleet_broker, DEVICE) == 1, fleet_broker.log()

    # The publisher reads what the device reports about itself.
    info = json.loads(_retained(fleet_broker, f"mpypi/nodes/{DEVICE}/info"))
    assert info["device_id"] == DEVICE and info["channel"] == "recipe"
    assert json.loads(_retained(fleet_broker, f"mpypi/nodes/{DEVICE}/status"))["state"] in (
        "online",
        "idle",
    )

    # Another device's credentials see nothing of this device's topics, its command
    # included, and cannot overwrite its status.
    other = _Watcher(fleet_broker, OTHER, f"mpypi/nodes/{DEVICE}/#")
    try:
        (tmp_path / "user_main.py").write_text(USER_MAIN.format(tag="v2"))
        done = publish.publish_update(
            BrokerURL(fleet_broker.host, fleet_broker.port, False, "publisher", "pub-secret"),
            [publish.src_package(tmp_path / "user_main.py")],
            device_ids=(DEVICE,),
            key=key.encode(),
        )
        assert done.list_topics == [f"mpypi/nodes/{DEVICE}/cmd"]
        package_topic = done.entries[0]["pkg_sha256"]
        rb.wait_for("v2 running", timeout=60)
        # Its trial confirmed (update.healthy_after_s 1): its status stays put now.
        deadline = time.monotonic() + 30
        own = _retained(fleet_broker, f"mpypi/nodes/{DEVICE}/status")
        while json.loads(own)["state"] != "ok":
            assert time.monotonic() < deadline, own
            time.sleep(0.1)
            own = _retained(fleet_broker, f"mpypi/nodes/{DEVICE}/status")
        other.client.publish(
            f"mpypi/nodes/{DEVICE}/status", b'{"state": "failed"}', qos=1, retain=True
        ).wait_for_publish(5)
        assert _retained(fleet_broker, f"mpypi/nodes/{DEVICE}/status") == own
        assert json.loads(own)["state"] == "ok"
        assert other.got == []
    finally:
        other.close()

    # The device fetched the list and the package with its own login: the app boot,
    # the install boot (to download, and again to report) and the app boot again.
    assert _logins(fleet_broker, DEVICE) == 4, fleet_broker.log()
    info = json.loads(_retained(fleet_broker, f"mpypi/nodes/{DEVICE}/info"))
    assert info["last_update"]["result"] == "ok", info
    assert info["src"]["user_main.py"] == package_topic
    console = rb.console()
    assert "refused" not in console and PASSWORDS[DEVICE] not in console

    # The secret left the flash: provision.json is gone, settings.json never had it.
    rb.stop()
    assert "provision.json" not in board.ls()
    kept = board.cat("settings.json").decode()
    assert PASSWORDS[DEVICE] not in kept and "password" not in kept
    assert PASSWORDS[DEVICE] not in (board.dir / "nvs.json").read_text()  # encrypted there


def test_a_board_with_a_wrong_password_says_so_and_keeps_retrying(
    fleet_broker, boards, runtime_mpy
):
    # The app without the update agent, compiled as a device gets it: compiling the
    # sources on the board after ingesting provision.json needs about 101K on the
    # 64-bit port, and the board reset once for a MemoryError depending on how long
    # its paths were (docs/runtime.md).
    settings = {
        "mqtt": {
            "server": fleet_broker.host,
            "port": fleet_broker.port,
            "username": OTHER,
            "wait_s": 2,
        },
        **NO_NTP,
    }
    board = boards.create(
        device_id=OTHER,
        files={
            "main.py": (REPO / "main.py").read_text(),
            "mpypi_recover.py": (REPO / "mpypi_recover.py").read_text(),
            "settings.json": json.dumps(settings),
            "provision.json": json.dumps({"mqtt.password": "not-" + PASSWORDS[OTHER]}),
            "user_main.py": USER_MAIN.format(tag="app"),
        },
    )
    board.put_tree(runtime_mpy, "lib/mpy_blox")
    # The 64-bit lane's equivalent of an ESP32's 100K (heap figures are the 32-bit
    # lane's): at 100K there, a first boot that ingests provision.json is on the edge.
    rb = boards.start(board, heap=micropython.format_size(micropython.BOARD_HEAP_64))
    refused = (
        r"mqtt: connecting to [\d.]+:\d+ failed \(ConnectError: connection refused: "
        r"(not authori[sz]ed|bad user name or password) "
        r"\(check mqtt\.username, mqtt\.password\)\)"
    )
    rb.wait_for(refused, count=3, timeout=30)
    rb.wait_for("app running")  # user code runs without MQTT
    assert rb.boots() == 1  # no crash, no reset
    assert "not-" + PASSWORDS[OTHER] not in rb.console()
    assert _logins(fleet_broker, OTHER) == 0
    # Mosquitto 2.0 names no client it refused: "Client <unknown> disconnected, not authorised."
    # Its log may trail the board's by a moment (the third refusal's line).
    deadline = time.monotonic() + 10
    while len(re.findall(r"disconnected, not authori[sz]ed", fleet_broker.log())) < 3:
        assert time.monotonic() < deadline, fleet_broker.log()[-2000:]
        time.sleep(0.1)
