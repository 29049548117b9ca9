"""Publishing through brokers with a size limit: chunks sized to the broker, every
message checked before the first is sent, a broker that hangs up said clearly, and
MQTT 5 message expiry on packages (issue 15)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mpy_blox import topics
from mpy_blox.update import manifest
from mpy_blox_tools import chunks, fit, mqtt, publish
from mpy_blox_tools.broker import EmbeddedBroker, Mosquitto, amqtt_installed
from mpy_blox_tools.cli import main as cli
from mpy_blox_tools.errors import MpyBloxError

KEY = "k" * 64
LIMIT = 131072  # AWS IoT Core's 128 KB, as a Mosquitto max_packet_size


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "STATE_DIR", tmp_path / "state")
    monkeypatch.chdir(tmp_path)  # no settings.json here: defaults apply
    (tmp_path / "key").write_text(KEY + "\n")
    return tmp_path / "state"


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A Mosquitto that refuses packets over 128 KiB (and says so to MQTT 5 clients)."""
    with Mosquitto(
        tmp_path_factory.mktemp("limited"), extra_config=f"max_packet_size {LIMIT}"
    ) as b:
        yield b


def _url(b) -> str:
    return f"mqtt://{b.host}:{b.port}"


def _retained(b, *filters) -> dict[str, bytes]:
    c = mqtt.connect(mqtt.BrokerURL(b.host, b.port))
    try:
        return mqtt.collect_retained(c, *filters)
    finally:
        mqtt.disconnect(c)


def _file(tmp_path, name: str, size: int) -> bytes:
    data = os.urandom(size)
    (tmp_path / name).write_bytes(data)
    return data


def _publish(b, channel: str, *args: str) -> int:
    return cli(["publish", "--broker", _url(b), "--channel", channel, "--key-file", "key", *args])


def _list(b, channel: str) -> list[dict]:
    payload = _retained(b, topics.channel_topic(channel))[topics.channel_topic(channel)]
    return manifest.decode_list(payload, KEY.encode(), f"channels/{channel}")[1]


def _reassembled(retained: dict[str, bytes], entry: dict) -> bytes:
    """The package from its retained chunks, each checked against the hash list."""
    hashes = retained[topics.chunk_topic(entry, None)]
    assert hashlib.sha256(hashes).hexdigest() == entry["chunks_sha256"]
    parts = [retained[topics.chunk_topic(entry, k)] for k in range(entry["chunks"])]
    for k, part in enumerate(parts):
        assert hashlib.sha256(part).digest() == hashes[32 * k : 32 * k + 32]
        assert len(part) == entry["chunk_size"] or k == entry["chunks"] - 1
    return b"".join(parts)


def test_a_package_larger_than_the_chunk_size_goes_out_as_chunks_the_device_module_accepts(
    limited, tmp_path, capsys
):
    big = _file(tmp_path, "big.bin", 300 * 1024 + 7)
    _file(tmp_path, "small.py", 100)
    assert _publish(limited, "c1", "--extra-src-files", "big.bin:data/big.bin", "small.py") == 0
    out = capsys.readouterr().out
    entries = {e.get("path", "wheel"): e for e in _list(limited, "c1")}
    e = entries["data/big.bin"]
    # 64K: the default fits the broker's 128K, said in its MQTT 5 CONNACK
    assert (e["chunk_size"], e["chunks"]) == (chunks.DEFAULT_CHUNK_SIZE, 5)
    assert "chunks of 64K bytes (the default; Maximum Packet Size" in out
    assert f"package data/big.bin: {len(big)} bytes in 5 chunks ->" in out
    retained = _retained(limited, "mpypi/packages/#")
    assert _reassembled(retained, e) == big
    assert topics.package_topic(e) not in retained  # chunks only, never the whole
    # A package no bigger than a chunk is one message, as before.
    assert "chunks" not in entries["small.py"]
    assert len(retained[topics.package_topic(entries["small.py"])]) == 100


def test_the_chunk_size_is_lowered_to_fit_a_broker_that_takes_less_than_64k(tmp_path, capsys):
    with Mosquitto(tmp_path / "b", extra_config="max_packet_size 40000") as b:
        big = _file(tmp_path, "big.bin", 100_000)
        assert _publish(b, "c2", "--extra-src-files", "big.bin") == 0
        e = next(e for e in _list(b, "c2") if e.get("path") == "big.bin")
        assert e["chunk_size"] == 38 * 1024 and e["chunks"] == 3
        assert "chunks of 38K bytes (to fit the broker's limit of 40000 bytes)" in (
            capsys.readouterr().out
        )
        assert _reassembled(_retained(b, "mpypi/packages/#"), e) == big


