"""examples/mosquitto: a device's credentials cannot push code; the publisher's can."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "mosquitto"
DEVICE = "esp32-840d8ed29760"
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
    for i, (user, password) in enumerate(
        [("publisher", "pub-secret"), (DEVICE, "dev-secret"), ("esp32-000000000002", "other")]
    ):
        subprocess.run(
            ["mosquitto_passwd", "-b"] + ([] if i else ["-c"]) + [str(pwfile), user, password],
            check=True,
        )
    kept = [
        line
        for line in (RECIPE / "mosquitto.conf").read_text().splitlines()
        if line.strip()
        and not line.startswith("#")
        and line.split()[0] not in MACHINE_SPECIFIC
        and line.split()[0] != "allow_anonymous"
    ]
    extra = "\n".join(kept + [f"password_file {pwfile}", f"acl_file {RECIPE / 'mpypi.acl'}"])
    return broker_factory(extra, allow_anonymous=False)


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
