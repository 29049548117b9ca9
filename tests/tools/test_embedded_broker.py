"""`mpy-blox broker --engine amqtt`: the embedded broker, run as users run it (a process).

Retained messages survive a restart byte for byte, an empty payload clears a topic for
good, a Mosquitto password file admits its users only, a 4 MiB package passes at QoS 1,
and a virtual board boots, reports, installs an update and goes offline through it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from sntp_server import NO_NTP

from mpy_blox_tools import broker as broker_module
from mpy_blox_tools import deploy, fleet, micropython, mqtt, publish
from mpy_blox_tools.broker import INSTALL_HINT, free_port, wait_for_port
from mpy_blox_tools.cli import main as cli

pytest.importorskip("amqtt", reason="the embedded broker needs the broker extra")

REPO = Path(__file__).resolve().parents[2]
HEAP = micropython.BOARD_HEAP_64  # the install boot's, on this 64-bit lane behaviour test
USER_MAIN = (
    "import asyncio\n\nasync def user_main():\n"
    "    print('{tag} running')\n    await asyncio.sleep(3600)\n"
)


class EmbeddedBroker:
    """`mpy-blox broker --engine amqtt` as a subprocess on a free loopback port."""

    def __init__(self, directory: Path, *extra_args: str) -> None:
        self.dir = directory
        self.host = "127.0.0.1"
        self.port = free_port()
        self.url = f"mqtt://{self.host}:{self.port}"
        self.log_file = directory.with_suffix(".log")
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    def start(self) -> EmbeddedBroker:
        command = [sys.executable, "-m", "mpy_blox_tools.cli", "broker", "--engine", "amqtt"]
        command += ["--port", str(self.port), "--dir", str(self.dir), *self.extra_args]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        assert wait_for_port(self.host, self.port, 15), self.log()
        return self

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Stop it with `signum`; its exit status."""
        assert self.process
        self.process.send_signal(signum)
        status = self.process.wait(timeout=15)
        self.process = None
        return status

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@pytest.fixture
def embedded(tmp_path):
    made: list[EmbeddedBroker] = []

    def make(*extra_args: str) -> EmbeddedBroker:
        b = EmbeddedBroker(tmp_path / f"broker{len(made)}", *extra_args)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        if b.process:
            b.process.kill()
            b.process.wait()


def _client(b: EmbeddedBroker, **kwargs) -> paho.Client:
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}", **kwargs
    )
    c.connect(b.host, b.port)
    c.loop_start()
    return c


def _publish_retained(b: EmbeddedBroker, messages: dict[str, bytes]) -> None:
    c = _client(b)
    for topic, payload in messages.items():
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


def _retained(b: EmbeddedBroker, topic_filter: str, quiet: float = 0.5) -> dict[str, bytes]:
    """Every retained message under `topic_filter`, as a new subscriber sees them."""
    got: dict[str, bytes] = {}
    last = [time.monotonic()]

    def on_message(client, userdata, msg):
        if msg.retain:
            got[msg.topic] = msg.payload
            last[0] = time.monotonic()

    c = _client(b)
    c.on_message = on_message
    c.subscribe(topic_filter, qos=1)
    while time.monotonic() - last[0] < quiet:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    return got


def test_retained_messages_come_back_byte_for_byte_after_a_restart(embedded):
    b = embedded()
    assert (b.dir / "retained").is_dir()  # where its first line says they are kept
    messages = {
        f"mpypi/packages/wheel/{'ab' * 32}": os.urandom(2**20 + 1),
        "mpypi/channels/stable": json.dumps({"seq": 7}).encode(),
        "mpypi/nodes/esp32-000000000001/info": b'{"framework": "0.1.0"}',
        "odd/tópico/with spaces": b"\x00\xff" * 64,
    }
    _publish_retained(b, messages)
    assert b.stop(signal.SIGTERM) == 0
    assert "broker stopped; retained messages saved" in b.log()
    b.start()
    assert _retained(b, "#") == messages
    assert "restored 4 retained messages" in b.log()


def test_an_empty_retained_payload_clears_the_topic_across_restarts(embedded):
    b = embedded()
    _publish_retained(b, {"t/keep": b"kept", "t/gone": b"soon cleared"})
    _publish_retained(b, {"t/gone": b""})
    assert _retained(b, "t/#") == {"t/keep": b"kept"}
    assert b.stop(signal.SIGINT) == 0  # Ctrl-C saves too
    b.start()
    assert _retained(b, "t/#") == {"t/keep": b"kept"}
    assert len(list((b.dir / "retained").iterdir())) == 1