def test_chunk_size_flag_sets_the_size_and_off_publishes_one_message(broker, tmp_path):
    big = _file(tmp_path, "big.bin", 40_000)
    assert _publish(broker, "c3", "--chunk-size", "16K", "--extra-src-files", "big.bin") == 0
    e = next(e for e in _list(broker, "c3") if e.get("path") == "big.bin")
    assert (e["chunk_size"], e["chunks"]) == (16384, 3)
    assert _reassembled(_retained(broker, "mpypi/packages/src/big.bin/#"), e) == big
    big = _file(tmp_path, "big2.bin", 100_000)  # over 64K: chunked but for `off`
    assert _publish(broker, "c3", "--chunk-size", "off", "--extra-src-files", "big2.bin") == 0
    e = next(e for e in _list(broker, "c3") if e.get("path") == "big2.bin")
    assert "chunks" not in e
    assert _retained(broker, topics.package_topic(e))[topics.package_topic(e)] == big


@pytest.mark.parametrize(
    "flag, said",
    [
        ("off", "package refused.bin: a 307"),
        ("200K", "chunk 0 of 2 of refused.bin: a 204"),
    ],
)
def test_a_message_larger_than_the_broker_takes_is_refused_before_anything_is_published(
    limited, tmp_path, capsys, state_dir, flag, said
):
    _file(tmp_path, "big.bin", 300 * 1024)
    _file(tmp_path, "small.py", 10)
    channel = f"refused-{flag}"
    args = [
        "--chunk-size",
        flag,
        "--extra-src-files",
        "small.py:refused.py",
        "big.bin:refused.bin",
    ]
    assert _publish(limited, channel, *args) == 1
    err = capsys.readouterr().err
    assert said in err, err
    assert f"is larger than the broker at {_url(limited)} takes, {LIMIT} bytes" in err
    assert "(Maximum Packet Size in the broker's MQTT 5 CONNACK)" in err
    assert "nothing was published: publish with a smaller --chunk-size, e.g. " in err
    assert "--chunk-size 64K" in err and "Traceback" not in err
    # Nothing: not the small package published first, not the list, no seq used.
    retained = _retained(limited, "mpypi/#")
    assert not [t for t in retained if "refused" in t], retained
    assert topics.channel_topic(channel) not in retained
    assert not (state_dir / "seq.json").exists()


@pytest.mark.parametrize("text", ["512", "17M", "abc", "-1", "64Q"])
def test_a_bad_chunk_size_is_refused_before_anything_is_built(broker, capsys, text):
    assert _publish(broker, "c4", "--chunk-size", text) == 1
    err = capsys.readouterr().err
    assert f"--chunk-size {text!r}: from 1K to 16M" in err and "0 or off" in err
    assert topics.channel_topic("c4") not in _retained(broker, "mpypi/channels/#")


def _payload_for(topic: str, total: int, mqtt5: bool, expiry: bool) -> int:
    """The payload size that makes a PUBLISH of `total` bytes, as packet_size counts."""
    n = total
    while mqtt.packet_size(topic, n, mqtt5, expiry) > total:
        n -= 1
    assert mqtt.packet_size(topic, n, mqtt5, expiry) == total
    return n


def test_packet_size_is_what_mosquitto_counts_at_its_limit(limited):
    # The check counts the whole packet, as MQTT 5 defines Maximum Packet Size;
    # Mosquitto 2.0 leaves out the remaining length's own 1-4 bytes, so it takes up
    # to 3 bytes more (its edge: 1 + remaining length = the limit). A message the
    # check lets through is taken; one 4 bytes over is refused, by either count.
    topic = "mpypi/packages/src/edge.bin/" + "0" * 64
    url = mqtt.BrokerURL(limited.host, limited.port)
    for mqtt5, expiry in ((True, None), (True, 60), (False, None)):
        c = mqtt.connect(url, mqtt5=mqtt5)
        try:
            assert mqtt.broker_limits(c) == mqtt.BrokerLimits(mqtt5, LIMIT if mqtt5 else None)
            fits = _payload_for(topic, LIMIT, mqtt5, bool(expiry))
            mqtt.publish_retained(c, topic, b"x" * fits, expiry_s=expiry)
            over = _payload_for(topic, LIMIT + 4, mqtt5, bool(expiry))
            with pytest.raises(mqtt.HungUp) as hung:
                mqtt.publish_retained(c, topic, b"x" * over, expiry_s=expiry, timeout=10)
            assert hung.value.reason == ("Packet too large" if mqtt5 else "Unspecified error")
        finally:
            mqtt.disconnect(c)
    c = mqtt.connect(url)
    mqtt.publish_retained(c, topic, b"")
    mqtt.disconnect(c)
    # The remaining length's own size grows at 128 and 16384 bytes ("t": 5 bytes
    # of topic and packet id before the payload).
    assert [mqtt.packet_size("t", n, False) for n in (0, 122, 123)] == [7, 129, 131]
    assert [mqtt.packet_size("t", n, False) for n in (16378, 16379)] == [16386, 16388]


