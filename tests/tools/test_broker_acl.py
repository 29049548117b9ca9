"""`mpy-blox broker --password-file`: the recipe's ACL and a packet size limit, on both engines.

Each test runs the broker as users run it (a process, `--engine mosquitto` and
`--engine amqtt`) and talks to it with real paho clients logged in as a device and as
the publisher (examples/mosquitto/mpypi.acl).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from mpy_blox_tools import broker as broker_module
from mpy_blox_tools.broker import free_port, wait_for_port
from mpy_blox_tools.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
DEVICE = "esp32-840d8ed29760"
OTHER = "esp32-000000000002"
PASSWORDS = {"publisher": "pub-secret", DEVICE: "dev-secret", OTHER: "other-secret"}
ENGINES = [
    pytest.param("mosquitto"),
    pytest.param(
        "amqtt",
        marks=pytest.mark.skipif(
            not broker_module.amqtt_installed(), reason="the embedded broker needs amqtt"
        ),
    ),
]


class BrokerProcess:
    """`mpy-blox broker --engine ENGINE --password-file F ...` on a free loopback port."""

    def __init__(self, directory: Path, engine: str, *args: str) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.log_file = directory / "broker.log"
        command = [sys.executable, "-m", "mpy_blox_tools.cli", "broker", "--engine", engine]
        command += ["--port", str(self.port), "--dir", str(directory / "b"), *args]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        assert wait_for_port(self.host, self.port, 15), self.log()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


@pytest.fixture
def password_file(tmp_path) -> Path:
    path = tmp_path / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        subprocess.run(
            ["mosquitto_passwd", "-b"] + ([] if i else ["-c"]) + [str(path), user, password],
            check=True,
        )
    return path


@pytest.fixture
def fleet_broker(request, tmp_path, password_file):
    made: list[BrokerProcess] = []

    def make(engine: str, *args: str) -> BrokerProcess:
        b = BrokerProcess(tmp_path, engine, "--password-file", str(password_file), *args)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


class Client:
    """A paho client logged in as `user`, keeping what reaches it."""

    def __init__(self, b: BrokerProcess, user: str, clean_session: bool = True, **kw) -> None:
        self.got: dict[str, bytes] = {}
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=kw.pop("client_id", f"t-{user}-{secrets.token_hex(3)}"),
            clean_session=clean_session,
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_message = lambda c, u, msg: self.got.__setitem__(msg.topic, msg.payload)
        self.client.on_connect = lambda c, u, f, reason, p: (
            self.__dict__.setdefault("reason", reason),
            self.connected.set(),
        )
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        if "will" in kw:
            self.client.will_set(*kw.pop("will"), qos=1, retain=True)
        self.client.connect(b.host, b.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def subscribe(self, topic_filter: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self.subscribed.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(b: BrokerProcess, topic_filter: str = "mpypi/#") -> dict[str, bytes]:
    """What the publisher sees retained under `topic_filter` (it may read everything)."""
    from mpy_blox_tools import mqtt

    client = mqtt.connect(mqtt.BrokerURL(b.host, b.port, False, "publisher", "pub-secret"))
    try:
        return mqtt.collect_retained(client, topic_filter)
    finally:
        mqtt.disconnect(client)


FORBIDDEN = (
    "mpypi/channels/stable",
    f"mpypi/packages/wheel/{'ab' * 32}",
    f"mpypi/packages/src/user_main.py/{'cd' * 32}",
    f"mpypi/nodes/{OTHER}/status",
    f"mpypi/nodes/{OTHER}/info",
    f"mpypi/nodes/{OTHER}/cmd",
    f"mpypi/nodes/{DEVICE}/cmd",  # its own commands come from the publisher only
)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_device_account_writes_its_own_info_and_status_and_nothing_else(fleet_broker, engine):
    b = fleet_broker(engine)
    dev = Client(b, DEVICE)
    for topic in FORBIDDEN:
        dev.publish(topic, b"evil")
    dev.publish(f"mpypi/nodes/{DEVICE}/info", b'{"device_id": "me"}')
    dev.publish(f"mpypi/nodes/{DEVICE}/status", b'{"state": "idle"}')
    dev.close()
    assert retained(b) == {
        f"mpypi/nodes/{DEVICE}/info": b'{"device_id": "me"}',
        f"mpypi/nodes/{DEVICE}/status": b'{"state": "idle"}',
    }, b.log()
    # The publisher may write everything.
    pub = Client(b, "publisher")
    for topic in FORBIDDEN:
        pub.publish(topic, topic.encode())
    pub.close()
    assert set(retained(b)) == set(FORBIDDEN) | {
        f"mpypi/nodes/{DEVICE}/info",
        f"mpypi/nodes/{DEVICE}/status",
    }


READABLE = {
    "mpypi/channels/stable",
    f"mpypi/packages/wheel/{'ab' * 32}",
    f"mpypi/packages/src/user_main.py/{'cd' * 32}",
    f"mpypi/nodes/{DEVICE}/cmd",
}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_device_reads_lists_packages_and_its_own_commands_retained_or_live(fleet_broker, engine):
    b = fleet_broker(engine)
    pub = Client(b, "publisher")
    for topic in FORBIDDEN:
        pub.publish(topic, b"retained")
    dev = Client(b, DEVICE)
    dev.subscribe("mpypi/#")
    # Live messages after the retained ones; the last one, readable, marks the end.
    for topic in sorted(set(FORBIDDEN) - READABLE) + sorted(READABLE):
        pub.client.publish(topic, b"live", qos=1).wait_for_publish(10)
    deadline = time.monotonic() + 10
    while dev.got.get(sorted(READABLE)[-1]) != b"live" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dev.got == {topic: b"live" for topic in READABLE}, b.log()
    dev.close()
    pub.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_device_coming_back_to_a_persistent_session_gets_no_other_retained_topics(
    fleet_broker, engine
):
    # amqtt 0.12 sends a returning persistent session the retained messages of every
    # client's subscriptions: the publisher's `mpypi/#` here.
    b = fleet_broker(engine)
    pub = Client(b, "publisher")
    for topic in FORBIDDEN:
        pub.publish(topic, b"retained")
    pub.subscribe("mpypi/#")
    dev = Client(b, DEVICE, clean_session=False, client_id=DEVICE)
    dev.subscribe(f"mpypi/nodes/{DEVICE}/cmd")
    dev.close()
    dev = Client(b, DEVICE, clean_session=False, client_id=DEVICE)
    dev.subscribe(f"mpypi/nodes/{DEVICE}/info")  # its SUBACK follows what the return sent
    dev.publish(f"mpypi/nodes/{DEVICE}/info", b"mine")
    deadline = time.monotonic() + 10
    while f"mpypi/nodes/{DEVICE}/info" not in dev.got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [topic for topic in dev.got if OTHER in topic], dev.got
    dev.close()
    pub.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_will_on_a_topic_the_device_may_not_write_is_never_published(fleet_broker, engine):
    b = fleet_broker(engine)
    evil = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="t-will")
    evil.username_pw_set(DEVICE, PASSWORDS[DEVICE])
    evil.will_set("mpypi/channels/stable", b"[]", qos=1, retain=True)
    codes = []
    evil.on_connect = lambda c, u, f, reason, p: codes.append(reason)
    evil.connect(b.host, b.port)
    evil.loop_start()
    deadline = time.monotonic() + 10
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)
    evil.loop_stop()
    assert codes, b.log()
    if not codes[0].is_failure:  # Mosquitto admits it, and drops the will when it fires
        evil.socket().close()  # vanish without DISCONNECT: the will fires
    # Then the device's own will (allowed), fired after: once it is there, the broker has
    # dealt with the first one.
    own = f"mpypi/nodes/{DEVICE}/status"
    ok = Client(b, DEVICE, will=(own, b'{"state": "offline"}'))
    assert not ok.reason.is_failure
    ok.client.loop_stop()
    ok.client.socket().close()
    deadline = time.monotonic() + 10
    while own not in (seen := retained(b)):
        assert time.monotonic() < deadline, b.log()
    assert seen == {own: b'{"state": "offline"}'}, b.log()


@pytest.mark.parametrize("engine", ENGINES)
def test_no_login_and_no_other_account_can_cut_a_device_off_with_its_client_id(
    fleet_broker, engine
):
    b = fleet_broker(engine)
    dev = Client(b, DEVICE, client_id=DEVICE)
    lost = threading.Event()
    dev.client.on_disconnect = lambda *a: lost.set()
    dev.subscribe(f"mpypi/nodes/{DEVICE}/cmd")
    # A stranger with a wrong password, then another device's account, both asking
    # for the device's client id with a clean session.
    stranger = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=DEVICE)
    stranger.username_pw_set(DEVICE, "guessed")
    answered = threading.Event()
    stranger.on_connect = lambda c, u, f, reason, p: answered.set()
    stranger.connect(b.host, b.port)
    stranger.loop_start()
    assert answered.wait(10)
    stranger.loop_stop()
    stranger.disconnect()
    Client(b, OTHER, client_id=DEVICE).close()
    # The device is still subscribed and connected: a live command reaches it.
    pub = Client(b, "publisher")
    pub.client.publish(f"mpypi/nodes/{DEVICE}/cmd", b"[]", qos=1).wait_for_publish(10)
    deadline = time.monotonic() + 10
    while f"mpypi/nodes/{DEVICE}/cmd" not in dev.got:
        assert time.monotonic() < deadline, b.log()
        time.sleep(0.02)
    assert not lost.is_set()
    pub.close()
    dev.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_packet_over_max_packet_size_ends_the_connection_and_is_not_kept(fleet_broker, engine):
    b = fleet_broker(engine, "--max-packet-size", "64K")
    pub = Client(b, "publisher")
    pub.publish("mpypi/packages/wheel/small", b"x" * (60 * 1024))
    lost = threading.Event()
    pub.client.on_disconnect = lambda *a: lost.set()
    pub.client.publish("mpypi/packages/wheel/big", b"x" * (65 * 1024), qos=1, retain=True)
    assert lost.wait(10), b.log()
    pub.close()
    assert set(retained(b, "mpypi/packages/#")) == {"mpypi/packages/wheel/small"}


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_broker_limits_and_acl_files_are_one_line_and_nothing_starts(
    engine, tmp_path, password_file, capsys
):
    args = ["broker", "--engine", engine, "--port", str(free_port()), "--dir", str(tmp_path / "b")]
    assert cli([*args, "--max-packet-size", "10"]) == 1
    assert "--max-packet-size 10: from 1024 to" in capsys.readouterr().err
    acl = tmp_path / "acl"
    acl.write_text("user publisher\ntopic readwrite mpypi/#\ntopik read mpypi/#\n")
    assert cli([*args, "--password-file", str(password_file), "--acl-file", str(acl)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{acl}:3: not an ACL line" in err, err
    assert cli([*args, "--acl-file", str(acl)]) == 1
    assert "--acl-file needs --password-file" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_patterns_never_grow_into_other_topics_through_a_user_name():
    from mpy_blox_tools.broker import recipe_acl
    from mpy_blox_tools.mosquitto_acl import load

    acl = load(recipe_acl())
    own = f"mpypi/nodes/{DEVICE}/status"
    assert acl.may_publish(DEVICE, DEVICE, own)
    assert not acl.may_publish(DEVICE, DEVICE, f"mpypi/nodes/{DEVICE}/cmd")
    # A user name with a wildcard or a level separator gets no pattern rights at all.
    for name in ("+", "#", f"{OTHER}/x", "esp32-+"):
        assert not acl.may_publish(name, name, f"mpypi/nodes/{name}/status")
        assert not acl.may_publish(name, name, f"mpypi/nodes/{OTHER}/status")
        assert not acl.may_receive(name, name, f"mpypi/nodes/{OTHER}/cmd")
    assert not acl.may_publish(None, "anon", own)  # no user: no %u
    assert acl.may_subscribe(DEVICE, DEVICE, "mpypi/#")  # delivery filters it
    assert not acl.may_subscribe(DEVICE, DEVICE, "other/#")


@pytest.mark.skipif(not broker_module.amqtt_installed(), reason="needs amqtt")
@pytest.mark.parametrize("chunking", ["as amqtt reads", "all at once", "byte by byte"])
@pytest.mark.parametrize("body", [126, 127, 128, 16383, 16384])
def test_the_embedded_brokers_reader_finds_each_packets_size_at_any_chunking(chunking, body):
    import asyncio

    from mpy_blox_tools.embedded_broker import LimitedReader

    def packet(n: int) -> bytes:
        length, remaining = bytearray(), n
        while True:
            byte, remaining = remaining & 0x7F, remaining >> 7
            length.append(byte | (0x80 if remaining else 0))
            if not remaining:
                return bytes([0x30, *length]) + b"x" * n

    ok, big = packet(body), packet(body + 1)
    limit = len(ok)

    class Inner:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def read(self, n: int = -1) -> bytes:
            n = len(self.data) if n < 0 else n
            out, self.data = self.data[:n], self.data[n:]
            return out

        def feed_eof(self) -> None:
            self.data = b""

    async def consume(stream: bytes) -> int:
        reader = LimitedReader(Inner(stream), limit, "test")
        total = 0
        if chunking == "all at once":
            return len(await reader.read(-1)) or -1
        while True:
            if chunking == "byte by byte":
                got = await reader.read(1)
            else:  # the fixed header a byte at a time, then the whole rest
                got = await reader.read(1 if reader.body == 0 else reader.body)
            if not got:
                return total if total == len(stream) else -1
            total += len(got)

    assert asyncio.run(consume(ok + ok)) == 2 * len(ok)
    assert asyncio.run(consume(ok + big)) == -1