def test_a_write_cut_short_by_a_crash_is_dropped_and_the_old_message_kept(tmp_path):
    from mpy_blox_tools.retained_store import RetainedStore

    store = RetainedStore(tmp_path)
    store.put("a/b", b"old", 1)
    # What a crash between writing and renaming leaves behind.
    leftover = store.path_for("a/b").with_name(store.path_for("a/b").name + ".tmp")
    leftover.write_bytes(b"MBR1\x01\x00\x03a/bnew, but half")
    assert list(store.load()) == [("a/b", b"old", 1)]
    assert not leftover.exists()


def test_a_new_client_gets_no_retained_message_for_filters_only_others_hold(embedded):
    # amqtt 0.12 sends a client, as it connects, the retained messages of every
    # filter *any* client holds; Mosquitto sends none before a SUBSCRIBE.
    b = embedded()
    _publish_retained(b, {"other/secret": b"not for you", "mine/x": b"yours"})
    holder = _client(b)
    holder.subscribe("other/#", qos=1)
    time.sleep(0.5)
    got: list[str] = []
    c = _client(b)
    c.on_message = lambda client, userdata, msg: got.append(msg.topic)
    time.sleep(1)
    assert got == []
    assert mqtt.collect_retained(c, "mine/#", limit=10) == {"mine/x": b"yours"}
    assert got == []  # (collect_retained's own callback took mine/x)
    for client in (c, holder):
        client.loop_stop()
        client.disconnect()


def test_clients_connecting_while_another_subscribes_all_get_their_answers(embedded):
    # amqtt 0.12 walks every client's filters as a client connects, yielding between
    # them; a SUBSCRIBE meanwhile changed the dict under it and that client's session
    # died after its CONNACK: connected, and never answered again (`mpy-blox status`
    # hung for its whole limit in the demo, now and then).
    b = embedded()
    _publish_retained(b, {f"fleet/{i}/info": b"{}" for i in range(40)})
    stop = threading.Event()

    def subscribe_and_unsubscribe():
        c = _client(b)
        i = 0
        while not stop.is_set():
            c.subscribe(f"fleet/{i % 40}/#", qos=0)
            time.sleep(0.002)
            i += 1
        c.loop_stop()
        c.disconnect()

    churn = threading.Thread(target=subscribe_and_unsubscribe)
    churn.start()
    try:
        for _ in range(25):
            url = mqtt.BrokerURL.parse(b.url)
            c = mqtt.connect(url)
            try:
                assert len(mqtt.collect_retained(c, "fleet/+/info", limit=10)) == 40
            finally:
                mqtt.disconnect(c)
    finally:
        stop.set()
        churn.join()
    assert "changed size during iteration" not in b.log()


def test_a_4_mib_package_reaches_a_qos_1_persistent_subscriber_that_was_away(embedded):
    b = embedded()
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        arrived.set()

    # Subscribe with a persistent session (clean session false), go away, come back.
    device = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id="esp32-persistent", clean_session=False
    )
    subscribed = threading.Event()
    device.on_subscribe = lambda *args: subscribed.set()
    device.connect(b.host, b.port, keepalive=5)
    device.loop_start()
    device.subscribe("mpypi/packages/#", qos=1)
    assert subscribed.wait(10)  # the SUBACK: the broker holds the subscription
    device.loop_stop()
    device.disconnect()
    package = os.urandom(4 * 2**20)
    _publish_retained(b, {"mpypi/packages/wheel/big": package})
    device.on_message = on_message
    device.reconnect()
    device.loop_start()
    assert arrived.wait(15)
    device.loop_stop()
    device.disconnect()
    assert got[0] == package
    assert _retained(b, "mpypi/packages/#") == {"mpypi/packages/wheel/big": package}