def test_a_broker_that_hangs_up_without_saying_its_limit_is_said_clearly_and_no_list_goes_out(
    limited, tmp_path, state_dir
):
    # A 3.1.1 client: Mosquitto says nothing of its limit, it closes the connection.
    big = _file(tmp_path, "big.bin", 200_000)
    package = publish.src_package(tmp_path / "big.bin", "data/hang.bin")
    client = mqtt.connect(mqtt.BrokerURL(limited.host, limited.port))
    try:
        with pytest.raises(MpyBloxError) as refused:
            publish.publish_update(
                mqtt.BrokerURL(limited.host, limited.port),
                [package],
                channel="hang",
                key=KEY.encode(),
                chunk_size=0,
                client=client,
                log=lambda line: None,
            )
    finally:
        mqtt.disconnect(client)
    said = str(refused.value)
    assert "closed the connection while taking package data/hang.bin" in said
    assert f"a message of {len(big)} bytes" in said
    assert "the list was not published: no device sees this release" in said
    assert "speaks only MQTT 3.1.1" in said and "--chunk-size 64K" in said
    assert topics.channel_topic("hang") not in _retained(limited, "mpypi/channels/#")
    assert not _retained(limited, "mpypi/packages/src/data/hang.bin/#")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    if not amqtt_installed():
        pytest.skip("amqtt is not installed")
    with EmbeddedBroker(tmp_path_factory.mktemp("amqtt"), max_packet_size=LIMIT) as b:
        yield b


def test_the_embedded_broker_speaks_3_1_1_so_the_default_chunks_fit_and_a_hang_up_is_said(
    embedded, tmp_path, capsys
):
    big = _file(tmp_path, "big.bin", 300 * 1024)
    assert _publish(embedded, "e1", "--extra-src-files", "big.bin") == 0
    assert "(the default; the broker speaks only MQTT 3.1.1" in capsys.readouterr().out
    e = next(e for e in _list(embedded, "e1") if e.get("path") == "big.bin")
    assert e["chunk_size"] == chunks.DEFAULT_CHUNK_SIZE
    assert _reassembled(_retained(embedded, "mpypi/packages/#"), e) == big
    # One message too large for it: it hangs up; the list is never published.
    _file(tmp_path, "big2.bin", 300 * 1024)
    args = ["--chunk-size", "off", "--extra-src-files", "big2.bin"]
    assert _publish(embedded, "e2", *args) == 1
    err = capsys.readouterr().err
    assert "closed the connection" in err and "while taking package big2.bin" in err, err
    assert "--chunk-size 64K" in err and "Traceback" not in err
    assert topics.channel_topic("e2") not in _retained(embedded, "mpypi/channels/#")


def test_expire_is_refused_on_a_3_1_1_broker_before_anything_is_published(
    embedded, tmp_path, capsys
):
    _file(tmp_path, "x.py", 10)
    assert _publish(embedded, "e3", "--expire", "30d", "--extra-src-files", "x.py") == 1
    err = capsys.readouterr().err
    assert "--expire: the broker at" in err and "speaks only MQTT 3.1.1" in err
    assert "nothing was published" in err and "mpy-blox prune" in err
    assert topics.channel_topic("e3") not in _retained(embedded, "mpypi/channels/#")
    assert not _retained(embedded, "mpypi/packages/src/x.py/#")


@pytest.mark.parametrize("text", ["30x", "0d", "d", "99999999w"])
def test_a_bad_expire_is_refused(broker, capsys, text):
    assert _publish(broker, "c5", "--expire", text) == 1
    assert f"--expire {text!r}" in capsys.readouterr().err


def _expiry_of(b, topic: str) -> int | None:
    """The Message Expiry Interval the broker delivers a retained message with."""
    got: dict = {}
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on_message(c, userdata, msg):
        got["expiry"] = getattr(msg.properties, "MessageExpiryInterval", None)
        done.set()

    c.on_message = on_message
    c.on_connect = lambda c, *a: c.subscribe(topic, 1)
    c.connect(b.host, b.port)
    c.loop_start()
    try:
        assert done.wait(10), f"nothing retained on {topic}"
        return got["expiry"]
    finally:
        c.disconnect()
        c.loop_stop()


def test_expire_puts_a_message_expiry_on_packages_and_chunks_and_they_go(broker, tmp_path):
    _file(tmp_path, "big.bin", 70_000)
    _file(tmp_path, "x.py", 10)
    args = ["--expire", "3s", "--extra-src-files", "big.bin:exp/big.bin", "x.py:exp/x.py"]
    assert _publish(broker, "exp", *args) == 0
    entries = [e for e in _list(broker, "exp") if e.get("path", "").startswith("exp/")]
    big = next(e for e in entries if e["path"] == "exp/big.bin")
    package_topics = [topics.package_topic(e) for e in entries if "chunks" not in e] + [
        topics.chunk_topic(big, k) for k in (0, 1, None)
    ]
    for topic in package_topics:
        assert _expiry_of(broker, topic) in (1, 2, 3), topic
    assert _expiry_of(broker, topics.channel_topic("exp")) is None  # the list: no expiry
    time.sleep(3.5)
    assert not _retained(broker, "mpypi/packages/src/exp/#")
    assert _list(broker, "exp")  # still there: prune or the next release replaces it


def test_json_names_the_chunks_and_the_progress_goes_to_stderr(limited, tmp_path, capsys):
    import json

    _file(tmp_path, "j.bin", 70_000)
    assert _publish(limited, "j", "--json", "--extra-src-files", "j.bin:out/j.bin") == 0
    got = capsys.readouterr()
    doc = json.loads(got.out)
    [e] = [e for e in doc["packages"] if e.get("path") == "out/j.bin"]
    assert (e["chunk_size"], e["chunks"]) == (65536, 2) and doc["ok"] is True
    assert "package out/j.bin: 70000 bytes in 2 chunks" in got.err


def test_packages_that_expire_before_the_list_are_warned_of(broker_factory, tmp_path, capsys):
    # A broker of its own: "no warning" must not hang on what other tests left retained
    # on the session broker (an unsigned list on a device's cmd topic is warned of too).
    broker = broker_factory()
    _file(tmp_path, "w.py", 10)
    args = ["--expire", "1d", "--expires", "30d", "--extra-src-files", "w.py:warn/w.py"]
    assert _publish(broker, "warn", *args) == 0
    assert (
        "warning: the packages leave the broker (--expire) before devices stop taking the "
        "list (--expires)" in capsys.readouterr().out
    )
    assert _publish(broker, "warn", "--expire", "30d", "--expires", "1d") == 0
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("size, chunked", [(1023, None), (1024, None), (1025, 2), (4097, 5)])
def test_a_package_of_exactly_the_chunk_size_is_one_message_one_byte_more_is_chunks(
    tmp_path, size, chunked
):
    (tmp_path / "edge.bin").write_bytes(os.urandom(size))
    c = fit.cut(publish.src_package(tmp_path / "edge.bin"), 1024)
    assert c.entry.get("chunks") == chunked
    assert len(c.messages) == (chunked + 1 if chunked else 1)  # chunks and their hash list
    if chunked:
        assert [len(m.payload) for m in c.messages[:-1]][-1] == size - 1024 * (chunked - 1)
        assert c.messages[-1].topic.endswith("/hashes") and len(c.messages[-1].payload) == (
            32 * chunked
        )


def test_a_3_1_1_broker_that_hangs_up_on_an_mqtt_5_connect_is_spoken_to_in_3_1_1():
    # A scripted broker (as RabbitMQ's plugin before 3.13 does): it closes the
    # connection on an MQTT 5 CONNECT and answers a 3.1.1 one.
    import socket

    levels = []
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        for _ in range(2):
            conn, _ = server.accept()
            data = conn.recv(256)  # a CONNECT: 0x10, length, "\0\4MQTT", level
            levels.append(data[8])
            if data[8] == 4:
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK: accepted
                conn.recv(256)  # until the client's DISCONNECT
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    c = mqtt.connect(mqtt.BrokerURL("127.0.0.1", server.getsockname()[1]), mqtt5=True)
    try:
        assert mqtt.broker_limits(c) == mqtt.BrokerLimits(False, None)
    finally:
        mqtt.disconnect(c)
        thread.join(5)
        server.close()
    assert levels == [5, 4]