def test_a_mosquitto_password_file_admits_its_users_and_no_one_else(embedded, tmp_path):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", passwords, "pbkdf2", "s3cret"], check=True)
    subprocess.run(
        ["mosquitto_passwd", "-H", "sha512", "-b", passwords, "sha512", "0ld"], check=True
    )
    b = embedded("--password-file", str(passwords))

    def connect(user: str | None, password: str | None) -> int:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{user}")
        if user:
            c.username_pw_set(user, password)
        codes = []
        c.on_connect = lambda client, userdata, flags, rc, props: codes.append(rc)
        try:
            c.connect(b.host, b.port)
            c.loop_start()
            deadline = time.monotonic() + 5
            while not codes and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            c.loop_stop()
            c.disconnect()
        return int(codes[0].value) if codes else -1

    assert connect("pbkdf2", "s3cret") == 0
    assert connect("sha512", "0ld") == 0
    assert connect("pbkdf2", "wrong") != 0
    assert connect("nobody", "s3cret") != 0
    assert connect(None, None) != 0


def test_a_password_file_it_cannot_read_is_refused_in_one_line(tmp_path, capsys):
    plain = tmp_path / "passwd"
    plain.write_text("alice:plain-text-password\n")
    args = ["broker", "--engine", "amqtt", "--port", str(free_port()), "--dir", str(tmp_path)]
    assert cli([*args, "--password-file", str(plain)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "passwd:1: not a mosquitto_passwd hash" in err


@pytest.mark.parametrize("engine", ["mosquitto", "amqtt"])
def test_a_taken_or_impossible_port_is_refused_before_any_broker_starts(engine, tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["broker", "--engine", engine, "--dir", str(tmp_path / "b"), "--port"]
        assert cli([*args, str(port)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"127.0.0.1:{port} is taken" in err and "is a broker running there" in err
    assert cli([*args, "99999"]) == 1
    err = capsys.readouterr().err
    assert err == "mpy-blox: --port 99999: a TCP port is 1 to 65535 (MQTT's is 1883)\n"
    assert not (tmp_path / "b").exists()  # nothing started, nothing made


def test_engine_mosquitto_without_mosquitto_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    assert cli(["broker", "--engine", "mosquitto", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"mpy-blox: {INSTALL_HINT}\n"


def test_no_broker_at_all_names_both_ways_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    monkeypatch.setattr(broker_module, "amqtt_installed", lambda: False)
    assert cli(["broker", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install mosquitto" in err
    assert "mpy-blox-tools[broker]" in err


def test_a_virtual_board_reports_installs_an_update_and_its_will_fires_via_amqtt(
    embedded, boards, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)
    b = embedded()
    key = secrets.token_hex(32)
    (tmp_path / "key").write_text(key)
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "mqtt": {"server": b.host, "port": b.port},
                **NO_NTP,
                "update": {"channel": "t-amqtt", "auto_update": True, "healthy_after_s": 1},
            }
        )
    )
    (tmp_path / "provision.json").write_text(json.dumps({"update.key": key}))
    (tmp_path / "user_main.py").write_text(USER_MAIN.format(tag="v1"))
    rb = boards.start(boards.create(), heap=HEAP)
    rb.wait_for(r"\[vboard\] boot 1")
    deploy.deploy_app(
        rb.serial_port, settings, tmp_path / "provision.json", tmp_path / "user_main.py"
    )
    rb.wait_for("v1 running", timeout=60)
    device = rb.board.device_id
    info = _retained(b, f"mpypi/nodes/{device}/info", quiet=2)
    assert json.loads(info[f"mpypi/nodes/{device}/info"])["device_id"] == device

    (tmp_path / "user_main.py").write_text(USER_MAIN.format(tag="v2"))
    status = cli(
        [
            "publish",
            "--broker",
            b.url,
            "--key-file",
            "key",
            "--dev",
            "--device-ids",
            device,
            "--extra-src-files",
            "user_main.py",
            "--wait",
            "120",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out + b.log()
    rb.wait_for("v2 running", timeout=60)
    devices = {d.device_id: d for d in fleet.fetch(mqtt.BrokerURL(b.host, b.port))}
    assert ".dev" in devices[device].framework and devices[device].last_update == "ok"
    # Power off: the link dies without a DISCONNECT and the broker publishes the will.
    rb.stop()
    status_topic = f"mpypi/nodes/{device}/status"
    deadline = time.monotonic() + 10
    while json.loads(_retained(b, status_topic).get(status_topic, b"{}")).get("state") != (
        "offline"
    ):
        assert time.monotonic() < deadline, b.log()
